"""LoRA export: diffusers / kohya / peft files give the trained model's outputs when loaded back by
diffusers' and peft's own loaders; the model card; bad input named in one line."""

import json

import pytest
import torch
import yaml

from mmalign.export import ExportError, Lora, export_run, flux_to_kohya, read_run
from mmalign.testing import make_tiny_flux, make_tiny_sdxl

PROMPT = "a red circle"


def _lora_run(tmp_path, generator, gen_name, pretrained, lora):
    """A finished run directory: config.yaml, final/ (the LoRA, moved off zero), summary, metrics."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in generator.trainable().parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    run = tmp_path / "run"
    generator.save_trained(run / "final")
    cfg = {
        "run": {"name": "toy d3po/1", "seed": 0},
        "generator": {"name": gen_name, "pretrained": str(pretrained), "finetune": "lora", "lora": lora},
        "method": {"name": "d3po"},
        "reward": {"name": "clip", "model": "toy:proxy_clip"},
        "data": {"kind": "prompts", "prompts": "toy:train"},
        "train": {"steps": 7},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "summary.json").write_text(json.dumps({"steps": 7}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "eval": {"reward": 0.2}})
        + "\n"
        + json.dumps({"step": 7, "eval": {"reward": 0.31, "gold": 0.4}})
        + "\n"
    )
    return run


def _latents(pipe, **kw):
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
        guidance_scale=3.0,
        **kw,
    )
    return out.images


@pytest.fixture(scope="module")
def sd_run(tiny_sd, tmp_path_factory):
    from mmalign.pipelines.common import LoraSettings
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    lora = {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd), lora=LoraSettings(**lora)))
    run = _lora_run(tmp_path_factory.mktemp("sd"), gen, "sd", tiny_sd, lora)
    return run, gen, tiny_sd


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sd15_export_loads_back_with_the_same_outputs(sd_run, fmt):
    from diffusers import StableDiffusionPipeline

    run, gen, base = sd_run
    out = export_run(run, fmt)
    assert out == run / "export" / fmt
    weight = next(p.name for p in out.glob("*.safetensors"))
    if fmt == "kohya":
        from safetensors import safe_open

        with safe_open(str(out / weight), "pt") as f:
            keys = list(f.keys())
            assert f.metadata()["ss_network_alpha"] == "8.0" and f.metadata()["ss_base_model_version"] == "sd_v1"
            assert float(f.get_tensor(next(k for k in keys if k.endswith(".alpha")))) == 8.0
        assert weight == "toy-d3po-1.safetensors"
        assert all(k.startswith("lora_unet_") for k in keys)
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in keys
    want = _latents(gen.pipe)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    before = _latents(pipe)
    pipe.load_lora_weights(out, weight_name=weight)
    got = _latents(pipe)
    assert (want - before).abs().max() > 1e-2  # the LoRA changes the outputs ...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # ... and the export reproduces them


def test_peft_export_loads_back_with_the_same_outputs(sd_run):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    run, gen, base = sd_run
    out = export_run(run, "peft", run / "peft_out")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), out)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 500, ehs).sample, gen.unet(x, 500, ehs).sample, rtol=1e-4, atol=1e-5)


def test_sdxl_kohya_export_loads_back_with_the_same_outputs(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from mmalign.pipelines.common import LoraSettings
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    base = make_tiny_sdxl(tmp_path / "sdxl")
    lora = {"rank": 2, "alpha": 1.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(base), lora=LoraSettings(**lora)))
    out = export_run(_lora_run(tmp_path, gen, "sd", base, lora), "kohya")
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.load_lora_weights(out, weight_name="toy-d3po-1.safetensors")
    kw = dict(height=32, width=32)
    torch.testing.assert_close(_latents(pipe, **kw), _latents(gen.pipe, **kw), rtol=1e-4, atol=1e-5)
    assert "base_model" not in (out / "README.md").read_text().split("---")[1]  # a local base is not a Hub id
    assert "sdxl" in (out / "README.md").read_text()


def test_flux_kohya_export_loads_back_with_the_same_outputs(tmp_path):
    """Tiny FLUX, LoRA on the double block's image and text attention: sd-scripts keys with fused qkv,
    read back by diffusers' kohya FLUX loader (whose single-block split assumes FLUX.1's real widths,
    so the single blocks are checked at those widths below)."""
    from diffusers import FluxPipeline

    from mmalign.pipelines.common import LoraSettings
    from mmalign.pipelines.flow import FlowGeneratorConfig, FlowMatchingGenerator

    base = make_tiny_flux(tmp_path / "flux")
    double = [f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]  # not single_...
    double += ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    lora = {"rank": 2, "alpha": 4.0, "target_modules": double}
    gen = FlowMatchingGenerator(FlowGeneratorConfig(pretrained=str(base), lora=LoraSettings(**lora)))
    out = export_run(_lora_run(tmp_path, gen, "flow", base, lora), "kohya")
    from safetensors import safe_open

    with safe_open(str(out / "toy-d3po-1.safetensors"), "pt") as f:
        assert sorted({k.split(".")[0] for k in f.keys()}) == [
            f"lora_unet_double_blocks_0_{s}_attn_{p}" for s in ("img", "txt") for p in ("proj", "qkv")
        ]
    pipe = FluxPipeline.from_pretrained(base)
    pipe.load_lora_weights(out, weight_name="toy-d3po-1.safetensors")
    kw = dict(height=16, width=16, max_sequence_length=16)
    torch.testing.assert_close(_latents(pipe, **kw), _latents(gen.pipe, **kw), rtol=1e-4, atol=1e-5)


def test_flux_single_blocks_round_trip_through_diffusers_kohya_loader():
    """At FLUX.1's widths (3072; MLP 12288), every default target, both block kinds: diffusers'
    loader turns the kohya file back into LoRAs with the same weight update B @ A * alpha / r."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    r, alpha, d = 2, 3.0, 3072
    names = [
        f"transformer_blocks.0.attn.{n}"
        for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    ]
    names += [f"single_transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")]
    sd = {}
    for n in names:
        sd[f"{n}.lora_A.weight"] = torch.randn(r, d, generator=g)
        sd[f"{n}.lora_B.weight"] = torch.randn(d, r, generator=g)
    kohya = flux_to_kohya(Lora(dict(sd), "transformer", "flux", r, alpha, []))
    back = _convert_kohya_flux_lora_to_diffusers(kohya)
    for n in names:
        want = sd[f"{n}.lora_B.weight"] @ sd[f"{n}.lora_A.weight"] * alpha / r
        got = back[f"transformer.{n}.lora_B.weight"] @ back[f"transformer.{n}.lora_A.weight"]  # scale folded in
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mlp = "transformer.single_transformer_blocks.0.proj_mlp"
    assert not back[f"{mlp}.lora_B.weight"].any()  # proj_mlp had no LoRA: a zero update


def test_model_card_names_base_method_reward_data_steps_and_final_eval(sd_run):
    from huggingface_hub import ModelCard

    run, _, base = sd_run
    card = ModelCard.load(export_run(run, "diffusers") / "README.md")
    assert "lora" in card.data.tags and "d3po" in card.data.tags and card.data.library_name == "diffusers"
    for text in (
        str(base),
        "`d3po`",
        "`clip` (toy:proxy_clip)",
        "prompts: `toy:train`",
        "| Steps | 7 |",
        "Final evaluation (step 7)",
        "| gold | 0.4 |",
        "load_lora_weights",
    ):
        assert text in card.text, text


def test_bad_input_is_one_clear_error(tmp_path, sd_run):
    with pytest.raises(ExportError, match="not a run directory"):
        export_run(tmp_path, "kohya")
    with pytest.raises(ExportError, match="unknown format; expected one of diffusers, kohya, peft"):
        export_run(sd_run[0], "ckpt")
    (tmp_path / "config.yaml").write_text("run: {name: x}\n")
    with pytest.raises(ExportError, match="did not finish"):
        export_run(tmp_path, "kohya")
    (tmp_path / "final" / "unet").mkdir(parents=True)
    with pytest.raises(ExportError, match="fully fine-tuned"):
        export_run(tmp_path, "peft")
    assert read_run(sd_run[0]).final_eval == {"step": 7, "reward": 0.31, "gold": 0.4}


def test_cli_exports_and_names_bad_input_in_one_line(sd_run, tmp_path, capsys):
    from mmalign.cli import main

    assert main(["export", str(sd_run[0]), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "toy-d3po-1.safetensors").is_file() and (tmp_path / "k" / "README.md").is_file()
    capsys.readouterr()
    for args, message in (
        (["export", str(tmp_path), "--format", "kohya"], "not a run directory"),
        (["export", str(sd_run[0]), "--format", "ckpt"], "unknown format"),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
