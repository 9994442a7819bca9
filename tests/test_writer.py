"""MaskWriter's writer thread: the same files as writing in the caller, errors raised in the
caller with nothing left behind, and a bounded queue (memory stays flat)."""

import json
import threading
import time

import numpy as np
import pytest

import runtime.writer as writer_mod
from runtime.writer import WRITE_AHEAD, FrameMasks, MaskWriter

SIZE = (24, 32)


def _frames(n: int, objects: int = 2):
    rng = np.random.default_rng(0)
    for t in range(n):
        masks = rng.random((objects, *SIZE)) > 0.6
        frame = rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)
        yield FrameMasks(t, f"{t:05d}", masks, rng.random(objects).astype(np.float32), frame)


def _write(folder, background: bool, n: int = 20, overlay: bool = False):
    overlay_path = folder.parent / f"{folder.name}.mp4" if overlay else None
    with MaskWriter(["a", "b"], SIZE, folder=folder, rle_path=folder.parent / f"{folder.name}.json",
                    overlay_path=overlay_path, background=background) as writer:
        for fm in _frames(n):
            writer.write(fm)
    return writer


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "virst-writer"]


def test_the_writer_thread_writes_what_the_caller_would(tmp_path):
    writers = [_write(tmp_path / "caller", background=False, overlay=True),
               _write(tmp_path / "thread", background=True, overlay=True)]
    assert all(w.seconds > 0 and w.frames_written == 20 for w in writers)  # timed where written
    files = sorted(p.relative_to(tmp_path / "caller") for p in (tmp_path / "caller").rglob("*.png"))
    assert len(files) == 40
    for rel in files:
        assert (tmp_path / "thread" / rel).read_bytes() == (tmp_path / "caller" / rel).read_bytes()
    rle = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("caller", "thread")]
    assert rle[0] == rle[1] and len(rle[0]["frames"]) == 20
    assert (tmp_path / "thread.mp4").stat().st_size > 0
    assert not _threads()  # joined at commit


def test_an_error_on_the_writer_thread_reaches_the_caller_and_leaves_nothing(tmp_path,
                                                                            monkeypatch):
    real = writer_mod.write_mask_png

    def failing(mask, path):
        if "00005" in str(path):
            raise OSError(28, "No space left on device")
        real(mask, path)

    monkeypatch.setattr(writer_mod, "write_mask_png", failing)
    with pytest.raises(OSError, match="No space left"):
        _write(tmp_path / "masks", background=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no RLE file
    assert not _threads()


def _stalled_writes(monkeypatch):
    """write_mask_png held until the returned event is set; the list counts its calls."""
    gate, calls, real = threading.Event(), [], writer_mod.write_mask_png

    def stalled(mask, path):
        gate.wait(10)
        calls.append(path)
        real(mask, path)

    monkeypatch.setattr(writer_mod, "write_mask_png", stalled)
    return gate, calls


def test_the_queue_is_bounded(tmp_path, monkeypatch):
    gate, calls = _stalled_writes(monkeypatch)
    handed, n = [], WRITE_AHEAD + 5
    writer = MaskWriter(["a", "b"], SIZE, folder=tmp_path / "masks", background=True).open()

    def produce():
        for fm in _frames(n):
            writer.write(fm)
            handed.append(fm.index)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    deadline = time.monotonic() + 5
    while len(handed) < WRITE_AHEAD + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # one frame held by the stalled writer thread, WRITE_AHEAD queued: the caller waits
    assert len(handed) == WRITE_AHEAD + 1
    gate.set()
    producer.join(10)
    writer.commit()
    assert len(handed) == n and len(calls) == 2 * n
    assert len(list((tmp_path / "masks").rglob("*.png"))) == 2 * n


def test_an_abort_drops_the_frames_still_queued(tmp_path, monkeypatch):
    gate, calls = _stalled_writes(monkeypatch)
    writer = MaskWriter(["a", "b"], SIZE, folder=tmp_path / "masks", background=True).open()
    for fm in _frames(WRITE_AHEAD):
        writer.write(fm)
    aborting = threading.Thread(target=writer.abort, daemon=True)
    aborting.start()
    deadline = time.monotonic() + 5
    while not writer._discard and time.monotonic() < deadline:  # the abort has begun
        time.sleep(0.01)
    gate.set()
    aborting.join(10)
    assert len(calls) <= 2  # at most the frame the thread held; the queued ones dropped
    assert not (tmp_path / "masks").exists() and not _threads()


def test_the_overlay_tints_each_mask_as_a_whole_float_frame_would():
    """Blended on the masked pixels only, the overlay equals blending the whole frame in
    float and rounding once, overlapping masks included."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    masks = rng.random((3, 48, 64)) > 0.6
    whole = frame.astype(np.float32)
    for i, mask in enumerate(masks):
        color = np.asarray(writer_mod.COLORS[i], np.float32)
        whole[mask] = 0.5 * whole[mask] + 0.5 * color
    out = writer_mod.overlay_frame(frame, masks)
    assert np.array_equal(out, whole.round().astype(np.uint8))
    assert not np.array_equal(out, frame) and np.array_equal(out[~masks.any(0)],
                                                             frame[~masks.any(0)])
    assert np.array_equal(writer_mod.overlay_frame(frame, masks[:0]), frame)
