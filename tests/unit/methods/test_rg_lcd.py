"""RG-LCD (mmalign/methods/rg_lcd.py) and LCM sampling in the sd adapter, on tiny models."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mmalign import checkpoint as ckpt
from mmalign.config import ConfigError, load_config
from mmalign.methods.rg_lcd import RGLCD, RGLCDConfig, boundary_scalings, consistency_output, lrm_loss
from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig, guidance_scale_embedding
from mmalign.trainer import Trainer, TrainingError
from mmalign.types import Samples
from tests.helpers import write_config


def _setup(tiny_sd, reward=None, **cfg):
    torch.manual_seed(0)
    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd), finetune="full"))
    m = RGLCD(RGLCDConfig(**cfg))
    m.setup(gen, reward)
    return gen, m


class Brightness:
    """A differentiable toy expert reward: sign * mean pixel value."""

    name, modality, differentiable = "brightness", "image", True

    def __init__(self, sign: float = 1.0):
        self.sign = sign

    def __call__(self, samples: Samples, prompts):
        return self.sign * samples.images.mean((1, 2, 3))


def test_guidance_embedding_is_diffusers_bit_for_bit():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 3.0, 7.25])
    for dim in (32, 255, 256):
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), want)


def test_boundary_condition():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    assert c_skip[1] == pytest.approx(0.25 / (190.0**2 + 0.25)) and c_out[1] == pytest.approx(
        190 / math.sqrt(190**2 + 0.25)
    )
    x = torch.randn(1, 4, 8, 8)
    f0 = consistency_output(torch.randn_like(x), x, torch.tensor([0]), torch.tensor([0.99]), "epsilon")
    assert torch.equal(f0, x)  # f(x, 0) = x whatever the model says


def _float64_lcd(tiny_sd, gen, m, batch):
    """Independent float64 computation of the LCD loss from the saved teacher, the student and
    the target, with the noise schedule recomputed from the scheduler's betas."""
    import copy

    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").double()
    student, target = copy.deepcopy(gen.unet).double(), copy.deepcopy(m.target).double()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    seeds = batch["seeds"].tolist()
    d = m.draws(seeds, batch["latents"].shape[1:], "cpu")
    k = m.cfg.skip
    assert set(d["t_start"].tolist()) <= {(i + 1) * k - 1 for i in range(1000 // k)}
    assert torch.equal(d["t_end"], (d["t_start"] - k).clamp(min=0))
    lo, hi = m.cfg.guidance_range
    assert ((d["scale"] >= lo) & (d["scale"] <= hi)).all()
    cond = gen.encode_prompt(batch["prompts"])["encoder_hidden_states"].double()
    uncond = gen.encode_prompt(batch["prompts"], negative=True)["encoder_hidden_states"].double()
    emb = guidance_scale_embedding(d["scale"] - 1, m.cfg.time_cond_proj_dim).double()
    col = lambda v: v.view(-1, 1, 1, 1)
    a, ap = col(abar[d["t_start"]]), col(abar[d["t_end"]])
    x0, noise, s = batch["latents"].double(), d["noise"].double(), col(d["scale"].double())

    def scal(t):
        st = 10.0 * t.double()
        return col(0.25 / (st**2 + 0.25)), col(st / (st**2 + 0.25).sqrt())

    with torch.no_grad():
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = student(xt, d["t_start"], encoder_hidden_states=cond, timestep_cond=emb).sample
        cs, co = scal(d["t_start"])
        f_student = cs * xt + co * (xt - (1 - a).sqrt() * eps) / a.sqrt()
        e_u = teacher(xt, d["t_start"], encoder_hidden_states=uncond).sample
        e_c = teacher(xt, d["t_start"], encoder_hidden_states=cond).sample
        e_s = e_u + s * (e_c - e_u)
        x_prev = ap.sqrt() * (xt - (1 - a).sqrt() * e_s) / a.sqrt() + (1 - ap).sqrt() * e_s
        e_t = target(x_prev, d["t_end"], encoder_hidden_states=cond, timestep_cond=emb).sample
        cs, co = scal(d["t_end"])
        f_target = cs * x_prev + co * (x_prev - (1 - ap).sqrt() * e_t) / ap.sqrt()
    c = m.cfg.huber_c
    loss = (((f_student - f_target) ** 2 + c * c).sqrt() - c).mean()
    return {"student": f_student, "target": f_target, "x_prev": x_prev, "loss": loss, "t_end": d["t_end"]}


def test_consistency_distillation_loss_matches_float64(tiny_sd):
    gen, m = _setup(tiny_sd, reward_weight=0.0, time_cond_proj_dim=32, guidance_range=[1.5, 7.0])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # student != teacher (guidance embedding included), target != student
        for p in gen.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for pt, ps in zip(m.target.parameters(), gen.unet.parameters()):
            pt.copy_(ps + torch.randn(ps.shape, generator=g) * 0.02)
    # seeds whose solver index is 0 (t_end = 0: the boundary) and three others
    n = m.draws(list(range(400)), (4, 8, 8), "cpu")["t_start"]
    seeds = [int((n == m.cfg.skip - 1).nonzero()[0])] + [s for s in range(3)]
    batch = {
        "prompts": ["a red circle", "two blue squares", "a green triangle", ""],
        "latents": torch.randn(4, 4, 8, 8, generator=g),
        "seeds": torch.tensor(seeds),
    }
    loss, metrics = m.loss(batch, gen)
    terms = m.distillation_terms(batch, gen)
    want = _float64_lcd(tiny_sd, gen, m, batch)
    for key in ("x_prev", "student", "target"):
        torch.testing.assert_close(terms[key].double(), want[key], rtol=1e-4, atol=2e-5)
    assert float(loss.detach()) == pytest.approx(float(want["loss"]), rel=1e-4)
    assert metrics["distill"] == pytest.approx(float(want["loss"]), rel=1e-4)
    assert want["t_end"][0] == 0 and torch.equal(terms["target"][0], terms["x_prev"][0])  # boundary: f(x, 0) = x
    assert float(want["loss"]) > 1e-3  # the check is not vacuous


def test_student_starts_as_the_teacher(tiny_sd):
    gen, m = _setup(tiny_sd, reward_weight=0.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 459])
    cond = gen.encode_prompt(["a red circle", "a blue square"])
    emb = guidance_scale_embedding(torch.tensor([3.0, 5.0]), m.cfg.time_cond_proj_dim)
    with torch.no_grad():
        s = gen.model_output(x, t, cond, timestep_cond=emb)
        with gen.reference():
            r = gen.model_output(x, t, cond)
    torch.testing.assert_close(s, r)


def test_lrm_loss_hand_computed():
    scores = torch.tensor([[1.0, 0.0, 2.0]])
    expert = torch.tensor([[0.3, 0.1, 0.2]])
    T = 0.1

    def kl(ri, rj, gi, gj):
        p = [math.exp(ri / T) / (math.exp(ri / T) + math.exp(rj / T))]
        p.append(1 - p[0])
        q = [math.exp(gi) / (math.exp(gi) + math.exp(gj))]
        q.append(1 - q[0])
        return sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))

    want = (kl(0.3, 0.1, 1.0, 0.0) + kl(0.3, 0.2, 1.0, 2.0) + kl(0.1, 0.2, 0.0, 2.0)) / 3
    loss, acc = lrm_loss(scores, expert, T)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(acc) == pytest.approx(2 / 3)  # (0,1) and (1,2) ordered as the expert orders them; (0,2) not
    ce, _ = lrm_loss(scores, expert, T, "cross_entropy")
    want_ce = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0)) + math.log(1 + math.exp(-2.0))) / 3
    assert float(ce) == pytest.approx(want_ce, rel=1e-6)
    # scores that already agree with the expert's (tempered) preference: zero loss
    exact = expert / T
    assert float(lrm_loss(exact, expert, T)[0]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="B,K"):
        lrm_loss(scores[0], expert[0], T)


@pytest.mark.parametrize("path", ["expert", "lrm"])
def test_reward_term_gradient_ascends_the_reward_and_flips_with_its_sign(tiny_sd, path):
    beta = 0.5
    gen, m = _setup(tiny_sd, reward=Brightness(1.0), reward_weight=beta, reward_path=path, time_cond_proj_dim=32)
    batch = {
        "prompts": ["a red circle", "two blue squares"],
        "latents": torch.randn(2, 4, 8, 8),
        "seeds": torch.tensor([5, 6]),
        "rewards": torch.zeros(2),
    }
    params = [p for p in gen.unet.parameters()]

    def grad_of(fn):
        for p in params:
            p.grad = None
        fn().backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    def flip():  # R -> -R
        if path == "expert":
            m.reward.sign *= -1
        else:
            with torch.no_grad():
                m.lrm.head[-1].weight.neg_()
                m.lrm.head[-1].bias.neg_()

    g_plus = grad_of(lambda: m.loss(batch, gen)[0])
    flip()
    g_minus = grad_of(lambda: m.loss(batch, gen)[0])
    flip()
    m.cfg.reward_weight = 0.0
    g_0 = grad_of(lambda: m.loss(batch, gen)[0])
    m.cfg.reward_weight = beta
    r_plus, r_minus = g_plus - g_0, g_minus - g_0
    assert r_plus.norm() > 1e-6
    torch.testing.assert_close(r_plus, -r_minus, rtol=1e-3, atol=1e-6)

    def reward_now():
        t = m.distillation_terms(batch, gen)
        return m.reward_of(t["student"], batch["prompts"], t["cond"], gen).mean()

    g_r = grad_of(reward_now)
    torch.testing.assert_close(r_plus, -beta * g_r, rtol=1e-3, atol=1e-6)  # the term is -beta * R
    before = float(reward_now().detach())
    with torch.no_grad():  # a small descent step on the reward term raises the reward
        off = 0
        for p in params:
            p.sub_(1e-2 / float(r_plus.norm()) * r_plus[off : off + p.numel()].view_as(p))
            off += p.numel()
    assert float(reward_now().detach()) > before


def test_saved_student_is_an_lcm_pipeline_that_samples_in_1_2_4_steps(tiny_sd, tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

    gen, m = _setup(tiny_sd, reward_weight=0.0, time_cond_proj_dim=32)
    with torch.no_grad():  # make the guidance embedding matter
        gen.unet.time_embedding.cond_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    out = gen.save_trained(tmp_path / "student")
    sd = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert isinstance(sd.scheduler, LCMScheduler)
    assert sd.scheduler.config.original_inference_steps == 1000 // m.cfg.skip
    assert sd.unet.config.time_cond_proj_dim == 32
    lcm = LatentConsistencyModelPipeline.from_pretrained(
        out, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    lcm.set_progress_bar_config(disable=True)
    student = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(out), finetune="none"))
    assert student.lcm_scheduler is not None
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    for steps in (1, 2, 4):
        ro = student.rollout(prompts, num_steps=steps, guidance_scale=4.0, eta=0.0, seeds=seeds, need_log_probs=False)
        assert ro.latents.shape == (2, steps + 1, 4, 8, 8) and ro.log_probs is None
        imgs = ro.samples.images
        assert imgs.shape == (2, 3, 32, 32) and 0 <= float(imgs.min()) and float(imgs.max()) <= 1
        gens = [torch.Generator().manual_seed(s * 7919 + 1) for s in seeds]
        want = lcm(
            prompts,
            num_inference_steps=steps,
            guidance_scale=4.0,
            latents=ro.latents[:, 0].clone(),
            generator=gens,
            output_type="latent",
        ).images
        torch.testing.assert_close(ro.latents[:, -1], want, rtol=1e-5, atol=1e-5)
    # one step is the consistency function at t=999 by hand
    ro = student.rollout(prompts, num_steps=1, guidance_scale=4.0, seeds=seeds, need_log_probs=False)
    x, t = ro.latents[:, 0], torch.tensor([999, 999])
    emb = guidance_scale_embedding(torch.tensor([3.0, 3.0]), 32)
    with torch.no_grad():
        eps = student.model_output(x, t, student.encode_prompt(prompts), timestep_cond=emb)
    a = float(student.train_scheduler.alphas_cumprod[999])
    cs, co = (0.25 / (9990.0**2 + 0.25), 9990.0 / math.sqrt(9990.0**2 + 0.25))
    torch.testing.assert_close(ro.latents[:, -1], cs * x + co * (x - math.sqrt(1 - a) * eps) / math.sqrt(a))
    low = student.rollout(prompts, num_steps=2, guidance_scale=2.0, seeds=seeds, need_log_probs=False)
    high = student.rollout(prompts, num_steps=2, guidance_scale=6.0, seeds=seeds, need_log_probs=False)
    assert not torch.allclose(low.latents[:, -1], high.latents[:, -1])  # the scale reaches the UNet
    with pytest.raises(ValueError, match="LCM sampling has no step log-probabilities"):
        student.rollout(prompts, num_steps=2)


def test_setup_rejects_bad_generators_and_missing_rewards(tiny_sd):
    lora = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd), finetune="lora"))
    with pytest.raises(ValueError, match="generator.finetune=full"):
        RGLCD(RGLCDConfig()).setup(lora, None)
    full = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd), finetune="full"))
    with pytest.raises(ValueError, match="needs a `reward:`"):
        RGLCD(RGLCDConfig(reward_weight=1.0)).setup(full, None)

    class Frozen(Brightness):
        differentiable = False

    with pytest.raises(ValueError, match="not differentiable"):
        RGLCD(RGLCDConfig(reward_path="expert")).setup(full, Frozen())
    with pytest.raises(ValueError, match="skip=300 must divide"):
        RGLCD(RGLCDConfig(skip=300, reward_weight=0.0)).setup(full, None)


RG = {
    "name": "rg_lcd",
    "skip": 100,
    "time_cond_proj_dim": 32,
    "reward_weight": 0.5,
    "lrm": {"width": 8, "warmup_steps": 1},
    "rollout": {
        "prompts_per_round": 2,
        "samples_per_prompt": 2,
        "num_steps": 3,
        "guidance_scale": 3.0,
        "steps_per_round": 2,
    },
}


def _rg_config(tmp_path, tiny_sd, tiny_clip, pairs_manifest, method=RG, **sections):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")
    base = {
        "generator": {"name": "sd", "pretrained": str(tiny_sd), "finetune": "full"},
        "method": method,
        "data": {"kind": "prompts", "prompts": str(prompts)},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2, "keep_last": 5},
        "eval": {"enabled": True, "prompts": ["a red circle"], "num_steps": 2, "guidance_scale": 3.0},
    }
    for k, v in sections.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, **base)


def test_trains_from_yaml_and_resumes_exactly(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    from diffusers import UNet2DConditionModel

    p = _rg_config(tmp_path, tiny_sd, tiny_clip, pairs_manifest)
    Trainer(load_config(p), run_dir=tmp_path / "full").fit()
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").state_dict()
    final = tmp_path / "full" / "final"
    index = json.loads((final / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    student = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not student["time_embedding.cond_proj.weight"].eq(0).all()  # the guidance embedding trained
    unchanged = [n for n, v in teacher.items() if torch.equal(v, student[n])]
    assert not unchanged, unchanged[:5]  # every weight moved away from the teacher
    logs = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in logs if "loss" in l]
    assert [l["step"] for l in steps] == [1, 2, 3, 4]
    assert all("distill" in l and "lrm_loss" in l and "reward" in l for l in steps)
    assert any("eval" in l for l in logs)  # the trainer evaluated the student (LCM sampling)
    # resume: 2 steps, stop, 2 more == 4 straight (student, target network, LRM and its optimizer)
    Trainer(load_config(p, ["train.steps=2"]), run_dir=tmp_path / "split").fit()
    Trainer(load_config(p), run_dir=tmp_path / "split", resume="latest").fit()
    for name in ("full", "split"):
        assert (ckpt.latest_checkpoint(tmp_path / name / "checkpoints") / "method.pt").is_file()
    a = load_file(str(tmp_path / "full/final/unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "split/final/unet/diffusion_pytorch_model.safetensors"))
    for n in a:
        assert torch.equal(a[n], b[n]), n
    ma = torch.load(ckpt.latest_checkpoint(tmp_path / "full/checkpoints") / "method.pt", weights_only=True)
    mb = torch.load(ckpt.latest_checkpoint(tmp_path / "split/checkpoints") / "method.pt", weights_only=True)
    for part in ("target", "lrm"):
        for n in ma[part]:
            assert torch.equal(ma[part][n], mb[part][n]), (part, n)
    # the saved student loads back through the `sd` adapter and samples with LCM
    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(final), finetune="none"))
    ro = gen.rollout(["a red circle"], num_steps=2, guidance_scale=3.0, need_log_probs=False)
    assert ro.extras["sampler"] == "lcm" and ro.samples.images.shape == (1, 3, 32, 32)


def test_no_reward_variant_needs_no_reward(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    p = _rg_config(
        tmp_path,
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        reward=None,
        train={"steps": 1, "checkpoint_every": 0},
        eval={"enabled": False},
    )
    summary = Trainer(load_config(p, ["method.reward_weight=0"]), run_dir=tmp_path / "run").fit()
    assert summary["steps"] == 1
    with pytest.raises((TrainingError, ValueError), match="reward"):
        Trainer(load_config(p), run_dir=tmp_path / "run2").fit()
    with pytest.raises(ConfigError, match="guidance_range"):
        load_config(p, ["method.reward_weight=0", "method.guidance_range=[0.5, 2.0]"])
