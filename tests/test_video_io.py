"""Frame sources, the prefetching reader and the atomic writers of vps.video, on small synthetic clips."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import vps  # noqa: F401
from vps.video import (
    Clip, FrameFolderSource, InputError, MaskVideoWriter, PngWriter, Prefetcher, VideoInfo, distributed_env,
    find_clips, list_frames, open_source, partial_path, probe_video, read_mask_video, shard, write_video,
)


def moving_disc(count: int = 8, width: int = 64, height: int = 48, radius: int = 8) -> np.ndarray:
    """count x H x W x 3 uint8 RGB: a bright disc moving left to right on a dark background."""
    yy, xx = np.mgrid[:height, :width]
    frames = np.full((count, height, width, 3), 20, np.uint8)
    for i in range(count):
        cx = radius + (width - 2 * radius) * i / max(count - 1, 1)
        frames[i][(yy - height / 2) ** 2 + (xx - cx) ** 2 < radius ** 2] = (230, 120, 100)
    return frames


def make_video(path: Path, count: int = 8, width: int = 64, height: int = 48, fps=25, **kwargs) -> Path:
    return write_video(path, moving_disc(count, width, height), fps=fps, **kwargs)


def make_frame_folder(folder: Path, names, width: int = 64, height: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in zip(names, moving_disc(len(names), width, height)):
        cv2.imwrite(str(folder / name), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return folder


VFR_TIMES = [0, 0.04, 0.08, 0.2, 0.24, 0.4, 0.44, 1.0]  # seconds: a variable frame rate


def make_vfr_video(path: Path, times=VFR_TIMES, width: int = 64, height: int = 48) -> Path:
    """An H.264 mp4 whose frames are shown at ``times`` (seconds), written with PyAV."""
    time_base = Fraction(1, 100)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        for seconds, array in zip(times, moving_disc(len(times), width, height)):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = round(seconds / time_base), time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_times(path: Path) -> list:
    """The presentation time of every frame of a video, in seconds."""
    with av.open(str(path)) as container:
        return [float(frame.time) for frame in container.decode(video=0)]


def leftovers(folder: Path) -> list:
    """Temporary (partial) files or folders anywhere under ``folder``."""
    return [p for p in Path(folder).rglob("*") if ".partial" in p.name]


# ---- sources ----------------------------------------------------------------------------------


def test_frame_folder_natural_order(tmp_path):
    make_frame_folder(tmp_path / "plain", ["10.png", "2.png", "1.png"])
    assert [p.name for p in list_frames(tmp_path / "plain")] == ["1.png", "2.png", "10.png"]
    sun = ["case1_3_a_10.jpg", "case1_3_a_2.jpg", "case1_3_a_1.jpg", "case1_3_a_100.jpg"]
    make_frame_folder(tmp_path / "sun", sun)
    source = open_source(find_clips(tmp_path / "sun")[0])
    assert [name for name, _, _ in source] == ["case1_3_a_1", "case1_3_a_2", "case1_3_a_10", "case1_3_a_100"]
    assert source.info.num_frames == 4 and (source.info.width, source.info.height) == (64, 48)


def test_find_clips_layouts(tmp_path):
    video = make_video(tmp_path / "clip.mp4")
    assert find_clips(video) == [Clip("clip", video, "video")]
    make_frame_folder(tmp_path / "sunseg" / "Frame" / "case10", ["a_1.jpg"])
    make_frame_folder(tmp_path / "sunseg" / "Frame" / "case2", ["a_1.jpg"])
    assert [c.case for c in find_clips(tmp_path / "sunseg")] == ["case2", "case10"]
    make_frame_folder(tmp_path / "cvc" / "01" / "frames", ["001.png"])
    (tmp_path / "cvc" / "01" / "masks").mkdir()
    make_frame_folder(tmp_path / "cvc" / "02" / "frames", ["001.png"])
    make_frame_folder(tmp_path / "cvc" / "02" / "masks", ["001.png"])
    clips = find_clips(tmp_path / "cvc")
    assert [(c.case, c.path.name, c.kind) for c in clips] == [("01", "frames", "frames"), ("02", "frames", "frames")]
    # one clip folder of that layout is one clip, named after the clip; its masks are not a clip
    assert find_clips(tmp_path / "cvc" / "02") == [Clip("02", tmp_path / "cvc" / "02" / "frames", "frames")]
    kvasir = make_frame_folder(tmp_path / "Kvasir" / "images", ["a.png"]).parent
    make_frame_folder(kvasir / "masks", ["a.png"])
    assert find_clips(kvasir) == [Clip("Kvasir", kvasir / "images", "frames")]
    with pytest.raises(InputError, match="not found"):
        find_clips(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no video"):
        find_clips(tmp_path / "empty")


@pytest.mark.parametrize("decoder", ["decord", "av"])
def test_video_source(tmp_path, decoder):
    video = make_video(tmp_path / "clip.mp4", count=9, width=96, height=72, fps=Fraction(30000, 1001))
    source = open_source(find_clips(video)[0], decoder)
    frames = list(source)
    assert source.info == VideoInfo(96, 72, Fraction(30000, 1001), 9)
    assert [name for name, _, _ in frames] == [f"{i:06d}" for i in range(9)]
    assert frames[4][1].shape == (72, 96, 3) and frames[4][1].dtype == np.uint8
    # the disc survives compression: bright red inside, dark outside
    expected = moving_disc(9, 96, 72)
    assert np.abs(frames[4][1].astype(int) - expected[4]).mean() < 4


def test_pyav_is_the_default_decoder(tmp_path):
    # decord decodes ahead without bound when the model is slower: memory grows with the video's length
    video = make_video(tmp_path / "clip.mp4", count=2)
    assert open_source(find_clips(video)[0]).decoder == "av"


@pytest.mark.parametrize("decoder", ["av", "decord"])
def test_sources_give_the_input_timestamps(tmp_path, decoder):
    source = open_source(find_clips(make_vfr_video(tmp_path / "vfr.mp4"))[0], decoder)
    seconds = [float(pts * source.info.time_base) for _, _, pts in source]
    assert seconds == pytest.approx(VFR_TIMES, abs=1e-3)
    folder = make_frame_folder(tmp_path / "frames", ["1.png", "2.png", "3.png"])
    source = open_source(find_clips(folder)[0], fps=Fraction(30))
    assert [float(pts * source.info.time_base) for _, _, pts in source] == pytest.approx([0, 1 / 30, 2 / 30])


def test_decord_and_av_agree(tmp_path):
    video = make_video(tmp_path / "clip.mkv", count=5)
    a = np.stack([f for _, f, _ in open_source(find_clips(video)[0], "decord")])
    b = np.stack([f for _, f, _ in open_source(find_clips(video)[0], "av")])
    assert a.shape == b.shape == (5, 48, 64, 3)
    assert np.abs(a.astype(int) - b).max() <= 3


# ---- bad inputs -------------------------------------------------------------------------------


def test_not_a_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all " * 50)
    with pytest.raises(InputError, match="not a readable video"):
        open_source(find_clips(junk)[0])


@pytest.mark.parametrize("decoder", ["decord", "av"])
def test_truncated_video_names_the_frame(tmp_path, decoder):
    video = make_video(tmp_path / "clip.mp4", count=40, width=96, height=72,
                       options={"crf": "10", "g": "5"}, container_options={"movflags": "faststart"})
    data = video.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    source = open_source(find_clips(truncated)[0], decoder)
    with pytest.raises(InputError, match=r"decoding failed at frame (\d+)") as error:
        list(source)
    frame = int(error.value.args[0].split("at frame ")[1].split()[0])
    assert 0 < frame < 40


def test_zero_frame_video(tmp_path):
    path = tmp_path / "zero.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    with pytest.raises(InputError, match="no video stream|no frames"):
        list(open_source(find_clips(path)[0]))


def test_frame_folder_errors(tmp_path):
    mixed = make_frame_folder(tmp_path / "mixed", ["1.png", "2.png"])
    cv2.imwrite(str(mixed / "3.png"), np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(InputError, match="mixed sizes.*--stills"):
        list(FrameFolderSource(find_clips(mixed)[0]))
    sizes = [frame.shape for _, frame, _ in FrameFolderSource(find_clips(mixed)[0], any_size=True)]
    assert sizes == [(48, 64, 3), (48, 64, 3), (20, 30, 3)]
    notes = make_frame_folder(tmp_path / "notes", ["1.png"])
    (notes / "notes.txt").write_text("hello")
    (notes / ".DS_Store").write_text("ignored")
    with pytest.raises(InputError, match="not an image: notes.txt"):
        open_source(find_clips(notes)[0])
    broken = make_frame_folder(tmp_path / "broken", ["1.png"])
    (broken / "2.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="2.png: not a readable image"):
        list(open_source(find_clips(broken)[0]))


# ---- prefetcher -------------------------------------------------------------------------------


class ListSource:
    def __init__(self, frames, fail_at=None):
        self.frames, self.fail_at = frames, fail_at

    def __iter__(self):
        for i, frame in enumerate(self.frames):
            if i == self.fail_at:
                raise InputError(f"decoding failed at frame {i}")
            yield str(i), frame, i

    def close(self):
        pass


def test_prefetcher_batches_in_order():
    frames = moving_disc(7)
    with Prefetcher(ListSource(frames), batch_size=3, depth=1) as reader:
        batches = list(reader)
    assert [b.names for b in batches] == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
    assert np.array_equal(np.concatenate([b.frames.numpy() for b in batches]), frames)


def test_prefetcher_raises_worker_errors():
    with Prefetcher(ListSource(moving_disc(7), fail_at=4), batch_size=2) as reader:
        seen = []
        with pytest.raises(InputError, match="frame 4"):
            for batch in reader:
                seen.extend(batch.names)
    assert seen == ["0", "1", "2", "3"]


def test_prefetcher_stops_when_closed_early():
    reader = Prefetcher(ListSource(moving_disc(50)), batch_size=1, depth=2)
    next(iter(reader))
    reader.close()
    assert not reader._thread.is_alive()


# ---- writers ----------------------------------------------------------------------------------


def test_mask_video_is_lossless(tmp_path):
    info = VideoInfo(64, 48, Fraction(25), 6)
    rng = np.random.default_rng(0)
    masks = [np.where(moving_disc(6)[i, ..., 0] > 100, 255, 0).astype(np.uint8) for i in range(4)]
    masks += [np.zeros((48, 64), np.uint8), rng.integers(0, 256, (48, 64), dtype=np.uint8)]
    writer = MaskVideoWriter(tmp_path / "masks.mp4", info)
    for mask in masks:
        writer.write(mask)
    assert partial_path(tmp_path / "masks.mp4").exists() and not (tmp_path / "masks.mp4").exists()
    writer.close()
    assert np.array_equal(read_mask_video(tmp_path / "masks.mp4"), np.stack(masks))
    assert probe_video(tmp_path / "masks.mp4") == info
    assert leftovers(tmp_path) == []


def test_mask_writer_keeps_timestamps(tmp_path):
    info = VideoInfo(64, 48, Fraction(25), None, time_base=Fraction(1, 1000))
    writer = MaskVideoWriter(tmp_path / "masks.mp4", info)
    # timestamps count from the first frame; missing or backward ones become one nominal frame later
    for pts in (500, 540, 700, None, 650, 2000):
        writer.write(np.zeros((48, 64), np.uint8), pts)
    writer.close()
    assert frame_times(tmp_path / "masks.mp4") == pytest.approx([0, 0.04, 0.2, 0.24, 0.241, 1.5], abs=1e-3)


def test_writers_abort_leave_nothing(tmp_path):
    writer = MaskVideoWriter(tmp_path / "masks.mp4", VideoInfo(64, 48, Fraction(25), None))
    writer.write(np.zeros((48, 64), np.uint8))
    writer.abort()
    pngs = PngWriter(tmp_path / "png", "case")
    pngs.write("1", np.zeros((48, 64), np.uint8))
    pngs.abort()
    assert list(tmp_path.rglob("*")) == [tmp_path / "png"]


def test_png_writer_replaces_the_case_folder_when_done(tmp_path):
    pngs = PngWriter(tmp_path, "case")
    pngs.write("f1", np.full((4, 5), 7, np.uint8))
    assert not (tmp_path / "case").exists()
    pngs.close()
    assert cv2.imread(str(tmp_path / "case" / "f1.png"), cv2.IMREAD_UNCHANGED).tolist() == [[7] * 5] * 4
    assert leftovers(tmp_path) == []


# ---- sharding ---------------------------------------------------------------------------------


def test_shard_covers_every_item_once():
    items = list(range(11))
    parts = [shard(items, rank, 4) for rank in range(4)]
    assert sorted(sum(parts, [])) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_distributed_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(InputError, match="torchrun"):
        distributed_env()
