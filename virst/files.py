"""Files written as the user's umask says. Writers that stage a temporary file and move it
into place (safetensors does, so do we) otherwise leave mode 0600: unreadable to the
service account or the group that serves the artifacts."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: str | Path) -> None:
    """chmod `path` to what a plain open() would have created: 0666 minus the umask."""
    os.chmod(path, 0o666 & ~umask())


def save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    public_mode(path)
