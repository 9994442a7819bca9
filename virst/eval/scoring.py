"""Scoring a whole dataset: per-expression metrics in a process pool, then the official tables.

Predictions live in PRED/<video>/<exp_id>/<frame>.png. A missing or unreadable prediction
frame is scored as an empty mask and reported (never dropped).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from virst.data.rvos import RVOSDataset, open_dataset
from virst.eval.metrics import (
    boundary_f,
    region_similarity,
    revos_accuracy,
    revos_robustness,
)


@dataclass
class ExpressionScore:
    key: str
    type_id: int | None
    J: float
    F: float
    A: float | None = None
    R: float | None = None
    missing: list[str] = field(default_factory=list)  # prediction frames scored as empty


def read_prediction(folder: Path, frames, shape) -> tuple[np.ndarray, list[str]]:
    """(T, H, W) bool predictions; absent, unreadable or mis-sized frames become empty."""
    pred = np.zeros((len(frames), *shape), bool)
    missing = []
    for t, name in enumerate(frames):
        try:
            with Image.open(folder / f"{name}.png") as im:
                m = np.asarray(im)
        except (FileNotFoundError, UnidentifiedImageError, OSError):
            missing.append(name)
            continue
        if m.ndim == 3:
            m = m.max(axis=2)
        if m.shape != shape:
            missing.append(name)
            continue
        pred[t] = m > 0
    return pred, missing


def score_expression(dataset: RVOSDataset, index: int, pred_dir: Path) -> ExpressionScore:
    expr = dataset.expressions[index]
    gt = dataset.ground_truth(expr)
    pred, missing = read_prediction(pred_dir / expr.video / expr.exp_id, expr.frames,
                                    gt.shape[1:])
    score = ExpressionScore(expr.key, expr.type_id,
                            float(np.mean(region_similarity(gt, pred))),
                            float(np.mean(boundary_f(gt, pred))), missing=missing)
    fg = dataset.foreground(expr)
    if fg is not None:
        score.A = float(np.mean(revos_accuracy(gt, pred)))
        score.R = float(np.mean(revos_robustness(gt, pred, fg)))
    return score


_WORKER: dict = {}


def _init_worker(name: str, root: str, split: str) -> None:
    _WORKER["dataset"] = open_dataset(name, root, split)


def _score_in_worker(args) -> ExpressionScore:
    index, pred_dir = args
    return score_expression(_WORKER["dataset"], index, Path(pred_dir))


def score_dataset(dataset: RVOSDataset, split: str, pred_dir: Path, indices=None,
                  workers: int | None = None, on_result=None) -> list[ExpressionScore]:
    """Score the expressions at `indices` (all by default), `workers` processes in parallel.

    `on_result(score)` is called as each expression finishes (used to checkpoint progress).
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    workers = min(workers or os.cpu_count() or 1, max(1, len(indices)))
    results = []
    with contextlib.ExitStack() as stack:
        if workers == 1:
            stream = (score_expression(dataset, i, pred_dir) for i in indices)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(
                workers, initializer=_init_worker,
                initargs=(dataset.name, str(dataset.root), split)))
            stream = pool.map(_score_in_worker, [(i, str(pred_dir)) for i in indices])
        for score in stream:
            results.append(score)
            if on_result is not None:
                on_result(score)
    return results


def _pct(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def summarize(name: str, scores: list[ExpressionScore]) -> dict:
    """The dataset's official table, in percent.

    ReVOS (and shapes): per-expression scores are rounded to 2 decimals (as the official
    script does) before the referring / reasoning means; overall = mean of the two split
    means; type 2 (no target) is excluded. Others: means over all expressions.
    """
    if name not in ("revos", "shapes"):
        j = 100 * _pct([s.J for s in scores])
        f = 100 * _pct([s.F for s in scores])
        return {"all": {"J": j, "F": f, "J&F": (j + f) / 2, "expressions": len(scores)}}
    table = {}
    for type_id, split in ((0, "referring"), (1, "reasoning")):
        rows = [s for s in scores if s.type_id == type_id]
        vals = {m: _pct([round(100 * getattr(s, m), 2) for s in rows]) for m in "JFAR"}
        table[split] = {**vals, "J&F": (vals["J"] + vals["F"]) / 2, "expressions": len(rows)}
    ref, rea = table["referring"], table["reasoning"]
    table["overall"] = {m: (ref[m] + rea[m]) / 2 for m in ("J", "F", "A", "R", "J&F")}
    table["overall"]["expressions"] = ref["expressions"] + rea["expressions"]
    return table


def format_table(name: str, table: dict) -> str:
    cols = ["J", "F", "J&F"] + (["A", "R"] if name in ("revos", "shapes") else [])
    lines = [f"{'split':<10}" + "".join(f"{c:>8}" for c in cols) + f"{'exprs':>8}"]
    for split, row in table.items():
        lines.append(f"{split:<10}" + "".join(f"{row[c]:8.2f}" for c in cols)
                     + f"{row['expressions']:8d}")
    return "\n".join(lines)


def to_json(scores: list[ExpressionScore]) -> list[dict]:
    return [asdict(s) for s in scores]
