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
# the demo clip (shapes valid video, expression): one the default model gets right (J&F 97);
# it gets 5 of the 80 valid expressions right, see its model card
DEMO_VIDEO, DEMO_EXPRESSION = 5, 0


def load_model(folder: str | None, device: str = "cpu"):
    """The model in `folder`, else the embedded default (or, before one is shipped, a seeded
    random tiny model, announced as such)."""
    from virst.model import VirstModel

    if folder:
        return VirstModel.from_pretrained(folder, device)
    if (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        return VirstModel.from_pretrained(DEFAULT_MODEL_DIR, device)
    print("note: no trained default model is embedded; using the seeded random tiny model",
          file=sys.stderr)
    return VirstModel.from_preset("tiny", seed=0).to(device)


def cmd_segment(args) -> None:
    from virst.media import load_video, save_masks

    model = load_model(args.model, args.device)
    video = load_video(args.video)
    start = time.perf_counter()
    masks = model.segment(video, args.expression, seed=args.seed, progress=True)
    took = time.perf_counter() - start
    save_masks(masks.astype(np.uint8), video.names, args.output)
    print(f"{len(video)} frames in {took:.1f} s ({len(video) / took:.1f} FPS); "
          f"masks in {args.output}")


def cmd_demo(args) -> None:
    """A clip of the generated shapes benchmark (valid split, which training never sees),
    segmented with the default model; masks, an overlay video and image, and the clip's J&F
    against its ground truth."""
    from PIL import Image

    from virst.data.shapes import make_video
    from virst.eval.metrics import sequence_jf
    from virst.media import Video, contact_sheet, overlay, save_masks, write_video

    out = Path(args.output)
    clip = make_video("valid", args.video)
    if not 0 <= args.expression < len(clip.expressions):
        raise InputError(f"valid video {args.video} has {len(clip.expressions)} expressions; "
                         f"--expression {args.expression} is out of range")
    expression, objects, _ = clip.expressions[args.expression]
    truth = clip.masks[objects].any(axis=0)
    video = Video(clip.frames, [f"{i:05d}" for i in range(len(clip.frames))])
    model = load_model(args.model, args.device)
    start = time.perf_counter()
    masks = model.segment(video, expression, progress=True)
    took = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    save_masks(masks.astype(np.uint8), video.names, out / "masks")
    write_video(clip.frames, out / "clip.mp4")
    tinted = overlay(clip.frames, masks)
    write_video(tinted, out / "overlay.mp4")
    Image.fromarray(contact_sheet(tinted)).save(out / ".overlay.partial.png")
    os.replace(out / ".overlay.partial.png", out / "overlay.png")
    j, f, jf = sequence_jf(truth, masks)
    print(f"demo: shapes valid video {args.video} ({len(video)} frames), {expression!r}: "
          f"{took:.1f} s ({len(video) / took:.1f} FPS); J {100 * j:.1f}, F {100 * f:.1f}, "
          f"J&F {100 * jf:.1f} against the ground truth")
    print(f"demo: masks in {out / 'masks'}, overlay in {out / 'overlay.mp4'} and "
          f"{out / 'overlay.png'}")


def cmd_eval(args) -> None:
    from virst.data.shapes import write_split
    from virst.eval.run import evaluate, report

    root = Path(args.root)
    meta = root / f"meta_expressions_{args.split}_.json"
    if args.dataset == "shapes" and not meta.is_file():
        print(f"generating the shapes {args.split} split in {root}", file=sys.stderr)
        write_split(root, args.split, args.count)
    model = None if args.pred else load_model(args.model, args.device)
    result = evaluate(args.dataset, root, args.output, model=model,
                      model_label=str(args.model or "default"), pred_dir=args.pred,
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
    import shutil

    from virst.data.shapes import write_split
    from virst.eval.run import evaluate, report
    from virst.model import VirstModel
    from virst.train.trainer import TrainConfig, Trainer

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
                      points_every=args.points_every)
    for stage, steps in zip(stages, args.steps or []):
        cfg.steps[stage] = steps
    for stage, lr in zip(stages, args.lr or []):
        cfg.lr[stage] = lr
    overrides = dict(_config_value(kv) for kv in args.set or [])
    model = (VirstModel.from_pretrained(args.init) if args.init
             else VirstModel.from_preset(args.preset, seed=args.seed, **overrides))
    val_root = Path(args.output) / "shapes"

    def validate(model, stage):
        if cfg.eval_videos <= 0:
            return None
        if not (val_root / "meta_expressions_valid_.json").is_file():
            write_split(val_root, "valid", cfg.eval_videos, progress=False)
        out = Path(args.output) / f"eval-stage{stage}"
        shutil.rmtree(out, ignore_errors=True)
        result = evaluate("shapes", val_root, out, model=model, model_label=f"stage{stage}")
        print(report(result))
        return result["table"]

    Trainer(model, cfg).run(validate=validate)
    print(f"model in {Path(args.output) / 'model'}")


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
    p.add_argument("expression")
    p.add_argument("-o", "--output", required=True, help="folder for one PNG mask per frame")
    p.add_argument("--model", help="model folder (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=None,
                   help="random frame sampling as in the release (default: deterministic)")
    p.set_defaults(run=cmd_segment)

    p = sub.add_parser("demo", help="generate a clip and segment it with the default model")
    p.add_argument("-o", "--output", default="out/demo")
    p.add_argument("--model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--video", type=int, default=DEMO_VIDEO, help="shapes valid video index")
    p.add_argument("--expression", type=int, default=DEMO_EXPRESSION,
                   help="expression index within that video")
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
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--init", help="model folder to start from (default: random init)")
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")],
                   help="optimizer steps per stage, comma-separated in stage order")
    p.add_argument("--lr", type=lambda s: [float(x) for x in s.split(",")],
                   help="learning rate per stage, comma-separated in stage order")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a preset config field (repeatable)")
    p.add_argument("--propagate-every", type=int, default=2,
                   help="stage 0: every n-th sample trains propagation")
    p.add_argument("--points-every", type=int, default=0,
                   help="stage 0: every n-th sample trains SAM2 click prompts (0: never)")
    p.add_argument("--lora", action="store_true", help="LoRA (r 64, alpha 16) on the LLM")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--eval-videos", type=int, default=24)
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
