import pytest
import yaml

from mmalign.config import ConfigError, dump_config, load_config
from tests.helpers import write_config


def test_valid_config_and_overrides(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    p = write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest)
    cfg = load_config(p, ["train.lr=1e-5", "method.beta=2500", "generator.lora.rank=16"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.method.name == "diffusion_dpo" and cfg.method.args.beta == 2500.0
    assert cfg.generator.args.lora.rank == 16
    # the resolved config round-trips
    again = yaml.safe_load(dump_config(cfg))
    assert again["method"]["name"] == "diffusion_dpo" and again["method"]["beta"] == 2500.0


def _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, match, overrides=(), **sections):
    p = write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, **sections)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p, list(overrides))
    assert str(p) in str(e.value)  # every message names the file


def test_unknown_key(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"train\.learning_rate: unknown key",
            train={"learning_rate": 1.0})
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"method\.betta: unknown key", ["method.betta=3"])
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"generator\.lora\.rnk: unknown key",
            ["generator.lora.rnk=3"])


def test_wrong_type(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"train\.lr: expected a number, got 'fast'",
            ["train.lr=fast"])
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"train\.steps: expected an integer", ["train.steps=1.5"])
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"train\.mixed_precision: expected one of",
            ["train.mixed_precision=fp8"])
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"method\.beta: must be positive", ["method.beta=-1"])


def test_missing_required_and_unknown_names(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    p = tmp_path / "g.yaml"
    p.write_text("generator: {name: sd}\nmethod: {name: diffusion_dpo}\n")
    with pytest.raises(ConfigError, match=r"g\.yaml: generator\.pretrained: missing required key"):
        load_config(p)
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"method\.name: unknown method 'dpo_typo'",
            ["method.name=dpo_typo"])
    p = tmp_path / "m.yaml"
    p.write_text("generator: {name: sd, pretrained: x}\n")
    with pytest.raises(ConfigError, match=r"method: missing required key"):
        load_config(p)


def test_missing_files(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"data\.path: .*missing\.jsonl not found",
            data={"kind": "manifest", "path": str(tmp_path / "missing.jsonl")})
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"reward\.model: .*open_clip_config\.json not found",
            reward={"name": "clip", "model": f"local-dir:{tmp_path}"})


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
