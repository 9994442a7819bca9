"""`manifest.json`: every artifact with its hash, shapes, dtypes, precision plan, producer
versions and verification results. `load_manifest` is what a runtime calls: it refuses a
folder whose files do not hash to what the manifest says, or that another format or
toolkit version wrote."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from virst.errors import CheckpointError

FORMAT = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(weights: Path) -> str:
    """A cheap identity of a model.safetensors file: its header (every tensor's name, dtype,
    shape and offset), size and the first and last MiB of data. Reading 16 GB to tell two
    checkpoints apart is not needed; any retrained or other model differs here."""
    h = hashlib.sha256()
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        h.update(f.read(min(header_len, size)))
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    h.update(str(size).encode())
    return h.hexdigest()[:32]


def code_fingerprint() -> str:
    """The code a graph is traced from: every .py file of the model package (virst/) and
    of the exporter (export/), by path and content. Part of each unit's build key and of
    the runtime cache's folder name, so that neither ever serves a graph of older code
    (the toolkit version changes only at a release)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for package in ("virst", "export"):
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def toolkit_version() -> str:
    try:
        return metadata.version("virst-deploy")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def producers() -> dict[str, str]:
    out = {}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "transformers", "sam2",
                 "tensorrt"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def read(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def write(folder: Path, manifest: dict) -> None:
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, Path(folder) / MANIFEST)


def load_manifest(folder: str | Path) -> dict:
    """The manifest of an artifact folder, after checking every file it lists."""
    folder = Path(folder)
    manifest = read(folder)
    if not manifest:
        raise CheckpointError(f"{folder} has no {MANIFEST}: not an export folder")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: manifest format {manifest.get('format')} is not "
                              f"{FORMAT}; rebuild with this toolkit")
    if manifest.get("toolkit") != toolkit_version():
        raise CheckpointError(f"{folder} was built by virst-deploy {manifest.get('toolkit')}, "
                              f"this is {toolkit_version()}; rebuild the artifacts")
    for name, entry in manifest.get("artifacts", {}).items():
        for rel, digest in entry.get("files", {}).items():
            path = folder / rel
            if not path.is_file():
                raise CheckpointError(f"artifact {name}: {rel} is missing")
            if sha256_file(path) != digest:
                raise CheckpointError(f"artifact {name}: {rel} does not match its manifest "
                                      f"hash (modified or truncated); rebuild it")
    return manifest
