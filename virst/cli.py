"""The `virst` command: segment, eval, data, train, convert, demo, info."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from virst.errors import InputError, VirstError

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"
VALID_VIDEOS = 24  # the shapes valid split the demo draws from (training never sees it)


def load_model(folder: str | None, device: str = "cpu"):
    """The model in `folder`, else the embedded default."""
    from virst.model import VirstModel

    return VirstModel.from_pretrained(folder or DEFAULT_MODEL_DIR, device)


def cmd_segment(args) -> None:
    """Every check that can run before the work runs first (options, expressions, outputs,
    the video's container), then the runtime streams the video through the model."""
    from tqdm.auto import tqdm

    from runtime.pipeline import Runtime, parse_backend, parse_device, parse_precision
    from runtime.video import open_video
    from runtime.writer import MaskWriter
    from virst.model import VirstModel
    from virst.prompt import normalize_expression

    parse_backend(args.backend), parse_device(args.device), parse_precision(args.precision)
    expressions = [normalize_expression(e) for e in args.expression]
    VirstModel.check_folder(args.model or DEFAULT_MODEL_DIR)
    writer = MaskWriter(expressions, (0, 0), folder=args.output, rle_path=args.rle,
                        overlay_path=args.overlay, overwrite=args.overwrite,
                        label=str(args.video))
    source = open_video(args.video, args.allow_truncated)
    writer.size, writer.fps = source.size, source.fps
    runtime = Runtime(args.model, backend=args.backend, device=args.device,
                      precision=args.precision, artifacts=args.artifacts, threads=args.threads)
    runtime.check_expressions(expressions)
    writer.background = runtime.threads.writer_thread
    session = runtime.session(source, seed=args.seed)
    start = time.perf_counter()
    # pass 1 reads the whole video before the first mask: minutes for an hour of 1080p
    with tqdm(total=session.sampled_frames, desc="pass 1 (sampled frames)", unit="frame",
              leave=False) as bar:
        session.on_sampled = bar.update
        session.video_tokens()
        session.on_sampled = None
    with writer, tqdm(total=session.length, desc="segment", unit="frame") as bar:
        for frame in session.segment(expressions, keep_frames=writer.wants_frames):
            writer.write(frame)
            bar.update()
    took = time.perf_counter() - start
    where = ", ".join(str(p) for p in (args.output, args.rle, args.overlay) if p)
    print(f"{session.length} frames in {took:.1f} s ({session.length / took:.1f} FPS) on "
          f"{runtime.describe()}; written to {where}")


def _check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on now, rather than after loading the model
    (uvicorn found it taken 5 s later with the embedded model)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise InputError(f"--host {host}: {err}") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise InputError(f"cannot listen on {host}:{port}: {err.strerror}") from err


def cmd_serve(args) -> None:
    """The runtime behind HTTP (runtime/serve.py); `--ray` deploys it on Ray Serve."""
    from runtime.serve import ServeConfig, log_off_the_event_loop, read_api_keys
    from runtime.store import Limits

    given = {"frames": args.max_frames, "megapixels": args.max_megapixels,
             "extracted_mb": args.max_extracted_mb}
    limits = Limits(**{k: v for k, v in given.items() if v is not None})  # else the defaults
    config = ServeConfig(max_upload_mb=args.max_upload_mb, max_uploads=args.max_uploads,
                         max_store_gb=args.max_store_gb,
                         limits=limits, max_queue=args.max_queue,
                         max_unstreamed=args.max_unstreamed,
                         deadline_s=args.deadline_s, sessions=args.sessions,
                         api_keys=read_api_keys(args.api_keys) if args.api_keys else [])
    if args.store:
        config.store = Path(args.store)
    if args.media_root:
        config.media_root = Path(args.media_root)
        if not config.media_root.is_dir():
            raise InputError(f"--media-root {args.media_root} is not a folder")
    log_off_the_event_loop()
    runtime_args = dict(model=args.model, backend=args.backend, device=args.device,
                        precision=args.precision, artifacts=args.artifacts,
                        threads=args.threads)
    if args.ray:
        from runtime.scale import run_ray

        run_ray(runtime_args, config, args.host, args.port, args.replicas, args.ray_address)
        return
    import uvicorn

    from runtime.pipeline import Runtime
    from runtime.serve import create_app

    _check_port(args.host, args.port)  # before the model loads (minutes for the full one)
    app = create_app(Runtime(**runtime_args), config)
    # keep-alive longer than the client's pools: a connection the server drops just as a
    # client reuses it fails a POST that nothing retries
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_keep_alive=75)


def cmd_client(args) -> None:
    import os

    from runtime.client import segment_to

    summary = segment_to(args.url, args.video, args.expression, folder=args.output,
                         rle_path=args.rle, overwrite=args.overwrite,
                         api_key=args.api_key or os.environ.get("VIRST_API_KEY"))
    print(f"{summary.get('frames')} frames in {summary.get('seconds')} s on the server "
          f"({summary.get('fps')} FPS); masks in {args.output or args.rle}")


def demo_videos(seed: int, clips: int) -> list[int]:
    """Which shapes valid videos the demo shows: drawn by `seed`, never picked by hand."""
    rng = np.random.default_rng(seed)
    return sorted(int(v) for v in rng.choice(VALID_VIDEOS, size=min(clips, VALID_VIDEOS),
                                             replace=False))


def cmd_demo(args) -> None:
    """Shapes valid clips drawn by a seed, every expression of each segmented in one pass
    with the default model: masks, an overlay video and image per clip, and J&F per
    expression against the clip's ground truth."""
    from PIL import Image

    from runtime.pipeline import Runtime
    from runtime.writer import MaskWriter, overlay_frame
    from virst.data.shapes import make_video
    from virst.eval.metrics import sequence_jf
    from virst.media import Video, contact_sheet

    out = Path(args.output)
    videos = [args.video] if args.video is not None else demo_videos(args.seed, args.clips)
    if any(not 0 <= v < VALID_VIDEOS for v in videos):
        raise InputError(f"--video must be within 0-{VALID_VIDEOS - 1}")
    runtime = Runtime(args.model, backend=args.backend, device=args.device)
    scores = []
    for v in videos:
        clip = make_video("valid", v)
        texts = [e[0] for e in clip.expressions]
        names = [f"{i:05d}" for i in range(len(clip.frames))]
        folder = out / f"valid-{v:02d}"
        session = runtime.session(Video(clip.frames, names))
        start = time.perf_counter()
        kept = []
        with MaskWriter(texts, session.source.size, folder=folder / "masks",
                        overlay_path=folder / "overlay.mp4", fps=10, overwrite=True,
                        background=runtime.threads.writer_thread) as writer:
            for frame in session.segment(texts, keep_frames=True):
                writer.write(frame)
                kept.append(frame.masks)
        took = time.perf_counter() - start
        masks = np.stack(kept, axis=1)  # (E, T, H, W)
        sheet = contact_sheet(np.stack([overlay_frame(f, m) for f, m in
                                        zip(clip.frames, masks.transpose(1, 0, 2, 3))]))
        Image.fromarray(sheet).save(folder / ".overlay.partial.png")
        os.replace(folder / ".overlay.partial.png", folder / "overlay.png")
        print(f"demo: shapes valid video {v} ({len(names)} frames, {len(texts)} expressions "
              f"in {took:.1f} s, {len(names) / took:.1f} FPS); overlay in {folder}")
        for (text, objects, kind), pred in zip(clip.expressions, masks):
            _, _, jf = sequence_jf(clip.masks[objects].any(axis=0), pred)
            scores.append(jf)
            label = "referring" if kind == 0 else "reasoning"
            print(f"  J&F {100 * jf:5.1f}  {label:<9}  {text!r}")
    print(f"demo: mean J&F {100 * np.mean(scores):.1f} over the {len(scores)} expressions "
          f"shown (the model card gives the whole valid split)")


def cmd_eval(args) -> None:
    from virst.data.shapes import write_split
    from virst.eval.run import evaluate, report

    root = Path(args.root)
    meta = root / f"meta_expressions_{args.split}_.json"
    if args.dataset == "shapes" and not meta.is_file():
        print(f"generating the shapes {args.split} split in {root}", file=sys.stderr)
        write_split(root, args.split, args.count)
    model = None
    if args.pred is None and args.backend == "reference":
        model = load_model(args.model, args.device)
    elif args.pred is None:
        from runtime.pipeline import Runtime

        model = Runtime(args.model, backend=args.backend, device=args.device,
                        threads=args.threads)
    label = f"{args.model or 'default'}" + ("" if args.backend == "reference"
                                            else f" on {args.backend}")
    result = evaluate(args.dataset, root, args.output, model=model, model_label=label,
                      pred_dir=args.pred,
                      split=args.split, workers=args.workers)
    print(report(result))
    print(f"results in {Path(args.output) / 'results.json'}")


def cmd_data(args) -> None:
    from virst.data.shapes import write_split

    for split in args.splits.split(","):
        count = {"train": args.train, "valid": args.valid, "test": args.test}[split]
        meta = write_split(args.root, split, count)
        print(f"{split}: {count} videos, {meta}")


def cmd_train(args) -> None:
    """One process, or every rank of a torchrun launch (`python -m virst.train`)."""
    import shutil

    import torch

    from virst.data.shapes import write_split
    from virst.eval.run import evaluate, report
    from virst.model import VirstModel
    from virst.train import distributed as D
    from virst.train.trainer import TrainConfig, Trainer

    if args.plan:
        from virst.train.plan import memory_plan

        print(memory_plan(args.preset, args.nproc, args.gpu_gb))
        return
    if not args.output:
        raise InputError("give a run folder: -o OUT")
    if args.data != "shapes":
        raise InputError(f"training data {args.data!r}: only the generated shapes are here")
    names = ("0", "1", "2", "3")
    stages = ([1, 2, 3] if args.init else [0, 1, 2, 3]) if args.stage == "all" else [
        int(s) for s in args.stage.split(",") if s in names]
    if args.stage != "all" and (len(stages) != len(args.stage.split(","))
                                or stages != sorted(set(stages))):
        raise InputError(f"--stage {args.stage!r}: give 'all' or increasing stages from 0-3")
    cfg = TrainConfig(out=args.output, stages=stages, lora=args.lora, seed=args.seed,
                      accumulate=args.accumulate, eval_videos=args.eval_videos,
                      save_every=args.save_every, propagate_every=args.propagate_every,
                      points_every=args.points_every, prompt_init=not args.init,
                      scratch_losses=(not args.init if args.scratch_losses is None
                                      else args.scratch_losses),
                      check_every=args.check_every, check_videos=args.check_videos,
                      strategy=args.strategy, checkpointing=args.checkpointing,
                      grounding_only=args.grounding_only, train_videos=args.train_videos,
                      first_video=args.first_video)
    for stage, steps in zip(stages, args.steps or []):
        cfg.steps[stage] = steps
    for stage, lr in zip(stages, args.lr or []):
        cfg.lr[stage] = lr
    overrides = dict(_config_value(kv) for kv in args.set or [])
    world = D.init_world(D.device_for(D.World(), args.device))
    device = D.device_for(world, args.device)
    if args.init and overrides:  # e.g. a finer STF grid on a trained model: STF starts fresh
        model, fresh = VirstModel.from_pretrained_changed(args.init, device, args.seed,
                                                          **overrides)
        if world.main:
            print(f"{args.init} with {overrides}: {', '.join(fresh) or 'no part'} "
                  f"start(s) fresh")
    elif args.init:
        model = VirstModel.from_pretrained(args.init, device)
    else:
        model = VirstModel.from_preset(args.preset, seed=args.seed, device=device, **overrides)
    val_root = Path(args.output) / "shapes"

    def validate(model, stage):
        if not (val_root / "meta_expressions_valid_.json").is_file():
            write_split(val_root, "valid", cfg.eval_videos, progress=False)
        out = Path(args.output) / f"eval-stage{stage}"
        shutil.rmtree(out, ignore_errors=True)
        result = evaluate("shapes", val_root, out, model=model, model_label=f"stage{stage}")
        print(report(result))
        return {**result["table"], "expression_agreement": result["expression_agreement"]}

    Trainer(model, cfg, world=world).run(stop_after=args.stop_after, validate=validate)
    if world.main:
        print(f"model in {Path(args.output) / 'model'} ({world.size} process(es), "
              f"{cfg.strategy if world.distributed else 'single process'})")
        if device.type == "cuda":
            print(f"peak GPU memory on rank 0: "
                  f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    if world.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def _config_value(text: str) -> tuple[str, object]:
    """KEY=VALUE for a config field; the value is read as JSON when it parses."""
    import json

    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_convert(args) -> None:
    from virst.checkpoint import convert
    from virst.config import preset

    table = convert(args.official, args.output, videochat=args.videochat, sam2=args.sam2,
                    config=preset(args.preset), alpha=args.lora_alpha)
    print(table)
    print(f"model in {args.output}")


def cmd_info(args) -> None:
    from virst.config import preset
    from virst.model import describe

    print(describe(preset(args.preset)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virst", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment the object an expression describes")
    p.add_argument("video", help="video file or folder of frames")
    p.add_argument("expression", nargs="+",
                   help="one or more expressions (several share one pass over the video)")
    p.add_argument("-o", "--output", help="folder for one PNG mask per frame (a subfolder "
                                          "per expression when there are several)")
    p.add_argument("--rle", help="also write COCO RLE masks to this JSON file")
    p.add_argument("--overlay", help="also write the video with the masks tinted (mp4)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the masks of a non-empty output folder")
    p.add_argument("--model", help="model folder (default: the embedded model)")
    p.add_argument("--backend", default="eager",
                   help="eager, compiled, onnxruntime or tensorrt (default: eager)")
    p.add_argument("--artifacts", help="export folder for onnxruntime / tensorrt (default: "
                                       "built from the model once and cached)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16")
    p.add_argument("--threads", type=int, help="cores to use (default: all available)")
    p.add_argument("--allow-truncated", action="store_true",
                   help="segment a video that ends before its container says (warns)")
    p.add_argument("--seed", type=int, default=None,
                   help="random frame sampling as in the release (default: deterministic)")
    p.set_defaults(run=cmd_segment)

    p = sub.add_parser("serve", help="serve the runtime over HTTP (FastAPI; --ray: Ray Serve)")
    p.add_argument("--model", help="model folder (default: the embedded model)")
    p.add_argument("--backend", default="eager")
    p.add_argument("--artifacts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, help="cores per model replica")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", help="where uploads are kept (default ~/.cache/virst/videos)")
    p.add_argument("--media-root", help="folder whose files may be segmented by path")
    p.add_argument("--max-upload-mb", type=float, default=512)
    p.add_argument("--max-uploads", type=int, default=4, help="uploads at once before 429")
    p.add_argument("--max-store-gb", type=float,
                   help="least recently used videos deleted beyond this (default: no limit)")
    p.add_argument("--max-frames", type=int, help="frames a video (default 100000)")
    p.add_argument("--max-megapixels", type=float, help="pixels a frame (default 36)")
    p.add_argument("--max-extracted-mb", type=float,
                   help="a frame archive's files, uncompressed (default 2048)")
    p.add_argument("--max-queue", type=int, default=8, help="waiting requests before 429")
    p.add_argument("--max-unstreamed", type=int, default=20_000,
                   help="frames x expressions of one ?stream=false answer")
    p.add_argument("--deadline-s", type=float, default=600, help="per-request deadline")
    p.add_argument("--sessions", type=int, default=4, help="videos whose features stay cached")
    p.add_argument("--api-keys", help="file of bearer tokens, one per line (default: no auth)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve")
    p.add_argument("--replicas", type=int, default=2, help="model replicas (--ray)")
    p.add_argument("--ray-address", default="auto",
                   help="Ray cluster to join (--ray; 'auto': the local one, else start one)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("client", help="segment a video on a `virst serve` server")
    csub = p.add_subparsers(dest="client_command", required=True)
    c = csub.add_parser("segment", help="upload, segment, write masks like `virst segment`")
    c.add_argument("url")
    c.add_argument("video")
    c.add_argument("expression", nargs="+")
    c.add_argument("-o", "--output", help="mask folder")
    c.add_argument("--rle", help="COCO RLE JSON file")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--api-key", help="bearer token (default: $VIRST_API_KEY)")
    c.set_defaults(run=cmd_client)

    p = sub.add_parser("demo", help="segment seeded shapes clips with the default model")
    p.add_argument("-o", "--output", default="out/demo")
    p.add_argument("--model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="draws the clips shown")
    p.add_argument("--clips", type=int, default=2, help="how many valid clips to show")
    p.add_argument("--video", type=int, help="show this valid video instead")
    p.add_argument("--backend", default="eager")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("eval", help="score a model or saved predictions on an RVOS dataset")
    p.add_argument("--dataset", required=True,
                   choices=["revos", "mevis", "refytvos", "davis17", "shapes"])
    p.add_argument("--root", required=True, help="dataset folder (shapes: generated if empty)")
    p.add_argument("-o", "--output", required=True, help="folder for predictions and scores")
    p.add_argument("--model", help="model folder (default: the embedded model)")
    p.add_argument("--pred", help="score these saved predictions instead of running a model")
    p.add_argument("--split", default="valid")
    p.add_argument("--count", type=int, default=24, help="shapes videos to generate if absent")
    p.add_argument("--workers", type=int, default=None, help="scoring processes")
    p.add_argument("--backend", default="reference",
                   help="reference (VirstModel.segment) or a runtime backend: eager, "
                        "compiled, onnxruntime, tensorrt")
    p.add_argument("--threads", type=int, help="cores for a runtime backend")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("data", help="generate the shapes benchmark (ReVOS layout)")
    p.add_argument("name", choices=["shapes"])
    p.add_argument("--root", required=True)
    p.add_argument("--splits", default="valid,test")
    p.add_argument("--valid", type=int, default=24)
    p.add_argument("--test", type=int, default=24)
    p.add_argument("--train", type=int, default=2000)
    p.set_defaults(run=cmd_data)

    p = sub.add_parser("train", help="progressive training (resumes from -o if interrupted)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default="shapes")
    p.add_argument("--stage", default="all", help="'all' or stages in order, e.g. 3 or 0,3")
    p.add_argument("-o", "--output", help="run folder (required unless --plan)")
    p.add_argument("--init", help="model folder to start from (default: random init)")
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")],
                   help="optimizer steps per stage, comma-separated in stage order")
    p.add_argument("--lr", type=lambda s: [float(x) for x in s.split(",")],
                   help="learning rate per stage, comma-separated in stage order")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field of the preset, or of the --init model (tensors "
                   "the change reshapes start fresh; repeatable)")
    p.add_argument("--scratch-losses", action=argparse.BooleanOptionalAction,
                   help="the expression and grounding losses, for an LLM and STF trained from "
                   "scratch (default: on without --init)")
    p.add_argument("--propagate-every", type=int, default=2,
                   help="stage 0: every n-th sample trains propagation from clicks")
    p.add_argument("--points-every", type=int, default=4,
                   help="stages 2-3: every n-th sample trains SAM2 click prompts (0: never)")
    p.add_argument("--check-every", type=int, default=100,
                   help="measure prompt following every n steps of stages training SAM2")
    p.add_argument("--check-videos", type=int, default=12,
                   help="held-out videos of the prompt-following check (0: no checks)")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2"],
                   help="with several ranks (torchrun -m virst.train): DDP or FSDP2")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing of the transformer blocks")
    p.add_argument("--device", help="default: this rank's GPU if there is one, else cpu")
    p.add_argument("--stop-after", type=int, help="stop after this many optimizer steps, "
                   "checkpoint written, as an interruption would (resume: run again)")
    p.add_argument("--plan", action="store_true",
                   help="print the per-rank memory plan (meta device, no training)")
    p.add_argument("--nproc", type=int, default=8, help="ranks of the --plan")
    p.add_argument("--gpu-gb", type=float, default=80, help="GPU memory of the --plan")
    p.add_argument("--lora", action="store_true", help="LoRA (r 64, alpha 16) on the LLM")
    p.add_argument("--accumulate", type=int, default=1,
                   help="samples per optimizer step over all ranks (a multiple of the ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--eval-videos", type=int, default=24)
    p.add_argument("--grounding-only", action="store_true",
                   help="stage 1 trains where STF looks, no mask decoder, on features kept "
                        "per training video (give --train-videos: the pool)")
    p.add_argument("--train-videos", type=int, default=100_000,
                   help="shapes training videos the sampler cycles over")
    p.add_argument("--first-video", type=int, default=0,
                   help="index of the first of them (a pool of videos a run has not seen)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("convert", help="import the authors' released checkpoint")
    p.add_argument("--official", required=True, help="the release's .pt (model_state_dict)")
    p.add_argument("--videochat", help="VideoChat-Flash-Qwen2-7B_res448 folder (fallback, "
                                       "tokenizer)")
    p.add_argument("--sam2", help="sam2.1_hiera_large.pt (fallback)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--preset", default="virst-7b")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("info", help="parameter count per part of a preset")
    p.add_argument("--preset", default="virst-7b")
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except VirstError as err:
        print(f"virst: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
