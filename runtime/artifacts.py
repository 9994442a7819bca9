"""An export folder as the runtime sees it: the manifest checked (hashes, toolkit, format),
then refused by name when it was built for another model or another precision than asked.
`ensure_artifacts` builds (once, cached) the artifacts a backend needs for a model folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from export import manifest as mf
from virst.config import VirstConfig
from virst.errors import CheckpointError

CACHE = Path(os.environ.get("VIRST_CACHE", Path.home() / ".cache" / "virst"))
KEEP_VERSIONS = 2  # cached artifact folders kept per model and precision: code versions


class Artifacts:
    def __init__(self, folder: str | Path, precision: str | None = None,
                 model_dir: str | Path | None = None):
        self.folder = Path(folder)
        self.manifest = mf.load_manifest(self.folder)
        self.precision = self.manifest["precision"]
        self.config = VirstConfig.from_dict(self.manifest["config"])
        if precision is not None and precision != self.precision:
            raise CheckpointError(f"{self.folder} holds {self.precision} artifacts, not "
                                  f"{precision} as asked: build them with python -m "
                                  f"export.build --precision {precision}")
        if model_dir is not None:
            self.check_model(Path(model_dir))

    def check_model(self, model_dir: Path) -> None:
        """Refuse artifacts built from other weights, or with another config: the runtime
        takes its config (frame plan, anchors, memory sizes) from the manifest, so a model
        folder whose config.json changed would otherwise run with the old one."""
        built = self.manifest.get("model", {})
        ours = mf.weights_fingerprint(model_dir / "model.safetensors")
        rebuild = f"rebuild with python -m export.build --checkpoint {model_dir}"
        if built.get("fingerprint") != ours:
            raise CheckpointError(
                f"{self.folder} was built from another model ({built.get('folder', '?')}, "
                f"fingerprint {built.get('fingerprint')}) than {model_dir} (fingerprint "
                f"{ours}): {rebuild}")
        theirs, mine = self.config.to_dict(), VirstConfig.load(model_dir / "config.json").to_dict()
        changed = [f"{k}={theirs[k]!r} (the folder says {mine[k]!r})"
                   for k in mine if theirs.get(k) != mine[k]]
        if changed:
            raise CheckpointError(f"{self.folder} was built with another config of this "
                                  f"model: {', '.join(changed)}; {rebuild}")

    def files(self, unit: str) -> dict[str, str]:
        entry = self.manifest["artifacts"].get(unit)
        if entry is None:
            raise CheckpointError(f"{self.folder} has no {unit!r} unit; rebuild it with "
                                  f"python -m export.build (this toolkit exports it)")
        return entry["files"]

    def onnx_file(self, unit: str) -> Path:
        return self.folder / next(f for f in self.files(unit) if f.endswith(".onnx"))

    def constants(self) -> dict[str, torch.Tensor]:
        self.files("constants")
        return load_file(str(self.folder / "constants.safetensors"))

    @property
    def llm_folder(self) -> Path:
        self.files("llm")
        return self.folder / "llm"


def cache_key(model_dir: Path) -> str:
    """Weights fingerprint + config hash + code fingerprint: two folders with the same
    weights and different configs (e.g. another anchor schedule) get their own cached
    artifacts, so neither rebuilds the other's under a running server; and an edited model
    or exporter gets new ones instead of the graphs of its older code."""
    config = json.dumps(VirstConfig.load(model_dir / "config.json").to_dict(), sort_keys=True)
    digest = hashlib.sha256(config.encode()).hexdigest()[:8]
    return (f"{mf.weights_fingerprint(model_dir / 'model.safetensors')}-{digest}-"
            f"{mf.code_fingerprint()[:8]}")


def ensure_artifacts(model_dir: str | Path, precision: str = "fp32",
                     cache: Path = CACHE) -> Artifacts:
    """The verified artifacts of `model_dir` in `precision`, built into the cache the first
    time (python -m export.build; unchanged units are never rebuilt)."""
    from export.build import build

    model_dir = Path(model_dir)
    folder = cache / "artifacts" / f"{cache_key(model_dir)}-{precision}"
    try:
        artifacts = Artifacts(folder, precision, model_dir)
        if "tensorrt" in artifacts.manifest:  # written last: an interrupted build lacks it
            _used(folder)
            return artifacts
    except CheckpointError:
        pass
    build(precision, folder, str(model_dir), tensorrt=False, progress=False)  # resumes
    _used(folder)
    return Artifacts(folder, precision, model_dir)


def _used(folder: Path) -> None:
    """Mark a cached folder used now, and delete the folders of other code versions of the
    same model and precision beyond the KEEP_VERSIONS most recently used: every change of
    the code makes a new one (26 MB for the embedded model, gigabytes for the full one), and
    they piled up."""
    now = time.time_ns()
    os.utime(folder, ns=(now, now))
    parts = folder.name.split("-")
    if len(parts) != 4:
        return
    weights, config, _, precision = parts
    versions = sorted((p for p in folder.parent.glob(f"{weights}-{config}-*-{precision}")
                       if p.is_dir()), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in versions[KEEP_VERSIONS:]:
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
