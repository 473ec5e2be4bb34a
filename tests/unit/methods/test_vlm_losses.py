"""The VLM-family losses of the preference layer against independent float64 formulas (math, not torch)."""

import math

import pytest
import torch

from mmalign.methods import preference as P


def lsig(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x


def sig(x):
    return 1 / (1 + math.exp(-x))


def _t(*n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*n, generator=g, dtype=torch.float64)


def _close(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (10.0, 1.4)])
def test_simpo_is_reference_free_and_length_normalised(beta, gamma):
    # summed log-probs and lengths -> the length averages SimPO uses
    sw, sl = -_t(16, seed=1).abs() * 20, -_t(16, seed=2).abs() * 20
    nw, nl = torch.randint(1, 30, (16,)).double(), torch.randint(1, 30, (16,)).double()
    want = [
        -lsig(beta / a_n * a - beta / b_n * b - gamma)
        for a, b, a_n, b_n in zip(sw.tolist(), sl.tolist(), nw.tolist(), nl.tolist())
    ]
    _close(P.simpo(sw / nw, sl / nl, beta, gamma), want)


def test_orpo_log_odds_and_total():
    aw, al = -_t(16, seed=3).abs() - 0.05, -_t(16, seed=4).abs() - 0.05  # mean token log-probs < 0
    lam = 0.1

    def lodds(a):
        p = math.exp(a)
        return math.log(p / (1 - p))

    l_or = [-lsig(lodds(a) - lodds(b)) for a, b in zip(aw.tolist(), al.tolist())]
    total, got_or = P.orpo(aw, al, lam)
    _close(got_or, l_or)
    _close(total, [-a + lam * o for a, o in zip(aw.tolist(), l_or)])


def test_kto_with_its_kl_baseline():
    lp, ref = _t(12, seed=5), _t(12, seed=6)
    klp, klr = _t(12, seed=7), _t(12, seed=8)
    lab = torch.tensor([True, False] * 6)
    beta, ld, lu = 0.7, 1.0, 1.33
    z0 = max(0.0, sum(a - b for a, b in zip(klp.tolist(), klr.tolist())) / 12)
    got_z0 = P.kto_kl_baseline(klp, klr)
    assert float(got_z0) == pytest.approx(z0, rel=1e-12, abs=1e-15)
    assert not got_z0.requires_grad
    want = [
        ld * (1 - sig(beta * ((a - b) - z0))) if d else lu * (1 - sig(beta * (z0 - (a - b))))
        for a, b, d in zip(lp.tolist(), ref.tolist(), lab.tolist())
    ]
    _close(P.kto(lp, ref, lab, got_z0, beta, ld, lu), want)
    # a negative mean KL clamps to zero
    assert float(P.kto_kl_baseline(klp - 10, klr)) == 0.0


def test_mdpo_three_terms():
    pw, pl, rw, rl, pc, rc = (_t(10, seed=s) for s in range(10, 16))
    beta, anchor = 0.3, 0.2
    got = P.mdpo(pw, pl, rw, rl, pc, rc, beta, anchor)
    z = list(zip(*(x.tolist() for x in (pw, pl, rw, rl, pc, rc))))
    dpo = [-lsig(beta * (a - c) - beta * (b - d)) for a, b, c, d, _, _ in z]
    copo = [-lsig(beta * (a - c) - beta * (e - f)) for a, _, c, _, e, f in z]
    anc = [-lsig(beta * (a - c) - anchor) for a, _, c, _, _, _ in z]
    _close(got["dpo"], dpo)
    _close(got["copo"], copo)
    _close(got["anchor"], anc)
    _close(got["loss"], [x + y + w for x, y, w in zip(dpo, copo, anc)])


def test_mmdpo_dynamic_beta_and_dpo_with_it():
    delta = _t(8, seed=20).abs() * 3
    beta, w, k = 0.1, 0.5, 0.8
    want = [beta * (1 + w * (1 - math.exp(-k * d))) for d in delta.tolist()]
    b = P.mmdpo_beta(beta, delta, w, k)
    _close(b, want)
    assert float(P.mmdpo_beta(beta, torch.zeros(1, dtype=torch.float64), w, k)) == pytest.approx(beta)
    pw, pl, rw, rl = (_t(8, seed=s) for s in range(21, 25))
    _close(
        P.dpo(pw, pl, rw, rl, b),
        [
            -lsig(bb * ((a - c) - (x - d)))
            for bb, a, x, c, d in zip(want, pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist())
        ],
    )


def test_rlhf_v_dense_score_and_weights():
    lp = -_t(3, 7, seed=30).abs()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]])
    changed = torch.tensor([[0, 0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0]]).bool()
    gamma = 5.0
    want = []
    for b in range(3):
        num = den = 0.0
        for j in range(7):
            if mask[b, j]:
                wgt = gamma if changed[b, j] else 1.0
                num += wgt * lp[b, j].item()
                den += wgt
        want.append(num / den)
    _close(P.dense_logp(lp, mask, changed, gamma), want)
    wts = P.dense_token_weights(mask, changed, gamma)
    assert wts[0].tolist() == [0, 0, 5, 1, 1, 5, 0]
    # gamma = 1 is the plain length average
    _close(
        P.dense_logp(lp, mask, changed, 1.0), [(lp[b] * mask[b]).sum().item() / mask[b].sum().item() for b in range(3)]
    )


def test_povid_two_part_objective():
    xs = [_t(9, seed=s) for s in range(40, 46)]
    pw, plt, pln, rw, rlt, rln = xs
    a, b1, b2 = 0.2, 0.1, 0.3
    want = [
        -lsig(a * (w - rw_) - (b1 * (t - rt) + b2 * (n - rn)))
        for w, t, n, rw_, rt, rn in zip(*(x.tolist() for x in xs))
    ]
    _close(P.povid(pw, plt, pln, rw, rlt, rln, a, b1, b2), want)
    # with beta2 = 0 and alpha = beta1 it is DPO
    _close(P.povid(pw, plt, pln, rw, rlt, rln, a, a, 0.0), P.dpo(pw, plt, rw, rlt, a).tolist())


def test_changed_mask_marks_only_the_differing_tokens():
    from mmalign.data.vlm import changed_mask

    a = torch.tensor([5, 6, 7, 8, 9])
    b = torch.tensor([5, 6, 1, 8, 9, 2])
    ca, cb = changed_mask(a, b)
    assert ca.tolist() == [False, False, True, False, False]
    assert cb.tolist() == [False, False, True, False, False, True]
