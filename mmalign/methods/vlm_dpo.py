"""The DPO family for vision-language models: one method, the objective chosen by `loss_type`.

Scores are response log-probabilities log pi(y | image, x) from `VLMGenerator.token_logps`,
summed over response tokens (`score: sum`, DPO's own definition) or length-averaged
(`score: mean`); SimPO and ORPO always use the length average. Objectives (the pure
functions live in mmalign/methods/preference.py):

- dpo / cdpo / robust_dpo / ipo / hinge  (Rafailov et al. 2023; Mitchell 2023 / Chowdhury et al.
  2024; Azar et al. 2023; SLiC)
- simpo   -log sigmoid(beta (avg_w - avg_l) - gamma), reference-free (Meng et al. 2024)
- orpo    -avg_w + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)) (Hong et al. 2024)
- kto     unpaired, with the batch's mismatched-pair KL baseline (Ethayarajh et al. 2024);
          paired rows are split into one desirable and one undesirable example
- mdpo    DPO + conditional preference against a cropped image + anchor (Wang et al. 2024)
- povid   alpha r(y_w) - beta1 r(y_l^t) - beta2 r(y_l^n | noisy image), y_l^n sampled from the
          policy on the noisy image (Zhou et al. 2024)
Modifiers: `dense_gamma` (RLHF-V's dense DPO score: tokens where chosen and rejected differ
weigh gamma, Yu et al. 2024), `dynamic_beta` (MM-DPO: beta(delta) = beta (1 + w (1 - e^{-k delta}))
from the row's reward margin delta, Zhang et al. 2025), per-row `weight`, `sft_weight` (an
NLL term on the chosen response).

Reference log-probs are computed live (adapters disabled, no grad) or precomputed once per
dataset and cached to disk (`reference: cached`), keyed by the data, model and score settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmalign.config import num
from mmalign.data.vlm import VLMPreferenceDataset, build_sequences, read_rows
from mmalign.methods import preference as P
from mmalign.protocols import TokenGenerator
from mmalign.registry import register_method

PAIRWISE = ("dpo", "cdpo", "robust_dpo", "ipo", "hinge")
LOSS_TYPES = PAIRWISE + ("simpo", "orpo", "kto", "mdpo", "povid")


@dataclass
class VLMDPOConfig:
    loss_type: str = "dpo"  # dpo | cdpo | robust_dpo | ipo | hinge | simpo | orpo | kto | mdpo | povid
    beta: float = num(0.1, gt=0)
    score: Literal["sum", "mean"] = "sum"  # response log-prob: summed or length-averaged
    label_smoothing: float = num(0.0, ge=0, lt=1)  # eps of cdpo / robust_dpo
    simpo_gamma: float = num(0.5, ge=0)  # SimPO's target margin gamma
    orpo_lambda: float = num(0.1, ge=0)
    kto_lambda_d: float = num(1.0, ge=0)
    kto_lambda_u: float = num(1.0, ge=0)
    mdpo_anchor: float = num(0.0)
    mdpo_crop: float = num(0.2, gt=0, le=1)  # the corrupted image keeps at most this fraction of the area
    povid_alpha: float = num(0.1, ge=0)
    povid_beta1: float = num(0.1, ge=0)
    povid_beta2: float = num(0.1, ge=0)
    povid_noise_step: int = num(500, ge=0)  # of 1000 (linear-beta DDPM forward noise on pixels)
    povid_max_new_tokens: int = num(64, ge=1)
    dense_gamma: float | None = num(None, gt=0)  # RLHF-V dense DPO, e.g. 5.0
    dynamic_beta: bool = False  # MM-DPO: needs a `margin` column
    dynamic_w: float = num(0.5, ge=0)
    dynamic_k: float = num(0.5, ge=0)
    sft_weight: float = num(0.0, ge=0)
    use_row_weights: bool = True
    reference: Literal["live", "cached"] = "live"
    reference_cache: str | None = None  # default: <run dir>/reference_logps
    reference_batch_size: int = num(4, ge=1)

    def validate(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: unknown {self.loss_type!r}; choose from {list(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError("beta: must be positive")
        if self.reference == "cached" and self.loss_type in ("kto", "povid"):
            raise ValueError(
                f"reference: {self.loss_type} needs live reference log-probs (its KL baseline / "
                "on-policy responses change every step)"
            )
        if self.dense_gamma is not None and self.loss_type in ("kto", "simpo", "orpo"):
            raise ValueError("dense_gamma: RLHF-V's dense score needs a chosen/rejected pair and a reference")
        if self.dense_gamma is not None and self.dense_gamma <= 0:
            raise ValueError("dense_gamma: must be positive")


def reduce_scores(lp: Tensor, mask: Tensor, changed: Tensor, how: str, dense_gamma: float | None) -> Tensor:
    """Per-sequence score from aligned token log-probs: sum, mean, or RLHF-V dense."""
    if dense_gamma is not None:
        return P.dense_logp(lp, mask, changed, dense_gamma)
    s = (lp * mask).sum(-1)
    return s / mask.sum(-1).clamp(min=1) if how == "mean" else s


class VLMDPO:
    generator_role = TokenGenerator

    def __init__(self, cfg: VLMDPOConfig):
        self.cfg = cfg

    @property
    def reduction(self) -> str:
        return "mean" if self.cfg.loss_type in ("simpo", "orpo") else self.cfg.score

    @property
    def uses_reference(self) -> bool:
        return self.cfg.loss_type not in ("simpo", "orpo")

    # ------------------------------------------------------------------ data
    def build_dataset(self, d, generator: TokenGenerator, run_dir: Path, log=print, accelerator=None):
        """Called by the trainer for offline data: rows -> encoded dataset (+ cached reference)."""
        if not d.path:
            raise ValueError("data.path: required (a .jsonl / .json / .parquet file or a parquet directory)")
        rs = read_rows(d.path, d.max_samples)
        corrupt, kw = None, {}
        if self.cfg.loss_type == "mdpo":
            corrupt, kw = "crop", {"keep": self.cfg.mdpo_crop}
        elif self.cfg.loss_type == "povid":
            corrupt, kw = "noise", {"step": self.cfg.povid_noise_step}
        ds = VLMPreferenceDataset(rs, generator.encoder(), corrupt, d.skip_bad, kw)
        log(
            f"data: {len(ds)} rows from {rs.source} ({rs.ties_dropped} ties dropped, {rs.bad_skipped} bad rows "
            f"skipped, {rs.too_long_dropped} too long dropped)"
        )
        if self.cfg.loss_type != "kto" and any(r.completion is not None for r in ds.rows):
            raise ValueError(f"{rs.source}: unpaired rows (completion/label) need loss_type: kto")
        if self.cfg.reference == "cached" and self.uses_reference:
            path = Path(self.cfg.reference_cache or Path(run_dir) / "reference_logps")
            is_main = accelerator is None or accelerator.is_main_process
            if is_main:
                precompute_reference(self, ds, generator, path, log)
            if accelerator is not None:
                accelerator.wait_for_everyone()
            ds.ref = load_reference(path, cache_key(self, ds, generator))
        return ds

    # ------------------------------------------------------------------ sequences
    def _sequences(
        self, items: list[dict], generator, noisy_ids: list[Tensor] | None = None
    ) -> tuple[dict, dict[str, slice]]:
        """Every sequence this batch needs, in one padded batch, and where each group sits."""
        prompts, resp, changed, where = [], [], [], {}

        def add(name, ps, rs, cs=None):
            where[name] = slice(len(prompts), len(prompts) + len(ps))
            prompts.extend(ps)
            resp.extend(rs)
            changed.extend(cs or [torch.zeros(len(r), dtype=torch.bool) for r in rs])

        pe = [it["prompt_enc"] for it in items]
        if self.cfg.loss_type == "kto":
            responses = [it["response"] for it in items]
            add("y", pe, responses)
            n = len(items)  # KL baseline: prompt i with the response of item i+1 (mismatched pairs)
            add("kl", pe, [responses[(i + 1) % n] for i in range(n)])
        else:
            add("w", pe, [it["chosen"] for it in items], [it["changed_w"] for it in items])
            add("l", pe, [it["rejected"] for it in items], [it["changed_l"] for it in items])
            if self.cfg.loss_type == "mdpo":
                add("wc", [it["prompt_corrupt"] for it in items], [it["chosen"] for it in items])
            if self.cfg.loss_type == "povid":
                noisy = [it["prompt_corrupt"] for it in items]
                add("ln", noisy, noisy_ids)
        return build_sequences(prompts, resp, generator.pad_id, generator.cfg.padding_side, changed), where

    def scores(self, items: list[dict], generator, noisy_ids: list[Tensor] | None = None) -> dict[str, Tensor]:
        seqs, where = self._sequences(items, generator, noisy_ids)
        lp, mask, ch = generator.token_logps(seqs)
        s = reduce_scores(lp, mask, ch, self.reduction, self.cfg.dense_gamma)
        out = {k: s[v] for k, v in where.items()}
        out["_n_tokens"] = mask.sum(-1).float()
        if "w" in where:
            out["_nll_w"] = -(lp[where["w"]].sum(-1) / mask[where["w"]].sum(-1).clamp(min=1))
        return out

    # ------------------------------------------------------------------ loss
    def loss(self, batch: dict, generator: TokenGenerator) -> tuple[Tensor, dict[str, float]]:
        c = self.cfg
        items = batch["items"]
        noisy_ids = None
        if c.loss_type == "povid":  # y_l^n: the policy's own answer to the noisy image, sampled once
            noisy_ids = generator.generate_ids([it["prompt_corrupt"] for it in items], c.povid_max_new_tokens)
        pol = self.scores(items, generator, noisy_ids)
        dev = pol["_n_tokens"].device
        if not self.uses_reference:
            ref = None
        elif "ref" in batch:
            ref = {k: v.to(dev) for k, v in batch["ref"].items()}
        else:
            with torch.no_grad(), generator.reference():
                ref = {k: v.detach() for k, v in self.scores(items, generator, noisy_ids).items()}
        weight = batch["weight"].to(dev).float() if c.use_row_weights else torch.ones(len(items), device=dev)
        metrics: dict[str, float] = {}
        beta: Any = c.beta
        if c.dynamic_beta:
            beta = P.mmdpo_beta(c.beta, batch["margin"].to(dev).float(), c.dynamic_w, c.dynamic_k)
            metrics["beta_mean"] = float(beta.mean())

        lt = c.loss_type
        if lt == "kto":
            z0 = P.kto_kl_baseline(pol["kl"], ref["kl"])
            losses = P.kto(pol["y"], ref["y"], batch["label"].to(dev), z0, beta, c.kto_lambda_d, c.kto_lambda_u)
            r = (pol["y"] - ref["y"]).detach()
            lab = batch["label"].to(dev)
            metrics.update(
                kl_baseline=float(z0),
                reward_desirable=float(r[lab].mean()) if lab.any() else 0.0,
                reward_undesirable=float(r[~lab].mean()) if (~lab).any() else 0.0,
            )
        else:
            pw, pl = pol["w"], pol["l"]
            if lt in PAIRWISE:
                losses = P.pairwise(lt, pw, pl, ref["w"], ref["l"], beta, c.label_smoothing)
            elif lt == "simpo":
                losses = P.simpo(pw, pl, beta, c.simpo_gamma)
            elif lt == "orpo":
                losses, l_or = P.orpo(pw, pl, c.orpo_lambda)
                metrics["orpo_or_loss"] = float(l_or.detach().mean())
            elif lt == "mdpo":
                terms = P.mdpo(pw, pl, ref["w"], ref["l"], pol["wc"], ref["wc"], beta, c.mdpo_anchor)
                losses = terms["loss"]
                metrics.update({f"mdpo_{k}": float(v.detach().mean()) for k, v in terms.items() if k != "loss"})
            elif lt == "povid":
                losses = P.povid(
                    pw, pl, pol["ln"], ref["w"], ref["l"], ref["ln"], c.povid_alpha, c.povid_beta1, c.povid_beta2
                )
            else:  # pragma: no cover - validate() guards
                raise ValueError(lt)
            if ref is not None:
                rw, rl = beta * (pw - ref["w"]).detach(), beta * (pl - ref["l"]).detach()
            else:
                rw, rl = beta * pw.detach(), beta * pl.detach()
            m = rw - rl
            metrics.update(
                margin=float(m.mean()),
                reward_w=float(rw.mean()),
                reward_l=float(rl.mean()),
                implicit_acc=float(((m > 0).float() + 0.5 * (m == 0).float()).mean()),
                logp_w=float(pw.detach().mean()),
                logp_l=float(pl.detach().mean()),
            )
        loss = (losses * weight).sum() / weight.sum().clamp(min=1e-8)
        if c.sft_weight and "_nll_w" in pol:
            loss = loss + c.sft_weight * pol["_nll_w"].mean()
        metrics["response_tokens"] = float(pol["_n_tokens"].mean())
        return loss, metrics


# --------------------------------------------------------------------------- reference cache


def cache_key(method: VLMDPO, ds, generator) -> str:
    c = method.cfg
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "pretrained": generator.cfg.pretrained,
                "revision": generator.cfg.revision,
                "dtype": generator.cfg.dtype,
                "loss_type": c.loss_type,
                "score": method.reduction,
                "dense_gamma": c.dense_gamma,
                "mdpo_crop": c.mdpo_crop,
                "source": ds.rowset.source,
                "max_length": generator.cfg.max_length,
                "padding": generator.cfg.padding_side,
                "rows": [r.name for r in ds.rows],
            },
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()[:16]


@torch.no_grad()
def precompute_reference(method: VLMDPO, ds, generator, path: Path, log=print) -> Path:
    """Reference scores of every item, computed once (adapters disabled) and saved to `path`."""
    path = Path(path)
    key = cache_key(method, ds, generator)
    meta = path / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        log(f"reference log-probs: using the cache in {path}")
        return path
    path.mkdir(parents=True, exist_ok=True)
    saved, ds.ref = ds.ref, None
    parts: dict[str, list[Tensor]] = {}
    bs = method.cfg.reference_batch_size
    with generator.reference():
        for i in range(0, len(ds), bs):
            items = [ds[j] for j in range(i, min(i + bs, len(ds)))]
            for k, v in method.scores(items, generator).items():
                if not k.startswith("_"):
                    parts.setdefault(k, []).append(v.detach().float().cpu())
    ds.ref = saved
    save_file({k: torch.cat(v).contiguous() for k, v in parts.items()}, str(path / "reference.safetensors"))
    meta.write_text(json.dumps({"key": key, "n": len(ds)}))
    log(f"reference log-probs: {len(ds)} items cached in {path}")
    return path


def load_reference(path: Path, key: str) -> dict[str, Tensor]:
    """The reference scores `precompute_reference` saved, if they were made for `key`."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    if meta.get("key") != key:
        raise ValueError(f"{path}: cached reference log-probs were made for other data or settings; delete it")
    return load_file(str(Path(path) / "reference.safetensors"))


@register_method("vlm_dpo", VLMDPOConfig)
def build_vlm_dpo(cfg: VLMDPOConfig) -> VLMDPO:
    """The VLM DPO family (DPO, cDPO, IPO, SimPO, ORPO, KTO, mDPO, POVID, RLHF-V dense, MM-DPO beta)."""
    return VLMDPO(cfg)
