"""Tiny models of the real classes, saved like a user's checkpoints, for tests and demos.

Everything here builds offline: the CLIP BPE vocabulary ships inside open_clip's wheel, so
a transformers CLIPTokenizer with ids identical to open_clip's can be written locally.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write a transformers CLIPTokenizer (vocab.json + merges.txt) from open_clip's BPE."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
    (out / "vocab.json").write_text(json.dumps(vocab))
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    tok.save_pretrained(out)
    return out


def tiny_unet(cross_attention_dim: int = 32, sample_size: int = 8, **kw):
    from diffusers import UNet2DConditionModel

    args = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    args.update(kw)
    return UNet2DConditionModel(**args)


def tiny_vae(sample_size: int = 32):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        layers_per_block=1,
    )


def tiny_text_encoder(hidden: int = 32, projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def make_tiny_sd(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A random-weight SD 1.x-layout pipeline (32x32 images, 8x8x4 latents) saved to `out_dir`."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok_dir = write_clip_tokenizer(out / "_tok")
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(),
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight SDXL-layout pipeline: two text encoders, pooled embeds and time ids."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "_tok"))
    unet = tiny_unet(
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        use_linear_projection=True,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(32),
        text_encoder_2=tiny_text_encoder(32, projection=True, projection_dim=32),
        tokenizer=tok,
        tokenizer_2=tok,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_tiny_open_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight open_clip model in the hub layout (open_clip_config.json + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + str(out), load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


# --------------------------------------------------------------------------- tiny VLMs
# (appended for the VLM adapter; the builders above are unchanged)

VLM_SPECIAL = {
    "<pad>": 0,
    "<s>": 1,
    "</s>": 2,
    "<unk>": 3,
    "<image>": 250,
    "<|image_pad|>": 250,
    "<|video_pad|>": 251,
    "<|vision_start|>": 252,
    "<|vision_end|>": 253,
    "<|im_start|>": 254,
    "<|im_end|>": 255,
}


def _vlm_chat_template(image: str) -> str:
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def make_char_tokenizer(image_token: str = "<image>", video_token: str | None = None):
    """A character-level `PreTrainedTokenizerFast` over printable ASCII (ids 4..98) with the VLM
    special tokens at the ids `VLM_SPECIAL` gives (vocab 256). Builds offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i, c in enumerate(chr(x) for x in range(32, 127)):
        vocab[c] = 4 + i
    vocab["\n"] = 99
    specials = [image_token, "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
    if video_token:
        specials.append(video_token)
    for s in specials:
        vocab[s] = VLM_SPECIAL[s]
    used = set(vocab.values())
    for i in range(256):
        if i not in used:
            vocab[f"<unused{i}>"] = i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=specials,
    )
    return tok


def make_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny `LlavaForConditionalGeneration` (CLIP vision tower, Llama LM; 32x32 images ->
    16 image tokens) with a LlavaProcessor and a chat template, saved with save_pretrained."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=255,
        ),
        image_token_index=250,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 255
    tok = make_char_tokenizer("<image>")
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_vlm_chat_template("<image>"),
    )
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def _save_tiny_qwen_vl(
    out_dir: str | Path, seed: int, config_cls, model_cls, processor_cls, vision_config: dict
) -> Path:
    """A tiny Qwen-VL-family model (M-RoPE text tower, 56x56 images -> 4 image tokens) with its
    processor and a chat template, saved with save_pretrained."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    out = Path(out_dir)
    torch.manual_seed(seed)
    cfg = config_cls(
        text_config={
            "vocab_size": 256,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 512,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 255,
        },
        vision_config=vision_config,
        image_token_id=250,
        video_token_id=251,
        vision_start_token_id=252,
        vision_end_token_id=253,
    )
    model = model_cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 255
    tok = make_char_tokenizer("<|image_pad|>", video_token="<|video_pad|>")
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    proc = processor_cls(
        image_processor=ip,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=_vlm_chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def make_tiny_qwen2vl(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny `Qwen2VLForConditionalGeneration` (56x56 images -> 4 image tokens, M-RoPE) with a
    Qwen2VLProcessor and a chat template, saved with save_pretrained."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    return _save_tiny_qwen_vl(
        out_dir,
        seed,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
    )


# --------------------------------------------------------------------------- tiny flow transformers
# (appended for the flow adapter, pipelines/flow.py; the builders above are unchanged)


def tiny_sd3_transformer(**kw):
    from diffusers import SD3Transformer2DModel

    args = dict(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
    )
    args.update(kw)
    return SD3Transformer2DModel(**args)


def make_tiny_sd3(out_dir: str | Path, seed: int = 0, shift: float = 3.0) -> Path:
    """A random-weight SD3-layout pipeline without T5 (32x32 images, 8x8x4 latents): two tiny
    CLIPTextModelWithProjection encoders (hidden 16 each -> joint dim 32, pooled 16+16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "_tok"))
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1)  # SD3 VAEs shift and scale their latents
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=tiny_text_encoder(16, projection=True, projection_dim=16),
        tokenizer=tok,
        text_encoder_2=tiny_text_encoder(16, projection=True, projection_dim=16),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight FLUX-layout pipeline (CLIP pooled + tiny T5 sequence, packed 2x2 latents,
    resolution-dependent shift). The T5 slot reuses the offline CLIP tokenizer (same vocab)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "_tok"))
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=49408,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            pad_token_id=49407,
            eos_token_id=49407,
            decoder_start_token_id=0,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 4, 8),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        layers_per_block=1,
        shift_factor=0.1,
        scaling_factor=0.5,
    )
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=sched,
        vae=vae,
        text_encoder=tiny_text_encoder(32),
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_qwen25vl(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny `Qwen2_5_VLForConditionalGeneration` (windowed-attention vision tower, M-RoPE; 56x56
    images -> 4 image tokens) with a Qwen2_5_VLProcessor, saved with save_pretrained."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    return _save_tiny_qwen_vl(
        out_dir,
        seed,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
    )


def make_tiny_llava_next(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny `LlavaNextForConditionalGeneration` (any-resolution tiling: a 32x32 base view plus
    grid crops chosen from `image_grid_pinpoints`, with image-newline tokens) with a
    LlavaNextProcessor, saved with save_pretrained."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    out = Path(out_dir)
    torch.manual_seed(seed)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=255,
        ),
        image_token_index=250,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
    )
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 255
    tok = make_char_tokenizer("<image>")
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_vlm_chat_template("<image>"),
    )
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- tiny Wan video pipeline
# (appended for the Wan adapter, pipelines/wan.py; the builders above are unchanged)


def make_word_tokenizer(vocab_size: int = 64):
    """A word-level `PreTrainedTokenizerFast` (lower-cased words, ids hashed into `vocab_size`
    slots; pad 0, eos 1, unk 2) that appends </s> like T5's. Builds offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    words = (
        "a an the of and with on in one two three red green blue yellow white black circle circles square squares "
        "triangle ball moving moves left right up down fast slow small big bouncing video scene background dot"
    ).split()
    for w in words:
        if len(vocab) < vocab_size:
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_tiny_wan(out_dir: str | Path, seed: int = 0, flow_shift: float = 3.0, scheduler: str = "euler") -> Path:
    """A random-weight `WanPipeline` (32x32 pixels; 4 latent channels; the VAE's 4x temporal and
    8x spatial compression, so 5 frames -> 2 x 4 x 4 latents): `WanTransformer3DModel` (2 layers,
    2 heads of dim 8, patch (1, 2, 2)), `AutoencoderKLWan` (base dim 8) with per-channel
    latents_mean / latents_std, a 1-layer `UMT5EncoderModel` (width 32) with a word-level
    tokenizer, and `FlowMatchEulerDiscreteScheduler(shift=flow_shift)` (`scheduler="unipc"`: the
    released checkpoints' UniPCMultistepScheduler with flow sigmas and `flow_shift`)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok = make_word_tokenizer(64)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1
        )
    )
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=flow_shift)
        if scheduler == "euler"
        else UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# --------------------------------------------------------------------------- tiny audio pipelines
# (AudioLDM and Stable Audio Open, pipelines/audioldm.py and pipelines/stable_audio.py)


def make_tiny_audioldm(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight `AudioLDMPipeline`: UNet over 4-channel mel latents conditioned on a
    16-d CLAP text embedding through `class_labels`, a 1-channel mel VAE (factor 2), a
    `ClapTextModelWithProjection` with a word-level tokenizer, and a `SpeechT5HifiGan`
    vocoder (16 mel bins, 16 samples per frame at 16 kHz). Default length: 32 mel frames
    (0.032 s, latents 4 x 16 x 8)."""
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    from mmalign.rewards.fixtures import word_tokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    unet = tiny_unet(
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(16, 32),
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=16,
        class_embeddings_concat=True,
    )
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=80,
            projection_dim=16,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    tokenizer = word_tokenizer({})
    tokenizer.model_max_length = 16
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=16,
            sampling_rate=16000,
            upsample_initial_channel=16,
            upsample_rates=[4, 4],
            upsample_kernel_sizes=[8, 8],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
        )
    )
    g = torch.Generator().manual_seed(seed)  # default init gives ~1e-6 waveforms: audible, unsaturated clips
    for m in vocoder.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
    scheduler = DDIMScheduler(
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = AudioLDMPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, vocoder=vocoder
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_animatediff(
    out_dir: str | Path, seed: int = 0, num_frames_max: int = 32, prediction_type: str = "epsilon"
) -> Path:
    """A random-weight `AnimateDiffPipeline` folder: the tiny SD 1.x parts of `make_tiny_sd` (32x32
    frames, 8x8x4 latents) and a tiny `MotionAdapter` matching its UNet (block channels (16, 32), one
    motion layer per block, 2 motion heads, a motion mid block, positional table of `num_frames_max`
    frames), so the saved `unet` is a `UNetMotionModel`. The scheduler is DDIM with AnimateDiff's
    linear beta schedule (its inference and training configs) and `prediction_type`."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok_dir = write_clip_tokenizer(out / "_tok")
    adapter = MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=num_frames_max,
        use_motion_mid_block=True,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = AnimateDiffPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=tiny_unet(),
        motion_adapter=adapter,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_stable_audio(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight `StableAudioPipeline`: `StableAudioDiTModel` (2 layers, 64 latent frames
    of 4 channels), `AutoencoderOobleck` (stereo, hop 4, 64 Hz "sampling rate": 4 s of audio in
    256 samples), a `T5EncoderModel` (width 16, 1 layer) with a word-level tokenizer,
    `StableAudioProjectionModel` (seconds 0..16) and `CosineDPMSolverMultistepScheduler`."""
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
        StableAudioProjectionModel,
    )
    from transformers import T5Config, T5EncoderModel

    from mmalign.rewards.fixtures import word_tokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    transformer = StableAudioDiTModel(
        sample_size=64,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=4,
        cross_attention_dim=8,
        time_proj_dim=8,
        global_states_input_dim=16,
        cross_attention_input_dim=8,
    )
    vae = AutoencoderOobleck(
        encoder_hidden_size=8,  # mean and scale of the 4 latent channels
        downsampling_ratios=[1, 4],
        decoder_channels=6,
        decoder_input_channels=4,
        audio_channels=2,
        channel_multiples=[1, 2],
        sampling_rate=64,
    )
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=256,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=1,
            eos_token_id=3,
            decoder_start_token_id=1,
        )
    )
    tokenizer = word_tokenizer({})
    tokenizer.model_max_length = 8
    projection = StableAudioProjectionModel(text_encoder_dim=16, conditioning_dim=8, min_value=0, max_value=16)
    scheduler = CosineDPMSolverMultistepScheduler(
        sigma_min=0.3,
        sigma_max=500,
        sigma_data=1.0,
        sigma_schedule="exponential",
        solver_order=2,
        prediction_type="v_prediction",
    )
    pipe = StableAudioPipeline(
        vae=vae,
        text_encoder=text_encoder,
        projection_model=projection,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
