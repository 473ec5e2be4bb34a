"""Every shipped config parses (paths to real models are only checked when local)."""

import pytest

from mmalign.config import load_config
from tests.helpers import ROOT


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "accelerate"),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_config_parses(path, tmp_path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    data = raw.get("data", {})
    overrides = [f"data.path={tmp_path}"] if data.get("path") else []  # datasets live elsewhere
    if data.get("prompts") and not str(data["prompts"]).startswith("toy:"):  # a prompt file of the real recipe
        (tmp_path / "prompts.txt").write_text("a photo of a cat\n")
        overrides.append(f"data.prompts={tmp_path / 'prompts.txt'}")
    cfg = load_config(path, overrides)
    assert cfg.method.name and cfg.generator.name
