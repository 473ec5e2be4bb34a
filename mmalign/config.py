"""YAML run configs -> typed, validated dataclasses.

Errors name the file and the dotted key path (`cfg.yaml: train.lr: expected a number, got
'fast'`). CLI overrides (`train.lr=1e-5 method.beta=2500`) are applied to the raw YAML
before validation, so they are checked the same way. Component sections (`generator`,
`reward`, `method`) name a registry entry with `name:`; their other keys are validated
against that entry's config dataclass.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mmalign import registry, sources
from mmalign.tracking import check_report_to


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric config value (each optional); any finite number when all are None."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: float) -> str | None:
        """Why `value` is out of range (`must be > 0`), or None when it is in range."""
        if not math.isfinite(value):
            return "must be a finite number"
        bounds = [
            (">=", self.ge, value >= (self.ge or 0)),
            (">", self.gt, value > (self.gt or 0)),
            ("<=", self.le, value <= (self.le or 0)),
            ("<", self.lt, value < (self.lt or 0)),
        ]
        wanted = [f"{op} {bound:g}" for op, bound, ok in bounds if bound is not None]
        if all(ok for _, bound, ok in bounds if bound is not None):
            return None
        return "must be " + " and ".join(wanted)


def num(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A numeric config field checked at load time: `steps: int = num(100, ge=1)`.

    The bounds apply to the value (None passes, when the type allows it) or to each item of a
    list or mapping; NaN and infinities are always refused. Out of range -> `train.steps: must be >= 1, got 0`.
    """
    return field(default=default, default_factory=default_factory, metadata={"range": Range(ge, gt, le, lt)})


def flag(
    tp: type, *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> Any:
    """An argparse `type=` for a numeric flag with bounds: `--eta -1` -> `argument --eta: must be >= 0, got -1`."""
    bounds = Range(ge, gt, le, lt)

    def parse(text: str) -> Any:
        try:
            value = tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_type_name(tp)}, got {text!r}") from None
        problem = bounds.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    parse.__name__ = tp.__name__  # argparse names the type in its own messages
    return parse


def check_range(key: str, value: Any, bounds: Range) -> None:
    """ConfigError `KEY: must be ..., got VALUE` unless `value` (or each item of a list) is in `bounds`."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_range(f"{key}[{i}]", item, bounds)
        return
    if isinstance(value, dict):
        for name, item in value.items():
            check_range(f"{key}.{name}", item, bounds)
        return
    if isinstance(value, (int, float)):
        problem = bounds.problem(value)
        if problem:
            raise ConfigError(f"{key}: {problem}, got {value!r}")


@dataclass
class Component:
    """A registry name plus that entry's validated config."""

    name: str
    args: Any


@dataclass
class RunSection:
    name: str = "run"
    output_dir: str | None = None  # default: runs/<name>
    seed: int = num(0, ge=0)


def check_source(key: str, kind: str, spec: str) -> None:
    """ValueError `KEY: unknown KIND 'SPEC'; known: ...` unless a plug-in registered `spec`."""
    try:
        sources.lookup(kind, spec)
    except sources.SourceError as e:
        raise ValueError(f"{key}: {e}") from None


@dataclass
class DataConfig:
    kind: Literal["manifest", "pickapic", "generated", "prompts", "vlm", "none"] = "manifest"
    path: str | None = None  # manifest .jsonl/.csv, or a parquet/arrow directory for pickapic; kind=vlm: rows
    resolution: int | None = num(None, ge=8)  # pixels; default: the generator's resolution
    skip_bad: bool = False  # skip (and count) unreadable images instead of stopping
    cache_latents: bool = False
    cache_dir: str | None = None  # default: <run dir>/latent_cache
    max_samples: int | None = num(None, ge=1)
    random_flip: bool = False  # never for captions with left/right relations
    num_workers: int = num(0, ge=0)
    # kind=prompts (online methods) and kind=generated: a .txt file (one per line) or a
    # registered prompt set "prefix:name" (mmalign.sources)
    prompts: str | None = None
    # kind=generated: on-policy pairs, sampled once from the generator and ranked by the reward
    candidates: int = num(4, ge=2)  # samples per prompt; the best and the worst make a pair
    sample_steps: int = num(20, ge=1)
    sample_guidance: float = num(5.0, ge=0)
    sample_eta: float = num(1.0, ge=0)
    min_gap: float = num(0.0, ge=0)  # drop pairs whose reward gap is below this
    reencode: bool = True  # pair latents = VAE(decoded sample), not the sampler's raw x_0 (see online.RolloutSettings)

    def validate(self) -> None:
        if self.kind in ("manifest", "pickapic", "vlm") and not self.path:
            raise ValueError(f"path: required for data.kind={self.kind}")
        named = self.kind == "vlm" and sources.is_spec(self.path)  # a preference source, built on use
        if self.path and self.kind in ("manifest", "pickapic", "vlm") and not named and not Path(self.path).exists():
            raise ValueError(f"path: {self.path} not found")
        if self.kind in ("generated", "prompts") and not self.prompts:
            raise ValueError(f"prompts: required for data.kind={self.kind} (a .txt file or a prompt set 'prefix:name')")
        if self.prompts and not Path(self.prompts).is_file():
            if not sources.is_spec(self.prompts):
                raise ValueError(f"prompts: {self.prompts} not found")
            check_source("prompts", "prompt_set", self.prompts)
        if named and not Path(self.path).exists():
            check_source("path", "preference_source", self.path)
        if self.candidates < 2:
            raise ValueError("candidates: need at least 2 to make a pair")


@dataclass
class EvalConfig:
    every: int = num(0, ge=0)  # steps; 0 = only before training and at the end
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat"])
    prompts_from: str | None = None  # instead of `prompts`: a prompt set "prefix:name" or a .txt file
    max_prompts: int | None = num(None, ge=1)
    # also report gold accuracy: true = the one registered gold evaluator of the samples'
    # modality (image, video, audio), or a gold evaluator's name (e.g. toy_video)
    gold: bool | str = False
    enabled: bool = True
    at_start: bool = True  # also evaluate before training (false: the caller has the base numbers)
    seed: int = num(1234, ge=0)
    num_steps: int = num(20, ge=1)
    guidance_scale: float = num(5.0, ge=0)
    images_per_prompt: int = num(1, ge=1)

    def validate(self) -> None:
        for i, prompt in enumerate(self.prompts):
            if not prompt.strip():
                raise ValueError(f"prompts[{i}]: is empty")
        if self.prompts_from and sources.is_spec(self.prompts_from) and not Path(self.prompts_from).is_file():
            check_source("prompts_from", "prompt_set", self.prompts_from)
        if isinstance(self.gold, str):
            check_source("gold", "gold_evaluator", self.gold)


@dataclass
class TrainConfig:
    steps: int = num(100, ge=1)  # optimizer steps
    batch_size: int = num(1, ge=1)  # per process, per micro-batch (pairs for preference methods)
    grad_accum: int = num(1, ge=1)
    lr: float = num(1e-5, gt=0)
    weight_decay: float = num(1e-2, ge=0)
    adam_betas: list[float] = num(default_factory=lambda: [0.9, 0.999], ge=0, lt=1)
    adam_eps: float = num(1e-8, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = num(0, ge=0)
    max_grad_norm: float | None = num(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = num(None, ge=0, lt=1)  # e.g. 0.999; None disables EMA
    checkpoint_every: int = num(0, ge=0)  # steps; 0 = only at the end
    keep_last: int = num(2, ge=1)
    log_every: int = num(1, ge=1)
    # online methods: write every N-th round's rollouts (buffer, images, rewards) to
    # <run>/rollouts/round_<n>/ for inspection; 0 = never
    save_rollouts_every: int = num(0, ge=0)
    # CPU only: flush float32 denormals to zero while training (torch.set_flush_denormal). Well-fit
    # preference pairs (log-sigmoid margins of 50-100) send gradients of ~e^-70 through the whole
    # backward pass, and CPUs compute on denormals ~100x slower: without it the toy Flow-DPO run's
    # late steps take 5x as long. Values below 1.2e-38 become 0; no effect on GPUs.
    flush_denormal: bool = True
    # skip up to N consecutive steps whose loss is NaN/inf (no update; counted in metrics as
    # nonfinite_skipped), then roll back to the last intact checkpoint; 0 = stop with an error
    skip_nonfinite: int = num(0, ge=0)
    # experiment trackers, through accelerate (mmalign.tracking): any of tensorboard, wandb, trackio,
    # mlflow; each gets metrics.jsonl's numbers, the evaluation grids and this config, offline unless
    # the environment says otherwise (docs/reports-and-trackers.md). [] = metrics.jsonl only
    report_to: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.save_rollouts_every < 0:
            raise ValueError("save_rollouts_every: must be >= 0 (rounds; 0 = never)")
        check_report_to(self.report_to)


@dataclass
class RunConfig:
    generator: Component = field(metadata={"component": "generator"})
    method: Component = field(metadata={"component": "method"})
    reward: Component | None = field(default=None, metadata={"component": "reward"})
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true/false"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is dict:
        return _convert(dict[str, Any], value, where)
    if tp is list:
        return _convert(list[Any], value, where)
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def parse_component(kind: str, value: Any, where: str) -> Component:
    """A `{name: ..., **args}` section -> Component(name, args parsed by the registered config class)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'name' key, got {value!r}")
    if "name" not in value:
        raise ConfigError(f"{where}.name: missing required key (which {kind} to use)")
    name = value["name"]
    try:
        entry = registry.lookup(kind, name)
    except KeyError as e:
        raise ConfigError(f"{where}.name: {e.args[0]}") from None
    rest = {k: v for k, v in value.items() if k != "name"}
    return Component(name, parse_dataclass(entry.config, rest, where))


def parse_dataclass(cls: type, data: Any, where: str) -> Any:
    """A mapping -> an instance of the config dataclass `cls`: unknown keys, missing required keys,
    wrong types and failed `validate()` checks raise ConfigError naming the key path under `where`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or '<top level>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: missing required key")
            continue
        kind = f.metadata.get("component")
        if kind is not None:
            kwargs[name] = None if data[name] is None else parse_component(kind, data[name], path)
        else:
            kwargs[name] = _convert(hints[name], data[name], path)
            if "range" in f.metadata:
                check_range(path, kwargs[name], f.metadata["range"])
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or '<top level>'}: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{prefix}{e}") from None
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw config dict."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key.path=value")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: the value is not valid YAML ({one_line_yaml_error(e)})") from None
    return data


def one_line_yaml_error(e: yaml.YAMLError) -> str:
    """A YAML parse error on one line: the problem and where it is (`line 3, column 5`)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def check_hub_model(key: str, model_id: str) -> None:
    """ConfigError when `model_id` is neither a local path nor in the Hugging Face cache while the
    hub is off (HF_HUB_OFFLINE=1): one line naming the id, instead of a download error later."""
    if Path(model_id).expanduser().exists() or ":" in model_id:
        return
    from huggingface_hub import constants

    cached = Path(constants.HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}"
    if constants.HF_HUB_OFFLINE and not cached.is_dir():
        raise ConfigError(
            f"{key}: {model_id!r} is not a local directory and is not downloaded, and HF_HUB_OFFLINE=1 "
            "forbids downloading it (no network): download it first or give a local path"
        )


def read_utf8(path: str | Path, what: str = "file") -> str:
    """The text of `path`; a file that is not UTF-8 is a ConfigError naming it and the offending byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: the {what} is not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8"
        ) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(read_utf8(path, "config"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {one_line_yaml_error(e)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (generator:, method:, ...), got {data!r:.60}")
    return config_from_dict(data or {}, overrides, source=str(path))


def config_from_dict(data: dict, overrides: list[str] | None = None, source: str = "<config>") -> RunConfig:
    data = apply_overrides(copy.deepcopy(data), overrides or [])
    try:
        return parse_dataclass(RunConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_dict(obj: Any) -> Any:
    if isinstance(obj, Component):
        return {"name": obj.name, **to_dict(obj.args)}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
