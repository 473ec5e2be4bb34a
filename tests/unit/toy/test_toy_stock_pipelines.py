"""The shipped toy models sample the same through their stock diffusers pipelines, called with
default arguments (only the prompts, steps, guidance scale and initial noise given), as through
mmalign's generators."""

import copy

import pytest
import torch

from mmalign.pipelines.common import LoraSettings
from mmalign.pipelines.flow import FLOW_LORA_TARGETS, FlowGeneratorConfig, FlowMatchingGenerator
from mmalign.toy import ASSETS as TOY_ASSETS
from mmalign.toy.world import heldout_captions
from mmalign.types import per_sample_randn

PROMPTS = ["a red circle to the left of a blue square", "two green triangles", ""]
SEEDS = [1234, 1235, 1236]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd3_toy():
    return FlowMatchingGenerator(FlowGeneratorConfig(pretrained="toy:sd3_toy", finetune="none"))


def test_sd3_toy_matches_stock_pipeline_defaults(sd3_toy):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(TOY_ASSETS / "sd3_toy", text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_3 is None and sd3_toy.max_sequence_length == 256  # the pipeline's zero T5 tokens
    x_T = per_sample_randn(SEEDS, sd3_toy.latent_shape)
    ro = sd3_toy.rollout(PROMPTS, num_steps=20, guidance_scale=4.0, eta=0.0, seeds=SEEDS, need_log_probs=False)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=20, guidance_scale=4.0, latents=x_T.clone(), output_type="latent")
        images = pipe.image_processor.postprocess(
            pipe.vae.decode(ref.images / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample, "pt"
        )
    # mmalign runs the 256 identical zero tokens as one (an attention bias of log 256): equal up to rounding
    torch.testing.assert_close(ro.latents[:, -1], ref.images, rtol=0, atol=1e-4)
    torch.testing.assert_close(ro.samples.images, images, rtol=0, atol=1e-4)


def test_repeated_token_attention_equals_the_full_forward_under_lora_with_gradients():
    """One zero token with a log(256) attention bias is the 256-token forward: outputs and
    LoRA gradients agree in float64 to rounding."""
    lora = LoraSettings(rank=4, alpha=4, target_modules=list(FLOW_LORA_TARGETS))
    g = FlowMatchingGenerator(FlowGeneratorConfig(pretrained="toy:sd3_toy", lora=lora))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in g.trainable().parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model = copy.deepcopy(g.transformer).double()
    cond = {k: v.double() for k, v in g.encode_prompt(PROMPTS).items()}
    emb = cond["encoder_hidden_states"]
    assert emb.shape[1] == 16 + 256 and not emb[:, 16:].any()
    x, t = torch.randn(3, 4, 8, 8, generator=gen).double(), torch.tensor([100.0, 500.0, 900.0])
    outs, grads = [], []
    for e, kw in ((emb, None), (emb[:, :17], {"last_token_repeats": 256})):
        model.zero_grad()
        v = model(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=e,
            pooled_projections=cond["pooled_projections"],
            joint_attention_kwargs=kw,
            return_dict=False,
        )[0]
        v.pow(2).mean().backward()
        outs.append(v.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    assert len(grads[0]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    # and the generator's float32 forward (the shortcut) against the float32 256-token forward
    c32 = g.encode_prompt(PROMPTS)
    with torch.no_grad():
        full = g.transformer(
            hidden_states=x.float(),
            timestep=t,
            encoder_hidden_states=c32["encoder_hidden_states"],
            pooled_projections=c32["pooled_projections"],
            return_dict=False,
        )[0]
        torch.testing.assert_close(g.model_output(x.float(), t, c32), full, rtol=0, atol=1e-4)


def test_sd3_toy_is_good_with_the_default_zero_tokens(sd3_toy):
    """The shipped weights were distilled for the pipeline's 256 zero T5 tokens: held-out gold
    with them stays in the toy model's band (it collapses for weights trained without them)."""
    from mmalign.toy.evaluate import gold_report

    caps = heldout_captions()
    ro = sd3_toy.rollout(
        caps,
        num_steps=20,
        guidance_scale=4.0,
        eta=0.0,
        seeds=[1234 + i for i in range(len(caps))],
        need_log_probs=False,
    )
    assert gold_report(ro.samples.images, caps)["accuracy"] > 0.3


def test_sd_toy_matches_stock_pipeline_defaults():
    from diffusers import StableDiffusionPipeline

    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    g = LatentDiffusionGenerator(SDGeneratorConfig(pretrained="toy:sd_toy", finetune="none"))
    pipe = StableDiffusionPipeline.from_pretrained(TOY_ASSETS / "sd_toy")
    pipe.set_progress_bar_config(disable=True)
    x_T = per_sample_randn(SEEDS, g.latent_shape)
    ro = g.rollout(PROMPTS, num_steps=20, guidance_scale=4.0, eta=0.0, seeds=SEEDS, need_log_probs=False)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=20, guidance_scale=4.0, latents=x_T.clone(), output_type="pt")
    torch.testing.assert_close(ro.samples.images, ref.images, rtol=0, atol=1e-4)
