"""Registries: a name -> (config dataclass, builder) dict per kind.

A config names its generator, reward(s) and method by registry name; the rest of that
section is validated against the registered config dataclass. Modules register
themselves on import; `load_builtins()` imports the ones shipped with mmalign.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

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

# Modules that register built-in components. New files add themselves here.
BUILTIN_MODULES = [
    "mmalign.pipelines.sd",
    "mmalign.pipelines.flow",
    "mmalign.rewards.clip",
    "mmalign.rewards.clip_hf",
    "mmalign.rewards.hps",
    "mmalign.rewards.pickscore",
    "mmalign.rewards.aesthetic",
    "mmalign.rewards.image_reward",
    "mmalign.rewards.rules",
    "mmalign.rewards.mix",
    "mmalign.rewards.vlm_judge",
    "mmalign.rewards.audio_judge",
    "mmalign.rewards.clap",
    "mmalign.rewards.audiobox",
    "mmalign.rewards.video",
    "mmalign.methods.diffusion_dpo",
    "mmalign.methods.online_dpo",
    "mmalign.methods.grpo",
    "mmalign.methods.diffusion_nft",
    "mmalign.methods.raft",
    "mmalign.methods.d3po",
    "mmalign.methods.diffusion_dro",
    "mmalign.pipelines.vlm",
    "mmalign.methods.vlm_dpo",
    "mmalign.methods.rg_lcd",
]


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


_loaded = False


def load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a module listed before its file lands
            if e.name != mod:
                raise
    _loaded = True


def lookup(kind: str, name: str) -> Entry:
    load_builtins()
    table = KINDS[kind]
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table)) or '(none)'}")
    return table[name]
