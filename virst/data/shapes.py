"""The generated RVOS benchmark "shapes": videos of coloured shapes whose referring
expressions need the whole video to answer ("the red circle that stops moving").

Each video is built around one temporal scenario (look-alike twins that differ only in how
they move, an object hidden behind another, an object that leaves and comes back), plus
random distractors. Expressions are produced from facts measured on the rendered video
(speeds, stops, visibility), and kept only when they single out exactly one object, with
a margin. Type 0 (referring) names appearance; type 1 (reasoning) needs motion over time.

Deterministic from (split, index); written in the ReVOS layout so that the ReVOS reader
and scorer handle it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from virst.data.render import COLORS, KINDS, Shape, render
from virst.data.rvos import encode_rle

HEIGHT, WIDTH = 160, 224
SPLIT_SEEDS = {"train": 1_000_003, "valid": 2_000_003, "test": 3_000_017}
DEFAULT_SIZES = {"valid": 24, "test": 24, "train": 0}
SCENARIOS = ("stops", "faster", "still", "hidden", "returns", "starts_late", "left_longest")
MOVE_EPS = 0.6  # px/frame: slower counts as not moving


@dataclass
class Facts:
    """What an object does over the video, measured on its trajectory and visible mask."""

    moving: np.ndarray  # (T-1,) bool
    mean_speed: float
    left_frames: int
    hidden_by: dict[int, int]  # occluder index -> frames mostly hidden behind it
    left_view_and_returned: bool
    visible_frames: int

    @property
    def stops(self) -> bool:  # moves during the first third, still during the last third
        n = len(self.moving)
        return self.moving[: n // 3].mean() > 0.8 and not self.moving[-(n // 3):].any()

    @property
    def starts_late(self) -> bool:
        n = len(self.moving)
        return not self.moving[: n // 3].any() and self.moving[-(n // 3):].mean() > 0.8

    @property
    def never_moves(self) -> bool:
        return not self.moving.any()

    @property
    def always_moves(self) -> bool:
        return self.moving.mean() > 0.9


@dataclass
class ShapesVideo:
    name: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    masks: np.ndarray  # (O, T, H, W) bool, visible pixels per object
    shapes: list[Shape]
    expressions: list[tuple[str, list[int], int]] = field(default_factory=list)


# ------------------------------------------------------------------------ trajectories


def _path(start, velocities, r, bounce=True) -> np.ndarray:
    """Integrate per-frame velocities (T, 2) from `start`, bouncing off the walls."""
    xy = np.empty((len(velocities) + 1, 2))
    xy[0] = start
    v = velocities.copy()
    lo, hi = np.array([r, r]), np.array([WIDTH - r, HEIGHT - r])
    for t in range(len(v)):
        nxt = xy[t] + v[t]
        if bounce:
            for a in range(2):
                if not lo[a] <= nxt[a] <= hi[a]:
                    v[t:, a] *= -1
                    nxt[a] = xy[t, a] + v[t, a]
        xy[t + 1] = nxt
    return xy


def _velocity(rng, speed, direction=None):
    ang = rng.uniform(0, 2 * np.pi) if direction is None else direction
    return speed * np.array([np.cos(ang), np.sin(ang)])


def _schedule(t: int, pieces: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """(t-1, 2) velocities from (fraction of the video, velocity) pieces."""
    out, start = np.zeros((t - 1, 2)), 0
    for i, (frac, vel) in enumerate(pieces):
        end = t - 1 if i == len(pieces) - 1 else start + int(round(frac * (t - 1)))
        out[start:end] = vel
        start = end
    return out


def _random_start(rng, r):
    return np.array([rng.uniform(r, WIDTH - r), rng.uniform(r, HEIGHT - r)])


def _random_motion(rng, t, r):
    kind = rng.choice(["still", "steady", "turn"], p=[0.3, 0.4, 0.3])
    if kind == "still":
        v = _schedule(t, [(1.0, np.zeros(2))])
    elif kind == "steady":
        v = _schedule(t, [(1.0, _velocity(rng, rng.uniform(1.5, 3.5)))])
    else:
        v = _schedule(t, [(0.5, _velocity(rng, rng.uniform(1.5, 3.5))),
                          (0.5, _velocity(rng, rng.uniform(1.5, 3.5)))])
    return _path(_random_start(rng, r), v, r)


# --------------------------------------------------------------------------- scenarios


def _appearance(rng, used: set) -> tuple[str, str, float]:
    while True:
        kind, color = str(rng.choice(KINDS)), str(rng.choice(list(COLORS)))
        if (kind, color) not in used:
            used.add((kind, color))
            return kind, color, float(rng.uniform(10, 15))


def _twins(rng, t, used, first_v, second_v):
    kind, color, r = _appearance(rng, used)
    a = Shape(kind, color, r, _path(_random_start(rng, r), first_v, r), 1)
    b = Shape(kind, color, r, _path(_random_start(rng, r), second_v, r), 1)
    return [a, b]


def _scenario(name: str, rng, t: int, used: set) -> list[Shape]:
    fast = lambda: _velocity(rng, rng.uniform(2.0, 3.5))  # noqa: E731
    zero = np.zeros(2)
    if name == "stops":
        return _twins(rng, t, used, _schedule(t, [(0.45, fast()), (0.55, zero)]),
                      _schedule(t, [(1.0, fast())]))
    if name == "starts_late":
        return _twins(rng, t, used, _schedule(t, [(0.45, zero), (0.55, fast())]),
                      _schedule(t, [(1.0, fast())]))
    if name == "still":
        return _twins(rng, t, used, _schedule(t, [(1.0, zero)]), _schedule(t, [(1.0, fast())]))
    if name == "faster":
        ang = rng.uniform(0, 2 * np.pi)
        return _twins(rng, t, used, _schedule(t, [(1.0, _velocity(rng, 4.0, ang))]),
                      _schedule(t, [(1.0, _velocity(rng, 1.2, ang + 2.0))]))
    if name == "left_longest":
        left = np.array([-2.5, 0.0])
        return _twins(rng, t, used, _schedule(t, [(0.8, left), (0.2, -left)]),
                      _schedule(t, [(0.3, left), (0.7, -left)]))
    if name == "returns":
        kind, color, r = _appearance(rng, used)
        y = rng.uniform(r, HEIGHT - r)
        out_speed = 5.0
        leave = int((WIDTH / 2 + r) / out_speed) + 1
        v = _schedule(t, [(leave / (t - 1), np.array([out_speed, 0.0])), (0.12, zero),
                          (1.0, np.array([-out_speed, 0.0]))])
        a = Shape(kind, color, r, _path(np.array([WIDTH / 2, y]), v, r, bounce=False), 1)
        b = Shape(kind, color, r, _path(_random_start(rng, r), _schedule(t, [(1.0, fast())]),
                                        r), 1)
        return [a, b]
    if name == "hidden":
        okind, ocolor, _ = _appearance(rng, used)
        occ_r = float(rng.uniform(28, 34))
        centre = np.array([WIDTH / 2, HEIGHT / 2])
        occluder = Shape(okind if okind in ("square", "circle") else "square", ocolor, occ_r,
                         np.tile(centre, (t, 1)), 5)
        kind, color, r = _appearance(rng, used)
        span = WIDTH - 2 * r
        v = _schedule(t, [(1.0, np.array([span / (t - 1), 0.0]))])
        hidden = Shape(kind, color, r, _path(np.array([r, HEIGHT / 2]), v, r, bounce=False), 1)
        y = HEIGHT / 2 + (occ_r + r + 6) * (1 if rng.random() < 0.5 else -1)
        twin = Shape(kind, color, r, _path(np.array([WIDTH - r, y]), -v, r, bounce=False), 1)
        used.add((occluder.kind, ocolor))
        return [occluder, hidden, twin]
    raise ValueError(name)


# ------------------------------------------------------------------------------- facts


def measure(shapes: list[Shape], masks: np.ndarray) -> list[Facts]:
    facts = []
    t = masks.shape[1]
    for i, s in enumerate(shapes):
        step = np.diff(s.xy, axis=0)
        speed = np.linalg.norm(step, axis=1)
        full = np.array([_in_frame_area(s, k) for k in range(t)])
        visible = masks[i].sum(axis=(1, 2))
        hidden_by = {}
        for j, o in enumerate(shapes):
            if j == i or o.depth <= s.depth:
                continue
            covered = [(visible[k] < 0.4 * full[k]) and full[k] > 0
                       and _overlaps(s, o, k) for k in range(t)]
            if sum(covered):
                hidden_by[j] = int(sum(covered))
        out = full == 0
        returned = bool(out.any() and not out[0] and not out[-1])
        facts.append(Facts(speed > MOVE_EPS, float(speed.mean()),
                           int((step[:, 0] < -MOVE_EPS).sum()), hidden_by, returned,
                           int((visible > 0).sum())))
    return facts


def _in_frame_area(s: Shape, k: int) -> int:
    from virst.data.render import shape_mask

    return int(shape_mask(s.kind, s.xy[k, 0], s.xy[k, 1], s.radius, HEIGHT, WIDTH).sum())


def _overlaps(s: Shape, o: Shape, k: int) -> bool:
    return bool(np.linalg.norm(s.xy[k] - o.xy[k]) < s.radius + o.radius)


# ------------------------------------------------------------------------- expressions


def _name(shapes, i, members) -> str:
    s = shapes[i]
    return f"{s.color} {s.kind}" if all(shapes[m].color == s.color for m in members) else s.kind


def expressions_for(shapes: list[Shape], facts: list[Facts]) -> list[tuple[str, list[int], int]]:
    """All unambiguous expressions about objects visible in at least 3 frames:
    (text, object indices, type_id)."""
    out = _all_expressions(shapes, facts)
    return [e for e in out if all(facts[i].visible_frames >= 3 for i in e[1])]


def _all_expressions(shapes, facts):
    out = []
    n = len(shapes)
    look = {}
    for i, s in enumerate(shapes):
        look.setdefault((s.kind, s.color), []).append(i)
    # referring: appearance that only one object has
    for (kind, color), members in look.items():
        if len(members) == 1:
            out.append((f"the {color} {kind}", members, 0))
    # reasoning: among look-alikes (same kind; same colour when possible), one does X
    groups = list(look.values()) + [
        [i for i in range(n) if shapes[i].kind == k] for k in {s.kind for s in shapes}]
    seen = set()
    for members in groups:
        if len(members) < 2 or tuple(members) in seen:
            continue
        seen.add(tuple(members))
        out += _reasoning(shapes, facts, members)
    for j in range(n):  # hidden behind a unique occluder
        key = (shapes[j].kind, shapes[j].color)
        hidden = [i for i in range(n) if facts[i].hidden_by.get(j, 0) >= 3]
        if len(look[key]) == 1 and len(hidden) == 1:
            out.append((f"the object that was hidden behind the {shapes[j].color} "
                        f"{shapes[j].kind}", hidden, 1))
    return out


def _reasoning(shapes, facts, members):
    out = []

    def unique(pred):
        hits = [i for i in members if pred(facts[i])]
        return hits[0] if len(hits) == 1 else None

    phrases = [
        (lambda f: f.stops, "the {} that stops moving"),
        (lambda f: f.starts_late, "the {} that starts moving later"),
        (lambda f: f.never_moves, "the {} that never moves"),
        (lambda f: f.left_view_and_returned, "the {} that leaves the frame and comes back"),
    ]
    for pred, template in phrases:
        i = unique(pred)
        if i is not None:
            out.append((template.format(_name(shapes, i, members)), [i], 1))
    speeds = sorted(((facts[i].mean_speed, i) for i in members), reverse=True)
    if speeds[0][0] > 1.8 * speeds[1][0] and speeds[0][0] > 1.0:
        i = speeds[0][1]
        out.append((f"which {_name(shapes, i, members)} moves the fastest?", [i], 1))
    lefts = sorted(((facts[i].left_frames, i) for i in members), reverse=True)
    if lefts[0][0] >= lefts[1][0] + 6:
        i = lefts[0][1]
        out.append((f"the {_name(shapes, i, members)} moving left the longest", [i], 1))
    return out


# ------------------------------------------------------------------------------ videos


def _rng(split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_SEEDS[split], index])


def make_video(split: str, index: int) -> ShapesVideo:
    """Video `index` of `split`: deterministic, with at least one expression of each type."""
    rng = _rng(split, index)
    for _ in range(20):  # rare scenarios end ambiguous (e.g. a bounce): draw again
        t = int(rng.integers(24, 49))
        used: set = set()
        scenario = SCENARIOS[(index + int(rng.integers(0, len(SCENARIOS)))) % len(SCENARIOS)]
        shapes = _scenario(scenario, rng, t, used)
        for _ in range(int(rng.integers(1, 3))):
            kind, color, r = _appearance(rng, used)
            shapes.append(Shape(kind, color, r, _random_motion(rng, t, r), int(rng.integers(0, 3))))
        frames, masks = render(shapes, HEIGHT, WIDTH, t, rng)
        exprs = expressions_for(shapes, measure(shapes, masks))
        if any(e[2] == 0 for e in exprs) and any(e[2] == 1 for e in exprs):
            chosen = _choose(rng, exprs)
            return ShapesVideo(f"shapes_{split}_{index:05d}", frames, masks, shapes, chosen)
    raise RuntimeError(f"could not build an unambiguous shapes video for {split}/{index}")


COMMON = ("moving left the longest", "moves the fastest")  # frequent by chance: drawn less


def _choose(rng, exprs, per_type: int = 2):
    chosen = []
    for type_id in (0, 1):
        pool = [e for e in exprs if e[2] == type_id]
        weight = np.array([0.25 if any(c in e[0] for c in COMMON) else 1.0 for e in pool])
        picks = rng.choice(len(pool), size=min(per_type, len(pool)), replace=False,
                           p=weight / weight.sum())
        chosen += [pool[k] for k in sorted(picks)]
    return chosen


def write_split(root: str | Path, split: str, count: int, progress: bool = True) -> Path:
    """Write `count` videos of `split` under `root` in the ReVOS layout; returns the meta file.

    mask_dict.json and mask_dict_foreground.json are shared by all splits of a root, with
    anno ids "<split>/<video index>/<object>".
    """
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    masks = _load_or_empty(root / "mask_dict.json")
    foreground = _load_or_empty(root / "mask_dict_foreground.json")
    videos = {}
    for index in tqdm(range(count), desc=f"shapes {split}", disable=not progress):
        v = make_video(split, index)
        folder = root / "JPEGImages" / v.name
        folder.mkdir(exist_ok=True)
        names = [f"{k:05d}" for k in range(len(v.frames))]
        for name, frame in zip(names, v.frames):
            Image.fromarray(frame).save(folder / f"{name}.jpg", quality=95)
        anno = [f"{split}/{index}/{o}" for o in range(len(v.shapes))]
        for o, a in enumerate(anno):
            masks[a] = [encode_rle(m) for m in v.masks[o]]
        foreground[v.name] = {"masks_rle": [encode_rle(m) for m in v.masks.any(axis=0)]}
        videos[v.name] = {
            "vid_id": index, "frames": names,
            "expressions": {str(k): {"exp": text, "obj_id": objs,
                                     "anno_id": [anno[o] for o in objs], "type_id": type_id}
                            for k, (text, objs, type_id) in enumerate(v.expressions)},
        }
    _write_json(root / "mask_dict.json", masks)
    _write_json(root / "mask_dict_foreground.json", foreground)
    meta = root / f"meta_expressions_{split}_.json"
    _write_json(meta, {"videos": videos})
    return meta


def _load_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def fingerprint(root: str | Path, split: str) -> str:
    """Hash of a split's expressions (to tell two generated copies apart)."""
    return hashlib.sha256((Path(root) / f"meta_expressions_{split}_.json").read_bytes()
                          ).hexdigest()[:16]
