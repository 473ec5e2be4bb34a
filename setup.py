"""Which import packages the mmalign wheel ships (all other metadata is in pyproject.toml).

The distribution installs one import package, `mmalign`, assembled from three top-level
directories of the repository:

    mmalign/    -> mmalign
    rewards/    -> mmalign.rewards
    pipelines/  -> mmalign.pipelines

Every directory below them that holds an `__init__.py` is found by `setuptools.find_packages`,
so a new subpackage cannot be left out of the wheel by a hand-kept list
(tests/integration/test_packaging.py checks the mapping). Non-Python files that must ship are declared
as package data in pyproject.toml (the toy assets).
"""

from __future__ import annotations

import os

from setuptools import find_packages, setup

# import-name prefix -> source directory (relative to the repository root)
PACKAGE_DIR = {"mmalign": "mmalign", "mmalign.rewards": "rewards", "mmalign.pipelines": "pipelines"}


def discover_packages(root: str = ".") -> list[str]:
    """Every package under each PACKAGE_DIR source directory, named under its import prefix."""
    packages = []
    for name, src in PACKAGE_DIR.items():
        path = os.path.join(root, src)
        if not os.path.isfile(os.path.join(path, "__init__.py")):
            raise SystemExit(f"setup.py: {src}/__init__.py missing (package {name})")
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(where=path)]
    return sorted(packages)


if __name__ == "__main__":
    setup(package_dir=PACKAGE_DIR, packages=discover_packages(os.path.dirname(os.path.abspath(__file__))))
