"""Names for shipped assets: `prefix:NAME` with a prefix that a plug-in registered as an asset
root (mmalign.sources.register_asset_root; the toy world registers `toy`, so `toy:sd_toy` is
its installed assets/sd_toy), wherever the package is installed, so configs work from any
working directory."""

from __future__ import annotations

from mmalign import sources


def resolve(path: str) -> str:
    """`toy:sd_toy` (any registered asset prefix) -> the installed asset path; anything else is
    returned unchanged."""
    return sources.resolve_asset(path)
