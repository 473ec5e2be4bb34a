"""The package's shape: the core never imports the toy world, module-level imports form no
cycle, built-ins are found by walking the packages, and the toy registers as a plug-in."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmalign import registry, sources

ROOT = Path(__file__).resolve().parents[3]
# source directory -> import name (setup.py's PACKAGE_DIR)
PACKAGE_DIR = {"mmalign": "mmalign", "rewards": "mmalign.rewards", "pipelines": "mmalign.pipelines"}


def module_files() -> dict[str, Path]:
    """Import name -> source file of every module of the three source directories."""
    out = {}
    for src, prefix in PACKAGE_DIR.items():
        for f in (ROOT / src).rglob("*.py"):
            parts = list(f.relative_to(ROOT / src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The mmalign modules `name` imports at module level (not inside functions or classes)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def test_module_level_imports_form_no_cycle():
    files = module_files()
    graph = {name: module_level_imports(name, f, set(files)) for name, f in files.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_cycles_named_in_the_issue_are_gone():
    files = module_files()
    known = set(files)
    assert "mmalign.toy.vlm_pairs" not in module_level_imports("mmalign.data.vlm", files["mmalign.data.vlm"], known)
    assert "mmalign.toy.train" not in module_level_imports("mmalign.toy.proxy", files["mmalign.toy.proxy"], known)


def test_the_core_never_mentions_the_toy_world_in_code():
    """No core module imports mmalign.toy (at any level) or special-cases a `toy:` prefix."""
    offenders = []
    for name, f in module_files().items():
        if name.startswith("mmalign.toy"):
            continue
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            if any(m.startswith("mmalign.toy") for m in mods):
                offenders.append(f"{name}:{node.lineno} imports the toy world")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "startswith":
                if any(isinstance(a, ast.Constant) and a.value == "toy:" for a in node.args):
                    offenders.append(f"{name}:{node.lineno} special-cases 'toy:'")
    assert not offenders, "\n".join(offenders)


def test_importing_every_core_module_leaves_the_toy_world_unimported():
    names = sorted(n for n in module_files() if not n.startswith("mmalign.toy") and not n.endswith("__main__"))
    code = (
        "import importlib, json, sys\n"
        f"for n in {names!r}:\n    importlib.import_module(n)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mmalign.toy'))))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_builtins_are_found_by_walking_the_packages():
    mods = registry.builtin_modules()
    assert {"mmalign.pipelines.sd", "mmalign.rewards.clip", "mmalign.methods.grpo"} <= set(mods)
    assert not [m for m in mods if any(p.startswith("_") for p in m.split("."))]
    assert not [m for m in mods if m.startswith("mmalign.toy")]


def test_the_toy_plugin_registers_its_sources():
    assert {"toy:all", "toy:heldout", "toy:train"} <= set(sources.names("prompt_set"))
    assert "toy:render" in sources.names("expert_source")
    assert "toy:vlm_pairs" in sources.names("preference_source")
    assert sources.resolve_asset("toy:sd_toy").endswith(str(Path("toy") / "assets" / "sd_toy"))
    assert sources.resolve_asset("hf-hub:org/model") == "hf-hub:org/model"  # another library's scheme
    assert registry.lookup("reward", "toy_gold").name == "toy_gold"


def test_an_unknown_spec_names_the_known_ones():
    with pytest.raises(
        sources.SourceError, match=r"unknown prompt set 'toy:nope'; known: toy:all, toy:audio_all, .*toy:heldout"
    ):
        sources.resolve("prompt_set", "toy:nope")
    assert not sources.is_spec("C:/data/prompts.txt") and not sources.is_spec("https://x.org/a")
    assert sources.is_spec("toy:heldout")


def test_a_missing_optional_package_names_itself(capsys, monkeypatch):
    from mmalign import cli

    def run(args):
        raise ModuleNotFoundError("No module named 'soundfile'", name="soundfile")

    monkeypatch.setattr(cli.score, "run", run)
    assert cli.main(["score", "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: mmalign score needs the package 'soundfile', which is not installed (pip install soundfile)")
