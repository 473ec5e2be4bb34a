import dataclasses
import math
import typing

import pytest
import yaml

from mmalign import registry
from mmalign.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    RunSection,
    TrainConfig,
    dump_config,
    load_config,
    parse_dataclass,
)
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
    _expect(
        tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"train\.learning_rate: unknown key", train={"learning_rate": 1.0}
    )
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"method\.betta: unknown key", ["method.betta=3"])
    _expect(
        tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"generator\.lora\.rnk: unknown key", ["generator.lora.rnk=3"]
    )


def test_wrong_type(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    _expect(
        tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"train\.lr: expected a number, got 'fast'", ["train.lr=fast"]
    )
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"train\.steps: expected an integer", ["train.steps=1.5"])
    _expect(
        tmp_path,
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        r"train\.mixed_precision: expected one of",
        ["train.mixed_precision=fp8"],
    )
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, r"method\.beta: must be > 0, got -1\.0", ["method.beta=-1"])


def test_missing_required_and_unknown_names(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    p = tmp_path / "g.yaml"
    p.write_text("generator: {name: sd}\nmethod: {name: diffusion_dpo}\n")
    with pytest.raises(ConfigError, match=r"g\.yaml: generator\.pretrained: missing required key"):
        load_config(p)
    _expect(
        tmp_path,
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        r"method\.name: unknown method 'dpo_typo'",
        ["method.name=dpo_typo"],
    )
    p = tmp_path / "m.yaml"
    p.write_text("generator: {name: sd, pretrained: x}\n")
    with pytest.raises(ConfigError, match=r"method: missing required key"):
        load_config(p)


def test_missing_files(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    _expect(
        tmp_path,
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        r"data\.path: .*missing\.jsonl not found",
        data={"kind": "manifest", "path": str(tmp_path / "missing.jsonl")},
    )
    _expect(
        tmp_path,
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        r"reward\.model: .*open_clip_config\.json not found",
        reward={"name": "clip", "model": f"local-dir:{tmp_path}"},
    )


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


# --------------------------------------------------------------------------- range checks of every numeric field


def _numeric(tp) -> type | None:
    """int or float when `tp` is a number, an optional number or a list of numbers; else None."""
    for arg in (tp, *typing.get_args(tp), *(a for t in typing.get_args(tp) for a in typing.get_args(t))):
        if arg in (int, float):
            return arg
    return None


def _dummy(tp):
    """A value of type `tp` for a required field, so that parsing reaches the fields after it."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    return [] if origin is list else {} if dict in (tp, origin) else "x"


def _numeric_fields(cls, path=()):
    """(path, field, type) of every numeric field of `cls` and of its nested config dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("component"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _numeric_fields(hints[f.name], (*path, f.name))
        elif _numeric(hints[f.name]):
            yield (*path, f.name), f, hints[f.name]


def _out_of_range(f, tp):
    bounds = f.metadata["range"]
    number = _numeric(tp)
    if bounds.ge is not None:
        bad = bounds.ge - 1
    elif bounds.gt is not None:
        bad = bounds.gt
    elif bounds.le is not None:
        bad = bounds.le + 1
    elif bounds.lt is not None:
        bad = bounds.lt
    else:
        assert number is float, "an unbounded integer field has no out-of-range value: give it a bound"
        bad = math.nan
    bad = number(bad) if not math.isnan(bad) else bad
    origins = {typing.get_origin(tp), *map(typing.get_origin, typing.get_args(tp))}
    return [bad] if list in origins else {"x": bad} if dict in origins else bad


def _config_classes():
    registry.load_builtins()
    registry.load_plugins()
    yield from (("run", RunSection), ("data", DataConfig), ("train", TrainConfig), ("eval", EvalConfig))
    for kind, table in registry.KINDS.items():
        for _name, entry in sorted(table.items()):
            yield f"{kind}", entry.config


def _cases():
    for where, cls in _config_classes():
        for path, f, tp in _numeric_fields(cls):
            yield pytest.param(where, cls, path, f, tp, id=f"{cls.__name__}.{'.'.join(path)}")


@pytest.mark.parametrize("where,cls,path,f,tp", list(_cases()))
def test_every_numeric_config_field_is_range_checked(where, cls, path, f, tp):
    """A numeric field without `num(..., bounds)` fails here: out-of-range values must be refused at load."""
    assert "range" in f.metadata, f"{where}.{'.'.join(path)} has no range: declare it with mmalign.config.num()"
    bad = _out_of_range(f, tp)
    data = node = {}
    hints, node_cls = typing.get_type_hints(cls), cls
    for part in path[:-1]:
        for g in dataclasses.fields(node_cls):  # required fields before the nested section
            if g.default is dataclasses.MISSING and g.default_factory is dataclasses.MISSING:
                node[g.name] = _dummy(hints[g.name])
        node = node.setdefault(part, {})
        node_cls = hints[part]
        hints = typing.get_type_hints(node_cls)
    for g in dataclasses.fields(node_cls):
        if g.default is dataclasses.MISSING and g.default_factory is dataclasses.MISSING:
            node[g.name] = _dummy(hints[g.name])
    node[path[-1]] = bad
    key = ".".join((where, *path)).replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"^{key}(\[0\]|\.x)?: must be"):
        parse_dataclass(cls, data, where)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=-1e-5", r"train\.lr: must be > 0, got -1e-05"),
        ("train.steps=0", r"train\.steps: must be >= 1, got 0"),
        ("train.grad_accum=0", r"train\.grad_accum: must be >= 1, got 0"),
        ("train.ema_decay=2.0", r"train\.ema_decay: must be >= 0 and < 1, got 2\.0"),
        ("train.keep_last=0", r"train\.keep_last: must be >= 1, got 0"),
        ("train.checkpoint_every=-1", r"train\.checkpoint_every: must be >= 0, got -1"),
        ("train.log_every=0", r"train\.log_every: must be >= 1, got 0"),
        ("train.batch_size=0", r"train\.batch_size: must be >= 1, got 0"),
        ("train.adam_betas=[0.9,1.5]", r"train\.adam_betas\[1\]: must be >= 0 and < 1, got 1\.5"),
        ("train.lr=.nan", r"train\.lr: must be a finite number, got nan"),
        ("data.resolution=0", r"data\.resolution: must be >= 8, got 0"),
        ("generator.resolution=0", r"generator\.resolution: must be >= 8, got 0"),
        ("eval.num_steps=0", r"eval\.num_steps: must be >= 1, got 0"),
        ("generator.lora.rank=0", r"generator\.lora\.rank: must be >= 1, got 0"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, tiny_sd, tiny_clip, pairs_manifest, override, message):
    _expect(tmp_path, tiny_sd, tiny_clip, pairs_manifest, message, [override])
