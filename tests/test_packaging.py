"""What we ship or run as top-level import names must not be another installed distribution's."""

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shipped_packages() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*").rstrip(".") for pattern in patterns]


def clashes(names: list[str]) -> dict[str, list[str]]:
    owners = importlib.metadata.packages_distributions()
    ours = importlib.metadata.distribution("virst-deploy").metadata["Name"]
    found = {name: sorted(set(owners.get(name, [])) - {ours}) for name in names}
    return {name: dists for name, dists in found.items() if dists}


def test_no_shipped_package_shares_its_import_name_with_an_installed_distribution():
    # transformers >= 5.25 requires Hugging Face's `kernels`; a top-level `kernels` of ours
    # shadowed it from the repository root and broke `import transformers` models.
    names = shipped_packages()
    assert names and all((ROOT / name / "__init__.py").is_file() for name in names)
    assert not clashes(names)


def test_no_benchmark_script_shadows_an_installed_distribution():
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path: each file there is then
    # the top-level module of its name for every import in that process.
    scripts = [path.stem for path in (ROOT / "benchmarks").glob("*.py")]
    assert "fps" in scripts
    assert not clashes(scripts)
