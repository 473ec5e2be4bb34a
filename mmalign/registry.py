"""Registries: a name -> (config dataclass, builder) dict per kind.

A config names its generator, reward(s) and method by registry name; the rest of that
section is validated against the registered config dataclass. Modules register
themselves on import; `load_builtins()` imports the ones shipped with mmalign (found by
walking their packages) and `load_plugins()` runs the plug-ins installed under the
`mmalign.plugins` entry-point group (the toy world is one: mmalign.toy.plugin).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str
    config: type
    build: Callable[..., Any]
    doc: str = ""


GENERATORS: dict[str, Entry] = {}
REWARDS: dict[str, Entry] = {}
METHODS: dict[str, Entry] = {}

KINDS = {"generator": GENERATORS, "reward": REWARDS, "method": METHODS}

# Packages whose modules register the built-in components; every public module below them
# is imported by load_builtins(), so a new file registers itself without being listed anywhere.
BUILTIN_PACKAGES = ("mmalign.pipelines", "mmalign.rewards", "mmalign.methods")

# Entry-point group of plug-ins: `[project.entry-points."mmalign.plugins"] NAME = "pkg.module:register"`;
# each `register()` adds components to these tables and sources to mmalign.sources.
PLUGIN_GROUP = "mmalign.plugins"


def _register(table: dict[str, Entry], name: str, config: type) -> Callable:
    def deco(build: Callable) -> Callable:
        if name in table and table[name].build is not build:
            raise KeyError(f"{name!r} is registered twice")
        table[name] = Entry(name, config, build, (build.__doc__ or "").strip().split("\n")[0])
        return build

    return deco


def register_generator(name: str, config: type) -> Callable:
    return _register(GENERATORS, name, config)


def register_reward(name: str, config: type) -> Callable:
    return _register(REWARDS, name, config)


def register_method(name: str, config: type) -> Callable:
    return _register(METHODS, name, config)


def builtin_modules() -> list[str]:
    """The public modules of BUILTIN_PACKAGES (names with a part starting with `_` are skipped)."""
    found = []
    for pkg_name in BUILTIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                found.append(info.name)
    return sorted(found)


_loaded = False
_plugins_loaded = False


def load_builtins() -> None:
    """Import every built-in module once, so that its components are registered."""
    global _loaded
    if _loaded:
        return
    for mod in builtin_modules():
        importlib.import_module(mod)
    _loaded = True


def load_plugins() -> None:
    """Call each installed plug-in's `register()` once (entry-point group PLUGIN_GROUP)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()()


def lookup(kind: str, name: str) -> Entry:
    load_builtins()
    table = KINDS[kind]
    if name not in table:
        load_plugins()
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table)) or '(none)'}")
    return table[name]
