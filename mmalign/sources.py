"""Named sources: data and hooks that a config or the command line names by a `prefix:name` spec.

The core never knows which worlds exist. A plug-in (the toy world, `mmalign.toy.plugin`, or a
third-party package) registers what it provides under its own prefix, and the core resolves
a spec by asking this registry:

    prompt_set         "toy:heldout"   -> a list of prompts            (data.prompts, eval.prompts_from, --prompts)
    preference_source  "toy:vlm_pairs" -> the path of a preference file (data.path with data.kind=vlm)
    expert_source      "toy:render"    -> fn(prompt, seed) -> PIL image (Diffusion-DRO's `experts`)
    gold_evaluator     "toy"           -> fn(images, prompts) -> report (eval.gold)
    asset root         "toy"           -> a directory: "toy:sd_toy" is ROOT/sd_toy (models, rewards)

Plug-ins are loaded (registry.load_plugins) the first time a spec is resolved, so nothing of
a plug-in is imported by a run that does not name it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmalign import registry

KINDS = ("prompt_set", "preference_source", "expert_source", "gold_evaluator")

_SOURCES: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}
_ASSET_ROOTS: dict[str, Path] = {}

# "prefix:name": a prefix of two or more word characters (so a Windows drive "C:\..." is not
# one) and no "//" after the colon (so a URL is not one)
_SPEC = re.compile(r"^(?P<prefix>[A-Za-z_][\w-]+):(?!//)(?P<name>.+)$")


class SourceError(ValueError):
    """An unknown or malformed source spec."""


def is_spec(value: Any) -> bool:
    """Whether `value` is spelled like a `prefix:name` source spec (not whether it is known)."""
    return isinstance(value, str) and _SPEC.match(value) is not None


def register_source(kind: str, spec: str, fn: Callable[..., Any]) -> None:
    """Register `fn` as the `kind` source named `spec` ("prefix:name"; a gold evaluator: a name)."""
    if kind not in _SOURCES:
        raise KeyError(f"unknown source kind {kind!r}; known: {', '.join(KINDS)}")
    table = _SOURCES[kind]
    if spec in table and table[spec] is not fn:
        raise KeyError(f"{kind} {spec!r} is registered twice")
    table[spec] = fn


def register_asset_root(prefix: str, root: str | Path) -> None:
    """`prefix:NAME` names the directory (or file) ROOT/NAME, wherever the package is installed."""
    root = Path(root)
    if prefix in _ASSET_ROOTS and _ASSET_ROOTS[prefix] != root:
        raise KeyError(f"asset prefix {prefix!r} is registered twice")
    _ASSET_ROOTS[prefix] = root


def names(kind: str) -> list[str]:
    """The registered names of one kind (plug-ins loaded)."""
    registry.load_plugins()
    return sorted(_ASSET_ROOTS) if kind == "asset" else sorted(_SOURCES[kind])


def lookup(kind: str, spec: str) -> Callable[..., Any]:
    """The function registered for `spec`; SourceError naming the known ones if there is none."""
    table = _SOURCES[kind]
    if spec not in table:
        registry.load_plugins()
    if spec not in table:
        known = (
            ", ".join(sorted(table))
            or f"none (no installed plug-in registers one; entry points {registry.PLUGIN_GROUP!r})"
        )
        raise SourceError(f"unknown {kind.replace('_', ' ')} {spec!r}; known: {known}")
    return table[spec]


def resolve(kind: str, spec: str, *args: Any, **kwargs: Any) -> Any:
    """Call the source registered for `spec`: `resolve("prompt_set", "toy:heldout")`."""
    return lookup(kind, spec)(*args, **kwargs)


def resolve_asset(path: str) -> str:
    """`prefix:NAME` with a registered asset prefix -> ROOT/NAME; anything else unchanged
    (a hub id, a local path, or another library's scheme such as open_clip's `hf-hub:`)."""
    m = _SPEC.match(path) if isinstance(path, str) else None
    if m is None:
        return path
    if m["prefix"] not in _ASSET_ROOTS:
        registry.load_plugins()
    root = _ASSET_ROOTS.get(m["prefix"])
    return str(root / m["name"]) if root is not None else path
