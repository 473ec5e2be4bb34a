"""The wheel's package list comes from discovery (setup.py), so no package directory is left out.

scripts/check_wheel.sh builds and installs the real wheel (CI); these checks are the fast part:
every directory under mmalign/, rewards/ and pipelines/ that holds an __init__.py must be a
package the configured discovery finds, under the import name its directory maps to.
"""

import fnmatch
import importlib.util
from pathlib import Path

import pytest

from tests.helpers import ROOT


def _setup_module():
    spec = importlib.util.spec_from_file_location("_mmalign_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": setup() does not run
    return mod


def _import_name(init: Path, package_dir: dict[str, str]) -> str:
    """mmalign/x/__init__.py -> mmalign.x; rewards/__init__.py -> mmalign.rewards."""
    rel = init.parent.relative_to(ROOT).parts
    for name, src in package_dir.items():
        src_parts = Path(src).parts
        if rel[: len(src_parts)] == src_parts:
            return ".".join((name, *rel[len(src_parts) :]))
    raise AssertionError(f"{init} lies in no source directory of setup.PACKAGE_DIR")


def _package_dirs(package_dir: dict[str, str]) -> list[Path]:
    return sorted(p for src in set(package_dir.values()) for p in (ROOT / src).rglob("__init__.py"))


def test_every_package_directory_is_discovered():
    setup = _setup_module()
    assert set(setup.PACKAGE_DIR.values()) == {"mmalign", "rewards", "pipelines"}
    found = set(setup.discover_packages(str(ROOT)))
    inits = _package_dirs(setup.PACKAGE_DIR)
    assert len(inits) >= 7  # mmalign, its subpackages, rewards, pipelines
    missing = {str(i.parent.relative_to(ROOT)): _import_name(i, setup.PACKAGE_DIR) for i in inits}
    missing = {d: n for d, n in missing.items() if n not in found}
    assert not missing, f"package directories the wheel would leave out: {missing}"
    for required in ("mmalign.guidance", "mmalign.rewards", "mmalign.pipelines", "mmalign.methods"):
        assert required in found


def test_discovered_packages_map_back_to_their_directories():
    """setuptools resolves a package's directory by the longest PACKAGE_DIR prefix; check each
    discovered name lands on a directory with an __init__.py (no stray or renamed entries)."""
    setup = _setup_module()
    for pkg in setup.discover_packages(str(ROOT)):
        prefix = max((n for n in setup.PACKAGE_DIR if pkg == n or pkg.startswith(n + ".")), key=len)
        path = ROOT / setup.PACKAGE_DIR[prefix] / Path(*pkg[len(prefix) :].split(".")[1:])
        assert (path / "__init__.py").is_file(), f"{pkg} -> {path} has no __init__.py"


def test_no_python_directory_without_init():
    """A directory of .py files without __init__.py would be skipped by find_packages silently."""
    setup = _setup_module()
    for src in set(setup.PACKAGE_DIR.values()):
        for py in (ROOT / src).rglob("*.py"):
            if "__pycache__" in py.parts:
                continue
            assert (py.parent / "__init__.py").is_file(), (
                f"{py.parent.relative_to(ROOT)} has .py files but no __init__.py"
            )


def test_pyproject_does_not_override_discovery_and_ships_toy_assets():
    tomllib = pytest.importorskip("tomllib")
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    # pyproject.toml takes precedence over setup.py: a hand-kept list there would switch discovery off
    assert "packages" not in conf and "package-dir" not in conf
    patterns = conf.get("package-data", {}).get("mmalign.toy", [])
    assets = [p for p in (ROOT / "mmalign" / "toy" / "assets").rglob("*") if p.is_file()]
    assert assets
    for a in assets:
        rel = a.relative_to(ROOT / "mmalign" / "toy").as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), f"toy asset {rel} matches no package-data pattern"
