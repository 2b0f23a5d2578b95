"""``vps.Segmenter``, the Python front door, with tiny random models (the built-in model: test_builtin_model.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import vps
from conftest import make_tiny_autosam, make_tiny_light, save_random_checkpoint
from test_video_io import make_frame_folder, make_video, moving_disc
from vps.inference import ExponentialSmoother, per_frame_loop
from vps.modeling import CheckpointError
from vps.video import Clip, InputError, open_clip

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")


@pytest.fixture(scope="module")
def light(checkpoint) -> vps.Segmenter:
    """The light model (random g + h) loaded from a checkpoint through the public constructor, fp32."""
    return vps.Segmenter(checkpoint=checkpoint, model="light", device="cpu", precision="fp32")


def decoded_frames(video) -> np.ndarray:
    """Every frame of a video as N x H x W x 3 uint8 RGB, decoded by PyAV on its own."""
    import av

    with av.open(str(video)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


# ---- predict ----------------------------------------------------------------------------------


def test_predict_matches_the_plain_per_frame_loop(light, checkpoint):
    frames = moving_disc(5, 96, 72)
    probabilities = light.predict(frames)
    assert probabilities.shape == (5, 72, 96) and probabilities.dtype == np.float32
    assert 0 <= probabilities.min() and probabilities.max() <= 1 and probabilities.std() > 0
    reference = per_frame_loop(vps.api.load_model(checkpoint, "light"), torch.from_numpy(frames)).numpy()
    assert np.abs(probabilities * 255 - reference).max() <= 1.5  # reference: 8-bit maps of the unbatched model


def test_predict_one_frame_gives_one_map(light):
    frames = moving_disc(3, 96, 72)
    one = light.predict(frames[1])
    assert one.shape == (72, 96) and one.dtype == np.float32
    np.testing.assert_allclose(one, light.predict(frames)[1], atol=1e-4)


@pytest.mark.parametrize("make_model, precision, tolerance", [
    (make_tiny_light, "fp32", 1e-5), (make_tiny_light, "bf16", 1e-3), (make_tiny_autosam, "fp32", 1e-5)])
def test_predict_does_not_depend_on_the_batch_size(make_model, precision, tolerance):
    frames = moving_disc(5, 80, 60)
    segmenter = vps.Segmenter(model=make_model(), device="cpu", precision=precision, batch_size=4)
    by_one, by_four = segmenter.predict(frames, batch_size=1), segmenter.predict(frames)  # 4 + 1
    assert np.abs(by_one - by_four).max() <= tolerance
    assert np.abs(by_one[0] - by_one[-1]).max() > 5 * tolerance  # the frames (a moving disc) do differ


def test_predict_takes_any_frame_size_torch_and_strided_frames(light):
    frames = moving_disc(2, 71, 33)
    probabilities = light.predict(frames)
    assert probabilities.shape == (2, 33, 71)
    np.testing.assert_allclose(light.predict(torch.from_numpy(frames)), probabilities, atol=1e-6)
    bgr = np.ascontiguousarray(frames[..., ::-1])
    np.testing.assert_allclose(light.predict(bgr[..., ::-1]), probabilities, atol=1e-6)  # negative strides
    assert light.predict(frames[:0]).shape == (0, 33, 71)


def test_predict_a_list_of_frames_of_different_sizes(light):
    images = [moving_disc(1, width, height)[0] for width, height in ((96, 72), (40, 50), (64, 64))]
    maps = light.predict(images, batch_size=2)
    assert [m.shape for m in maps] == [(72, 96), (50, 40), (64, 64)]
    for image, got in zip(images, maps):
        assert got.dtype == np.float32
        assert np.abs(got - light.predict(image)).max() < 2 / 255  # the same as one frame at its own size


# ---- segment_video ----------------------------------------------------------------------------


def test_segment_video_streams_a_pyav_video(tmp_path, light):
    video = make_video(tmp_path / "clip.mp4", count=7, width=96, height=72)
    results = list(light.segment_video(video, batch_size=3))
    assert [index for index, _, _ in results] == list(range(7))
    frames = np.stack([frame for _, frame, _ in results])
    probabilities = np.stack([probability for _, _, probability in results])
    assert np.array_equal(frames, decoded_frames(video))
    assert probabilities.shape == (7, 72, 96) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, light.predict(frames), atol=1e-4)


def test_segment_video_reads_a_frame_folder_in_natural_order(tmp_path, light):
    folder = make_frame_folder(tmp_path / "case1", ["10.png", "2.png", "1.png"], width=64, height=48)
    results = list(light.segment_video(folder))
    frames = np.stack([frame for _, frame, _ in results])
    expected = [cv2.cvtColor(cv2.imread(str(folder / name)), cv2.COLOR_BGR2RGB) for name in ("1.png", "2.png", "10.png")]
    assert [index for index, _, _ in results] == [0, 1, 2]
    assert np.array_equal(frames, np.stack(expected))
    np.testing.assert_allclose(np.stack([p for _, _, p in results]), light.predict(frames), atol=1e-4)


def test_segment_video_yields_before_the_video_is_done(tmp_path, checkpoint, monkeypatch):
    segmenter = vps.Segmenter(checkpoint=checkpoint, model="light", device="cpu", precision="fp32", batch_size=2)
    calls = []
    model_call = segmenter.engine.probabilities
    monkeypatch.setattr(segmenter.engine, "probabilities", lambda frames: calls.append(len(frames)) or model_call(frames))
    stream = segmenter.segment_video(make_video(tmp_path / "clip.mp4", count=12))
    assert next(stream)[0] == 0 and calls == [2]  # one batch of 2 frames run, not the whole clip
    stream.close()  # stops the reader thread


def test_segment_video_smoothing_is_per_video(tmp_path, light):
    video = make_video(tmp_path / "clip.mp4", count=6)
    raw = light.predict(decoded_frames(video))
    expected = ExponentialSmoother(3)(torch.from_numpy(raw)).numpy()
    first, second = light.segment_video(video, smooth=3, batch_size=4), light.segment_video(video, smooth=3)
    interleaved = [(a[2], b[2]) for a, b in zip(first, second)]  # two streams at once share no state
    for got in zip(*interleaved):
        np.testing.assert_allclose(np.stack(got), expected, atol=1e-4)
    assert np.abs(expected - raw).max() > 1e-3  # smoothing changed more than the tolerance


# ---- errors: exceptions with the CLI's messages ----------------------------------------------


@pytest.mark.parametrize("frames, message", [
    (np.zeros((2, 48, 64, 3), np.float32), "frames must be uint8 RGB (0-255), got float32; for floats in [0, 1] pass "
                                           "(frames * 255).round().astype(np.uint8)"),
    (torch.zeros(48, 64, 3, dtype=torch.int64), "frames must be uint8 RGB (0-255), got int64"),
    (np.zeros((48, 64), np.uint8), "frames must be one RGB frame (H, W, 3) or a batch (N, H, W, 3), got shape (48, 64)"),
    (np.zeros((2, 3, 48, 64), np.uint8), "got shape (2, 3, 48, 64) (channels first? put the 3 colour channels last)"),
    (np.zeros((48, 64, 4), np.uint8), "got shape (48, 64, 4)"),
    (np.zeros((2, 0, 64, 3), np.uint8), "got shape (2, 0, 64, 3)"),
    ([np.zeros((48, 64, 3), np.uint8), np.zeros((2, 48, 64, 3), np.uint8)],
     "frames[1]: a list holds single frames (H, W, 3), got shape (2, 48, 64, 3)"),
])
def test_bad_frames_are_value_errors(light, frames, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        light.predict(frames)


def test_bad_arguments_fail_before_loading(tmp_path, checkpoint, monkeypatch):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        vps.Segmenter(checkpoint=tmp_path / "nope.pt", device="cpu")
    with pytest.raises(ValueError, match="unknown model 'big'; expected autosam or light"):
        vps.Segmenter(checkpoint=checkpoint, model="big", device="cpu")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        vps.Segmenter(checkpoint=checkpoint, model="light", device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="--device gpu: expected auto, cpu, cuda or cuda:N"):
        vps.Segmenter(checkpoint=checkpoint, model="light", device="gpu")
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        vps.Segmenter(checkpoint=checkpoint, model="light", device="cpu", batch_size=0)
    with pytest.raises(ValueError, match="a built model is used as is"):
        vps.Segmenter(checkpoint=checkpoint, model=make_tiny_light(), device="cpu")
    monkeypatch.setattr("vps.modeling.default_checkpoint_path", lambda: tmp_path / "weights" / "default.pt")
    with pytest.raises(CheckpointError, match="built-in model .*default.pt is not installed"):
        vps.Segmenter(device="cpu")


def test_bad_videos_fail_when_called(tmp_path, light):
    with pytest.raises(InputError, match="input not found"):
        light.segment_video(tmp_path / "missing.mp4")  # before iterating
    (tmp_path / "text.mp4").write_text("not a video\n" * 20)
    with pytest.raises(InputError, match="not a readable video"):
        light.segment_video(tmp_path / "text.mp4")
    (tmp_path / "clips").mkdir()
    make_video(tmp_path / "clips" / "a.mp4", count=2)
    make_video(tmp_path / "clips" / "b.mp4", count=2)
    with pytest.raises(InputError, match="holds 2 clips \\(a, b\\); give one video or frame folder"):
        light.segment_video(tmp_path / "clips")
    with pytest.raises(ValueError, match="smooth must be 0"):
        light.segment_video(tmp_path / "clips" / "a.mp4", smooth=-1)
    stills = open_clip(Clip("shots", make_frame_folder(tmp_path / "shots", ["1.png"]), "stills"))
    with pytest.raises(ValueError, match="smoothing works across the frames of a video"):
        light.segment_batches(stills, smooth=3)


# ---- defaults ---------------------------------------------------------------------------------


def test_defaults_follow_the_model_and_the_cpu(checkpoint, monkeypatch):
    monkeypatch.setattr("vps.hardware.cpu_flags", lambda: {"avx512f", "amx_bf16"})
    native = vps.Segmenter(checkpoint=checkpoint, model="light", device="cpu")
    assert (native.precision, native.batch_size) == ("bf16", 8)
    monkeypatch.setattr("vps.hardware.cpu_flags", lambda: {"avx2"})
    assert vps.Segmenter(model=make_tiny_autosam(), device="cpu").precision == "fp32"
    assert vps.Segmenter(model=make_tiny_autosam(), device="cpu").batch_size == 1
    assert "precision=fp32" in repr(vps.Segmenter(model=make_tiny_light(), device="cpu"))


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c code`` in ``cwd`` with this checkout's vps first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_import_vps_stays_light(tmp_path):
    code = ("import sys, vps; heavy = [m for m in ('vps.api', 'vps.modeling', 'timm', 'segment_anything', 'av', 'cv2') "
            "if m in sys.modules]; assert not heavy, heavy; assert vps.Segmenter.__module__ == 'vps.api'")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
    """The README's Python API example, as written, on a fresh machine (the built-in model, no ../shared)."""
    readme = (REPO / "README.md").read_text()
    example = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    result = run_python(example, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # a real segmentation of the drawn polyp (the built-in model of 2026-11-26 scores about 0.72 on it)
    assert lines[0].startswith("Segmenter(model=AutoSAM, ") and float(lines[0].split("Dice")[1]) > 0.6, lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
    assert all("(288, 384, 3) (288, 384)" in line for line in lines[1:])
