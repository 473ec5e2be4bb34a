"""Names for the assets mmalign ships: `toy:NAME` is mmalign/toy/assets/NAME, wherever the
package is installed, so configs work from any working directory."""
from __future__ import annotations

from pathlib import Path

TOY_ASSETS = Path(__file__).resolve().parent / "toy" / "assets"


def resolve(path: str) -> str:
    """`toy:sd_toy` (or `toy:sd3_toy`, `toy:proxy_clip`) -> the installed asset directory;
    anything else is returned unchanged."""
    if path.startswith("toy:"):
        return str(TOY_ASSETS / path[len("toy:"):])
    return path
