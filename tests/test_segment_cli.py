"""``vps-segment`` end to end with a tiny random checkpoint (no real weights needed)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

import vps  # noqa: F401
from test_video_io import leftovers, make_frame_folder, make_video
from vps.cli.segment import main
from vps.video import probe_video, read_mask_video


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from conftest import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")


def segment(capsys, *argv) -> tuple:
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def light(checkpoint) -> list:
    return ["--model", "light", "--checkpoint", checkpoint, "--quiet"]


def read_pngs(folder: Path) -> dict:
    return {p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))}


def test_video_to_mask_png_and_overlay(tmp_path, capsys, checkpoint):
    video = make_video(tmp_path / "clip.mp4", count=7, width=96, height=72, fps=Fraction(30000, 1001))
    out = tmp_path / "out"
    code, stdout, err = segment(capsys, video, "--out", out / "masks.mp4", "--png-dir", out / "png",
                                "--overlay", out / "overlay.mp4", "--batch-size", 3, *light(checkpoint))
    assert code == 0, err
    assert "7 frames" in stdout and "frames/s" in stdout and str(out / "masks.mp4") in stdout
    source = probe_video(video)
    for name in ("masks.mp4", "overlay.mp4"):
        info = probe_video(out / name)
        assert (info.width, info.height, info.fps, info.num_frames) == (96, 72, source.fps, 7)
    pngs = read_pngs(out / "png" / "clip")
    assert list(pngs) == [f"{i:06d}" for i in range(7)]
    maps = np.stack(list(pngs.values()))
    assert maps.shape == (7, 72, 96) and maps.dtype == np.uint8
    masks = read_mask_video(out / "masks.mp4")
    assert set(np.unique(masks)) <= {0, 255}
    assert np.array_equal(masks, np.where(maps >= 128, 255, 0))
    assert leftovers(tmp_path) == []


def test_frame_folder_keeps_frame_names(tmp_path, capsys, checkpoint):
    folder = make_frame_folder(tmp_path / "case7", ["case7_10.png", "case7_2.png", "case7_1.png"])
    code, _, err = segment(capsys, folder, "--png-dir", tmp_path / "png", "--out", tmp_path / "m.mp4",
                           "--fps", 30, "--decoder", "av", *light(checkpoint))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "png" / "case7").iterdir()) == \
        ["case7_1.png", "case7_10.png", "case7_2.png"]
    info = probe_video(tmp_path / "m.mp4")
    assert (info.num_frames, info.fps, info.width) == (3, 30, 64)


def test_batch_size_and_decoder_do_not_change_results(tmp_path, capsys, checkpoint):
    video = make_video(tmp_path / "clip.mp4", count=5)
    for name, options in {"b1": ["--batch-size", 1], "b4": ["--batch-size", 4, "--decoder", "av"]}.items():
        code, _, err = segment(capsys, video, "--png-dir", tmp_path / name, *options, *light(checkpoint))
        assert code == 0, err
    b1, b4 = read_pngs(tmp_path / "b1" / "clip"), read_pngs(tmp_path / "b4" / "clip")
    assert list(b1) == list(b4)
    assert all(np.abs(b1[k].astype(int) - b4[k]).max() <= 3 for k in b1)


def test_many_inputs_and_sunseg_root_with_sharding(tmp_path, capsys, checkpoint, monkeypatch):
    a = make_video(tmp_path / "a.mp4", count=3)
    b = make_video(tmp_path / "b.avi", count=4)
    root = tmp_path / "SUN-SEG"
    make_frame_folder(root / "Frame" / "case2", ["case2_1.jpg", "case2_2.jpg"])
    make_frame_folder(root / "Frame" / "case10", ["case10_1.jpg"])
    expected = {0: ["a", "case2"], 1: ["a", "b", "case10", "case2"]}  # clips a, b, case2, case10 by rank
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        code, stdout, err = segment(capsys, a, b, root, "--out-dir", tmp_path / "out", "--overlay",
                                    *light(checkpoint))
        assert code == 0, err
        assert f"[rank {rank}/2]" in stdout and "2 clip(s)" in stdout
        written = sorted(p.name for p in (tmp_path / "out").glob("*_mask.mp4"))
        assert written == [f"{case}_mask.mp4" for case in expected[rank]]
    assert probe_video(tmp_path / "out" / "b_mask.mp4").num_frames == 4
    assert probe_video(tmp_path / "out" / "case2_overlay.mp4").num_frames == 2


def test_smoothing_runs(tmp_path, capsys, checkpoint):
    video = make_video(tmp_path / "clip.mp4", count=4)
    code, _, err = segment(capsys, video, "--png-dir", tmp_path / "png", "--smooth", 3, *light(checkpoint))
    assert code == 0, err
    assert len(list((tmp_path / "png" / "clip").glob("*.png"))) == 4


def test_autosam_with_litemedsam(tmp_path, capsys, checkpoint):
    video = make_video(tmp_path / "clip.mp4", count=2)
    code, stdout, err = segment(capsys, video, "--out", tmp_path / "m.mp4", "--model", "autosam",
                                "--checkpoint", checkpoint, "--batch-size", 2, "--precision", "bf16", "--quiet")
    assert code == 0, err
    assert "bf16" in stdout
    assert read_mask_video(tmp_path / "m.mp4").shape == (2, 48, 64)


# ---- errors: one line, exit status 2, no output ----------------------------------------------


def assert_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vps-segment: error: "), err
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in err


def truncated_video(tmp_path) -> Path:
    video = make_video(tmp_path / "full.mp4", count=40, width=96, height=72, options={"crf": "10", "g": "5"},
                       container_options={"movflags": "faststart"})
    path = tmp_path / "in" / "truncated.mp4"
    path.parent.mkdir()
    path.write_bytes(video.read_bytes()[: int(video.stat().st_size * 0.6)])
    return path


@pytest.mark.parametrize("case, pattern", [
    ("missing", "input not found"),
    ("not_video", "not a readable video"),
    ("truncated", "decoding failed at frame"),
    ("mixed_sizes", "mixed sizes"),
    ("non_image", "not an image: readme.txt"),
])
def test_bad_inputs(tmp_path, capsys, checkpoint, case, pattern):
    source = tmp_path / "in" / "x.mp4"
    if case == "not_video":
        source.parent.mkdir()
        source.write_text("this is not a video\n" * 20)
    elif case == "truncated":
        source = truncated_video(tmp_path)
    elif case == "mixed_sizes":
        source = make_frame_folder(tmp_path / "in" / "frames", ["1.png", "2.png", "3.png"])
        cv2.imwrite(str(source / "4.png"), np.zeros((30, 40, 3), np.uint8))
    elif case == "non_image":
        source = make_frame_folder(tmp_path / "in" / "frames", ["1.png"])
        (source / "readme.txt").write_text("hi")
    out = tmp_path / "out"
    code, _, err = segment(capsys, source, "--out", out / "m.mp4", "--png-dir", out / "png", "--overlay",
                           "--batch-size", 2, *light(checkpoint))
    assert_error(code, err, pattern)
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []


def test_output_exists_needs_overwrite(tmp_path, capsys, checkpoint):
    video = make_video(tmp_path / "clip.mp4", count=2)
    (tmp_path / "m.mp4").write_bytes(b"old")
    code, _, err = segment(capsys, video, "--out", tmp_path / "m.mp4", *light(checkpoint))
    assert_error(code, err, "output exists")
    assert (tmp_path / "m.mp4").read_bytes() == b"old"
    code, _, err = segment(capsys, video, "--out", tmp_path / "m.mp4", "--overwrite", *light(checkpoint))
    assert code == 0, err
    assert probe_video(tmp_path / "m.mp4").num_frames == 2


def test_output_cannot_be_written(tmp_path, capsys, checkpoint):
    video = make_video(tmp_path / "clip.mp4", count=2)
    (tmp_path / "file").write_text("a file, not a folder")
    code, _, err = segment(capsys, video, "--out", tmp_path / "file" / "m.mp4", *light(checkpoint))
    assert_error(code, err, "cannot write")


def test_usage_errors(tmp_path, capsys, checkpoint, monkeypatch):
    video = make_video(tmp_path / "clip.mp4", count=2)
    code, _, err = segment(capsys, video, *light(checkpoint))
    assert_error(code, err, "nothing to write")
    code, _, err = segment(capsys, video, video, "--out", tmp_path / "m.mp4", *light(checkpoint))
    assert_error(code, err, "use --out-dir")
    code, _, err = segment(capsys, video, "--out", tmp_path / "m.mp4", "--precision", "fp16", "--device", "cpu",
                           *light(checkpoint))
    assert_error(code, err, "fp16 needs a CUDA device")
    code, _, err = segment(capsys, video, "--out", tmp_path / "m.mp4", "--model", "light",
                           "--checkpoint", tmp_path / "nope.pt")
    assert_error(code, err, "checkpoint not found")
    import vps.modeling

    monkeypatch.setattr(vps.modeling, "default_checkpoint_path", lambda: tmp_path / "weights" / "default.pt")
    code, _, err = segment(capsys, video, "--out", tmp_path / "m.mp4")
    assert_error(code, err, "is not installed; pass --checkpoint")
    assert list(tmp_path.glob("*.mp4")) == [video]


def test_interrupt_leaves_no_partial_files(tmp_path, capsys, checkpoint, monkeypatch):
    from vps.inference import SegmentationEngine

    calls = []
    original = SegmentationEngine.__call__

    def interrupted(self, frames):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, frames)

    monkeypatch.setattr(SegmentationEngine, "__call__", interrupted)
    video = make_video(tmp_path / "clip.mp4", count=6)
    code, _, err = segment(capsys, video, "--out", tmp_path / "out" / "m.mp4", "--png-dir", tmp_path / "out",
                           "--overlay", "--batch-size", 2, *light(checkpoint))
    assert code == 130 and "interrupted" in err
    assert [p for p in (tmp_path / "out").rglob("*")] == []
