"""Source specs (`prefix:name`) in configs: resolved through mmalign.sources, unknown ones
refused at load with one line naming the known ones."""

from __future__ import annotations

import pytest

from mmalign.config import ConfigError, config_from_dict
from mmalign.data.generated import load_prompts
from mmalign.toy import world


def cfg(**sections):
    base = {
        "generator": {"name": "sd", "pretrained": "toy:sd_toy"},
        "method": {"name": "grpo"},
        "reward": {"name": "toy_gold"},
        "data": {"kind": "prompts", "prompts": "toy:train"},
    }
    return config_from_dict({**base, **sections})


def test_a_known_prompt_set_loads_and_resolves():
    assert cfg().data.prompts == "toy:train"
    assert load_prompts("toy:heldout") == list(world.heldout_captions())


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"data": {"kind": "prompts", "prompts": "toy:nope"}},
            r"data\.prompts: unknown prompt set 'toy:nope'; known: toy:all, .*toy:heldout, toy:train",
        ),
        ({"data": {"kind": "vlm", "path": "toy:nope"}}, r"data\.path: unknown preference source 'toy:nope'; known: "),
        ({"eval": {"prompts_from": "toy:nope"}}, r"eval\.prompts_from: unknown prompt set 'toy:nope'"),
        (
            {"method": {"name": "diffusion_dro", "experts": "toy:nope"}, "reward": None},
            r"method\.experts: unknown expert source 'toy:nope'; known: toy:render",
        ),
        ({"method": {"name": "diffusion_dro"}, "reward": None}, r"method\.experts: missing required key"),
    ],
)
def test_an_unknown_or_missing_source_is_one_clear_line(sections, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**sections)
