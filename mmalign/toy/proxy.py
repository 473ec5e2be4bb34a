"""The toy world's proxy reward: a tiny open_clip model trained on rendered scenes.

Contrastive (CLIP) training on train-split captions where every batch is built from
pairs (caption, hard negative caption) -- wrong colour, wrong shape, wrong count,
swapped colours (binding), swapped relation -- each with its own rendered scene, so the
in-batch softmax has to separate near-misses both ways (image -> text and text ->
image). Images are augmented the way generated ones differ from rendered ones: gaussian
blur, gaussian noise, colour jitter, a one-pixel shift (no flips: they break "left of").

Saved in open_clip's hub layout (`open_clip_config.json` + `open_clip_model.safetensors`,
fp16 weights that load into a float32 model), so a user loads it with

    model = open_clip.create_model("local-dir:" + path)
    tokenizer = open_clip.get_tokenizer("local-dir:" + path)

or `load_proxy(path)` below, which also returns the score function.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageFilter

from .gold import gold_score
from .sampling import sample
from .world import extra_object_scene, heldout_captions, layout, perturb_caption, render, render_objects, train_captions

PROXY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
PROXY_MEAN = [0.5, 0.5, 0.5]
PROXY_STD = [0.5, 0.5, 0.5]

NEG_MODES = ("color", "shape", "count", "swap", "relation")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def build_model(model_cfg: dict):
    import open_clip
    from open_clip.model import CLIP

    return CLIP(**model_cfg), open_clip.tokenizer.SimpleTokenizer(
        context_length=model_cfg["text_cfg"]["context_length"]
    )


def load_proxy(path: str | Path):
    """(model in eval mode, tokenizer, score_fn(images B,3,H,W in [0,1], captions) -> [B])."""
    import open_clip

    path = Path(path)
    model = open_clip.create_model("local-dir:" + str(path)).eval().float()
    tok = open_clip.get_tokenizer("local-dir:" + str(path))
    pre = json.loads((path / "open_clip_config.json").read_text())["preprocess_cfg"]
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)

    def score(images: torch.Tensor, captions) -> torch.Tensor:
        """Cosine similarity of image and caption embeddings (higher = better match)."""
        x = (images.float() - mean) / std
        if x.shape[-1] != pre["size"]:
            x = F.interpolate(x, size=(pre["size"], pre["size"]), mode="bilinear", antialias=True)
        ie = F.normalize(model.encode_image(x), dim=-1)
        te = F.normalize(model.encode_text(tok(list(captions))), dim=-1)
        return (ie * te).sum(-1)

    return model, tok, score


# ---------------------------------------------------------------- augmentation


def augment(img, rng: random.Random):
    if rng.random() < 0.7:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.1)))
    a = np.asarray(img).astype(np.float32)
    if rng.random() < 0.5:  # one-pixel shift, background fill (keeps relations)
        dx, dy = rng.choice([(0, 1), (1, 0), (0, -1), (-1, 0)])
        a = np.roll(a, (dy, dx), axis=(0, 1))
    if rng.random() < 0.5:  # colour jitter: per-channel gain/offset
        a = a * np.array([rng.uniform(0.92, 1.08) for _ in range(3)]) + rng.uniform(-12, 12)
    if rng.random() < 0.8:
        a = a + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(0, 12), a.shape)
    return np.clip(a, 0, 255) / 255.0


def _batch(rng: random.Random, n_pairs: int, train_set: set, extra_negatives: float = 0.0):
    """2*n_pairs (caption, image) pairs: each caption followed by one of its hard negatives.

    With `extra_negatives` p, a fraction p of the captions also brings its own scene with one
    more object (`extra_object_scene`, same layout), appended with caption None: an image no
    caption in the batch matches, so each text must rank its scene above it (text -> image)."""
    caps, imgs, extra = [], [], []
    train = sorted(train_set)
    while len(caps) < 2 * n_pairs:
        c = rng.choice(train)
        neg = None
        for _ in range(6):
            n = perturb_caption(c, rng)
            if n is not None and n in train_set:
                neg = n
                break
        for cc in (c, neg) if neg else (c,):
            caps.append(cc)
            seed = rng.randrange(1 << 30)
            imgs.append(augment(render(cc, seed), rng))
            if len(caps) <= 2 * n_pairs and rng.random() < extra_negatives:
                extra.append(augment(extra_object_scene(cc, seed), rng))
    caps, imgs = caps[: 2 * n_pairs] + [None] * len(extra), imgs[: 2 * n_pairs] + extra
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return caps, x


def clip_loss(img_emb, txt_emb, caps, logit_scale):
    """Symmetric InfoNCE where identical captions in the batch share one text (no false negatives).

    `caps[i]` None marks a negative-only image (no caption matches it): it is left out of the
    image -> text term and is one more negative column for every text in text -> image."""
    uniq = sorted({c for c in caps if c is not None})
    index = {c: i for i, c in enumerate(uniq)}
    has = torch.tensor([c is not None for c in caps])
    labels = torch.tensor([index[c] if c is not None else 0 for c in caps])
    # txt_emb is per unique caption here
    logits = logit_scale * img_emb @ txt_emb.t()  # B, U
    l_i2t = F.cross_entropy(logits[has], labels[has])
    pos = torch.zeros_like(logits, dtype=torch.bool)
    pos[torch.arange(len(caps))[has], labels[has]] = True
    lt = logits.t()  # U, B
    l_t2i = -(torch.logsumexp(lt.masked_fill(~pos.t(), -1e4), 1) - torch.logsumexp(lt, 1)).mean()
    return (l_i2t + l_t2i) / 2


def pairwise_accuracy(score_fn, captions, seeds=(0, 1), blur_noise=False) -> dict:
    """How often score(img, caption) > score(img, hard negative), per negative mode."""
    rng = random.Random(1234)
    res = {}
    for mode in NEG_MODES:
        pos_c, neg_c, imgs = [], [], []
        for c in captions:
            n = perturb_caption(c, rng, mode)
            if n is None:
                continue
            for s in seeds:
                img = render(c, 100_000 + s)
                if blur_noise:
                    img = img.filter(ImageFilter.GaussianBlur(0.7))
                    a = np.asarray(img).astype(np.float32)
                    a = a + np.random.default_rng(s).normal(0, 8, a.shape)
                    arr = np.clip(a, 0, 255) / 255.0
                else:
                    arr = np.asarray(img) / 255.0
                imgs.append(arr)
                pos_c.append(c)
                neg_c.append(n)
        if not imgs:
            continue
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            sp, sn = score_fn(x, pos_c), score_fn(x, neg_c)
        res[mode] = float((sp > sn).float().mean())
    res["mean"] = float(np.mean([v for k, v in res.items()]))
    return res


def best_of_k(score_fn, sd_path, captions, k=4, seeds_per=1, steps=20, cfg=4.0) -> dict:
    """Rank K base-model samples per caption by the proxy: gold accuracy of the top pick vs
    the mean (a random pick), and how often the proxy's best beats its worst in gold."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    pipe.set_progress_bar_config(disable=True)
    caps = [c for c in captions for _ in range(k)]
    seeds = [j for _ in captions for j in range(k)]
    imgs = sample(pipe, caps, seeds, steps=steps, cfg=cfg)
    x = torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        s = torch.cat([score_fn(x[i : i + 256], caps[i : i + 256]) for i in range(0, len(caps), 256)])
    gold = np.array([gold_score(im, c)["correct"] for im, c in zip(imgs, caps)], dtype=float)
    s = s.view(len(captions), k).numpy()
    g = gold.reshape(len(captions), k)
    top = g[np.arange(len(captions)), s.argmax(1)]
    bottom = g[np.arange(len(captions)), s.argmin(1)]
    mixed = g.max(1) > g.min(1)
    return {
        "captions": len(captions),
        "k": k,
        "steps": steps,
        "cfg": cfg,
        "random_pick_gold": float(g.mean()),
        "proxy_top_gold": float(top.mean()),
        "proxy_bottom_gold": float(bottom.mean()),
        "mixed_groups": int(mixed.sum()),
        "top_correct_in_mixed": float(top[mixed].mean()) if mixed.any() else float("nan"),
        "random_in_mixed": float(g[mixed].mean()) if mixed.any() else float("nan"),
    }


# ---------------------------------------------------------------- training


def scene_negatives(score_fn, captions, seeds=(100_000, 100_001)) -> dict:
    """On multi-object captions: how often the correct scene outscores the same scene with one
    extra object, and how often the extra-object scene outscores the one with an object missing
    (both fail the gold evaluator; a proxy that prefers 'extra' teaches a policy to draw more)."""
    caps, scenes = [], {"correct": [], "extra": [], "missing": []}
    for c in captions:
        for s in seeds:
            objects = layout(c, s)
            if len(objects) > 1:
                caps.append(c)
                scenes["correct"].append(render(c, s))
                scenes["extra"].append(extra_object_scene(c, s))
                scenes["missing"].append(render_objects(objects[:-1]))
    with torch.no_grad():
        sc = {
            k: score_fn(
                torch.from_numpy(np.stack([np.asarray(im) for im in v])).permute(0, 3, 1, 2).float() / 255, caps
            )
            for k, v in scenes.items()
        }
    return {
        "n": len(caps),
        **{f"mean_{k}": float(v.mean()) for k, v in sc.items()},
        "correct_over_extra": float((sc["correct"] > sc["extra"]).float().mean()),
        "correct_over_missing": float((sc["correct"] > sc["missing"]).float().mean()),
        "extra_over_missing": float((sc["extra"] > sc["missing"]).float().mean()),
        "drop_extra": float((sc["correct"] - sc["extra"]).mean()),
        "drop_missing": float((sc["correct"] - sc["missing"]).mean()),
    }


def train_proxy(
    out: Path,
    minutes: float,
    seed: int,
    max_steps: int | None = None,
    n_pairs: int = 96,
    lr: float = 1e-3,
    extra_negatives: float = 0.0,
):
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = build_model(PROXY_CFG)
    log(f"proxy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    mean = torch.tensor(PROXY_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PROXY_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    train_set = set(train_captions())
    tok_cache = {}

    def tokens(caps):
        miss = [c for c in caps if c not in tok_cache]
        if miss:
            for c, t in zip(miss, tok(miss)):
                tok_cache[c] = t
        return torch.stack([tok_cache[c] for c in caps])

    t0, step = time.time(), 0
    budget = minutes * 60
    while time.time() - t0 < budget and (max_steps is None or step < max_steps):
        caps, x = _batch(rng, n_pairs, train_set, extra_negatives)
        uniq = sorted({c for c in caps if c is not None})
        ie = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        te = F.normalize(model.encode_text(tokens(uniq)), dim=-1)
        loss = clip_loss(ie, te, caps, model.logit_scale.exp().clamp(max=100))
        frac = (time.time() - t0) / budget
        cur = lr * min(1.0, (step + 1) / 100) * (0.5 * (1 + np.cos(np.pi * min(frac, 1.0))) * 0.95 + 0.05)
        for pg in opt.param_groups:
            pg["lr"] = cur
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"proxy step {step} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f}")
    model.eval()
    d = Path(out) / "proxy_clip"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": PROXY_CFG, "preprocess_cfg": {"mean": PROXY_MEAN, "std": PROXY_STD, "size": 32}}
    (d / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(
        {k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
        str(d / "open_clip_model.safetensors"),
    )
    _, _, score = load_proxy(d)
    info = {
        "steps": step,
        "seed": seed,
        "minutes": (time.time() - t0) / 60,
        "pairwise_heldout": pairwise_accuracy(score, heldout_captions()),
        "pairwise_heldout_blur_noise": pairwise_accuracy(score, heldout_captions(), blur_noise=True),
        "pairwise_train": pairwise_accuracy(score, train_captions()[::3]),
        "scene_negatives_heldout": scene_negatives(score, heldout_captions()),
        "extra_negatives": extra_negatives,
    }
    log(f"proxy: {step} steps; pairwise held-out {info['pairwise_heldout']}")
    log(f"proxy: pairwise held-out, blur+noise {info['pairwise_heldout_blur_noise']}")
    log(f"proxy: pairwise train {info['pairwise_train']}")
    log(f"proxy: scene negatives held-out {info['scene_negatives_heldout']}")
    sd = Path(out) / "sd_toy"
    if (sd / "model_index.json").exists():
        info["best_of_4_heldout"] = best_of_k(score, sd, heldout_captions())
        log(f"proxy: best-of-4 on held-out base-model samples {info['best_of_4_heldout']}")
    (d / "train_info.json").write_text(json.dumps(info, indent=2))
    return model
