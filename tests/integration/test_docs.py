"""The documentation: README links resolve, its generated results block is current, every config
starts with a header comment, and the MkDocs site builds with warnings as errors (when mkdocs is
installed: `pip install -e '.[docs]'`; CI builds it with scripts/build_docs.sh either way)."""

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_relative_links_exist():
    text = (ROOT / "README.md").read_text()
    links = [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m)]
    assert links
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_results_block_is_generated_from_the_benchmark_json():
    assert _hooks().update_readme(check=True), "README.md is stale: run python scripts/docs_hooks.py --readme"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_starts_with_a_header_comment(path):
    assert path.read_text().startswith("#"), f"{path.relative_to(ROOT)}: no header comment (what it is, how to run it)"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (the docs extra)")
def test_docs_build_strict(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
