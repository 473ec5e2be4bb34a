"""Reference outputs of the original Audiobox Aesthetics code on a tiny random model.

Writes tests/fixtures/audiobox/ (checked by tests/unit/rewards/test_rewards_audiobox.py):

    checkpoint_a.pt        model A in the released checkpoint.pt layout: {"state_dict": {"model.<key>": ...},
                           "model_cfg": {...}, "target_transform": {...}} (loads with weights_only=True)
    hub_b/config.json      model B as AesMultiOutput.save_pretrained writes it (the hub repo's layout:
    hub_b/model.safetensors  config.json with the constructor arguments + model.safetensors)
    expected.json          the tiny WavLM config, the inputs, and what the original predicted

Model A: one-layer heads (the package's defaults). Model B: two-layer heads with LayerNorm and
dropout, normalize_embed=False, precision="bf16". Both share a tiny WavLM (the package hard-codes
a Base-size WavLM in `audiobox_aesthetics.model.aes.DEFAULT_AUDIO_CFG`; this script replaces that global
before building). Every parameter is perturbed from its initial value so that layer weights,
gates and norms are not at their trivial initial values (the heads' weights by more, so that
scores differ visibly between inputs).

The outputs come from the original inference path, `audiobox_aesthetics.infer.AesPredictor`
(resampling, 10 s windows, padding masks, de-normalisation, window weighting), on fixed
waveforms (`reference_wave`, a deterministic formula shared with the test): 1.5 s mono and
12.5 s stereo at 22.05 kHz (two windows after resampling, the second one partial), and 0.8 s
at 16 kHz. CPU, float32.

How it was made (the package is not a dependency of mmalign; use a throwaway venv):

    python -m venv /tmp/abavenv
    /tmp/abavenv/bin/pip install torch==2.14.1 torchaudio numpy huggingface_hub safetensors requests tqdm rich
    /tmp/abavenv/bin/pip install --no-deps audiobox_aesthetics==0.0.4
    /tmp/abavenv/bin/python scripts/make_audiobox_reference.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audiobox"

# The original's WavLMConfig fields that differ from the package's Base-size WavLM (DEFAULT_AUDIO_CFG).
TINY_WAVLM = {
    "encoder_layers": 2,
    "encoder_embed_dim": 24,
    "encoder_ffn_embed_dim": 32,
    "encoder_attention_heads": 3,
    "conv_feature_layers": "[(12,10,5)] + [(12,3,2)] * 4 + [(12,2,2)] * 2",
    "conv_pos": 16,
    "conv_pos_groups": 4,
}
TARGET_TRANSFORM = {  # made-up statistics (the released ones live in the checkpoint)
    "CE": {"mean": 5.6, "std": 1.3},
    "CU": {"mean": 6.4, "std": 1.7},
    "PC": {"mean": 3.9, "std": 1.1},
    "PQ": {"mean": 7.1, "std": 0.9},
}
INPUTS = [  # (seconds, sample_rate, channels, seed)
    (1.5, 22050, 1, 0),
    (12.5, 22050, 2, 1),
    (0.8, 16000, 1, 2),
]


def reference_wave(seconds: float, sample_rate: int, channels: int, seed: int) -> torch.Tensor:
    """A deterministic [C, T] float32 waveform in [-1, 1]: tones, a chirp, an envelope."""
    t = torch.arange(int(round(seconds * sample_rate)), dtype=torch.float64) / sample_rate
    chans = []
    for c in range(channels):
        f = 110.0 * (1 + seed + 0.5 * c)
        x = (
            0.3 * torch.sin(2 * math.pi * f * t)
            + 0.15 * torch.sin(2 * math.pi * 2.71 * f * t + 0.3) * (0.5 + 0.5 * torch.sin(2 * math.pi * 0.7 * t))
            + 0.1 * torch.sin(2 * math.pi * (200.0 + 90.0 * t) * t)
            + 0.05 * torch.sin(2 * math.pi * 3141.5 * t + 1.0 + c)
        )
        chans.append(x)
    return torch.stack(chans).float()


def main() -> None:
    import audiobox_aesthetics.model.aes as aes
    from audiobox_aesthetics import infer
    from audiobox_aesthetics.model.wavlm import WavLMConfig

    aes.DEFAULT_AUDIO_CFG = WavLMConfig(dict(aes.DEFAULT_AUDIO_CFG.__dict__, **TINY_WAVLM))
    OUT.mkdir(parents=True, exist_ok=True)
    heads = {
        "a": dict(
            proj_num_layer=1,
            proj_ln=False,
            proj_act_fn="gelu",
            proj_dropout=0.0,
            nth_layer=3,
            use_weighted_layer_sum=True,
            precision="32",
            normalize_embed=True,
            output_dim=1,
        ),
        "b": dict(
            proj_num_layer=2,
            proj_ln=True,
            proj_act_fn="gelu",
            proj_dropout=0.1,
            nth_layer=3,
            use_weighted_layer_sum=True,
            precision="bf16",
            normalize_embed=False,
            output_dim=1,
        ),
    }
    torch.manual_seed(0)
    for name, cfg in heads.items():
        model = aes.AesMultiOutput(**cfg, target_transform=TARGET_TRANSFORM)
        with torch.no_grad():
            for key, p in model.named_parameters():
                scale = 1.0 if key.startswith("layer_weights") else 3.0 if key.startswith("proj_layer") else 0.2
                p.add_(torch.randn_like(p) * scale)
        if name == "a":
            sd = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
            ckpt = {"state_dict": sd, "model_cfg": cfg, "target_transform": TARGET_TRANSFORM}
            torch.save(ckpt, OUT / "checkpoint_a.pt")
        else:
            model.save_pretrained(OUT / "hub_b")
            (OUT / "hub_b" / "README.md").unlink(missing_ok=True)

    waves = [reference_wave(*spec) for spec in INPUTS]
    batch = [{"path": w, "sample_rate": spec[1]} for w, spec in zip(waves, INPUTS)]
    results = {}
    for name in heads:
        if name == "a":
            pred = infer.AesPredictor(checkpoint_pth=str(OUT / "checkpoint_a.pt"), data_col="path")
        else:  # the hub path: AesMultiOutput.from_pretrained, pointed at the local directory
            hub = aes.AesMultiOutput.from_pretrained.__func__
            aes.AesMultiOutput.from_pretrained = classmethod(lambda cls, repo, **kw: hub(cls, str(OUT / "hub_b")))
            try:
                pred = infer.AesPredictor(checkpoint_pth=None, data_col="path")
            finally:
                aes.AesMultiOutput.from_pretrained = classmethod(hub)
        assert pred.device.type == "cpu"
        rows = pred.forward(batch)
        # the normalised per-window predictions too (the same windows the predictor built)
        mono = pred.audio_resample_mono(batch)
        wavs, masks, weights, bids = infer.make_inference_batch(mono, 10, 10, sample_rate=16000)
        with torch.inference_mode():
            raw = pred.model({"wav": torch.stack(wavs), "mask": torch.stack(masks)})
        results[name] = {
            "scores": rows,
            "windows": {"weights": weights, "sample": bids, **{k: v.tolist() for k, v in raw.items()}},
        }
    meta = {
        "package": "audiobox_aesthetics 0.0.4",
        "torch": torch.__version__,
        "tiny_wavlm": TINY_WAVLM,
        "target_transform": TARGET_TRANSFORM,
        "heads": heads,
        "inputs": [dict(seconds=s, sample_rate=sr, channels=c, seed=seed) for s, sr, c, seed in INPUTS],
        "results": results,
    }
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: v["scores"] for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
