"""benchmarks/reward_throughput.py: argument parsing and the real-mode spec builders, at the
tiny sizes only (`--arch tiny`); the released sizes are far too slow for CI."""

import importlib.util
import json

import pytest
import torch

from mmalign.rewards.common import build_reward
from mmalign.types import Samples
from tests.helpers import ROOT

_PATH = ROOT / "benchmarks" / "reward_throughput.py"


@pytest.fixture(scope="module")
def rt():
    spec = importlib.util.spec_from_file_location("reward_throughput", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["hps", "pickscore", "aesthetic", "image_reward"])
def test_real_spec_tiny_loads_through_the_adapter(rt, tmp_path, name):
    spec = rt.real_spec(name, tmp_path, arch="tiny", dtype="bfloat16", batch_size=4)
    assert spec["name"] == name and spec["dtype"] == "bfloat16" and spec["batch_size"] == 4
    reward = build_reward(spec, name)
    n, _ = rt._param_count(reward)
    model = reward.clip.model if hasattr(reward, "clip") else reward.model
    assert n > 0 and next(model.parameters()).dtype == torch.bfloat16  # (ImageReward's MLP head stays float32)
    with torch.no_grad():
        scores = reward(Samples(images=torch.rand(3, 3, 40, 40)), ["a red circle"] * 3)
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_real_arch_configs_are_the_released_sizes(rt):
    h, l14 = rt.CLIP_H14, rt.CLIP_L14
    hv, ht, lv, lt = h["vision_config"], h["text_config"], l14["vision_config"], l14["text_config"]
    assert (hv["hidden_size"], hv["num_hidden_layers"], hv["intermediate_size"], h["projection_dim"]) == (
        1280,
        32,
        5120,
        1024,
    )
    assert (ht["hidden_size"], ht["num_hidden_layers"], ht["intermediate_size"], ht["vocab_size"]) == (
        1024,
        24,
        4096,
        49408,
    )
    assert (lv["hidden_size"], lt["hidden_size"], l14["projection_dim"]) == (1024, 768, 768)
    import open_clip.factory

    cfg = open_clip.factory._MODEL_CONFIGS["ViT-H-14"]  # PickScore's CLIP-H = open_clip ViT-H-14
    assert cfg["embed_dim"] == h["projection_dim"] and cfg["vision_cfg"]["width"] == h["vision_config"]["hidden_size"]
    assert cfg["text_cfg"]["layers"] == h["text_config"]["num_hidden_layers"]


def test_real_mode_main_writes_json(rt, tmp_path):
    out = tmp_path / "real.json"
    assert (
        rt.main(
            [
                "--real",
                "--arch",
                "tiny",
                "--adapters",
                "aesthetic",
                "--batches",
                "1,2",
                "--min-time",
                "0",
                "--warmup",
                "0",
                "--out",
                str(out),
                "--workdir",
                str(tmp_path / "work"),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["meta"]["mode"] == "real" and res["meta"]["dtype"] == "float32" and res["meta"]["device_name"]
    assert [(r["adapter"], r["batch"]) for r in res["results"]] == [("aesthetic", 1), ("aesthetic", 2)]
    assert all(r["peak_mem_batched_mib"] is None and r["scores_finite"] for r in res["results"])
    assert list((tmp_path / "work").iterdir()) == []  # checkpoints removed after loading


def test_tiny_mode_default_output_unchanged(rt, tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert rt.main(["--adapters", "jpeg_compressibility", "--batches", "2", "--min-time", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["meta"]) == {"torch", "threads", "cpu_count", "platform", "load_avg", "note"}
    assert set(res["results"][0]) == {"adapter", "batch", "batched_samples_per_s", "loop_samples_per_s", "speedup"}
    assert capsys.readouterr().out.splitlines()[0].split() == ["adapter", "batch", "batched/s", "loop/s", "speedup"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "cuda"],  # real-mode options need --real
        ["--dtype", "bfloat16"],
        ["--real", "--adapters", "clap"],  # not a real-mode adapter
        ["--real", "--dtype", "float16"],
        ["--adapters", "nope"],
    ],
)
def test_bad_arguments_exit(rt, argv):
    with pytest.raises(SystemExit):
        rt.main(argv + ["--out", "/nonexistent/never-written.json"])
