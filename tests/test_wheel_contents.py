"""What the wheel ships: the packages pyproject lists, and no test oracle or fixture among them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TEST_ONLY = ("reference", "fakehub", "sass_count")  # stems of modules that live under tests/


def shipped_modules() -> list[str]:
    """Paths (relative to the repo root) of the .py files the wheel holds, from pyproject's packages."""
    tomllib = pytest.importorskip("tomllib")
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = setuptools_cfg.get("package-dir", {})
    shipped = []
    for package in setuptools_cfg["packages"]:
        top, *rest = package.split(".")
        folder = ROOT / package_dirs.get(top, top) / Path(*rest)
        shipped += [p.relative_to(ROOT).as_posix() for p in sorted(folder.glob("*.py"))]
    return shipped


def test_no_test_oracle_or_fixture_in_the_wheel():
    shipped = shipped_modules()
    assert "internvl_plugin/quant.py" in shipped and "hub_cli/serve.py" in shipped
    offenders = [p for p in shipped if any(word in Path(p).stem for word in TEST_ONLY)]
    assert not offenders, f"test-only modules in the wheel: {offenders}"
    for name in ("internvl_plugin.reference", "internvl_plugin.reference_vision", "internvl_plugin.reference_llm",
                 "hub_cli.fakehub"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable from the installed packages"


def test_tests_import_the_oracles_from_tests():
    import fakehub
    import reference

    assert Path(reference.__file__).parent == ROOT / "tests" / "reference"
    assert Path(fakehub.__file__) == ROOT / "tests" / "fakehub.py"
