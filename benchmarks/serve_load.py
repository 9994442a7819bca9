"""python benchmarks/serve_load.py: `virst serve` under a bounded load on 127.0.0.1.

Starts the server (single process, then `--ray` on a local Ray cluster), sends `--requests`
requests at `--concurrency` (a mix: a quarter upload a new video and segment it, the rest
ask new expressions about videos already uploaded, whose features are cached), and prints
throughput, p50 / p95 / p99 latency, frames per second, status counts and the server's
resident memory over the run (first vs last quarter). A second phase overloads a server
whose queue is short (`--overload-queue`) and reports the share of 429 answers. Everything
stops by itself: a fixed number of requests, a global timeout, servers terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_videos(folder: Path, count: int, frames: int) -> list[tuple[Path, list[str]]]:
    """`count` distinct short shapes clips with their expressions."""
    from virst.data.shapes import make_video
    from virst.media import write_video

    out = []
    for i in range(count):
        clip = make_video("test", i)
        path = folder / f"clip{i:03d}.mp4"
        write_video(clip.frames[:frames], path)
        out.append((path, [e[0] for e in clip.expressions]))
    return out


def rss_mb(pids: list[int]) -> float:
    """Resident memory of the server processes without shared memory (RssShmem): Ray maps
    its object store into every worker, and those pages are the store's, not a leak."""
    total = 0
    for pid in pids:
        try:
            fields = dict(line.split(":", 1) for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
            total += int(fields["VmRSS"].split()[0]) - int(fields["RssShmem"].split()[0])
        except (OSError, KeyError, ValueError):
            pass
    return total / 1024


def server_pids(proc: subprocess.Popen, ray: bool) -> list[int]:
    if not ray:
        return [proc.pid]
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ServeReplica" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class Sampler(threading.Thread):
    """RSS of the server processes every half second."""

    def __init__(self, proc, ray):
        super().__init__(daemon=True)
        self.proc, self.ray, self.samples, self.stop = proc, ray, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append(rss_mb(server_pids(self.proc, self.ray)))
            self.stop.wait(0.5)


UPLOAD_RETRIES = 6  # tries of an upload the server answers 429 (at most --max-uploads at once)


def start_server(args, store: Path, max_queue: int, ray_address: str | None):
    port = free_port()
    cmd = [sys.executable, "-m", "virst.cli", "serve", "--port", str(port), "--store",
           str(store), "--max-queue", str(max_queue), "--threads", str(args.threads),
           "--backend", args.backend]
    if ray_address:
        cmd += ["--ray", "--replicas", str(args.replicas), "--ray-address", ray_address]
    # The server's log goes to a file: a pipe nobody reads fills up (64 KB of request log
    # lines) and blocks the server's event loop mid-run.
    log = store.parent / f"server-{port}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready")


async def load(url: str, videos, requests: int, concurrency: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    uploaded: dict[int, str] = {}
    latencies, statuses, frames = [], {}, 0
    sem = asyncio.Semaphore(concurrency)
    lock = asyncio.Lock()
    order = []
    fresh = iter(range(len(videos)))
    for i in range(requests):  # a quarter new videos, the rest repeats on known ones
        new = i < 4 or rng.random() < 0.25
        order.append(next(fresh, None) if new else None)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def one(slot):
            try:
                await attempt(slot)
            except httpx.TransportError as err:  # counted, never hidden
                statuses[type(err).__name__] = statuses.get(type(err).__name__, 0) + 1

        async def attempt(slot):
            nonlocal frames
            async with sem:
                start = time.perf_counter()
                async with lock:
                    known = list(uploaded)
                index = slot if slot is not None else rng.choice(known or [0])
                path, texts = videos[index]
                vid = uploaded.get(index)
                if vid is None:
                    data = path.read_bytes()
                    for _ in range(UPLOAD_RETRIES):  # as runtime.client does: wait out a 429
                        r = await http.post("/v1/videos", files={"file": (path.name, data)})
                        if r.status_code != 429:
                            break
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    if r.status_code != 200:
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                        return
                    vid = r.json()["id"]
                    async with lock:
                        uploaded[index] = vid
                body = {"expressions": [rng.choice(texts)]}
                r = await http.post(f"/v1/videos/{vid}/segment", json=body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
                    if "summary" in lines[-1]:
                        frames += lines[-1]["summary"]["frames"]
                        latencies.append(time.perf_counter() - start)
                    else:
                        statuses["incomplete"] = statuses.get("incomplete", 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(one(slot) for slot in order))
        seconds = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": requests, "concurrency": concurrency, "seconds": round(seconds, 2),
            "throughput_rps": round(len(latencies) / seconds, 2),
            "frames_per_second": round(frames / seconds, 1),
            "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p95_s": round(float(np.percentile(lat, 95)), 3),
            "p99_s": round(float(np.percentile(lat, 99)), 3),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)}}


def phase(args, name, videos, max_queue, ray_address=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args, Path(tmp) / "store", max_queue, ray_address)
        sampler = Sampler(proc, ray_address is not None)
        sampler.start()
        try:
            result = asyncio.run(asyncio.wait_for(
                load(url, videos, args.requests, args.concurrency), args.timeout))
        finally:
            sampler.stop.set()
            sampler.join()
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    rss = sampler.samples or [0.0]
    q = max(1, len(rss) // 4)
    first, last = float(np.mean(rss[:q])), float(np.mean(rss[-q:]))
    result.update(phase=name, max_queue=max_queue, rss_first_quarter_mb=round(first, 1),
                  rss_last_quarter_mb=round(last, 1), rss_peak_mb=round(max(rss), 1),
                  rss_growth=round(last / first - 1, 3) if first else None)
    errors = sum(v for k, v in result["statuses"].items() if k.startswith("5"))
    result["server_errors"] = errors
    total = sum(result["statuses"].values())
    result["rate_429"] = round(result["statuses"].get("429", 0) / max(total, 1), 3)
    return result


def start_ray(tmp: Path, cpus: int) -> str:
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={cpus}",
                    "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                    f"--temp-dir={tmp}", "--disable-usage-stats"], check=True,
                   capture_output=True, env=env, timeout=180)
    return f"127.0.0.1:{port}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/serve_load.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--frames", type=int, default=12, help="frames per clip")
    ap.add_argument("--videos", type=int, default=60, help="distinct clips to draw from")
    ap.add_argument("--threads", type=int, default=2, help="cores per server / replica")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--overload-queue", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800, help="per phase, seconds")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="virst-load-"))
    videos = make_videos(tmp, args.videos, args.frames)
    rows = [phase(args, "single process", videos, max_queue=4 * args.concurrency),
            phase(args, "overloaded", videos, max_queue=args.overload_queue)]
    print(json.dumps(rows[:2]), file=sys.stderr)  # kept even if the Ray phase fails
    if not args.no_ray:
        address = start_ray(tmp / "ray", args.replicas * args.threads)
        try:
            rows.append(phase(args, f"ray {args.replicas} replicas", videos,
                              max_queue=4 * args.concurrency, ray_address=address))
        finally:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)
    head = (f"{'phase':<20}{'queue':>6}{'req/s':>7}{'FPS':>8}{'p50 s':>7}{'p95 s':>7}"
            f"{'p99 s':>7}{'5xx':>5}{'429':>6}  {'RSS first/last/peak MB':<24} statuses")
    print(head)
    for r in rows:
        rss = (f"{r['rss_first_quarter_mb']:.0f}/{r['rss_last_quarter_mb']:.0f}/"
               f"{r['rss_peak_mb']:.0f} ({100 * (r['rss_growth'] or 0):+.1f}%)")
        print(f"{r['phase']:<20}{r['max_queue']:>6}{r['throughput_rps']:7.2f}"
              f"{r['frames_per_second']:8.1f}{r['p50_s']:7.2f}{r['p95_s']:7.2f}"
              f"{r['p99_s']:7.2f}{r['server_errors']:5d}{r['rate_429']:6.1%}  {rss:<24} "
              f"{r['statuses']}")
    print(f"{args.requests} requests per phase at concurrency {args.concurrency}, clips of "
          f"{args.frames} frames, {args.threads} threads per server/replica, loopback only")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
