"""ImageReward adapter (rewards/image_reward.py) on a tiny BLIP of the real transformers classes,
checked against scores recorded from the ORIGINAL image-reward code
(tests/fixtures/image_reward_reference.json, made by scripts/make_image_reward_reference.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign import registry
from mmalign.config import ConfigError, parse_dataclass
from mmalign.rewards import fixtures as fx
from mmalign.rewards.common import build_reward, images_to_uint8_pil
from mmalign.rewards.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    ImageRewardConfig,
    ImageRewardModel,
    convert_original_state_dict,
    image_reward_formula,
    image_reward_v1_config,
    to_original_state_dict,
)
from mmalign.types import Samples
from tests.helpers import ROOT

REFERENCE = ROOT / "tests" / "fixtures" / "image_reward_reference.json"
PROMPTS = ["a red circle", "a blue square left of a green triangle", "a cat"]


def build(**args):
    return build_reward({"name": "image_reward", **args}, "reward")


def rand_images(b=3, h=40, w=52, seed=0, dtype=torch.float32, smooth=False):
    g = torch.Generator().manual_seed(seed)
    if smooth:
        x = torch.rand(b, 3, 5, 5, generator=g, dtype=dtype)
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return torch.rand(b, 3, h, w, generator=g, dtype=dtype)


@pytest.fixture(scope="module")
def tiny():
    return fx.tiny("image_reward")


@pytest.fixture(scope="module")
def reward(tiny):
    return build(**tiny)


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def reference_reward(reference, tmp_path_factory):
    """The reference's state dict (original key names and shapes) saved as ImageReward.pt and
    loaded through the registry, with the tiny BLIP config and BERT tokenizer."""
    d = tmp_path_factory.mktemp("image_reward_ref")
    fx.tiny_image_reward_blip_config().save_pretrained(d / "blip")
    tok = fx.write_bert_tokenizer(d / "tokenizer")
    torch.save(fx.det_state_dict(reference["keys"], reference["seed"]), d / "ImageReward.pt")
    return build(checkpoint=str(d / "ImageReward.pt"), blip_config=str(d / "blip"), tokenizer=tok)


# --------------------------------------------------------------------------- loading


def test_registered_and_listed_by_score_list():
    from mmalign.scoring import list_rewards

    entry = registry.lookup("reward", "image_reward")
    assert entry.config is ImageRewardConfig and entry.doc
    row = next(r for r in list_rewards() if r["name"] == "image_reward")
    assert row["modality"] == "image" and "ImageReward.pt" in row["loads"]


def test_tiny_model_loads_from_checkpoint_file_and_scores_a_batch(reward):
    x = rand_images()
    s = reward(Samples(images=x), PROMPTS)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert s.std() > 1e-3  # different images and prompts get different scores
    one = torch.cat([reward(Samples(images=x[i : i + 1]), PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(s, one, rtol=1e-5, atol=1e-5)  # batching (padding to 35) changes nothing
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())


def test_matches_the_original_imagereward_code(reference, reference_reward):
    """Scores recorded from image-reward 1.5's ImageReward.score / inference_rank (tiny sizes)."""
    r, prompts = reference_reward, reference["prompts"]
    assert r.tokenize(prompts)["input_ids"].tolist() == reference["input_ids"]  # incl. truncation to 35
    assert r.tokenize(prompts)["attention_mask"].tolist() == reference["attention_mask"]
    for s in reference["image_sets"]:
        n, h, w = s["n"], s["height"], s["width"]
        x = fx.det_images(n, h, w, reference["seed"]).float() / 255
        pairs, long_p, rank = (torch.tensor(s[k]) for k in ("pair_scores", "long_prompt_scores", "rank_prompt0_scores"))
        # the original's PIL preprocessing + our model, key mapping and tokenizer: exact
        pil = r.preprocess_pil(images_to_uint8_pil(x))
        torch.testing.assert_close(r.score_pixels(pil, prompts[:n]), pairs, rtol=0, atol=1e-5)
        torch.testing.assert_close(r.score_pixels(pil, [prompts[-1]] * n), long_p, rtol=0, atol=1e-5)
        torch.testing.assert_close(r.score_pixels(pil, [prompts[0]] * n), rank, rtol=0, atol=1e-5)
        ours = r(Samples(images=x), prompts[:n])  # the differentiable torch preprocessing
        if (h, w) == (32, 32):  # the model's size: no resize, identical
            torch.testing.assert_close(ours, pairs, rtol=0, atol=1e-5)
        else:  # PIL resizes 8-bit images; measured gap 0.003-0.007 on these scores of magnitude ~1
            assert (ours - pairs).abs().max() < 0.02


def test_float64_matches_the_reference_too(reference, tmp_path):
    fx.tiny_image_reward_blip_config().save_pretrained(tmp_path / "blip")
    tok = fx.write_bert_tokenizer(tmp_path / "tokenizer")
    torch.save(fx.det_state_dict(reference["keys"], reference["seed"]), tmp_path / "ImageReward.pt")
    r = build(
        checkpoint=str(tmp_path / "ImageReward.pt"), blip_config=str(tmp_path / "blip"), tokenizer=tok, dtype="float64"
    )
    s = reference["image_sets"][0]
    x = fx.det_images(s["n"], s["height"], s["width"], reference["seed"]).double() / 255
    out = r(Samples(images=x), reference["prompts"][: s["n"]])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor(s["pair_scores"], dtype=torch.float64), rtol=0, atol=1e-5)


def test_key_mapping_is_complete_and_strict(reference):
    keys = dict((k, tuple(v)) for k, v in reference["keys"])
    sd = {k: torch.zeros(v) for k, v in keys.items()}
    mapped = convert_original_state_dict(sd)
    model = ImageRewardModel(fx.tiny_image_reward_blip_config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours  # every weight, right shapes, nothing extra
    dropped = set(keys) - set(to_original_state_dict(mapped))
    assert dropped == {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
    assert (
        mapped["vision_model.encoder.layers.1.self_attn.qkv.weight"].shape
        == keys["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    )
    with pytest.raises(
        ValueError, match=r"ckpt.pt: not an ImageReward checkpoint: 1 unknown keys.*blip.itm_head.weight"
    ):
        convert_original_state_dict({**sd, "blip.itm_head.weight": torch.zeros(2, 32)}, "ckpt.pt")


def test_checkpoint_missing_a_weight_or_of_another_size_is_reported(tiny, tmp_path):
    sd = torch.load(tiny["checkpoint"], weights_only=True)
    sd.pop("blip.visual_encoder.blocks.1.attn.qkv.bias")
    bad = tmp_path / "missing_key.pt"
    torch.save(sd, bad)
    with pytest.raises(
        ValueError, match=r"missing_key.pt: checkpoint does not match the model.*layers.1.self_attn.qkv.bias"
    ):
        build(**{**tiny, "checkpoint": str(bad)})
    with pytest.raises(ValueError, match=r"MLP head expects 32-d text features but .*ImageReward v1.0.* 768-d"):
        build(checkpoint=tiny["checkpoint"], tokenizer=tiny["tokenizer"])  # default (full-size) architecture
    cfg = fx.tiny_image_reward_blip_config()
    cfg.vision_config.image_size = 64  # a BLIP config for another resolution: position embeddings differ
    cfg.save_pretrained(tmp_path / "blip64")
    with pytest.raises(
        ValueError, match=r"ImageReward.pt: checkpoint does not match the BLIP config .*blip64.*size mismatch"
    ):
        build(**{**tiny, "blip_config": str(tmp_path / "blip64")})


def test_missing_checkpoint_file_is_a_clear_error(tiny, tmp_path):
    missing = tmp_path / "nope" / "ImageReward.pt"
    with pytest.raises(ConfigError, match=f"checkpoint: file {missing} not found"):
        parse_dataclass(ImageRewardConfig, {"checkpoint": str(missing)}, "reward")
    from mmalign.rewards.image_reward import ImageReward

    with pytest.raises(FileNotFoundError, match=f"checkpoint: file {missing} not found"):
        ImageReward(
            ImageRewardConfig(checkpoint=str(missing), blip_config=tiny["blip_config"], tokenizer=tiny["tokenizer"])
        )


# --------------------------------------------------------------------------- formula and constants


def test_normalisation_formula_and_published_constants(reward, reference):
    assert IMAGE_REWARD_MEAN == 0.16717362830052426 and IMAGE_REWARD_STD == 1.0333394966054072
    assert (reference["mean"], reference["std"]) == (IMAGE_REWARD_MEAN, IMAGE_REWARD_STD)  # read off the original
    raw = torch.tensor([IMAGE_REWARD_MEAN, IMAGE_REWARD_MEAN + IMAGE_REWARD_STD, 0.0])
    torch.testing.assert_close(
        image_reward_formula(raw), torch.tensor([0.0, 1.0, -IMAGE_REWARD_MEAN / IMAGE_REWARD_STD])
    )
    # end to end: score = (MLP(text encoder [CLS] | image) - mean) / std, by hand from the parts
    x = rand_images()
    px = reward.preprocess(x)
    tok = reward.tokenize(PROMPTS)
    with torch.no_grad():
        img = reward.model.vision_model(pixel_values=px).last_hidden_state
        h = reward.model.text_encoder(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=img
        ).last_hidden_state[:, 0]
        raw = h
        for layer in reward.model.mlp.layers:  # Linear / Dropout(eval) chain, no activations
            raw = layer(raw)
    torch.testing.assert_close(
        reward(Samples(images=x), PROMPTS), (raw.squeeze(-1) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
    )
    assert [type(m).__name__ for m in reward.model.mlp.layers] == ["Linear", "Dropout"] * 3 + ["Linear", "Linear"]


def test_preprocessing_and_tokenizer_constants(reward):
    t = reward.transform
    assert t.mean == (0.48145466, 0.4578275, 0.40821073) and t.std == (0.26862954, 0.26130258, 0.27577711)
    assert t.resize == 32 and t.crop == (32, 32) and t.interpolation == "bicubic" and t.crop_offset == "round"
    cfg = ImageRewardConfig()
    assert cfg.max_length == 35 and cfg.tokenizer == "bert-base-uncased"
    assert cfg.checkpoint == "hf-hub:THUDM/ImageReward/ImageReward.pt" and cfg.blip_config is None
    tok = reward.tokenize(["a cat", "a red circle"])
    assert tok["input_ids"].shape == (2, 35)  # padding="max_length"
    assert tok["input_ids"][0, 0].item() == reward.tokenizer.cls_token_id  # [CLS] first: the scored token
    assert tok["attention_mask"][0].tolist() == [1] * 4 + [0] * 31
    assert "[DEC]" in reward.tokenizer.all_special_tokens and "[ENC]" in reward.tokenizer.all_special_tokens
    # the released architecture: ViT-L/16 at 224 px (eps 1e-6) + BERT-base with cross-attention to 1024-d tokens
    v1 = image_reward_v1_config()
    v, tx = v1.vision_config, v1.text_config
    assert (
        v.image_size,
        v.patch_size,
        v.hidden_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.intermediate_size,
        v.layer_norm_eps,
        v.hidden_act,
    ) == (224, 16, 1024, 24, 16, 4096, 1e-6, "gelu")
    assert (
        tx.vocab_size,
        tx.hidden_size,
        tx.encoder_hidden_size,
        tx.num_hidden_layers,
        tx.num_attention_heads,
        tx.intermediate_size,
        tx.max_position_embeddings,
        tx.layer_norm_eps,
        tx.is_decoder,
    ) == (30524, 768, 1024, 12, 12, 3072, 512, 1e-12, True)


def test_torch_preprocessing_is_close_to_the_pil_path(reward):
    step = 1 / 255 / min(reward.transform.std)  # one 8-bit level after normalisation
    for h, w in [(32, 32), (48, 60), (70, 40)]:
        u8 = (rand_images(2, h, w, smooth=True) * 255).round() / 255
        pil = reward.preprocess_pil(images_to_uint8_pil(u8))
        ours = reward.preprocess(u8)
        assert ours.shape == pil.shape == (2, 3, 32, 32)
        tol = 1e-5 if (h, w) == (32, 32) else 3 * step
        assert (ours - pil).abs().max() < tol, (h, w)


# --------------------------------------------------------------------------- calling


def test_gradient_reaches_the_pixels_finite_difference_float64(tiny):
    r = build(dtype="float64", **tiny)
    x = rand_images(1, 36, 36, dtype=torch.float64, smooth=True)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    fn = lambda z: r(Samples(images=z), PROMPTS[:1]).sum()  # noqa: E731
    xg = x.clone().requires_grad_(True)
    fn(xg).backward()
    analytic = (xg.grad * v).sum().item()
    eps = 1e-6
    with torch.no_grad():
        numeric = ((fn(x + eps * v) - fn(x - eps * v)) / (2 * eps)).item()
    assert math.isfinite(analytic) and abs(analytic) > 1e-6
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_no_gradient_when_not_differentiable(tiny):
    r = build(differentiable=False, **tiny)
    x = rand_images(1, 32, 32).requires_grad_(True)
    assert not r.differentiable and not r(Samples(images=x), PROMPTS[:1]).requires_grad


def test_wrong_modality_or_prompt_count_is_a_clear_error(reward):
    with pytest.raises(TypeError, match="image_reward.*scores image samples, but got audio"):
        reward(Samples(audio=torch.zeros(2, 1, 100), sample_rate=16000), ["a", "b"])
    with pytest.raises(ValueError, match="3 samples but 2 prompts"):
        reward(Samples(images=rand_images()), ["a", "b"])
    with pytest.raises(ValueError, match="needs one prompt per sample"):
        reward(Samples(images=rand_images()), None)
