"""Distribution rewards (fad, vendi) and exemplar similarity (exemplar_clap): the formulas against
independent float64 computations (numpy / scipy.linalg.sqrtm), per-item contributions that sum
to the batch value, tiny CLAP offline, exemplar folders and expert sources, and `mmalign score`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from mmalign import registry, scoring
from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.media import load_audio, save_wav, tensor_to_pil
from mmalign.protocols import DistributionReward, Reward
from mmalign.rewards import fixtures as fx
from mmalign.rewards._distribution import gaussian
from mmalign.rewards.common import build_reward
from mmalign.rewards.exemplar import exemplar_similarity
from mmalign.rewards.fad import per_clip_distance, set_contributions
from mmalign.rewards.vendi import vendi_from_embeddings
from mmalign.toy.audio_world import render_audio
from mmalign.types import Samples

fx.register_test_rewards()

CAPS = ["one low beep", "two high beeps", "a low beep then a mid beep"]


def build(name: str, **args):
    return build_reward({"name": name, **args}, "reward")


def reference_fd(e: np.ndarray, r: np.ndarray) -> float:
    """The reference FAD formula: np.cov and scipy.linalg.sqrtm(sigma1 @ sigma2)."""
    m1, m2 = e.mean(0), r.mean(0)
    s1, s2 = np.cov(e, rowvar=False), np.cov(r, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def randn(*shape, seed=0, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


@pytest.fixture(scope="module")
def clap_args():
    return fx.tiny("clap")


@pytest.fixture(scope="module")
def clap(clap_args):
    return build("clap", **clap_args)


def rendered(caps, seed=0):
    return torch.stack([torch.from_numpy(render_audio(c, seed)[0])[None] for c in caps])  # B,1,T


# --------------------------------------------------------------------------- FAD formula


@pytest.mark.parametrize("b,n,d", [(12, 30, 6), (40, 50, 8), (3, 20, 6)])  # the last: rank-deficient S_b
def test_fad_matches_scipy_and_contributions_sum(b, n, d):
    e, r = randn(b, d, seed=1), randn(n, d, seed=2, scale=1.5, shift=0.3)
    mu_r, s_r = gaussian(r)
    fd, shares = set_contributions(e, mu_r, s_r)
    rtol = 1e-9 if b > d else 1e-6  # scipy's sqrtm is less accurate on a singular product
    assert float(fd) == pytest.approx(reference_fd(e.numpy(), r.numpy()), rel=rtol)
    assert float(shares.sum()) == pytest.approx(float(fd), rel=1e-12, abs=1e-12)
    if b > d:  # full rank: each share from the documented formula, in numpy
        E, R = e.numpy(), r.numpy()
        mb, mr = E.mean(0), R.mean(0)
        sb, sr = np.cov(E, rowvar=False), np.cov(R, rowvar=False)
        root = scipy.linalg.sqrtm(sr).real
        m = root @ sb @ root
        inv_sqrt = np.linalg.inv(scipy.linalg.sqrtm(m).real)
        v = E - mb
        want = (
            (E - mr) @ (mb - mr) / b
            + (v * v).sum(1) / (b - 1)
            + np.trace(sr) / b
            - 2 * np.einsum("id,de,ie->i", v @ root, inv_sqrt, v @ root) / (b - 1)
        )
        np.testing.assert_allclose(shares.numpy(), want, rtol=1e-7, atol=1e-9)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of the singular reference product
def test_fad_edge_cases():
    r = randn(20, 4, seed=3)
    mu_r, s_r = gaussian(r)
    fd, _ = set_contributions(r, mu_r, s_r)  # the exemplars themselves: distance 0
    assert abs(float(fd)) < 1e-9
    with pytest.raises(ValueError, match="at least 2 samples"):
        set_contributions(r[:1], mu_r, s_r)
    e = randn(5, 4, seed=4)
    d = per_clip_distance(e, mu_r, s_r)
    want = ((e.numpy() - r.numpy().mean(0)) ** 2).sum(1) + np.trace(np.cov(r.numpy(), rowvar=False))
    np.testing.assert_allclose(d.numpy(), want, rtol=1e-12)
    # a point mass is a Gaussian with zero covariance: the FD formula gives the same number
    for i in range(5):
        assert float(d[i]) == pytest.approx(reference_fd(np.repeat(e[i : i + 1].numpy(), 2, 0), r.numpy()), rel=1e-9)


# --------------------------------------------------------------------------- Vendi formula


def test_vendi_hand_computations():
    x = torch.tensor([[1.0, 0.0, 0.0]] * 4, dtype=torch.float64)
    vs, c = vendi_from_embeddings(x)
    assert float(vs) == pytest.approx(1.0) and torch.allclose(c, torch.full((4,), 0.25, dtype=torch.float64))
    vs, c = vendi_from_embeddings(torch.eye(5, dtype=torch.float64) * 3)  # orthogonal (norms irrelevant)
    assert float(vs) == pytest.approx(5.0) and torch.allclose(c, torch.ones(5, dtype=torch.float64))
    # two identical items and one orthogonal: K/3 has eigenvalues 2/3, 1/3, 0
    vs, c = vendi_from_embeddings(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    h = -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    assert float(vs) == pytest.approx(math.exp(h), rel=1e-12)
    # item shares of H: the pair splits the 2/3 eigenvalue's term, the third item has the 1/3 one
    hi = np.array([-(1 / 3) * math.log(2 / 3), -(1 / 3) * math.log(2 / 3), -(1 / 3) * math.log(1 / 3)])
    np.testing.assert_allclose(c.numpy(), math.exp(h) * hi / h, rtol=1e-10)
    assert float(c.sum()) == pytest.approx(float(vs), rel=1e-12)


def test_vendi_matches_numpy_on_random_embeddings():
    e = randn(9, 4, seed=5)
    x = e.numpy() / np.linalg.norm(e.numpy(), axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(x @ x.T / 9)
    lam = lam[lam > 1e-12]
    vs, c = vendi_from_embeddings(e)
    assert float(vs) == pytest.approx(float(np.exp(-(lam * np.log(lam)).sum())), rel=1e-10)
    assert float(c.sum()) == pytest.approx(float(vs), rel=1e-12) and (c >= 0).all()


# --------------------------------------------------------------------------- built rewards (tiny CLAP)


def test_fad_reward_with_tiny_clap_and_an_expert_source(clap, clap_args):
    fad = build(
        "fad",
        exemplars="toy:render_audio",
        exemplar_prompts=CAPS,
        exemplar_seeds=2,
        embedding=clap_args | {"name": "clap"},
    )
    assert isinstance(fad, DistributionReward) and isinstance(fad, Reward)
    assert fad.higher_is_better and fad.modality == "audio" and fad.num_exemplars == 6
    audio = rendered(CAPS + ["three mid beeps"], seed=7)
    score, contrib = fad.score_batch(Samples(audio=audio, sample_rate=16000), CAPS + ["x"])
    with torch.no_grad():
        emb = clap.audio_embeds(clap.prepare(Samples(audio=audio, sample_rate=16000))).double().numpy()
        ref = torch.cat(
            [clap.audio_embeds(clap.prepare(Samples(audio=rendered(CAPS, s), sample_rate=16000))) for s in (0, 1)]
        )
    # the exemplars are the prompts x seeds in prompt-major order; the Gaussian fit does not care
    assert float(score) == pytest.approx(-reference_fd(emb, ref.double().numpy()), rel=1e-5)
    assert float(contrib.sum()) == pytest.approx(float(score), rel=1e-9)
    per_sample = fad(Samples(audio=audio, sample_rate=16000), CAPS + ["x"])
    assert per_sample.shape == (4,) and float(per_sample.mean()) == pytest.approx(float(score), rel=1e-5)
    clip = build(
        "fad",
        exemplars="toy:render_audio",
        exemplar_prompts=CAPS,
        exemplar_seeds=2,
        variant="per_clip",
        embedding=clap_args | {"name": "clap"},
    )
    r = clip(Samples(audio=audio, sample_rate=16000), CAPS + ["x"])
    mr, sr = ref.double().numpy().mean(0), np.cov(ref.double().numpy(), rowvar=False)
    np.testing.assert_allclose(r.numpy(), -(((emb - mr) ** 2).sum(1) + np.trace(sr)), rtol=1e-5)
    s, c = clip.score_batch(Samples(audio=audio, sample_rate=16000), CAPS + ["x"])
    assert float(s) == pytest.approx(float(r.double().mean()), rel=1e-5) and float(c.sum()) == pytest.approx(float(s))


def test_exemplar_folder_equals_its_files_and_bad_folders_are_one_line(tmp_path, clap, clap_args):
    d = tmp_path / "ex"
    (d / "sub").mkdir(parents=True)
    for i, cap in enumerate(CAPS):
        save_wav(d / ("sub" if i else "") / f"{i}.wav", torch.from_numpy(render_audio(cap, 0)[0])[None], 16000)
    (d / "notes.txt").write_text("not audio")
    emb = {"name": "clap"} | clap_args
    fad = build("fad", exemplars=str(d), embedding=emb)
    assert fad.num_exemplars == 3
    waves = [load_audio(p)[0] for p in sorted(d.rglob("*.wav"))]
    with torch.no_grad():
        ref = clap.audio_embeds(clap.prepare(Samples(audio=torch.stack(waves), sample_rate=16000))).double()
    mu, cov = gaussian(ref)
    torch.testing.assert_close(fad.mu_r, mu) and torch.testing.assert_close(fad.s_r, cov)

    with pytest.raises(ConfigError, match=r"^reward\.exemplars: folder .*missing not found"):
        build("fad", exemplars=str(tmp_path / "missing"), embedding=emb)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^exemplars: no audio files in .*empty \(looked for"):
        build("fad", exemplars=str(tmp_path / "empty"), embedding=emb)
    with pytest.raises(ConfigError, match="needs exemplar_prompts"):
        build("fad", exemplars="toy:render_audio", embedding=emb)
    with pytest.raises(ConfigError, match="unknown expert source 'toy:nope'"):
        build("fad", exemplars="toy:nope", exemplar_prompts=CAPS, embedding=emb)
    with pytest.raises(ConfigError, match="embedding.name: reward 'jpeg_compressibility' has no encoder"):
        build("vendi", embedding={"name": "jpeg_compressibility"})
    with pytest.raises(ConfigError, match="variant"):
        build("fad", exemplars=str(d), embedding=emb, variant="sets")


def test_vendi_reward_on_audio_and_images(clap, clap_args):
    v = build("vendi", embedding={"name": "clap"} | clap_args)
    audio = rendered(CAPS + CAPS[:1], seed=3)
    vs, c = v.score_batch(Samples(audio=audio, sample_rate=16000), CAPS + CAPS[:1])
    with torch.no_grad():
        emb = clap.audio_embeds(clap.prepare(Samples(audio=audio, sample_rate=16000)))
    want_vs, want_c = vendi_from_embeddings(emb)
    assert float(vs) == pytest.approx(float(want_vs), rel=1e-5) and float(c.sum()) == pytest.approx(float(vs))
    torch.testing.assert_close(c, want_c, rtol=1e-4, atol=1e-6)
    # per prompt: the mean of each prompt group's Vendi score
    pp = build("vendi", embedding={"name": "clap"} | clap_args, per_prompt=True)
    prompts = ["a", "a", "b", "b"]
    vs2, c2 = pp.score_batch(Samples(audio=audio, sample_rate=16000), prompts)
    want = 0.5 * (vendi_from_embeddings(emb[:2])[0] + vendi_from_embeddings(emb[2:])[0])
    assert float(vs2) == pytest.approx(float(want), rel=1e-5) and float(c2.sum()) == pytest.approx(float(vs2))
    # images, through any reward with embed_images (the test reward's: normalised pixels)
    vi = build("vendi", embedding={"name": "test_mean_pixel"})
    imgs = torch.zeros(3, 3, 4, 4)
    imgs[0, 0], imgs[1, 1], imgs[2, 2] = 1.0, 1.0, 1.0  # three orthogonal pixel vectors
    vs3, _ = vi.score_batch(Samples(images=imgs), ["a"] * 3)
    assert vi.modality == "image" and float(vs3) == pytest.approx(3.0)
    with pytest.raises(TypeError, match="scores audio samples, but got image"):
        v.score_batch(Samples(images=imgs), ["a"] * 3)


def test_vendi_on_clip_image_embeddings():
    args = fx.tiny("clip_hf")
    v = build("vendi", embedding={"name": "clip_hf", **args})
    clip = build("clip_hf", **args)
    imgs = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vs, c = v.score_batch(Samples(images=imgs), ["a"] * 5)
    with torch.no_grad():
        want_vs, want_c = vendi_from_embeddings(clip.embed_images(imgs))
    assert v.modality == "image" and 1.0 <= float(vs) <= 5.0
    assert float(vs) == pytest.approx(float(want_vs), rel=1e-5) and float(c.sum()) == pytest.approx(float(vs))
    torch.testing.assert_close(c, want_c, rtol=1e-4, atol=1e-6)


def test_exemplar_clap_text_and_audio_exemplars(clap, clap_args):
    texts = ["a cat", "a dog barking"]
    r = build("exemplar_clap", embedding={"name": "clap"} | clap_args, exemplar_texts=texts)
    audio = rendered(CAPS, seed=1)
    s = r(Samples(audio=audio, sample_rate=16000), CAPS)
    with torch.no_grad():
        a = clap.audio_embeds(clap.prepare(Samples(audio=audio, sample_rate=16000))).double()
        t = clap.text_embeds(texts).double()
    centroid = F.normalize(t.mean(0), dim=-1)
    torch.testing.assert_close(s.double(), a @ centroid, rtol=1e-5, atol=1e-6)
    mx = build("exemplar_clap", embedding={"name": "clap"} | clap_args, exemplar_texts=texts, reduce="max", scale=2.0)
    torch.testing.assert_close(
        mx(Samples(audio=audio, sample_rate=16000), CAPS).double(), 2 * (a @ t.T).max(1).values, rtol=1e-5, atol=1e-6
    )
    # audio exemplars from the expert source: a clip identical to an exemplar has similarity 1 under max
    au = build(
        "exemplar_clap",
        embedding={"name": "clap"} | clap_args,
        exemplars="toy:render_audio",
        exemplar_prompts=CAPS,
        reduce="max",
    )
    got = au(Samples(audio=rendered(CAPS, seed=0), sample_rate=16000), CAPS)
    torch.testing.assert_close(got, torch.ones(3), rtol=1e-5, atol=1e-5)
    an = F.normalize(a, dim=-1)
    assert float(exemplar_similarity(a, a, "mean")[0]) == pytest.approx(float((an[0] @ an.T).mean()), rel=1e-12)
    with pytest.raises(ConfigError, match="exemplar_texts"):
        build("exemplar_clap", embedding={"name": "clap"} | clap_args)


# --------------------------------------------------------------------------- mmalign score


def test_score_cli_prints_the_set_value_and_writes_contributions(tmp_path, capsys, clap_args):
    paths = []
    for i, cap in enumerate(CAPS + ["three low beeps"]):
        p = tmp_path / "gen" / f"{i}.wav"
        p.parent.mkdir(exist_ok=True)
        save_wav(p, torch.from_numpy(render_audio(cap, 11)[0])[None], 16000)
        paths.append(p)
    cfg = tmp_path / "fad.yaml"
    cfg.write_text(
        json.dumps(
            {
                "name": "fad",
                "exemplars": "toy:render_audio",
                "exemplar_prompts": CAPS,
                "exemplar_seeds": 2,
                "embedding": {"name": "clap", **clap_args},
            }
        )
    )
    out = tmp_path / "contrib.jsonl"
    assert main(["score", "--config", str(cfg), "--out", str(out), "--batch-size", "3", *map(str, paths)]) == 0
    printed = capsys.readouterr().out
    assert "value" in printed and "higher_is_better" in printed and "contributions" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    value, contrib = scoring.score_distribution(
        build_reward(json.loads(cfg.read_text())), [(str(p), "") for p in paths], batch_size=3
    )
    np.testing.assert_allclose([r["contribution"] for r in rows], contrib, rtol=1e-6, atol=1e-12)
    assert sum(contrib) == pytest.approx(value, rel=1e-9, abs=1e-15)
    assert f"{value:.4f}" in printed
    # the folder itself: its audio files, in path order
    assert main(["score", "--config", str(cfg), "--out", str(out), "--batch-size", "3", str(tmp_path / "gen")]) == 0
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [str(p) for p in paths]
    (tmp_path / "none").mkdir()
    capsys.readouterr()
    assert main(["score", "--config", str(cfg), str(tmp_path / "none")]) == 2
    assert "none: no audio files in this folder" in capsys.readouterr().err
    # a bad exemplar folder through the CLI: one line, exit 2
    capsys.readouterr()
    assert main(["score", "--reward", "fad", "--reward-args", f"exemplars={tmp_path / 'nope'}", *map(str, paths)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: reward.exemplars: folder") and "\n" not in err


def test_list_marks_distribution_rewards(capsys):
    registry.load_builtins()
    assert {"fad", "vendi", "exemplar_clap"} <= set(registry.REWARDS)
    assert main(["score", "--list"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["fad"][1] == "batch" and lines["vendi"][1] == "batch" and lines["exemplar_clap"][1] == "sample"
    assert lines["clap"][1] == "sample"


def test_image_exemplar_folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        x = torch.zeros(3, 4, 4)
        x[i] = 1.0
        tensor_to_pil(x).save(d / f"{i}.png")
    fad = build("fad", exemplars=str(d), embedding={"name": "test_mean_pixel"})
    assert fad.modality == "image" and fad.num_exemplars == 3
    score, contrib = fad.score_batch(Samples(images=torch.rand(4, 3, 4, 4)), ["a"] * 4)
    assert float(score) < 0 and float(contrib.sum()) == pytest.approx(float(score))


@pytest.mark.parametrize("variant", ["set", "per_clip"])
def test_dragon_credits_an_off_distribution_clip_least(variant):
    from mmalign.methods.dragon import item_credits

    low = ["one low beep", "two low beeps", "three low beeps"]
    fad = build(
        "fad",
        variant=variant,
        exemplars="toy:render_audio",
        exemplar_prompts=low,
        exemplar_seeds=4,
        embedding={"name": "toy_audio_gold"},
    )
    caps = [*low, "two high beeps", "one low beep"]
    samples = Samples(
        audio=torch.stack([torch.from_numpy(render_audio(c, 50 + i)[0])[None] for i, c in enumerate(caps)]),
        sample_rate=16000,
    )
    credits, value = item_credits(fad, samples, caps)
    assert int(credits.argmin()) == 3  # the high beeps are furthest from the low-beep exemplars
    assert float(credits.double().sum()) == pytest.approx(float(value), rel=1e-5)
