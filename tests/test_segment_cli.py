"""``vps-segment`` end to end with a tiny random checkpoint (no real weights needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import av
import numpy as np
import pytest

import vps  # noqa: F401
from eval.readers import find_gt_clips, match_predictions
from test_video_io import VFR_TIMES, frame_times, leftovers, make_frame_folder, make_vfr_video, make_video
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


@pytest.mark.parametrize("decoder", ["av", "decord"])
def test_variable_frame_rate_keeps_timestamps(tmp_path, capsys, checkpoint, decoder):
    video = make_vfr_video(tmp_path / "vfr.mp4")  # 8 frames over 1.0 s, unevenly spaced
    code, _, err = segment(capsys, video, "--out", tmp_path / "m.mp4", "--overlay", "--decoder", decoder,
                           *light(checkpoint))
    assert code == 0, err
    for name in ("m.mp4", "m_overlay.mp4"):
        assert frame_times(tmp_path / name) == pytest.approx(VFR_TIMES, abs=1e-3), name
        with av.open(str(tmp_path / name)) as container:
            assert 1.0 < container.duration / av.time_base < 1.1, name  # not 8 frames at the average rate (0.52 s)


def test_clip_folder_is_one_clip(tmp_path, capsys, checkpoint):
    clip = make_frame_folder(tmp_path / "cvc" / "07" / "frames", ["1.png", "2.png"]).parent
    make_frame_folder(clip / "masks", ["1.png", "2.png"])
    code, _, err = segment(capsys, clip, "--png-dir", tmp_path / "png", *light(checkpoint))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["07"]
    code, _, err = segment(capsys, tmp_path / "cvc", "--png-dir", tmp_path / "png2", *light(checkpoint))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "png2").iterdir()) == ["07"]
    assert sorted(p.name for p in (tmp_path / "png2" / "07").iterdir()) == ["1.png", "2.png"]


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_stills_keep_each_image_size(tmp_path, capsys, checkpoint):
    sizes = {"a": (64, 48), "b": (90, 40), "c": (33, 71)}  # stem: (width, height)
    for stem, (width, height) in sizes.items():
        write_image(tmp_path / "shots" / f"{stem}.png", width, height)
    code, stdout, err = segment(capsys, tmp_path / "shots", "--stills", "--png-dir", tmp_path / "png",
                                "--batch-size", 2, *light(checkpoint))
    assert code == 0, err
    assert "3 images" in stdout
    maps = read_pngs(tmp_path / "png" / "shots")
    assert {stem: (m.shape[1], m.shape[0]) for stem, m in maps.items()} == sizes
    assert all(m.dtype == np.uint8 for m in maps.values())
    assert leftovers(tmp_path) == []


def test_stills_kvasir_root_in_the_layout_vps_eval_reads(tmp_path, capsys, checkpoint):
    root = tmp_path / "Kvasir"
    for stem, width in (("cju0", 70), ("cju1", 52)):
        write_image(root / "images" / f"{stem}.jpg", width, 40)
        write_image(root / "masks" / f"{stem}.jpg", width, 40)
    code, _, err = segment(capsys, root, "--stills", "--png-dir", tmp_path / "png", *light(checkpoint))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["Kvasir"]  # images/ only, named after root
    clips = find_gt_clips(root / "masks")  # vps-eval --protocol image --gt-root Kvasir/masks --pred-root png/Kvasir
    assert match_predictions(clips, tmp_path / "png" / "Kvasir") == []
    assert cv2.imread(str(clips[0].predictions[0]), cv2.IMREAD_UNCHANGED).shape == (40, 70)


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
    ("mixed_sizes", "mixed sizes; for images of different sizes use --stills"),
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
    assert_error(code, err, f"cannot write {tmp_path / 'file' / 'm.mp4'}: {tmp_path / 'file'} is a file, not a folder")
    code, _, err = segment(capsys, video, "--png-dir", tmp_path / "file" / "png", *light(checkpoint))
    assert_error(code, err, f"{tmp_path / 'file'} is a file, not a folder")
    assert (tmp_path / "file").read_text() == "a file, not a folder"


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


@pytest.mark.parametrize("options, pattern", [
    (["--out", "m.mp4", "--device", "gpu"], "--device gpu: expected auto, cpu, cuda or cuda:N"),
    (["--out", "m.mp4", "--threads", "-2"], "--threads must be at least 1"),
    (["--out", "m.mp4", "--fps", "0"], "--fps must be a positive number"),
    (["--out", "m.mp4", "--model", "big"], "argument --model: invalid choice: 'big'"),
    (["--out", "m.mp4", "--batch-size", "two"], "argument --batch-size: invalid int value: 'two'"),
    (["--out", "m.mp4", "--stills"], "--stills writes probability maps only"),
    (["--png-dir", "P", "--stills", "--smooth", "3"], "--smooth works across the frames of a video"),
    (["--out", "m.mp4", "--embedding-prompt"], "the embedding prompt head adds to AutoSAM's dense prompt"),
])
def test_option_errors_are_one_line(tmp_path, capsys, checkpoint, monkeypatch, options, pattern):
    folder = make_frame_folder(tmp_path / "frames", ["1.png", "2.png"])
    monkeypatch.chdir(tmp_path)
    code, _, err = segment(capsys, folder, *light(checkpoint), *options)
    assert_error(code, err, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


def test_stills_refuse_videos(tmp_path, capsys, checkpoint):
    video = make_video(tmp_path / "clip.mp4", count=2)
    code, _, err = segment(capsys, video, "--stills", "--png-dir", tmp_path / "png", *light(checkpoint))
    assert_error(code, err, "--stills takes folders of images, not videos")


def nothing_new(root: Path, before: set) -> bool:
    return {p for p in root.rglob("*")} == before


def test_two_outputs_on_one_path_are_refused(tmp_path, capsys, checkpoint):
    video = make_video(tmp_path / "clip.mp4", count=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    before = set(tmp_path.rglob("*"))
    for options in (["--out", tmp_path / "out" / "x.mp4", "--overlay", tmp_path / "out" / "x.mp4"],
                    ["--out", tmp_path / "out" / "x.mp4", "--overlay", tmp_path / "link" / "x.mp4"],
                    ["--out", tmp_path / "out" / "clip" / "x.mp4", "--png-dir", tmp_path / "link" / ".." / "out"]):
        code, _, err = segment(capsys, video, *options, "--overwrite", *light(checkpoint))
        assert code == 2 and err.count("\n") == 1 and "vps-segment: error: " in err, err
        assert "two outputs on one path" in err or "is inside the PNG folder" in err, err
        assert nothing_new(tmp_path, before)


@pytest.mark.parametrize("case", ["video", "video_symlink", "png_dir_is_parent", "png_dir_inside",
                                  "video_in_frame_folder", "clip_layout_parent", "png_folder_holds_video"])
def test_outputs_never_replace_inputs(tmp_path, capsys, checkpoint, case):
    video = make_video(tmp_path / "in.mp4", count=2)
    (tmp_path / "alias.mp4").symlink_to(video)
    (tmp_path / "clips").mkdir()
    held = make_video(tmp_path / "clips" / "clips.mp4", count=2)
    data = tmp_path / "data"
    make_frame_folder(data / "clipA", ["1.png", "2.png"])
    make_frame_folder(data / "clipB" / "frames", ["1.png"])
    make_frame_folder(data / "clipB" / "masks", ["1.png"])
    argv = {
        "video": [video, "--out", video],
        "video_symlink": [tmp_path / "alias.mp4", "--overlay", video],
        "png_dir_is_parent": [data / "clipA", "--png-dir", data],
        "png_dir_inside": [data / "clipA", "--png-dir", data / "clipA"],
        "video_in_frame_folder": [data / "clipA", "--out", data / "clipA" / "m.mp4"],
        "clip_layout_parent": [data / "clipB", "--png-dir", data],  # would replace data/clipB: frames and masks
        "png_folder_holds_video": [held, "--png-dir", tmp_path],  # the PNG folder tmp_path/clips holds the input
    }[case]
    before = sorted(tmp_path.rglob("*"))
    contents = {p: p.read_bytes() for p in before if p.is_file()}
    code, _, err = segment(capsys, *argv, "--overwrite", *light(checkpoint))
    assert_error(code, err, "outputs never replace inputs")
    assert sorted(tmp_path.rglob("*")) == before
    assert {p: p.read_bytes() for p in before if p.is_file()} == contents


def test_logs_off_a_terminal_have_no_bars(tmp_path, checkpoint):
    good = make_video(tmp_path / "good.mp4", count=12)
    bad = truncated_video(tmp_path)  # decoding fails part way
    log = tmp_path / "log.txt"
    with open(log, "w") as stderr:
        argv = [good, bad, "--out-dir", tmp_path / "out", "--model", "light", "--checkpoint", checkpoint,
                "--batch-size", 2]  # no --quiet
        result = subprocess.run([sys.executable, "-m", "vps.cli.segment", *map(str, argv)],
                                stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "TERM": "xterm"})
    text = log.read_text()
    assert result.returncode == 2
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert "vps-segment: good: 12/12 (100 %)" in "\n".join(lines)  # periodic one-line summaries
    assert 3 <= len([line for line in lines if line.startswith("vps-segment: good: ")]) <= 11
    assert lines[-1].startswith("vps-segment: error: ") and "decoding failed at frame" in lines[-1]
    assert all(line.startswith("vps-segment: ") for line in lines if "vps-segment: " in line), text  # none glued


def test_interrupt_leaves_no_partial_files(tmp_path, capsys, checkpoint, monkeypatch):
    from vps.inference import SegmentationEngine

    calls = []
    original = SegmentationEngine.probabilities  # what vps.Segmenter runs the model through

    def interrupted(self, frames):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, frames)

    monkeypatch.setattr(SegmentationEngine, "probabilities", interrupted)
    video = make_video(tmp_path / "clip.mp4", count=6)
    code, _, err = segment(capsys, video, "--out", tmp_path / "out" / "m.mp4", "--png-dir", tmp_path / "out",
                           "--overlay", "--batch-size", 2, *light(checkpoint))
    assert code == 130 and "interrupted" in err
    assert [p for p in (tmp_path / "out").rglob("*")] == []
