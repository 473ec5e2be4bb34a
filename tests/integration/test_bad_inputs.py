"""The bad-input corpus: every case is a hostile input that must end in ONE line naming the culprit.

Each case builds its bad input under tmp_path, runs the command line in-process
(`mmalign.cli.main`) and asserts: exit status 2, stderr is a single `error: ...` line matching
the case's pattern (which names the file, line, key or flag), no traceback, and nothing
written where the command would have written. A few cases run through a real subprocess
(`python -m mmalign.cli`) to prove the same end to end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from mmalign.cli import main
from tests.helpers import ROOT, write_config


@dataclass
class Env:
    """Where a case builds its input: tmp_path and the shared tiny models and pairs."""

    tmp: Path
    sd: Path
    clip: Path
    manifest: Path

    def config(self, overrides: list[str] | None = None, **sections) -> list[str]:
        """`train CONFIG [OVERRIDES] --output-dir TMP/run` with a valid small config."""
        path = write_config(self.tmp / "c.yaml", self.sd, self.clip, self.manifest, **sections)
        return ["train", str(path), *(overrides or []), "--output-dir", str(self.tmp / "run")]

    def pairs(self, *lines: str) -> Path:
        """A manifest in tmp_path with these raw lines after one valid row (images of the shared pairs)."""
        img = self.manifest.parent / "img"
        good = json.dumps({"prompt": "a red square", "chosen": str(img / "0_w.png"), "rejected": str(img / "0_l.png")})
        path = self.tmp / "pairs.jsonl"
        path.write_text("\n".join([good, *lines]) + "\n")
        return path

    def row(self, **fields) -> str:
        """A manifest row (JSON) with valid images and these fields replaced."""
        img = self.manifest.parent / "img"
        return json.dumps(
            {"prompt": "a red square", "chosen": str(img / "1_w.png"), "rejected": str(img / "1_l.png"), **fields}
        )

    def train_on(self, manifest: Path, *overrides: str) -> list[str]:
        return self.config(list(overrides), data={"kind": "manifest", "path": str(manifest)})

    def image(self) -> Path:
        path = self.tmp / "img.png"
        Image.new("RGB", (16, 16), (200, 10, 10)).save(path)
        return path


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    pattern: str  # what the single `error:` line must match (it names the culprit)


def _override(key_value: str, pattern: str, name: str | None = None) -> Case:
    return Case(name or key_value, lambda e: e.config([key_value]), pattern)


def _latin1(e: Env, name: str, text: str) -> Path:
    path = e.tmp / name
    path.write_bytes(text.encode("latin-1"))
    return path


CASES = [
    # --- every numeric config value range-checked at load, the key named
    _override("train.steps=0", r"c\.yaml: train\.steps: must be >= 1, got 0"),
    _override("train.steps=-3", r"train\.steps: must be >= 1, got -3"),
    _override("train.lr=0", r"train\.lr: must be > 0, got 0\.0"),
    _override("train.lr=-1e-5", r"train\.lr: must be > 0, got -1e-05"),
    _override("train.grad_accum=0", r"train\.grad_accum: must be >= 1, got 0"),
    _override("train.batch_size=0", r"train\.batch_size: must be >= 1, got 0"),
    _override("train.log_every=0", r"train\.log_every: must be >= 1, got 0"),
    _override("train.ema_decay=2.0", r"train\.ema_decay: must be >= 0 and < 1, got 2\.0"),
    _override("train.checkpoint_every=-1", r"train\.checkpoint_every: must be >= 0, got -1"),
    _override("train.keep_last=0", r"train\.keep_last: must be >= 1, got 0"),
    _override("train.warmup_steps=-1", r"train\.warmup_steps: must be >= 0, got -1"),
    _override("train.max_grad_norm=0", r"train\.max_grad_norm: must be > 0, got 0\.0"),
    _override("train.lr=.inf", r"train\.lr: must be a finite number, got inf"),
    _override("run.seed=-1", r"run\.seed: must be >= 0, got -1"),
    _override("data.resolution=0", r"data\.resolution: must be >= 8, got 0"),
    _override("data.max_samples=0", r"data\.max_samples: must be >= 1, got 0"),
    _override("eval.num_steps=0", r"eval\.num_steps: must be >= 1, got 0"),
    _override("eval.guidance_scale=-1", r"eval\.guidance_scale: must be >= 0, got -1\.0"),
    _override("generator.lora.rank=0", r"generator\.lora\.rank: must be >= 1, got 0"),
    _override("method.beta=-5", r"method\.beta: must be > 0, got -5\.0"),
    _override("method.label_smoothing=1.5", r"method\.label_smoothing: must be >= 0 and < 1, got 1\.5"),
    # --- config files and overrides
    _override("train.lr=[", r"override 'train\.lr=\[': the value is not valid YAML", "override_bad_yaml"),
    _override("train.lr", r"override 'train\.lr': expected key\.path=value", "override_without_value"),
    _override("train.lr=fast", r"train\.lr: expected a number, got 'fast'", "override_wrong_type"),
    _override("train.learning_rate=1", r"train\.learning_rate: unknown key", "override_unknown_key"),
    Case(
        "config_not_utf8",
        lambda e: ["train", str(_latin1(e, "c.yaml", "run: {name: caf\xe9}\n"))],
        r"c\.yaml: line 1: the config is not UTF-8 text \(byte 0xe9\)",
    ),
    Case("config_missing", lambda e: ["train", str(e.tmp / "nope.yaml")], r"nope\.yaml: config file not found"),
    Case(
        "config_is_a_list",
        lambda e: ["train", str(_write(e.tmp / "c.yaml", "- 1\n- 2\n"))],
        r"c\.yaml: expected a mapping of sections",
    ),
    Case(
        "config_bad_yaml",
        lambda e: ["train", str(_write(e.tmp / "c.yaml", "train: {lr: [\n"))],
        r"c\.yaml: not valid YAML: .* at line \d+, column \d+",
    ),
    _override("eval.prompts=[5]", r"eval\.prompts\[0\]: expected a string, got 5", "eval_prompt_numeric"),
    _override("eval.prompts=['  ']", r"eval\.prompts\[0\]: is empty", "eval_prompt_empty"),
    Case(
        "config_unknown_generator",
        lambda e: e.config(["generator.name=nope"]),
        r"generator\.name: unknown generator 'nope'; registered: .*sd",
    ),
    # --- data files
    Case("manifest_missing", lambda e: e.train_on(e.tmp / "missing.jsonl"), r"data\.path: .*missing\.jsonl not found"),
    Case(
        "manifest_not_utf8",
        lambda e: e.train_on(_latin1(e, "pairs.jsonl", '{"prompt": "caf\xe9"}\n')),
        r"pairs\.jsonl: line 1: the data file is not UTF-8 text \(byte 0xe9\)",
    ),
    Case(
        "manifest_csv_not_utf8",
        lambda e: e.train_on(_latin1(e, "pairs.csv", "prompt,chosen,rejected\ncaf\xe9,a,b\n")),
        r"pairs\.csv: line 2: the data file is not UTF-8 text",
    ),
    Case(
        "manifest_row_is_a_list",
        lambda e: e.train_on(e.pairs("[1, 2, 3]")),
        r"pairs\.jsonl:2: expected a JSON object \(\{\.\.\.\}\), got a list",
    ),
    Case(
        "manifest_row_is_a_number",
        lambda e: e.train_on(e.pairs("42")),
        r"pairs\.jsonl:2: expected a JSON object \(\{\.\.\.\}\), got a number",
    ),
    Case(
        "manifest_row_is_a_string",
        lambda e: e.train_on(e.pairs('"text"')),
        r"pairs\.jsonl:2: expected a JSON object \(\{\.\.\.\}\), got a string",
    ),
    Case("manifest_row_not_json", lambda e: e.train_on(e.pairs("{nope")), r"pairs\.jsonl:2: not valid JSON"),
    Case(
        "manifest_numeric_prompt",
        lambda e: e.train_on(e.pairs(e.row(prompt=5))),
        r"pairs\.jsonl:2: prompt: expected text, got a number",
    ),
    Case(
        "manifest_empty_prompt", lambda e: e.train_on(e.pairs(e.row(prompt="   "))), r"pairs\.jsonl:2: prompt: is empty"
    ),
    Case(
        "manifest_missing_key",
        lambda e: e.train_on(e.pairs(json.dumps({"prompt": "x", "chosen": "a.png"}))),
        r"pairs\.jsonl:2: missing rejected",
    ),
    Case(
        "manifest_path_not_text",
        lambda e: e.train_on(e.pairs(e.row(chosen=["a.png"]))),
        r"pairs\.jsonl:2: chosen: expected text, got a list",
    ),
    Case(
        "manifest_image_missing",
        lambda e: e.train_on(e.pairs(e.row(chosen="nowhere.png"))),
        r"nowhere\.png: image file not found \(set data\.skip_bad=true",
    ),
    Case(
        "batch_size_larger_than_data",
        lambda e: e.config(["train.batch_size=64"]),
        r"pairs\.jsonl: 6 usable pairs, fewer than one batch .* = 64",
    ),
    # --- sample flags and inputs (all refused before a model loads)
    Case(
        "sample_eta_negative",
        lambda e: ["sample", "--model", str(e.sd), "--prompt", "a", "--eta", "-1"],
        r"mmalign sample: argument --eta: must be >= 0, got -1",
    ),
    Case(
        "sample_n_zero",
        lambda e: ["sample", "--model", str(e.sd), "--prompt", "a", "--n", "0"],
        r"argument --n: must be >= 1, got 0",
    ),
    Case(
        "sample_steps_zero",
        lambda e: ["sample", "--model", str(e.sd), "--prompt", "a", "--steps", "0"],
        r"argument --steps: must be >= 1, got 0",
    ),
    Case(
        "sample_steps_not_a_number",
        lambda e: ["sample", "--model", str(e.sd), "--prompt", "a", "--steps", "x"],
        r"argument --steps: expected an integer, got 'x'",
    ),
    Case(
        "sample_seed_negative",
        lambda e: ["sample", "--model", str(e.sd), "--prompt", "a", "--seed", "-1"],
        r"argument --seed: must be >= 0, got -1",
    ),
    Case(
        "sample_cfg_scale_negative",
        lambda e: ["sample", "--model", str(e.sd), "--prompt", "a", "--cfg-scale", "-2"],
        r"argument --cfg-scale: must be >= 0, got -2",
    ),
    Case(
        "sample_unknown_generator",
        lambda e: ["sample", "--model", str(e.sd), "--generator", "nope", "--prompt", "a", "--out", str(e.tmp / "o")],
        r"--generator: unknown generator 'nope'; registered: .*sd",
    ),
    Case(
        "sample_prompts_not_utf8",
        lambda e: [
            "sample",
            "--model",
            str(e.sd),
            "--prompts",
            str(_latin1(e, "p.txt", "a caf\xe9\n")),
            "--out",
            str(e.tmp / "o"),
        ],
        r"p\.txt: line 1: the prompts file is not UTF-8 text",
    ),
    Case(
        "sample_prompts_missing",
        lambda e: ["sample", "--model", str(e.sd), "--prompts", str(e.tmp / "none.txt"), "--out", str(e.tmp / "o")],
        r"none\.txt: prompts file not found",
    ),
    Case(
        "sample_empty_prompt",
        lambda e: ["sample", "--model", str(e.sd), "--prompt", " ", "--out", str(e.tmp / "o")],
        r"--prompt: a prompt is empty",
    ),
    Case(
        "sample_out_is_a_file",
        lambda e: ["sample", "--model", str(e.sd), "--prompt", "a", "--out", str(_write(e.tmp / "o.txt", "x"))],
        r"--out .*o\.txt: is a file; give a directory",
    ),
    Case("sample_no_model", lambda e: ["sample", "--prompt", "a", "--out", str(e.tmp / "o")], r"give --model MODEL"),
    Case(
        "sample_offline_hub_id",
        lambda e: ["sample", "--model", "someorg/never-downloaded", "--prompt", "a", "--out", str(e.tmp / "o")],
        r"generator\.pretrained: 'someorg/never-downloaded' is not a local directory and is not downloaded, "
        r"and HF_HUB_OFFLINE=1",
    ),
    # --- score / eval / pairs flags and inputs
    Case(
        "score_batch_size_zero",
        lambda e: ["score", "--reward", "clip", "--batch-size", "0", str(e.image())],
        r"mmalign score: argument --batch-size: must be >= 1, got 0",
    ),
    Case(
        "score_num_frames_zero",
        lambda e: ["score", "--reward", "clip", "--num-frames", "0", str(e.image())],
        r"argument --num-frames: must be >= 1, got 0",
    ),
    Case(
        "score_clip_without_prompt",
        lambda e: ["score", "--reward", "clip", "--reward-args", f"model=local-dir:{e.clip}", str(e.image())],
        r"--reward clip scores media against a prompt, and .*img\.png has none",
    ),
    Case(
        "score_prompts_not_utf8",
        lambda e: ["score", "--reward", "clip", "--prompts", str(_latin1(e, "p.txt", "caf\xe9\n")), str(e.image())],
        r"p\.txt: line 1: the prompts file is not UTF-8 text",
    ),
    Case(
        "score_manifest_row_is_a_list",
        lambda e: ["score", "--reward", "clip", "--manifest", str(_write(e.tmp / "m.jsonl", "[1]\n"))],
        r"m\.jsonl:1: expected a JSON object",
    ),
    Case(
        "score_manifest_numeric_prompt",
        lambda e: [
            "score",
            "--reward",
            "clip",
            "--manifest",
            str(_write(e.tmp / "m.jsonl", json.dumps({"path": str(e.image()), "prompt": 7}) + "\n")),
        ],
        r"m\.jsonl:1: prompt: expected text, got a number",
    ),
    Case(
        "score_missing_file",
        lambda e: [
            "score",
            "--reward",
            "clip",
            "--reward-args",
            f"model=local-dir:{e.clip}",
            "--prompt",
            "a",
            str(e.tmp / "gone.png"),
        ],
        r"gone\.png: file not found",
    ),
    Case(
        "score_output_under_a_file",
        lambda e: [
            "score",
            "--reward",
            "clip",
            "--reward-args",
            f"model=local-dir:{e.clip}",
            "--prompt",
            "a",
            "--out",
            str(_write(e.tmp / "file.txt", "x") / "scores.jsonl"),
            str(e.image()),
        ],
        r"file\.txt",
    ),
    Case(
        "score_clip_unknown_model",
        lambda e: [
            "score",
            "--reward",
            "clip",
            "--reward-args",
            "model=someorg/clip-x",
            "--prompt",
            "a",
            str(e.image()),
        ],
        r"reward\.model: 'someorg/clip-x' is not a built-in open_clip model",
    ),
    Case(
        "score_clip_offline_hub_id",
        lambda e: [
            "score",
            "--reward",
            "clip",
            "--reward-args",
            "model=hf-hub:someorg/clip-x",
            "--prompt",
            "a",
            str(e.image()),
        ],
        r"reward\.model: 'someorg/clip-x' is not a local directory and is not downloaded, and HF_HUB_OFFLINE=1",
    ),
    Case(
        "score_config_not_utf8",
        lambda e: ["score", "--config", str(_latin1(e, "r.yaml", "name: caf\xe9\n")), "--prompt", "a", str(e.image())],
        r"r\.yaml: line 1: the config is not UTF-8 text",
    ),
    Case(
        "eval_reward_config_missing",
        lambda e: ["eval", "--pretrained", str(e.sd), "--reward-config", str(e.tmp / "none.yaml")],
        r"none\.yaml: config file not found",
    ),
    Case(
        "score_unknown_reward",
        lambda e: ["score", "--reward", "nope", "--prompt", "a", str(e.image())],
        r"unknown reward 'nope'",
    ),
    Case(
        "eval_seeds_zero",
        lambda e: ["eval", "--pretrained", str(e.sd), "--seeds", "0"],
        r"mmalign eval: argument --seeds: must be >= 1, got 0",
    ),
    Case(
        "eval_guidance_negative",
        lambda e: ["eval", "--pretrained", str(e.sd), "--guidance", "-1"],
        r"argument --guidance: must be >= 0, got -1",
    ),
    Case("eval_no_model", lambda e: ["eval"], r"give --run RUN_DIR or --pretrained MODEL"),
    Case("pairs_k_one", lambda e: ["pairs", "--k", "1"], r"mmalign pairs: argument --k: must be >= 2, got 1"),
    Case(
        "pairs_top_p_above_one",
        lambda e: ["pairs", "--top-p", "1.5"],
        r"argument --top-p: must be > 0 and <= 1, got 1\.5",
    ),
    Case(
        "eval_judge_tie_eps_negative",
        lambda e: ["eval-judge", "--tie-eps", "-0.1"],
        r"argument --tie-eps: must be >= 0, got -0\.1",
    ),
    Case(
        "label_port_out_of_range",
        lambda e: ["label", "--port", "70000"],
        r"argument --port: must be >= 0 and <= 65535, got 70000",
    ),
    Case("unknown_command", lambda e: ["nope"], r"argument command: invalid choice: 'nope'"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def env(tmp_path, tiny_sd, tiny_clip, pairs_manifest, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the repository (runs/, samples/)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return Env(tmp_path, tiny_sd, tiny_clip, pairs_manifest)


def _check_one_line(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not _is_noise(line)]
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


def _is_noise(line: str) -> bool:
    """Progress bars and library warnings that are not the command's own output."""
    return any(s in line for s in ("it/s]", "Warning", "warnings.warn", "Loading"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, env, capsys):
    argv = case.argv(env)
    before = sorted(p.relative_to(env.tmp) for p in env.tmp.rglob("*"))
    assert main(argv) == 2
    _check_one_line(capsys.readouterr().err, case.pattern)
    after = sorted(p.relative_to(env.tmp) for p in env.tmp.rglob("*"))
    assert after == before  # nothing written: no run directory, no outputs


def test_every_case_name_is_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


def test_a_refused_run_leaves_the_old_config_untouched(env, capsys):
    """A run that fails on bad data does not overwrite the run directory's config.yaml."""
    run = env.tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old: config\n")
    assert main([*env.train_on(env.pairs("[1]")), "--overwrite"]) == 2
    _check_one_line(capsys.readouterr().err, r"pairs\.jsonl:2: expected a JSON object")
    assert (run / "config.yaml").read_text() == "old: config\n"


SUBPROCESS_CASES = ["train.lr=-1e-5", "config_not_utf8", "manifest_row_is_a_list", "sample_eta_negative"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_end_to_end_has_no_traceback(name, env):
    """The same through a real `python -m mmalign.cli` process: exit 2, one line, no traceback."""
    case = next(c for c in CASES if c.name == name)
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "mmalign.cli", *case.argv(env)],
        cwd=env.tmp,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    _check_one_line(r.stderr, case.pattern)
    assert r.stdout == ""


def test_latent_cache_follows_image_content(env):
    """The latent cache is keyed by the images' bytes: swapping chosen and rejected images under
    the same paths re-encodes them, and the cached latents follow the content."""
    import torch

    from mmalign import registry
    from mmalign.config import parse_dataclass
    from mmalign.data import preference as P

    img = env.tmp / "img"
    shutil.copytree(env.manifest.parent / "img", img)
    rows = [{"prompt": f"p{i}", "chosen": f"img/{i}_w.png", "rejected": f"img/{i}_l.png"} for i in range(2)]
    manifest = env.tmp / "pairs.jsonl"
    manifest.write_text("\n".join(map(json.dumps, rows)) + "\n")
    entry = registry.lookup("generator", "sd")
    gen = entry.build(
        parse_dataclass(
            entry.config, {"pretrained": str(env.sd), "finetune": "none", "vae_latents": "mean"}, "generator"
        )
    )

    def cached():
        ds = P.PreferenceDataset(P.read_manifest(manifest), 32)
        path = ds.cache_latents(gen, env.tmp / "cache")
        ds.use_latents(path)
        return path, ds.latents

    first_path, first = cached()
    for i in range(2):  # swap chosen and rejected under the same paths
        w, l_ = img / f"{i}_w.png", img / f"{i}_l.png"
        tmp = img / "swap.png"
        w.rename(tmp), l_.rename(w), tmp.rename(l_)
    second_path, second = cached()
    assert second_path != first_path
    assert torch.equal(second["w"], first["l"]) and torch.equal(second["l"], first["w"])
    assert cached()[0] == second_path  # unchanged content: the cache is reused


# --------------------------------------------------------------------------- the same through the data API
def _vlm_rows(e: Env, text: str, name: str = "rows.jsonl") -> Path:
    path = e.tmp / name
    path.write_text(text)
    return path


def _vlm_row(e: Env, **fields) -> str:
    img = e.manifest.parent / "img" / "0_w.png"
    return json.dumps({"image": str(img), "prompt": "what is it?", "chosen": "a square", "rejected": "a cat", **fields})


API_CASES = [
    (
        "vlm_rows_row_is_a_list",
        lambda e, mp: _read_vlm(_vlm_rows(e, "[1, 2]\n")),
        r"rows\.jsonl:1: expected a JSON object \(\{\.\.\.\}\), got a list",
    ),
    (
        "vlm_rows_json_not_a_list",
        lambda e, mp: _read_vlm(_vlm_rows(e, '{"a": 1}', "rows.json")),
        r"rows\.json: expected a JSON list of rows, got an object",
    ),
    (
        "vlm_rows_not_utf8",
        lambda e, mp: _read_vlm(_latin1(e, "rows.jsonl", '{"prompt": "caf\xe9"}\n')),
        r"rows\.jsonl: line 1: the data file is not UTF-8 text",
    ),
    (
        "vlm_rows_numeric_prompt",
        lambda e, mp: _read_vlm(_vlm_rows(e, _vlm_row(e, prompt=3) + "\n")),
        r"rows\.jsonl:1: prompt: expected a string or a list of chat messages, got int",
    ),
    (
        "vlm_rows_empty_prompt",
        lambda e, mp: _read_vlm(_vlm_rows(e, _vlm_row(e, prompt="") + "\n")),
        r"rows\.jsonl:1: prompt: is empty",
    ),
    (
        "vlm_rows_margin_not_a_number",
        lambda e, mp: _read_vlm(_vlm_rows(e, _vlm_row(e, margin="big") + "\n")),
        r"rows\.jsonl:1: margin: expected a number, got 'big'",
    ),
    (
        "prompts_file_not_utf8",
        lambda e, mp: _load_prompts(_latin1(e, "p.txt", "ok\ncaf\xe9\n")),
        r"p\.txt: line 2: the prompts file is not UTF-8 text",
    ),
    ("prompts_file_empty", lambda e, mp: _load_prompts(_write(e.tmp / "p.txt", "\n  \n")), r"p\.txt: no prompts"),
    (
        "decompression_bomb_without_skip_bad",
        lambda e, mp: _validate(e.pairs(e.row(chosen=str(_bomb(e, mp))))),
        r"bomb\.png: .*(decompression bomb|pixels).*set data\.skip_bad=true",
    ),
]


def _read_vlm(path: Path):
    from mmalign.data.vlm import read_rows

    return read_rows(path)


def _load_prompts(path: Path):
    from mmalign.data.generated import load_prompts

    return load_prompts(str(path))


def _bomb(e: Env, monkeypatch) -> Path:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # the 32x32 pairs stay under twice this
    big = e.tmp / "bomb.png"
    Image.new("RGB", (64, 64)).save(big)
    return big


def _validate(manifest: Path, skip_bad: bool = False):
    from mmalign.data import preference as P

    return P.validate_pairs(P.read_manifest(manifest), skip_bad)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name,call,pattern", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_data_is_a_one_line_known_error(name, call, pattern, env, monkeypatch):
    """Data readers raise an error type `mmalign.cli.main` turns into one line (exit 2), naming the culprit."""
    from mmalign.config import ConfigError
    from mmalign.data.preference import DataError
    from mmalign.media import MediaError

    with pytest.raises((DataError, ConfigError, MediaError)) as e:
        call(env, monkeypatch)
    assert "\n" not in str(e.value)
    assert re.search(pattern, str(e.value)), str(e.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_is_skipped_and_counted_with_skip_bad(env, monkeypatch):
    """Documented behaviour: under data.skip_bad a decompression bomb is a bad image, skipped and counted."""
    ps = _validate(env.pairs(env.row(chosen=str(_bomb(env, monkeypatch)))), skip_bad=True)
    assert (len(ps.pairs), ps.bad_skipped) == (1, 1)
