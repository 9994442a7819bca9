"""`virst serve --ray` on a real local Ray cluster (`ray start --head` on 127.0.0.1), two
CPU replicas: the same masks as the single-process server, and when one replica is
killed under load every accepted request still completes. Bounded, loopback only."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray = shutil.which("ray", path=str(BIN)) or "ray"
    start = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=4",
                            "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                            f"--temp-dir={tmp}", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):
    address, env = cluster
    store = tmp_path_factory.mktemp("store")
    port = free_port()
    log = store.parent / "server.log"  # a file, not a pipe: an unread pipe blocks the server
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "virst.cli", "serve", "--ray",
                                 "--replicas", "2", "--ray-address", address, "--port",
                                 str(port), "--threads", "1", "--store", str(store)], env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "Ray Serve did not become ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    try:
        yield url, address
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _segment(url, vid, texts):
    with httpx.Client(base_url=url, timeout=300) as http:
        r = http.post(f"/v1/videos/{vid}/segment", json={"expressions": texts})
        return r.status_code, [json.loads(x) for x in r.text.splitlines() if x.strip()]


def test_ray_serve_gives_the_single_process_masks_and_survives_a_replica_kill(
        served, tmp_path):
    import ray

    from runtime.client import Client
    from runtime.pipeline import Runtime
    from virst.data.shapes import make_video
    from virst.media import write_video

    url, address = served
    clip = make_video("valid", 5)
    write_video(clip.frames, tmp_path / "clip.mp4", lossless=True)
    texts = [e[0] for e in clip.expressions[:2]]
    vid = Client(url).upload(tmp_path / "clip.mp4")["id"]
    status, lines = _segment(url, vid, texts)
    assert status == 200 and "summary" in lines[-1]
    local = Runtime(threads=1).session(tmp_path / "clip.mp4")
    from runtime.writer import frame_record

    want = [frame_record(f)["masks"] for f in local.segment(texts)]
    assert [line["masks"] for line in lines[:-1]] == want

    import numpy as np

    write_video(np.concatenate([clip.frames] * 6), tmp_path / "long.mp4", lossless=True)
    long = Client(url).upload(tmp_path / "long.mp4")["id"]
    want_long = [frame_record(f)["masks"] for f in Runtime(threads=1).session(
        tmp_path / "long.mp4").segment(texts)]
    results = []
    threads = [threading.Thread(target=lambda: results.append(_segment(url, long, texts)))
               for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)  # requests are running on both replicas
    ray.init(address=address, logging_level="ERROR")
    try:
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "SegmentReplica" in a["name"]]
        assert len(replicas) == 2, replicas
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]),
                 no_restart=False)
    finally:
        ray.shutdown()
    for t in threads:
        t.join(300)
    assert len(results) == 6
    for status, lines in results:  # none lost: every one complete, masks unchanged
        assert status == 200 and "summary" in lines[-1], lines[-1:]
        assert [line["masks"] for line in lines[:-1]] == want_long
    retried = httpx.get(f"{url}/metrics").text
    assert "virst_replica_retries_total 0.0" not in retried  # the kill hit a running request
