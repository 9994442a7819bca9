"""`virst eval`: run a model over a dataset (or read saved predictions), score, print the
official table. Resumable: finished predictions and scores are kept in OUT and skipped.

    OUT/run.json        what this folder evaluates (a resumed run must match it)
    OUT/pred/...        predictions, PRED/<video>/<exp_id>/<frame>.png (unless --pred)
    OUT/scores.jsonl    one line per scored expression, appended as each finishes
    OUT/results.json    the table, every expression's scores, missing predictions
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from virst.data.rvos import RVOSDataset, open_dataset
from virst.errors import InputError
from virst.eval.prompting import expression_agreement
from virst.eval.scoring import ExpressionScore, format_table, score_dataset, summarize, to_json
from virst.media import save_masks


def _check_run(out: Path, spec: dict) -> None:
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != spec:
            raise InputError(f"{out} holds another evaluation ({old}); use a new -o folder")
    else:
        path.write_text(json.dumps(spec, indent=2) + "\n")


def _complete(folder: Path, frames) -> bool:
    return folder.is_dir() and all((folder / f"{f}.png").is_file() for f in frames)


def predict(dataset: RVOSDataset, model, pred_dir: Path, progress: bool = True) -> int:
    """Write predictions for every expression that has none yet; returns how many ran.
    `model`: a `VirstModel` (one expression at a time) or a runtime `Runtime` (all the
    expressions of a video in one pass)."""
    todo = [e for e in dataset.expressions
            if not _complete(pred_dir / e.video / e.exp_id, e.frames)]
    by_video: dict[str, list] = {}
    for expr in todo:
        by_video.setdefault(expr.video, []).append(expr)
    bar = tqdm(total=len(todo), desc="predict", disable=not progress)
    for exprs in by_video.values():
        video = dataset.load_video(exprs[0])
        if hasattr(model, "session"):
            masks = np.stack([f.masks for f in model.session(video).segment(
                [e.text for e in exprs])], axis=1)
        else:
            masks = [model.segment(video, e.text) for e in exprs]
        for expr, m in zip(exprs, masks):
            save_masks(m.astype("uint8"), list(expr.frames), pred_dir / expr.video / expr.exp_id)
            bar.update()
    bar.close()
    return len(todo)


def _load_scores(path: Path) -> dict[str, ExpressionScore]:
    if not path.is_file():
        return {}
    scores = {}
    for line in path.read_text().splitlines():
        if line.strip():
            s = ExpressionScore(**json.loads(line))
            scores[s.key] = s
    return scores


def evaluate(name: str, root, out, *, model=None, model_label: str = "", pred_dir=None,
             split: str = "valid", workers: int | None = None, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(name, root, split)
    if pred_dir is None and model is None:
        raise InputError("give a model or a folder of predictions (--pred)")
    spec = {"dataset": name, "root": str(Path(root).resolve()), "split": split,
            "source": str(Path(pred_dir).resolve()) if pred_dir else f"model:{model_label}"}
    _check_run(out, spec)
    if pred_dir is None:
        pred_dir = out / "pred"
        predict(dataset, model, pred_dir, progress)
    pred_dir = Path(pred_dir)
    scores_path = out / "scores.jsonl"
    done = _load_scores(scores_path)
    todo = [i for i, e in enumerate(dataset.expressions) if e.key not in done]
    with open(scores_path, "a") as log, tqdm(total=len(todo), desc="score",
                                              disable=not progress) as bar:
        def record(score: ExpressionScore) -> None:
            log.write(json.dumps(to_json([score])[0]) + "\n")
            log.flush()
            done[score.key] = score
            bar.update()

        score_dataset(dataset, split, pred_dir, todo, workers, on_result=record)
    scores = [done[e.key] for e in dataset.expressions]
    table = summarize(name, scores)
    missing = {s.key: s.missing for s in scores if s.missing}
    result = {"dataset": name, "split": split, "table": table,
              "expression_agreement": expression_agreement(dataset, pred_dir),
              "missing_predictions": missing, "expressions": to_json(scores)}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out / "results.json")
    return result


def report(result: dict) -> str:
    lines = [f"{result['dataset']} ({result['split']})", format_table(result["dataset"],
                                                                    result["table"])]
    agree = result.get("expression_agreement", {})
    if agree.get("pairs"):
        lines.append(f"agreement between the masks of different expressions of one clip: "
                     f"{agree['agreement']:.2f} over {agree['pairs']} pairs (near 1: the "
                     f"expression is ignored)")
    missing = result["missing_predictions"]
    if missing:
        frames = sum(len(v) for v in missing.values())
        first = ", ".join(list(missing)[:5])
        lines.append(f"warning: {frames} prediction frames of {len(missing)} expressions were "
                     f"missing or unreadable and scored as empty masks ({first}...)")
    return "\n".join(lines)
