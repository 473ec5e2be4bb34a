"""The preference layer against independent float64 formulas (math, not torch)."""

import itertools
import math

import pytest
import torch

from mmalign.methods import preference as P
from mmalign.methods.diffusion_dpo import diffusion_dpo_loss


def lsig(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4)]


def _deltas(pw, pl, rw, rl):
    return [(a - c) - (b - d) for a, b, c, d in zip(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist())]


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_pairwise_losses(beta):
    pw, pl, rw, rl = _data()
    deltas = _deltas(pw, pl, rw, rl)
    eps = 0.2
    want = {
        "dpo": [-lsig(beta * d) for d in deltas],
        "cdpo": [-(1 - eps) * lsig(beta * d) - eps * lsig(-beta * d) for d in deltas],
        "robust_dpo": [(-(1 - eps) * lsig(beta * d) + eps * lsig(-beta * d)) / (1 - 2 * eps) for d in deltas],
        "ipo": [(d - 1 / (2 * beta)) ** 2 for d in deltas],
        "hinge": [max(0.0, 1 - beta * d) for d in deltas],
    }
    for name, w in want.items():
        got = P.pairwise(name, pw, pl, rw, rl, beta, eps)
        torch.testing.assert_close(got, torch.tensor(w, dtype=torch.float64), rtol=1e-10, atol=1e-12, msg=name)


def test_rank_is_plackett_luce_and_reduces_to_dpo():
    g = torch.Generator().manual_seed(1)
    sp, sr = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    beta = 0.7
    got = P.rank(sp, sr, beta)
    for b in range(5):
        r = [beta * (x - y) for x, y in zip(sp[b].tolist(), sr[b].tolist())]
        nll = -sum(r[k] - math.log(sum(math.exp(v) for v in r[k:])) for k in range(3))
        assert got[b].item() == pytest.approx(nll, rel=1e-10)
    # PL likelihoods of all K! orders sum to one
    orders = list(itertools.permutations(range(4)))
    total = sum(math.exp(-P.rank(sp[:1, list(o)], sr[:1, list(o)], beta).item()) for o in orders)
    assert total == pytest.approx(1.0, rel=1e-9)
    pw, pl, rw, rl = _data(8)
    torch.testing.assert_close(
        P.rank(torch.stack([pw, pl], 1), torch.stack([rw, rl], 1), 1.3), P.dpo(pw, pl, rw, rl, 1.3)
    )


def test_diffusion_dpo_is_dpo_on_negative_errors():
    ew, el, rw, rl = (x.abs() for x in _data())
    losses, _ = diffusion_dpo_loss(ew, el, rw, rl, beta=5000.0)
    torch.testing.assert_close(losses, P.dpo(-ew, -el, -rw, -rl, beta=2500.0))


def test_signs_prefer_the_winner():
    z = torch.zeros(1)
    up = torch.ones(1)
    for name in P.LOSSES:  # raising the winner's score lowers every loss
        lo = P.pairwise(name, up * 0.1, z, z, z, 1.0, 0.1)
        hi = P.pairwise(name, -up * 0.1, z, z, z, 1.0, 0.1)
        assert lo.item() < hi.item(), name
    with pytest.raises(ValueError, match="unknown loss_type"):
        P.pairwise("dpoo", z, z, z, z, 1.0)


@pytest.mark.parametrize("name", sorted(P.LOSSES))
def test_swapping_winner_and_loser_flips_the_gradient_and_a_tie_has_none(name):
    g = torch.Generator().manual_seed(3)
    pw, pl = (torch.randn(8, generator=g, dtype=torch.float64) * 0.01 for _ in range(2))
    rw, rl = pw.clone(), pl.clone()  # policy == reference: every loss sits at its starting point

    def grads(w, l):
        w, l = w.clone().requires_grad_(True), l.clone().requires_grad_(True)
        P.pairwise(name, w, l, rw, rl, 1.5, 0.1).sum().backward()
        return w.grad, l.grad

    gw, gl = grads(pw, pl)
    assert (gw < 0).all() and (gl > 0).all(), name  # descent raises the winner's score, lowers the loser's
    rw, rl = pl.clone(), pw.clone()
    sw, sl = grads(pl, pw)  # the same pair with the roles swapped
    torch.testing.assert_close(sw, -gl, rtol=1e-12, atol=0)
    torch.testing.assert_close(sl, -gw, rtol=1e-12, atol=0)
    tie = pw.clone().requires_grad_(True)  # one sample on both sides (a tie): no gradient at all
    P.pairwise(name, tie, tie, rw, rw, 1.5, 0.1).sum().backward()
    assert torch.count_nonzero(tie.grad) == 0, name
