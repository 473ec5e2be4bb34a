import math

import numpy as np
import pytest
import torch

from mmalign.methods.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig, diffusion_dpo_loss
from mmalign.pipelines.sd import LatentDiffusionGenerator, LoraSettings, SDGeneratorConfig


def reference_loss(pw, pl, rw, rl, beta):
    """Independent float64 implementation of the paper's formula."""
    out = []
    for a, b, c, d in zip(pw, pl, rw, rl):
        inside = -beta / 2.0 * ((a - b) - (c - d))
        out.append(math.log1p(math.exp(-inside)) if inside > -30 else -inside)  # -log sigmoid
    return np.array(out)


def test_loss_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (torch.rand(64, generator=g, dtype=torch.float64) * 0.2 for _ in range(4))
    for beta in (1.0, 100.0, 5000.0):
        losses, m = diffusion_dpo_loss(pw, pl, rw, rl, beta)
        want = reference_loss(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), beta)
        np.testing.assert_allclose(losses.numpy(), want, rtol=1e-10, atol=1e-12)
        inside = -beta / 2 * ((pw - pl) - (rw - rl))
        assert m["implicit_acc"].mean().item() == pytest.approx((inside > 0).double().mean().item())
        np.testing.assert_allclose(m["margin"].numpy(), inside.numpy(), rtol=1e-10)


def test_loss_hand_computed():
    # policy improves the winner by 0.002 relative to the reference: inside = -2500 * (-0.002) = 5
    losses, m = diffusion_dpo_loss(
        torch.tensor([0.100]), torch.tensor([0.2]), torch.tensor([0.102]), torch.tensor([0.2]), beta=5000.0
    )
    assert losses.item() == pytest.approx(math.log1p(math.exp(-5.0)), rel=1e-4)
    assert m["implicit_acc"].item() == 1.0
    # equal policy and reference: loss log 2
    losses, _ = diffusion_dpo_loss(*(torch.full((3,), 0.3),) * 4, beta=5000.0)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2.0)))


@pytest.fixture()
def gen(tiny_sd):
    torch.manual_seed(0)
    return LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd), lora=LoraSettings(rank=4, alpha=4)))


def _pair_batch(gen):
    g = torch.Generator().manual_seed(1)
    w = torch.rand(1, 3, 32, 32, generator=g)
    l = torch.rand(1, 3, 32, 32, generator=g)
    return {"prompts": ["a red circle"], "chosen": w, "rejected": l, "seeds": torch.tensor([7])}


def test_steps_increase_implicit_margin(gen):
    method = DiffusionDPO(DiffusionDPOConfig(beta=5000.0))
    batch = _pair_batch(gen)
    params = [p for p in gen.trainable().parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    margins = []
    for _ in range(6):
        loss, m = method.loss(batch, gen)
        margins.append(m["margin"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, m = method.loss(batch, gen)
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    assert m["margin"] > 0.1, margins + [m["margin"]]
    assert m["implicit_acc"] == 1.0


def test_swapping_chosen_and_rejected_flips_the_gradient(gen):
    method = DiffusionDPO(DiffusionDPOConfig(beta=5000.0))
    params = [p for p in gen.trainable().parameters() if p.requires_grad]
    # move off the identity first (at margin 0 the two gradients are exact negatives anyway)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 1e-2)
    batch = _pair_batch(gen)
    swapped = dict(batch, chosen=batch["rejected"], rejected=batch["chosen"])

    def grad(b):
        for p in params:
            p.grad = None
        loss, _ = method.loss(b, gen)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params])

    g1, g2 = grad(batch), grad(swapped)
    cos = torch.nn.functional.cosine_similarity(g1, g2, dim=0)
    assert cos < -0.99, cos
