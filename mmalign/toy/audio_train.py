"""Train the toy audio world's shipped models from scratch (CPU is enough).

    python -m mmalign.toy.audio_train {vae,dit,proxy,all,report} --out mmalign/toy/assets

The generator is in the Stable Audio layout (`StableAudioPipeline.from_pretrained` loads
`<out>/stable_audio_toy`; the `stable_audio` generator adapter samples it):

  vae    AutoencoderOobleck, mono at 4 kHz (the world's 16 kHz clips resampled: 880 Hz is far
         below the 2 kHz Nyquist), hop 32 (1 s = 4000 samples = 125 latent frames of 8
         channels), trained on random 1024-sample crops of rendered train clips to minimise
         waveform MSE plus a multi-resolution log-STFT-magnitude L1 (and a tiny KL)
         -> <work>/audio_vae/. The posterior means are rescaled to unit variance per channel
         by folding the scale into the encoder's last and the decoder's first convolution
         (StableAudioPipeline decodes latents as they are: there is no scaling factor).
  dit    StableAudioDiTModel + a tiny T5EncoderModel (word-level tokenizer over the grammar) +
         StableAudioProjectionModel on cached latents -> <out>/stable_audio_toy/ (fp16). The
         conditioning is the adapter's (pipelines/stable_audio.py): projected T5 states times
         the attention mask, followed by the seconds_start / seconds_total embeddings (0 and
         1 s), and the two seconds embeddings as global states; the loss is the adapter's
         cosine v-objective with u ~ U(0, 1). Captions are dropped 10% of the time: the
         adapter's unconditional branch is all-zero cross-attention states, so a dropped
         caption is exactly that.
  proxy  the toy_audio_proxy reward (audio_proxy.py) -> <out>/audio_proxy/
  report held-out gold of the shipped model through the adapter's default sampler

As in `train.py`, the DiT stage evaluates held-out gold (held-out captions x seeds) every
--eval-every minutes with EMA weights, saves each evaluation as a checkpoint under --work, and
stops at the first evaluation inside [--stop-accuracy, --max-accuracy]: the shipped model must
stay imperfect so that alignment has room to show.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .audio_gold import gold_report_audio
from .audio_world import all_audio_captions, audio_heldout_captions, audio_train_captions, render_audio
from .train import ema_update_step, log, seed_all

HERE = Path(__file__).parent
SR = 4000  # the shipped model's sampling rate
N = 4000  # samples per clip (1 s)
HOP = 32
LATENT = 8
FRAMES = N // HOP  # 125
TEXT_LEN = 12  # the longest caption's 11 words + </s>
VAE_CFG = dict(
    encoder_hidden_size=2 * LATENT,
    downsampling_ratios=[4, 8],
    channel_multiples=[1, 2],
    decoder_channels=32,
    decoder_input_channels=LATENT,
    audio_channels=1,
    sampling_rate=SR,
)
DIT_CFG = dict(
    sample_size=FRAMES,
    in_channels=LATENT,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    num_key_value_attention_heads=2,
    out_channels=LATENT,
    cross_attention_dim=64,
    time_proj_dim=64,
    global_states_input_dim=64,
    cross_attention_input_dim=32,
)
TEXT_CFG = dict(
    d_model=32,
    d_kv=16,
    d_ff=64,
    num_layers=2,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
SCHED_CFG = dict(
    sigma_min=0.3,
    sigma_max=500.0,
    sigma_data=1.0,
    sigma_schedule="exponential",
    solver_order=2,
    prediction_type="v_prediction",
)
SAMPLE_STEPS, SAMPLE_CFG = 20, 7.0  # the adapter's rollout defaults


# ------------------------------------------------------------------ data


def vocabulary() -> list[str]:
    return sorted({w for c in all_audio_captions() for w in c.split()})


def render_4k(caption: str, seed: int) -> np.ndarray:
    import torchaudio

    wave, sr = render_audio(caption, seed)
    return torchaudio.functional.resample(torch.from_numpy(wave)[None].double(), sr, SR)[0].float().numpy()


def clip_pool(captions, per_caption: int, seed_offset: int = 0):
    """(captions, float tensor [N, 1, 4000]) of rendered clips at 4 kHz."""
    caps, clips = [], []
    for s in range(per_caption):
        for c in captions:
            caps.append(c)
            clips.append(render_4k(c, seed_offset + s))
    return caps, torch.from_numpy(np.stack(clips))[:, None]


def make_tokenizer():
    """Word-level `PreTrainedTokenizerFast` over the grammar (pad 0, </s> 1, unk 2), appending
    </s> like T5's; model_max_length TEXT_LEN (the pipeline pads to it)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in vocabulary():
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=TEXT_LEN
    )


# ------------------------------------------------------------------ VAE


def stft_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multi-resolution L1 between log STFT magnitudes (windows 64 to 512)."""
    loss = 0.0
    for n in (64, 128, 256, 512):
        w = torch.hann_window(n, device=x.device)
        a = torch.stft(rec.flatten(0, 1), n, n // 4, window=w, return_complex=True).abs()
        b = torch.stft(x.flatten(0, 1), n, n // 4, window=w, return_complex=True).abs()
        loss = loss + (torch.log(a + 1e-4) - torch.log(b + 1e-4)).abs().mean()
    return loss / 4


def recon_gold(vae, caps, clips) -> float:
    with torch.no_grad():
        rec = vae.decode(vae.encode(clips).latent_dist.mean).sample.clamp(-1, 1)
    return gold_report_audio(rec, SR, caps)["accuracy"]


def train_vae(work: Path, minutes: float, seed: int, max_steps: int | None = None, batch: int = 16, crop: int = 1024):
    from diffusers import AutoencoderOobleck

    seed_all(seed)
    _, pool = clip_pool(audio_train_captions(), 4, seed_offset=10_000)
    log(f"vae: pool {tuple(pool.shape)}")
    vae = AutoencoderOobleck(**VAE_CFG)
    caps, held = clip_pool(audio_heldout_captions(), 2, seed_offset=50_000)
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e3:.0f}k params")
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, step, hist = time.time(), 0, []
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        off = torch.randint(0, (N - crop) // HOP + 1, (batch,), generator=g) * HOP
        idx = torch.randint(0, len(pool), (batch,), generator=g)
        x = torch.stack([pool[i, :, o : o + crop] for i, o in zip(idx.tolist(), off.tolist())])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        mse = F.mse_loss(rec, x)
        spec = stft_loss(rec, x)
        loss = 10 * mse + spec + 1e-4 * post.kl().mean()
        lr = 2e-3 * min(1.0, (step + 1) / 50) * (0.25 if time.time() - t0 > 0.75 * minutes * 60 else 1.0)
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        hist.append((mse.item(), spec.item()))
        if step % 20 == 0:
            m = np.mean(hist[-20:], 0)
            log(f"vae step {step} mse {m[0]:.5f} stft {m[1]:.3f} ({(time.time() - t0) / step:.2f}s/step)")
        if step % 200 == 0:
            log(f"vae step {step}: held-out reconstructions gold-correct {recon_gold(vae, caps, held):.3f}")
    vae.eval()
    ok = recon_gold(vae, caps, held)
    log(f"vae: {step} steps; held-out reconstructions gold-correct {ok:.3f}")
    normalise_latents(vae, pool)
    ok2 = recon_gold(vae, caps, held)
    log(f"vae: latents normalised; held-out reconstructions gold-correct {ok2:.3f}")
    d = work / "audio_vae"
    vae.save_pretrained(d)
    (d / "train_info.json").write_text(
        json.dumps({"steps": step, "seed": seed, "crop": crop, "batch": batch, "recon_gold": ok2})
    )
    return vae


def _set_weight(conv, w: torch.Tensor):
    """Set a weight-normed conv's effective weight to `w` (g = per-output-row norm, v = w)."""
    if hasattr(conv, "weight_v"):
        conv.weight_v.data.copy_(w)
        conv.weight_g.data.copy_(w.flatten(1).norm(dim=1).view(-1, *([1] * (w.ndim - 1))))
    else:
        conv.weight.data.copy_(w)


def _weight(conv) -> torch.Tensor:
    if hasattr(conv, "weight_v"):
        v = conv.weight_v.data
        return conv.weight_g.data * v / v.flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))
    return conv.weight.data.clone()


@torch.no_grad()
def normalise_latents(vae, pool: torch.Tensor):
    """Per-channel affine map of the posterior means to zero mean and unit variance over the
    pool, folded into encoder.conv2 (the mean rows) and decoder.conv1 (its inverse). The
    encoder side is exact; the decoder side is exact except within 3 latent frames of either end,
    where decoder.conv1's zero padding meets the shifted means (the held-out reconstructions stay
    gold-correct: train_info.json of the VAE)."""
    mu = torch.cat([vae.encode(pool[i : i + 64]).latent_dist.mean for i in range(0, len(pool), 64)])
    m, s = mu.mean(dim=(0, 2)), mu.std(dim=(0, 2)).clamp_min(1e-3)
    enc, dec = vae.encoder.conv2, vae.decoder.conv1
    we, be = _weight(enc), enc.bias.data
    we[:LATENT] /= s.view(-1, 1, 1)
    be[:LATENT] = (be[:LATENT] - m) / s
    _set_weight(enc, we)
    wd = _weight(dec)  # out, in, k: z = s z' + m
    dec.bias.data += (wd.sum(2) * m.view(1, -1)).sum(1)
    _set_weight(dec, wd * s.view(1, -1, 1))
    log(f"vae: latent channel mean {m.numpy().round(2)} std {s.numpy().round(2)}")


@torch.no_grad()
def posteriors(vae, pool: torch.Tensor, chunk: int = 64):
    mus, sds = [], []
    for i in range(0, len(pool), chunk):
        d = vae.encode(pool[i : i + chunk]).latent_dist
        mus.append(d.mean)
        sds.append(d.std)
    return torch.cat(mus), torch.cat(sds)


# ------------------------------------------------------------------ DiT


def save_pipe(pipe, path: Path, info: dict):
    """save_pretrained, then every floating tensor of every safetensors file cast to fp16 (the
    folder stays small; the pipeline loads it in float32). `train.save_pipe` deep-copies the
    pipeline first, which the weight-normed Oobleck VAE does not allow."""
    from safetensors.torch import load_file, save_file

    if path.exists():
        shutil.rmtree(path)
    pipe.save_pretrained(path, safe_serialization=True)
    for f in path.rglob("*.safetensors"):
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(f)).items()}
        save_file(sd, str(f))
    (path / "train_info.json").write_text(json.dumps(info, indent=1))


def build_pipe(vae, text_encoder, tokenizer, transformer, projection):
    from diffusers import CosineDPMSolverMultistepScheduler, StableAudioPipeline

    return StableAudioPipeline(
        vae=vae,
        text_encoder=text_encoder,
        projection_model=projection,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=CosineDPMSolverMultistepScheduler(**SCHED_CFG),
    )


def adapter(pipe):
    """The `stable_audio` generator adapter around a pipeline (no trainable adapter)."""
    from mmalign.pipelines.stable_audio import StableAudioGenerator, StableAudioGeneratorConfig

    return StableAudioGenerator(StableAudioGeneratorConfig(pretrained="(in memory)", finetune="none"), pipe=pipe)


def heldout_samples(seeds) -> tuple[list[str], list[int]]:
    caps0 = audio_heldout_captions()
    caps = [c for _ in seeds for c in caps0]
    sd = [s * len(caps0) + i for s in seeds for i in range(len(caps0))]
    return caps, sd


@torch.no_grad()
def heldout_eval(gen, seeds=(0, 1, 2), steps: int = SAMPLE_STEPS, cfg: float = SAMPLE_CFG, batch: int = 64) -> dict:
    """Gold report of the adapter's default sampler (eta 0: the pipeline's scheduler) over the
    held-out captions x seeds."""
    caps, sd = heldout_samples(seeds)
    clips = []
    for i in range(0, len(caps), batch):
        ro = gen.rollout(
            caps[i : i + batch],
            num_steps=steps,
            guidance_scale=cfg,
            eta=0.0,
            seeds=sd[i : i + batch],
            need_log_probs=False,
        )
        clips.append(ro.samples.audio.float().cpu())
    return gold_report_audio(torch.cat(clips), gen.sample_rate, caps)


def fmt_report(r: dict) -> str:
    kinds = " ".join(f"{k}={v:.2f}" for k, v in r["per_kind"].items())
    cons = " ".join(f"{k}={v:.2f}" for k, v in r["per_constraint"].items())
    return f"acc={r['accuracy']:.3f} n={r['n']} [{kinds}] [{cons}]"


def conditioning(text_encoder, projection, ids, mask):
    """The adapter's conditioning (encode_prompt): projected T5 states times the mask, then the
    seconds_start (0) and seconds_total (1 s) embeddings; global states the two seconds
    embeddings side by side."""
    h = projection(text_hidden_states=text_encoder(ids, attention_mask=mask)[0]).text_hidden_states
    h = h * mask.unsqueeze(-1).to(h.dtype)
    B = ids.shape[0]
    p = projection(start_seconds=torch.zeros(B), end_seconds=torch.full((B,), N / SR))
    start, end = p.seconds_start_hidden_states, p.seconds_end_hidden_states
    return torch.cat([h, start, end], 1), torch.cat([start, end], 2)


def dit_forward(transformer, x, u, ehs, glob):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    rotary = get_1d_rotary_pos_embed(
        DIT_CFG["attention_head_dim"] // 2, x.shape[2] + glob.shape[1], use_real=True, repeat_interleave_real=False
    )
    return transformer(x, u, encoder_hidden_states=ehs, global_hidden_states=glob, rotary_embedding=rotary)[0]


def train_dit(
    out: Path,
    work: Path,
    minutes: float,
    seed: int,
    max_steps: int | None = None,
    eval_every: float = 3.0,
    batch: int = 32,
    lr: float = 1e-3,
    clips_per_caption: int = 24,
    stop_accuracy: float = 0.25,
    max_accuracy: float = 0.6,
    eval_seeds=(0, 1, 2),
    init_from: Path | None = None,
):
    from diffusers import AutoencoderOobleck, StableAudioDiTModel, StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    seed_all(seed)
    vae = AutoencoderOobleck.from_pretrained(work / "audio_vae").eval()
    tokenizer = make_tokenizer()
    caps, pool = clip_pool(audio_train_captions(), clips_per_caption)
    t = time.time()
    mu, _ = posteriors(vae, pool)
    del pool
    log(f"dit: latents {tuple(mu.shape)} ({time.time() - t:.0f}s); std {mu.std():.3f}")
    names = sorted(set(caps)) + [""]
    enc = tokenizer(names, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    index = {c: i for i, c in enumerate(names)}
    cap_idx = torch.tensor([index[c] for c in caps])

    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TEXT_CFG))
    projection = StableAudioProjectionModel(
        text_encoder_dim=TEXT_CFG["d_model"],
        conditioning_dim=DIT_CFG["cross_attention_input_dim"],
        min_value=0,
        max_value=1,
    )
    transformer = StableAudioDiTModel(**DIT_CFG)
    if init_from is not None:  # continue from a checkpoint (weights only: a fresh optimizer)
        transformer.load_state_dict(StableAudioDiTModel.from_pretrained(init_from / "transformer").float().state_dict())
        text_encoder.load_state_dict(T5EncoderModel.from_pretrained(init_from / "text_encoder").float().state_dict())
        projection.load_state_dict(
            StableAudioProjectionModel.from_pretrained(init_from / "projection_model").float().state_dict()
        )
        log(f"dit: initialised from {init_from}")
    log(f"dit: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params")
    params = [p for m in (transformer, text_encoder, projection) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)

    def swap_ema():
        for p, e in zip(params, ema):
            tmp = p.detach().clone()
            p.data.copy_(e)
            e.copy_(tmp)

    history, stopped = [], False

    def snapshot(step):
        swap_ema()
        for m in (transformer, text_encoder, projection):
            m.eval()
        pipe = build_pipe(vae, text_encoder, tokenizer, transformer, projection)
        pipe.set_progress_bar_config(disable=True)
        t = time.time()
        r = heldout_eval(adapter(pipe), seeds=eval_seeds)
        log(f"eval step {step}: held-out {fmt_report(r)} ({time.time() - t:.0f}s)")
        history.append(
            {
                "step": step,
                "minutes": (time.time() - t0) / 60,
                **{k: r[k] for k in ("accuracy", "per_kind", "per_constraint")},
            }
        )
        save_pipe(pipe, work / f"stable_audio_toy_step_{step:06d}", {"step": step, "heldout": r["accuracy"]})
        return pipe, r

    def restore():
        swap_ema()
        for m in (transformer, text_encoder, projection):
            m.train().requires_grad_(True)  # the adapter froze them for the evaluation

    t0, step, last_eval, losses = time.time(), 0, time.time(), []
    pipe = None
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        idx = torch.randint(0, len(mu), (batch,), generator=g)
        x0 = mu[idx]
        ci = cap_idx[idx]
        ehs, glob = conditioning(text_encoder, projection, enc.input_ids[ci], enc.attention_mask[ci])
        drop = (torch.rand(batch, generator=g) < 0.1).view(-1, 1, 1)
        ehs = torch.where(drop, torch.zeros_like(ehs), ehs)  # the adapter's unconditional branch
        noise = torch.randn(x0.shape, generator=g)
        u = torch.rand(batch, generator=g)
        a, s = torch.cos(u * torch.pi / 2).view(-1, 1, 1), torch.sin(u * torch.pi / 2).view(-1, 1, 1)
        v = dit_forward(transformer, a * x0 + s * noise, u, ehs, glob)
        loss = F.mse_loss(v, a * noise - s * x0)
        step = ema_update_step(opt, loss, params, ema, step, lr, warmup=100, max_decay=0.995)
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"dit step {step} loss {np.mean(losses[-50:]):.4f} ({(time.time() - t0) / step:.2f}s/step)")
        if time.time() - last_eval > eval_every * 60:
            pipe, r = snapshot(step)
            last_eval = time.time()
            if stop_accuracy <= r["accuracy"] <= max_accuracy:
                stopped = True
                break
            restore()
    if not stopped:
        pipe, r = snapshot(step)
    info = {
        "steps": step,
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "minutes": (time.time() - t0) / 60,
        "pool": {"clips": len(caps), "clips_per_caption": clips_per_caption},
        "init_from": None if init_from is None else str(init_from),
        "init_info": None
        if init_from is None or not (init_from / "train_info.json").is_file()
        else json.loads((init_from / "train_info.json").read_text()),
        "stop_band": [stop_accuracy, max_accuracy],
        "sample": {"num_inference_steps": SAMPLE_STEPS, "guidance_scale": SAMPLE_CFG, "eta": 0.0},
        "heldout_gold": r["accuracy"],
        "history": history,
    }
    save_pipe(pipe, out / "stable_audio_toy", info)
    log(f"dit: saved {out / 'stable_audio_toy'} after {step} steps")
    return pipe


def load_shipped(path: Path):
    from mmalign.pipelines.stable_audio import StableAudioGenerator, StableAudioGeneratorConfig

    return StableAudioGenerator(StableAudioGeneratorConfig(pretrained=str(path), finetune="none"))


def final_report(out: Path, seeds=(0, 1, 2)) -> dict:
    r = heldout_eval(load_shipped(out / "stable_audio_toy"), seeds=seeds)
    log(
        f"final stable_audio_toy held-out gold ({len(seeds)} seeds x {len(audio_heldout_captions())} "
        f"captions): {fmt_report(r)}"
    )
    p = out / "stable_audio_toy" / "train_info.json"
    info = json.loads(p.read_text())
    info["final_heldout"] = {"seeds": list(seeds), **{k: r[k] for k in ("accuracy", "n", "per_kind", "per_constraint")}}
    p.write_text(json.dumps(info, indent=1))
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "dit", "proxy", "all", "report"])
    ap.add_argument("--out", type=Path, default=HERE / "assets")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmalign_audio_work"))
    ap.add_argument("--minutes", type=float, default=20.0, help="DiT training time box")
    ap.add_argument("--vae-minutes", type=float, default=8.0)
    ap.add_argument("--proxy-minutes", type=float, default=4.0)
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--dit-steps", type=int, default=None)
    ap.add_argument("--proxy-steps", type=int, default=None)
    ap.add_argument("--eval-every", type=float, default=3.0, help="minutes between held-out evals/checkpoints")
    ap.add_argument("--stop-accuracy", type=float, default=0.25)
    ap.add_argument("--max-accuracy", type=float, default=0.6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--init-from", type=Path, default=None, help="dit: continue from a saved checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    t = time.time()
    if args.stage in ("vae", "all"):
        train_vae(args.work, args.vae_minutes, args.seed, args.vae_steps)
    if args.stage in ("dit", "all"):
        train_dit(
            args.out,
            args.work,
            args.minutes,
            args.seed,
            args.dit_steps,
            args.eval_every,
            batch=args.batch,
            lr=args.lr,
            stop_accuracy=args.stop_accuracy,
            max_accuracy=args.max_accuracy,
            init_from=args.init_from,
        )
    if args.stage in ("dit", "all", "report"):
        final_report(args.out)
    if args.stage in ("proxy", "all"):
        from .audio_proxy import train_audio_proxy

        train_audio_proxy(args.out, args.proxy_minutes, args.seed, args.proxy_steps)
    log(f"done in {(time.time() - t) / 60:.1f} min")


if __name__ == "__main__":
    main()
