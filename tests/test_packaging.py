"""What we ship as top-level import names must not be another installed distribution's."""

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shipped_packages() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*").rstrip(".") for pattern in patterns]


def test_no_shipped_package_shares_its_import_name_with_an_installed_distribution():
    # transformers >= 5.25 requires Hugging Face's `kernels`; a top-level `kernels` of ours
    # shadowed it from the repository root and broke `import transformers` models.
    owners = importlib.metadata.packages_distributions()
    ours = importlib.metadata.distribution("virst-deploy").metadata["Name"]
    clashes = {name: sorted(set(owners.get(name, [])) - {ours}) for name in shipped_packages()}
    assert shipped_packages() and all((ROOT / name).is_dir() for name in shipped_packages())
    assert not {name: dists for name, dists in clashes.items() if dists}
