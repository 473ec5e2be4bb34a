"""The AnimateDiff adapter (pipelines/animatediff.py) on a tiny random AnimateDiffPipeline:
4 frames of 32x32 pixels, latents B,4,4,8,8."""

import json
import math
import re

import pytest
import torch
import yaml
from PIL import Image

from mmalign.config import load_config
from mmalign.pipelines.animatediff import (
    MOTION_LORA_TARGETS,
    AnimateDiffGenerator,
    AnimateDiffGeneratorConfig,
    MotionLoraSettings,
    resolve_lora_targets,
)
from mmalign.testing import make_tiny_animatediff
from mmalign.trainer import Trainer
from tests.helpers import write_config

F = 4
PROMPTS = ["a red circle moving right", "two blue squares"]


@pytest.fixture(scope="session")
def tiny_ad(tmp_path_factory):
    return make_tiny_animatediff(tmp_path_factory.mktemp("models") / "animatediff")


def _gen(path, **kw):
    kw.setdefault("lora", MotionLoraSettings(rank=4, alpha=4))
    return AnimateDiffGenerator(AnimateDiffGeneratorConfig(pretrained=str(path), num_frames=F, **kw))


@pytest.fixture(scope="module")
def gen(tiny_ad):
    torch.manual_seed(0)
    g = _gen(tiny_ad)
    with torch.no_grad():  # non-trivial LoRA: the policy differs from the reference
        for p in g.trainable().parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return g


def test_rollout_log_probs_are_the_float64_ddim_gaussian(gen):
    """Stored log-probs equal log N(x_{t-1}; mu, sigma^2) averaged over the C*F*h*w latent dimensions,
    mu from diffusers' DDIM step (noise zeroed), sigma^2 its eta=1 variance, in float64."""
    from diffusers import DDIMScheduler

    ro = gen.rollout(PROMPTS, num_steps=3, guidance_scale=3.0, eta=1.0, seeds=[3, 4])
    assert ro.latents.shape == (2, 4, 4, F, 8, 8) and ro.log_probs.shape == (2, 3)
    assert ro.samples.video.shape == (2, F, 3, 32, 32) and ro.samples.images is None
    assert ro.log_probs.dtype == torch.float64
    sched = DDIMScheduler.from_config(gen.scheduler.config)
    assert sched.config.beta_schedule == "linear"  # AnimateDiff's schedule
    sched.set_timesteps(3)
    cond, uncond = ro.extras["cond"], ro.extras["uncond"]
    for k, t in enumerate(sched.timesteps):
        x, x_next = ro.latents[:, k], ro.latents[:, k + 1].double()
        with torch.no_grad():  # the UNetMotionModel called as AnimateDiffPipeline.__call__ calls it
            emb = torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]]).repeat_interleave(F, 0)
            u, c = gen.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
        eps = (u + 3.0 * (c - u)).double()
        prev_t = int(t) - 1000 // 3
        var = sched._get_variance(int(t), prev_t).double()
        mean = sched.step(eps, t, x.double(), eta=1.0, variance_noise=torch.zeros_like(eps)).prev_sample
        per_dim = -((x_next - mean) ** 2) / (2 * var) - 0.5 * torch.log(var) - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(ro.log_probs[:, k], per_dim.flatten(1).mean(1), rtol=1e-6, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(gen.step_log_prob(ro, k), ro.log_probs[:, k], rtol=1e-6, atol=1e-5)
            with gen.reference():
                assert not torch.allclose(gen.step_log_prob(ro, k), ro.log_probs[:, k])


def test_deterministic_ddim_equals_animatediff_pipeline_call(gen):
    """eta=0 rollout == AnimateDiffPipeline.__call__ on the same x_T, prompts and guidance (LoRA active)."""
    x_T = torch.randn(2, 4, F, 8, 8, generator=torch.Generator().manual_seed(7))
    ro = gen.rollout(PROMPTS, num_steps=4, guidance_scale=4.0, eta=0.0, latents=x_T, need_log_probs=False)
    with torch.no_grad():
        ref = gen.pipe(
            PROMPTS, num_frames=F, height=32, width=32, num_inference_steps=4, guidance_scale=4.0,
            latents=x_T.clone(), output_type="pt",
        ).frames  # fmt: skip
    torch.testing.assert_close(ro.samples.video, ref.float(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        lat = gen.pipe(
            PROMPTS, num_frames=F, height=32, width=32, num_inference_steps=4, guidance_scale=4.0,
            latents=x_T.clone(), output_type="latent",
        ).frames  # fmt: skip
    torch.testing.assert_close(ro.latents[:, -1], lat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guidance_hooks_walk_the_rollouts_steps(gen, eta):
    """The guided samplers (mmalign.guidance) reproduce the rollout through the guidance hooks on
    5-D latents: dynamic CFG with one candidate scale is plain CFG, bit for bit."""
    from mmalign.guidance.dynamic_cfg import dynamic_cfg_sample

    ref = gen.rollout(PROMPTS, num_steps=3, guidance_scale=3.0, eta=eta, seeds=[3, 4], need_log_probs=False)
    out = dynamic_cfg_sample(gen, PROMPTS, [], candidates=[3.0], num_steps=3, seeds=[3, 4], eta=eta)
    assert torch.equal(out.latents, ref.latents) and torch.equal(out.samples.video, ref.samples.video)


def test_lora_targets_only_the_motion_modules_by_default(gen, tiny_ad):
    from diffusers import UNetMotionModel

    trained = [n for n, p in gen.trainable().named_parameters() if p.requires_grad]
    pattern = r".*\.motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    want = {n for n, _ in UNetMotionModel.from_pretrained(tiny_ad / "unet").named_modules() if re.fullmatch(pattern, n)}
    assert len(want) == 8 * 7  # 7 motion modules (down 2, mid 1, up 4), 2 attentions x 4 projections
    assert all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert {n.split(".lora_")[0] for n in trained} == want and len(trained) == 2 * len(want)
    # plain names keep peft's suffix meaning (spatial attention too); a glob matching nothing is refused
    g = _gen(tiny_ad, lora=MotionLoraSettings(rank=2, alpha=2, target_modules=["to_q"]))
    names = [n for n, p in g.trainable().named_parameters() if p.requires_grad]
    assert any("motion_modules" in n for n in names) and any(".attentions." in n for n in names)
    with pytest.raises(ValueError, match="matches no Linear"):
        _gen(tiny_ad, lora=MotionLoraSettings(target_modules=["motion_modules.*.nothing_here"]))


def test_default_targets_on_the_v2_motion_adapter_layout():
    """At full size (diffusers' MotionAdapter defaults: AnimateDiff v2's motion modules for SD 1.5, mid
    block included; built on the meta device): 21 motion modules x 2 attentions x 4 projections = 168
    LoRA targets, a rank-8 LoRA of 2.42M parameters on 453.2M motion-module parameters."""
    from diffusers import MotionAdapter

    with torch.device("meta"):
        adapter = MotionAdapter()
    names = resolve_lora_targets(adapter, MOTION_LORA_TARGETS)
    attn = r"motion_modules\.\d+\.transformer_blocks\.0\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
    assert len(names) == 168 and all(re.search(attn, n) for n in names)
    mods = dict(adapter.named_modules())
    assert sum(8 * (mods[n].in_features + mods[n].out_features) for n in names) == 2_416_640
    assert sum(p.numel() for p in adapter.parameters()) == 453_209_280


def test_full_finetune_trains_the_motion_modules_only(tiny_ad, tmp_path):
    g = _gen(tiny_ad, finetune="full")
    named = dict(g.trainable().named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    assert trained == {n for n in named if "motion_modules" in n}
    with torch.no_grad():
        for n in trained:
            named[n].add_(0.01)
    x0, cond = torch.randn(1, 4, F, 8, 8), g.encode_prompt(["a"])
    t, noise = torch.tensor([500]), torch.randn(1, 4, F, 8, 8)
    with torch.no_grad():
        pol = g.denoise_error(x0, cond, t, noise)
        with g.reference():
            ref = g.denoise_error(x0, cond, t, noise)
    assert not torch.allclose(pol, ref)
    # saved as a MotionAdapter folder; a fresh generator loads it back
    out = g.save_trained(tmp_path / "full")
    from diffusers import MotionAdapter

    MotionAdapter.from_pretrained(out / "motion_adapter")
    g2 = _gen(tiny_ad, finetune="full")
    g2.load_trained(out)
    for n in trained:
        torch.testing.assert_close(dict(g2.trainable().named_parameters())[n], named[n])


def test_lora_saved_in_the_format_animatediff_pipeline_loads(gen, tiny_ad, tmp_path):
    """save_trained -> AnimateDiffPipeline.load_lora_weights reproduces the adapter's own samples."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    out = gen.save_trained(tmp_path / "lora")
    pipe = AnimateDiffPipeline.from_pretrained(tiny_ad)
    pipe.load_lora_weights(out)
    pipe.scheduler = DDIMScheduler.from_config(gen.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(1, 4, F, 8, 8, generator=torch.Generator().manual_seed(1))
    ro = gen.rollout(PROMPTS[:1], num_steps=3, guidance_scale=2.0, eta=0.0, latents=x_T, need_log_probs=False)
    with torch.no_grad():
        got = pipe(
            PROMPTS[:1], num_frames=F, height=32, width=32, num_inference_steps=3, guidance_scale=2.0,
            latents=x_T.clone(), output_type="latent",
        ).frames  # fmt: skip
        with gen.reference():  # without the LoRA the samples differ: the LoRA is what was loaded
            base = gen.rollout(PROMPTS[:1], num_steps=3, guidance_scale=2.0, eta=0.0, latents=x_T, need_log_probs=False)
    torch.testing.assert_close(got, ro.latents[:, -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base.latents[:, -1], ro.latents[:, -1], atol=1e-4)
    # and the adapter's own loader
    g2 = _gen(tiny_ad)
    g2.load_trained(out)
    a, b = gen.trainable_state_dict(), g2.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_ad):
    def grads(checkpointing):
        torch.manual_seed(0)
        g = _gen(tiny_ad)
        with torch.no_grad():
            for p in g.trainable().parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        if checkpointing:
            g.enable_gradient_checkpointing()
        g.unet.train()
        gen_ = torch.Generator().manual_seed(3)
        x0, noise = torch.randn(2, 4, F, 8, 8, generator=gen_), torch.randn(2, 4, F, 8, 8, generator=gen_)
        g.denoise_error(x0, g.encode_prompt(PROMPTS), torch.tensor([100, 700]), noise).sum().backward()
        assert g.unet.is_gradient_checkpointing == checkpointing
        return {n: p.grad.clone() for n, p in g.trainable().named_parameters() if p.requires_grad}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys() and all(v.abs().sum() > 0 for v in a.values())
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7)


def test_bfloat16_frozen_weights_train_float32_lora(tiny_ad):
    """dtype: bfloat16 freezes the UNet, VAE and text encoder in bf16; the LoRA trains in float32 under
    autocast (train.mixed_precision: bf16), with gradient checkpointing."""
    g = _gen(tiny_ad, dtype="bfloat16")
    frozen = {p.dtype for p in g.unet.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and g.vae.dtype == torch.bfloat16
    assert {p.dtype for p in g.trainable().parameters() if p.requires_grad} == {torch.float32}
    g.enable_gradient_checkpointing()
    g.unet.train()
    x0 = torch.randn(2, 4, F, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        err = g.denoise_error(x0, g.encode_prompt(PROMPTS), torch.tensor([10, 900]), torch.randn_like(x0))
        ro = g.rollout(PROMPTS[:1], num_steps=2, guidance_scale=2.0)
    err.sum().backward()
    grads = [p.grad for p in g.trainable().parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0
    assert torch.isfinite(ro.log_probs).all() and torch.isfinite(ro.samples.video).all()


def test_denoise_error_is_the_float64_epsilon_mse(gen):
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 4, F, 8, 8, generator=g), torch.randn(2, 4, F, 8, 8, generator=g)
    t = torch.tensor([50, 800])
    cond = gen.encode_prompt(PROMPTS)
    with torch.no_grad():
        got = gen.denoise_error(x0, cond, t, noise)
        a = gen.train_scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
        emb = cond["encoder_hidden_states"].repeat_interleave(F, 0)
        pred = gen.unet(x_t.float(), t, encoder_hidden_states=emb).sample.double()
    torch.testing.assert_close(got.double(), (pred - noise.double()).pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-6)


def test_v_prediction_targets_and_pipeline_parity(tmp_path):
    """A v-prediction AnimateDiff (e.g. motion modules for SD 2.x): denoise_error is the float64 MSE to
    v = sqrt(a) eps - sqrt(1 - a) x0, and deterministic DDIM still equals AnimateDiffPipeline.__call__."""
    g = _gen(make_tiny_animatediff(tmp_path / "v", prediction_type="v_prediction"))
    assert g.prediction_type == "v_prediction"
    r = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, F, 8, 8, generator=r), torch.randn(2, 4, F, 8, 8, generator=r)
    t, cond = torch.tensor([30, 700]), g.encode_prompt(PROMPTS)
    with torch.no_grad():
        got = g.denoise_error(x0, cond, t, noise)
        a = g.train_scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
        v = a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
        emb = cond["encoder_hidden_states"].repeat_interleave(F, 0)
        pred = g.unet(x_t.float(), t, encoder_hidden_states=emb).sample.double()
    torch.testing.assert_close(got.double(), (pred - v).pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-6)
    x_T = torch.randn(1, 4, F, 8, 8, generator=r)
    ro = g.rollout(PROMPTS[:1], num_steps=3, guidance_scale=2.5, eta=0.0, latents=x_T, need_log_probs=False)
    with torch.no_grad():
        lat = g.pipe(
            PROMPTS[:1], num_frames=F, height=32, width=32, num_inference_steps=3, guidance_scale=2.5,
            latents=x_T.clone(), output_type="latent",
        ).frames  # fmt: skip
    torch.testing.assert_close(ro.latents[:, -1], lat, rtol=1e-5, atol=1e-5)


def test_video_vae_round_trip_is_per_frame(gen):
    video = torch.rand(2, F, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = gen.encode_images(video, [4, 9])
    assert z.shape == (2, 4, F, 8, 8)
    # frame f of the sample with seed s is the image adapter's encoding with seed s*F + f
    frame = super(AnimateDiffGenerator, gen).encode_images(video[1, 2:3], [9 * F + 2])
    torch.testing.assert_close(z[1, :, 2], frame[0])
    torch.testing.assert_close(gen.encode_images(video[1:], [9]), z[1:])  # batch-independent
    out = gen.decode(z)
    assert out.video.shape == (2, F, 3, 32, 32) and out.images is None
    torch.testing.assert_close(out.video[0, 1], super(AnimateDiffGenerator, gen).decode(z[0:1, :, 1]).images[0])


def test_loads_an_sd_base_with_a_motion_adapter(tiny_ad, tiny_sd, tmp_path):
    from diffusers import MotionAdapter

    MotionAdapter.from_pretrained(tiny_ad / "motion_adapter").save_pretrained(tmp_path / "adapter")
    g = AnimateDiffGenerator(
        AnimateDiffGeneratorConfig(pretrained=str(tiny_sd), motion_adapter=str(tmp_path / "adapter"), num_frames=2)
    )
    assert type(g.unet).__name__ == "UNetMotionModel" and g.latent_shape == (4, 2, 8, 8)
    assert g.rollout(["a"], num_steps=2).samples.video.shape == (1, 2, 3, 32, 32)
    with pytest.raises(ValueError, match="not an AnimateDiffPipeline"):
        AnimateDiffGenerator(AnimateDiffGeneratorConfig(pretrained=str(tiny_sd)))
    with pytest.raises(ValueError, match="motion_max_seq_length"):
        AnimateDiffGenerator(AnimateDiffGeneratorConfig(pretrained=str(tiny_ad), num_frames=64))


VIDEO_REWARD = {"name": "video_from_image", "image_reward": {"name": "jpeg_compressibility"}, "frames": "all"}
ROLLOUT = {"prompts_per_round": 2, "num_steps": 3, "steps_per_round": 1}
METHODS = {
    "diffusion_dpo": {"name": "diffusion_dpo", "beta": 500},
    "grpo": {"name": "grpo", "kl_coef": 0.1, "rollout": {**ROLLOUT, "samples_per_prompt": 3}},
    "d3po": {
        "name": "d3po",
        "reference": "base",
        "rollout": {**ROLLOUT, "samples_per_prompt": 2, "same_initial_noise": True},
    },
}


@pytest.mark.parametrize("method", list(METHODS))
def test_one_training_step_changes_the_motion_lora(method, tiny_ad, tiny_sd, tiny_clip, pairs_manifest, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\na blue square spinning\n")
    data = {"kind": "prompts", "prompts": str(prompts)}
    if method == "diffusion_dpo":  # pairs generated by the policy and ranked by the video reward
        data = {**data, "kind": "generated", "candidates": 2, "sample_steps": 2, "sample_guidance": 2.0}
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        generator={"name": "animatediff", "pretrained": str(tiny_ad), "num_frames": 2, "lora": {"rank": 4, "alpha": 4}},
        method=METHODS[method],
        data=data,
        train={"steps": 1, "batch_size": 2, "lr": 1e-2},
        eval={"enabled": method == "grpo", "prompts": ["a red circle"], "num_steps": 2, "guidance_scale": 2.0},
    )
    raw = yaml.safe_load(p.read_text())
    p.write_text(yaml.safe_dump({**raw, "reward": VIDEO_REWARD}))  # (write_config merges into its CLIP reward)
    tr = Trainer(load_config(p), run_dir=tmp_path / "run")
    before = {n: v.detach().clone() for n, v in tr.generator.trainable().named_parameters() if v.requires_grad}
    assert before and all("motion_modules" in n for n in before)
    tr.fit()
    after = dict(tr.generator.trainable().named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    if method == "grpo":  # evaluation samples videos: a reward and a frame-row grid per evaluation
        logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        evals = [line["eval"] for line in logs if "eval" in line]
        assert len(evals) == 2 and all(math.isfinite(e["reward"]) for e in evals)
        grids = sorted((tmp_path / "run" / "samples").glob("*.png"))
        assert len(grids) == 2 and all(Image.open(g).size[0] > Image.open(g).size[1] for g in grids)


def test_export_of_a_motion_lora(gen, tiny_ad, tmp_path):
    """`mmalign export`: diffusers format loads into AnimateDiffPipeline with the run's outputs, its
    adapter metadata names the exact layers (not the config's globs), peft format too; kohya is refused."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    from mmalign.export import ExportError, export_run

    run = tmp_path / "run"
    gen.save_trained(run / "final")
    lora = {"rank": 4, "alpha": 4, "target_modules": list(MOTION_LORA_TARGETS)}
    cfg = {"run": {"name": "ad"}, "generator": {"name": "animatediff", "pretrained": str(tiny_ad), "lora": lora}}
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "method": {"name": "grpo"}, "train": {"steps": 1}}))
    out = export_run(run, "diffusers")
    card = (out / "README.md").read_text()
    assert "AnimateDiff" in card and "text-to-video" in card and "motion_modules.*.to_q" in card
    pipe = AnimateDiffPipeline.from_pretrained(tiny_ad)
    pipe.load_lora_weights(out)
    pipe.scheduler = DDIMScheduler.from_config(gen.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(1, 4, F, 8, 8, generator=torch.Generator().manual_seed(4))
    ro = gen.rollout(PROMPTS[:1], num_steps=2, guidance_scale=2.0, eta=0.0, latents=x_T, need_log_probs=False)
    with torch.no_grad():
        got = pipe(
            PROMPTS[:1], num_frames=F, height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
            latents=x_T.clone(), output_type="latent",
        ).frames  # fmt: skip
    torch.testing.assert_close(got, ro.latents[:, -1], rtol=1e-5, atol=1e-5)
    peft_out = export_run(run, "peft")
    peft_cfg = json.loads((peft_out / "adapter_config.json").read_text())
    assert len(peft_cfg["target_modules"]) == 56 and all("*" not in t for t in peft_cfg["target_modules"])
    from diffusers import UNetMotionModel
    from peft import PeftModel

    unet = PeftModel.from_pretrained(UNetMotionModel.from_pretrained(tiny_ad / "unet"), peft_out)
    x, ehs = torch.randn(1, 4, F, 8, 8), torch.randn(F, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 500, ehs).sample, gen.unet(x, 500, ehs).sample, rtol=1e-4, atol=1e-5)
    with pytest.raises(ExportError, match="AnimateDiff"):
        export_run(run, "kohya")


def test_full_motion_finetune_run_saves_a_motion_adapter(tiny_ad, tiny_sd, tiny_clip, pairs_manifest, tmp_path):
    """finetune: full through the trainer: only motion-module weights change, final/ is a MotionAdapter
    folder that a fresh generator loads back."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\na blue square spinning\n")
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        generator={"name": "animatediff", "pretrained": str(tiny_ad), "num_frames": 2, "finetune": "full"},
        method=METHODS["grpo"],
        data={"kind": "prompts", "prompts": str(prompts)},
        train={"steps": 1, "batch_size": 2, "lr": 1e-3, "gradient_checkpointing": True},
    )
    raw = yaml.safe_load(p.read_text())
    p.write_text(yaml.safe_dump({**raw, "reward": VIDEO_REWARD}))
    tr = Trainer(load_config(p), run_dir=tmp_path / "run")
    before = {n: v.detach().clone() for n, v in tr.generator.trainable().named_parameters()}
    tr.fit()
    after = dict(tr.generator.trainable().named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("motion_modules" in n for n in changed)
    final = tmp_path / "run" / "final"
    assert (final / "motion_adapter" / "config.json").is_file()
    g = AnimateDiffGenerator(AnimateDiffGeneratorConfig(pretrained=str(tiny_ad), num_frames=2, finetune="full"))
    g.load_trained(final)
    loaded = dict(g.trainable().named_parameters())
    for n in changed:
        torch.testing.assert_close(loaded[n], after[n])
