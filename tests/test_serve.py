"""`virst serve` for real: uvicorn on an ephemeral loopback port, httpx clients. Streamed
masks equal `virst segment`'s, bad inputs get their status and leave the server working,
a full queue answers 429 without losing accepted work, a client that leaves frees its
slot, keys are checked, uploads outlive the server. Traffic is bounded and local only."""

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import truncated_avi
from PIL import Image

from runtime.client import Client, ServerError, decode_record, segment_to
from runtime.pipeline import Runtime
from runtime.serve import Segmenter, ServeConfig, Server, create_app
from runtime.store import Limits
from runtime.video import open_video
from virst.media import read_mask, write_video


@contextlib.contextmanager
def serving(runtime, config, warm=False):
    server = uvicorn.Server(uvicorn.Config(create_app(runtime, config, warm=warm),
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def runtime():
    return Runtime(backend="eager", threads=2)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from virst.data.shapes import make_video

    root = tmp_path_factory.mktemp("videos")
    clip = make_video("valid", 5)
    write_video(clip.frames, root / "clip.mp4", lossless=True)
    long = np.concatenate([clip.frames] * 8)  # ~200 frames: a request that takes a while
    write_video(long, root / "long.mp4")
    (root / "notes.txt").write_text("not a video")
    truncated_avi(root, frames=40, keep=0.3)
    return root, [e[0] for e in clip.expressions]


def test_streamed_masks_equal_virst_segment(runtime, videos, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="virst.serve")
    root, texts = videos
    config = ServeConfig(store=tmp_path / "store")
    with serving(runtime, config, warm=True) as url:
        assert httpx.get(f"{url}/readyz").json()["status"] == "ready"
        summary = segment_to(url, root / "clip.mp4", texts[:2], folder=tmp_path / "served")
        assert summary["frames"] > 0 and summary["fps"] > 0 and "propagation" in summary["stages"]
        client = Client(url)
        info = client.upload(root / "clip.mp4")
        whole = httpx.post(f"{url}/v1/videos/{info['id']}/segment?stream=false",
                           json={"expressions": texts[:1]}, timeout=120).json()
        assert len(whole["frames"]) == info["frames"] and whole["summary"]["frames"] > 0
        first = decode_record(whole["frames"][0]).masks[0]
        metrics = httpx.get(f"{url}/metrics").text
        assert "virst_cache_hits_total 1.0" in metrics  # the second request reused features
        assert 'virst_stage_seconds_count{stage="propagation"}' in metrics
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "virst.serve"]
    segments = [x for x in lines if x["route"].endswith("/segment")]
    assert segments and all(x["frames"] > 0 and "propagation" in x["stages"] and x["video"]
                            for x in segments)  # one line per request, logged once streamed
    res = subprocess.run([sys.executable, "-m", "virst.cli", "segment", str(root / "clip.mp4"),
                          *texts[:2], "-o", str(tmp_path / "cli")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for e in range(2):
        served = sorted((tmp_path / "served" / str(e)).glob("*.png"))
        cli = sorted((tmp_path / "cli" / str(e)).glob("*.png"))
        assert [p.name for p in served] == [p.name for p in cli] and served
        assert all(np.array_equal(read_mask(a), read_mask(b)) for a, b in zip(served, cli))
    assert np.array_equal(first, read_mask(tmp_path / "cli" / "0" / "00000.png"))


def test_bad_inputs_get_their_status_and_the_server_keeps_working(runtime, videos, tmp_path):
    root, texts = videos
    config = ServeConfig(store=tmp_path / "store", media_root=root, max_upload_mb=0.5,
                         max_unstreamed=100)
    with serving(runtime, config) as url:
        http = httpx.Client(base_url=url, timeout=120)

        def upload(name, data=None):
            content = data if data is not None else (root / name).read_bytes()
            return http.post("/v1/videos", files={"file": (name, content)})

        ok = http.post("/v1/videos", json={"path": "clip.mp4"})
        assert ok.status_code == 200
        vid = ok.json()["id"]
        cases = [
            (upload("notes.txt"), 415, "not a video"),
            (upload("big.mp4", b"\0" * (1 << 20)), 413, "exceeds the limit"),
            (upload("cut.avi"), 422, "cut short"),
            (http.post("/v1/videos", json={"path": "../clip.mp4"}), 403, "outside the media"),
            (http.post("/v1/videos", json={"path": "/etc/passwd"}), 403, "outside the media"),
            (http.post(f"/v1/videos/{vid}/segment", json={"expressions": [" "]}), 422, "empty"),
            (http.post(f"/v1/videos/{vid}/segment", json={"expressions": ["red " * 5000]}),
             422, "too long"),
            (http.post(f"/v1/videos/{vid}/segment", json={"expressions": []}), 422, "list"),
            (http.post(f"/v1/videos/{vid}/segment?stream=false",
                       json={"expressions": texts[:1] * 5}), 422, "ask for the stream"),
            (http.post(f"/v1/videos/{vid}/segment", content=b"{nope"), 422, "not JSON"),
            (http.post("/v1/videos/0123456789abcdef/segment", json={"expressions": ["x"]}),
             404, "no video"),
            (http.get("/v1/videos/nope"), 404, "no video"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, (status, response.text)
            assert message in response.json()["error"], response.text
        assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [".incoming", vid]
        assert not any((tmp_path / "store" / ".incoming").iterdir())  # nothing half-stored
        good = http.post(f"/v1/videos/{vid}/segment?stream=false",
                         json={"expressions": texts[:1]})
        assert good.status_code == 200 and good.json()["summary"]["frames"] > 0
        assert http.delete(f"/v1/videos/{vid}").status_code == 200
        assert http.get(f"/v1/videos/{vid}").status_code == 404


def test_full_queue_answers_429_and_loses_no_accepted_request(runtime, videos, tmp_path):
    root, texts = videos
    config = ServeConfig(store=tmp_path / "store", max_queue=1)
    with serving(runtime, config) as url:
        vid = Client(url).upload(root / "clip.mp4")["id"]
        results = []

        def request():
            with httpx.Client(base_url=url, timeout=300) as http:
                r = http.post(f"/v1/videos/{vid}/segment", json={"expressions": texts[:1]})
                lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
                results.append((r.status_code, r.headers.get("retry-after"), lines))

        threads = [threading.Thread(target=request) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    statuses = sorted(s for s, _, _ in results)
    assert len(results) == 6 and 429 in statuses and 200 in statuses
    for status, retry, lines in results:
        if status == 429:
            assert retry == "5"
        else:  # every accepted request completed: all frames, then the summary
            assert status == 200 and "summary" in lines[-1]
            assert [x["frame"] for x in lines[:-1]] == list(range(len(lines) - 1))


def test_a_client_that_leaves_frees_its_slot(runtime, videos, tmp_path):
    root, texts = videos
    config = ServeConfig(store=tmp_path / "store", max_queue=1)
    with serving(runtime, config) as url:
        client = Client(url)
        long = client.upload(root / "long.mp4")
        short = client.upload(root / "clip.mp4")
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", f"/v1/videos/{long['id']}/segment",
                             json={"expressions": texts[:1]}) as r:
                lines = r.iter_lines()
                assert json.loads(next(lines))["frame"] == 0
            # the connection is closed after one of ~200 frames
        start = time.time()
        records = list(client.segment(short["id"], texts[:1]))
        assert "summary" in records[-1] and time.time() - start < 60
        metrics = httpx.get(f"{url}/metrics").text
        assert 'virst_errors_total{kind="client_gone"} 1.0' in metrics
        assert "virst_in_flight 0.0" in metrics


def test_pass_1_stops_at_the_deadline_or_when_nobody_waits(runtime, videos):
    """Pass 1 reads the whole video before the first mask (minutes on a long one); it used
    to run on past the deadline or after the client had gone, holding the only slot."""
    root, texts = videos
    segmenter, source = Segmenter(runtime), str(root / "long.mp4")
    length, calls = open_video(source).length, []

    def cancelled_at_third_frame() -> bool:
        calls.append(1)
        return len(calls) >= 3

    items = list(segmenter.segment("v", source, texts[:1], cancelled=cancelled_at_third_frame))
    assert items == [] and len(calls) == 3 + 1  # stopped at the 3rd of 64 sampled frames
    late = list(segmenter.segment("v", source, texts[:1], deadline=time.perf_counter() - 1))
    assert late == [{"error": f"deadline exceeded while reading the video's {length} "
                              f"frames, before the first mask", "status": 504}]
    whole = list(segmenter.segment("v", source, texts[:1]))  # the session starts anew
    assert whole[-1]["summary"]["frames"] == length and not whole[-1]["summary"]["cached"]


def test_the_store_keeps_within_max_store_gb_evicting_the_least_recently_used(
        runtime, videos, tmp_path):
    """Over `max_store_gb` the least recently used videos go (a GET or a request counts as
    a use), never one a request waits for or runs on; before, the store grew until the
    disk was full."""
    root, texts = videos
    clips = []
    for seed in range(4):
        frames = np.random.default_rng(seed).integers(0, 255, (6, 40, 56, 3), dtype=np.uint8)
        write_video(frames, tmp_path / f"{seed}.mp4", lossless=True)
        clips.append(tmp_path / f"{seed}.mp4")
    limit = 2.5 * clips[0].stat().st_size  # two of them fit
    config = ServeConfig(store=tmp_path / "store", max_store_gb=limit / (1 << 30))
    with serving(runtime, config) as url:
        client = Client(url)
        a, b = (client.upload(clip)["id"] for clip in clips[:2])
        assert "summary" in list(client.segment(a, texts[:1]))[-1]  # a used after b
        c = client.upload(clips[2])["id"]
        assert [client.http.get(f"/v1/videos/{v}").status_code for v in (a, b, c)] == [
            200, 404, 200]
        client.http.get(f"/v1/videos/{a}")  # a used after c
        d = client.upload(clips[3])["id"]
        assert [client.http.get(f"/v1/videos/{v}").status_code for v in (a, c, d)] == [
            200, 404, 200]
        assert "virst_videos_evicted_total 2.0" in client.http.get("/metrics").text

    # a request on a video (waiting or running) keeps it, least recently used or not
    server = Server(SimpleNamespace(concurrency=1, forget=lambda video_id: None), config)
    server.store.touch(d)  # a is the least recently used now, and in use
    server.in_use[a] += 1
    spooled = server.store.spool()
    spooled.write_bytes(clips[1].read_bytes())
    b = server.store.add_upload(spooled, "b.mp4").id  # three do not fit
    asyncio.run(server.evict(b))
    assert server.store.get(a) and server.store.get(b) and not server.store.get(d)


def test_api_keys_are_required_and_uploads_survive_a_restart(runtime, videos, tmp_path):
    root, texts = videos
    keys = tmp_path / "keys"
    keys.write_text("# one per line\nsecret-one\nsecret-two\n")
    from runtime.serve import read_api_keys

    config = ServeConfig(store=tmp_path / "store", api_keys=read_api_keys(keys))
    with serving(runtime, config) as url:
        assert httpx.get(f"{url}/v1/videos/x").status_code == 401
        bad = httpx.get(f"{url}/v1/videos/x", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and "API key" in bad.json()["error"]
        probe = httpx.get(f"{url}/healthz")
        assert probe.status_code == 200  # probes need no key
        assert len(probe.headers["x-request-id"]) == 12
        vid = Client(url, "secret-two").upload(root / "clip.mp4")["id"]
    incoming = tmp_path / "store" / ".incoming"
    stale, fresh = incoming / "old", incoming / "new"
    stale.mkdir()
    fresh.write_bytes(b"an upload in progress")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)  # left by a crash two days ago
    with serving(runtime, config) as url:  # a new server on the same store
        assert not stale.exists() and fresh.exists()
        client = Client(url, "secret-one")
        info = client.http.get(f"/v1/videos/{vid}").json()
        assert info["id"] == vid and info["frames"] > 0
        assert "summary" in list(client.segment(vid, texts[:1]))[-1]


def test_the_same_video_uploaded_at_once_is_stored_once(runtime, videos, tmp_path):
    """Content addressing under concurrency: simultaneous uploads of one file all succeed
    with one id (the store's rename race is handled)."""
    root, _ = videos
    with serving(runtime, ServeConfig(store=tmp_path / "store", max_uploads=6)) as url:
        data = (root / "clip.mp4").read_bytes()
        answers = []

        def upload():
            answers.append(httpx.post(f"{url}/v1/videos", files={"file": ("c.mp4", data)},
                                      timeout=120))

        threads = [threading.Thread(target=upload) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [a.status_code for a in answers] == [200] * 6
    assert len({a.json()["id"] for a in answers}) == 1
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        ".incoming", answers[0].json()["id"]]
    assert not any((tmp_path / "store" / ".incoming").iterdir())


def _png(width, height, mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return out.getvalue()


def _zip(members, big: tuple[str, int] | None = None) -> bytes:
    """A zip of (name, bytes) members, and optionally one member of `big` zero bytes
    (deflated to about a thousandth of it: a zip bomb)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
        if big:
            with z.open(big[0], "w", force_zip64=True) as f:
                for _ in range(big[1] >> 20):
                    f.write(bytes(1 << 20))
    return out.getvalue()


def _tar_gz(members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_uploads_beyond_the_limits_are_refused_before_anything_is_decoded(runtime, tmp_path):
    """Frame count, frame size and an archive's uncompressed size are checked from what
    the container, the headers and the archive's listing declare. Before: a 64 MB zero
    member in a 64 KB zip was read whole into the server's memory (2 GB in 2 MB: a 5.1 GB
    peak RSS); frames of another size were decoded first; messages named server paths."""
    frame = _png(64, 48)
    limits = Limits(frames=20, megapixels=0.5, extracted_mb=2)  # frame_bytes ~5 MB
    cases = [
        ("bomb.zip", _zip([("0000.png", frame)], big=("0001.png", 64 << 20)), 413,
         "0001.png is 64 MB uncompressed"),
        ("many.tar.gz", _tar_gz([(f"{i:04d}.png", frame) for i in range(30)]), 413,
         "more than 20 entries"),
        ("heavy.zip", _zip([(f"{i}.bmp", bytes(700_000)) for i in range(4)]), 413,
         "exceed 2 MB uncompressed (at 2.bmp)"),
        ("wide.zip", _zip([("0.png", _png(1000, 600, "1"))]), 413,
         "frames of 1000x600; this server takes at most 0.5 megapixels"),
        ("mixed.zip", _zip([("0.png", frame), ("1.png", _png(2000, 2000, "1"))]), 422,
         "frame mixed.zip:1.png is 2000x2000, earlier frames are 64x48"),
        ("bomb.png.zip", _zip([("0.png", frame), ("1.png", _png(30000, 30000, "1"))]), 422,
         "cannot read frame bomb.png.zip:1.png: Image size (900000000 pixels)"),  # was 500
        ("twice.zip", _zip([("a/0.png", frame), ("b/0.png", frame)]), 422,
         "two frames named 0.png"),
    ]
    with serving(runtime, ServeConfig(store=tmp_path / "store", limits=limits)) as url:
        http = httpx.Client(base_url=url, timeout=120)
        for name, data, status, message in cases:
            r = http.post("/v1/videos", files={"file": (name, data)})
            assert r.status_code == status, (name, r.text)
            assert message in r.json()["error"], (name, r.text)
            assert str(tmp_path) not in r.text  # no server path in the answer
        assert not any((tmp_path / "store" / ".incoming").iterdir())  # nothing left behind
        ok = http.post("/v1/videos", files={"file": ("ok.zip", _zip(
            [(f"{i:02d}.png", frame) for i in range(20)]))})
        assert ok.status_code == 200 and ok.json()["frames"] == 20


def _stall_an_upload(url: str) -> socket.socket:
    """A client that starts an upload and sends no more (the caller closes it)."""
    host, port = url.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                    b"Content-Type: multipart/form-data; boundary=B\r\n\r\n--B\r\n"
                    b'Content-Disposition: form-data; name="file"; filename="a.mp4"'
                    b"\r\n\r\n" + bytes(1000))
    return stalled


def _wait_for_uploads(url: str, count: float) -> None:
    deadline = time.time() + 30
    while True:
        text = httpx.get(f"{url}/metrics").text
        if float(text.split("\nvirst_uploads_in_progress ")[1].split()[0]) == count:
            return
        assert time.time() < deadline, f"uploads in progress never reached {count}"
        time.sleep(0.05)


def test_uploads_beyond_max_uploads_answer_429_and_a_dropped_one_frees_its_place(
        runtime, videos, tmp_path):
    """An upload holds disk and a decoding thread: at most `max_uploads` at once. A client
    that stalls mid-upload holds its place until it goes away, then frees it."""
    root, _ = videos
    with serving(runtime, ServeConfig(store=tmp_path / "store", max_uploads=1)) as url:
        stalled = _stall_an_upload(url)
        _wait_for_uploads(url, 1)
        data = (root / "clip.mp4").read_bytes()
        busy = httpx.post(f"{url}/v1/videos", files={"file": ("c.mp4", data)}, timeout=60)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "5"
        assert "1 uploads are in progress" in busy.json()["error"]
        stalled.close()
        _wait_for_uploads(url, 0)
        ok = httpx.post(f"{url}/v1/videos", files={"file": ("c.mp4", data)}, timeout=60)
        assert ok.status_code == 200 and ok.json()["frames"] > 0
        assert 'virst_errors_total{kind="uploads_full"} 1.0' in httpx.get(f"{url}/metrics").text
    assert [p.name for p in (tmp_path / "store" / ".incoming").iterdir()] == []


def test_the_client_uploads_frame_folders_once_waits_out_429_and_names_a_lost_server(
        runtime, videos, tmp_path):
    """Before: a frame folder was an IsADirectoryError traceback, a busy server (429) an
    error, an unreachable one an httpx traceback, and every call sent the whole video."""
    root, texts = videos
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in open_video(root / "clip.mp4").frames():
        Image.fromarray(frame).save(folder / f"{t:05d}.png")
    with serving(runtime, ServeConfig(store=tmp_path / "store", max_uploads=1)) as url:
        client, sent = Client(url), []
        client.http.event_hooks["request"] = [lambda r: sent.append(r.method)]
        info = client.upload(folder)
        assert info["frames"] == len(list(folder.iterdir())) and sent == ["GET", "POST"]
        assert client.upload(folder) == info and sent == ["GET", "POST", "GET"]  # known
        stalled = _stall_an_upload(url)
        _wait_for_uploads(url, 1)
        threading.Timer(1.0, stalled.close).start()  # the slot frees while the client waits
        again = client.upload(root / "clip.mp4")
        assert again["frames"] == info["frames"] and sent[3:] == ["GET", "POST", "POST"]
        summary = segment_to(url, folder, texts[:1], folder=tmp_path / "masks")
        assert summary["frames"] == info["frames"]
        assert sorted(p.stem for p in (tmp_path / "masks").glob("*.png")) == sorted(
            p.stem for p in folder.iterdir())
    with pytest.raises(ServerError, match=f"cannot reach the server at {url}"):
        Client(url).upload(root / "clip.mp4")


def test_a_blocked_log_sink_does_not_block_the_server_thread():
    """The request log is written on the event loop; with `log_off_the_event_loop` a sink
    that does not move (an unread stderr pipe) leaves logging calls instant, and every
    line is written once the sink moves again."""
    import atexit
    import logging

    from runtime.serve import log, log_off_the_event_loop

    class Stuck(logging.Handler):
        def __init__(self):
            super().__init__()
            self.moving, self.lines = threading.Event(), []

        def emit(self, record):
            self.moving.wait(30)
            self.lines.append(record.getMessage())

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sink = Stuck()
    listener = log_off_the_event_loop(sink)
    atexit.unregister(listener.stop)  # stopped here, not at exit
    try:
        start = time.perf_counter()
        for i in range(200):
            log.info(json.dumps({"request": i}))
        assert time.perf_counter() - start < 2.0  # 200 calls, none waiting on the sink
        sink.moving.set()
    finally:
        listener.stop()  # drains the queue
        root.handlers = handlers
        root.setLevel(level)
    assert [json.loads(line)["request"] for line in sink.lines] == list(range(200))


def test_the_serve_commands_defaults_are_the_servers():
    """`virst serve`'s flags state their defaults for --help; each must be the one
    `ServeConfig` / `Limits` use when the flag is not given (two places, held equal)."""
    from runtime.store import Limits
    from virst.cli import build_parser

    args = build_parser().parse_args(["serve"])
    config = ServeConfig()
    for flag in ("max_upload_mb", "max_uploads", "max_store_gb", "max_queue",
                 "max_unstreamed", "deadline_s", "sessions"):
        assert getattr(args, flag) == getattr(config, flag), flag
    limits = Limits()
    for flag, field in (("max_frames", "frames"), ("max_megapixels", "megapixels"),
                        ("max_extracted_mb", "extracted_mb")):  # stated in the help text
        assert f"default {getattr(limits, field):g})" in _help(flag), flag


def _help(dest: str) -> str:
    from virst.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return next(a.help for a in serve._actions if a.dest == dest)
