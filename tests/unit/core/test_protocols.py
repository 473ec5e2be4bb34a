"""Each shipped generator, method and reward plays exactly the roles of mmalign.protocols it should,
and the trainer and guidance refuse a component that lacks a role with one clear line."""

import pytest
import torch

from mmalign import protocols as P
from mmalign import registry
from mmalign.config import ConfigError, load_config
from mmalign.rewards import fixtures as fx
from mmalign.testing import make_tiny_llava, make_tiny_sd3
from mmalign.trainer import Trainer, TrainingError
from mmalign.types import Samples
from tests.helpers import write_config

GENERATOR_ROLES = (P.Generator, P.DiffusionGenerator, P.GuidableGenerator, P.TokenGenerator)
METHOD_ROLES = (
    P.OnlineMethod,
    P.SetupMethod,
    P.AfterStepMethod,
    P.StatefulMethod,
    P.OwnDataMethod,
    P.RewardOptionalMethod,
)
REWARD_ROLES = (P.Reward, P.PairwiseJudge, P.OrderedPairwiseJudge, P.DistributionReward, P.MovesToDevice)


def roles(obj, candidates) -> set[str]:
    return {r.__name__ for r in candidates if isinstance(obj, r)}


@pytest.fixture(scope="module")
def sd_gen(tiny_sd):
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    return LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("models") / "llava")


@pytest.fixture(scope="module")
def vlm_gen(tiny_llava):
    from mmalign.pipelines.vlm import VLMGenerator, VLMGeneratorConfig

    return VLMGenerator(VLMGeneratorConfig(pretrained=str(tiny_llava)))


# --------------------------------------------------------------------------- generators
def test_sd_generator_is_a_diffusion_and_guidable_generator(sd_gen):
    assert roles(sd_gen, GENERATOR_ROLES) == {"Generator", "DiffusionGenerator", "GuidableGenerator"}


def test_flow_generator_is_a_diffusion_and_guidable_generator(tmp_path):
    from mmalign.pipelines.flow import FlowGeneratorConfig, FlowMatchingGenerator

    gen = FlowMatchingGenerator(FlowGeneratorConfig(pretrained=str(make_tiny_sd3(tmp_path / "sd3"))))
    assert roles(gen, GENERATOR_ROLES) == {"Generator", "DiffusionGenerator", "GuidableGenerator"}


def test_vlm_generator_is_a_token_generator_only(vlm_gen):
    assert roles(vlm_gen, GENERATOR_ROLES) == {"Generator", "TokenGenerator"}
    # a hook it cannot do is not declared (rather than raising NotImplementedError)
    assert not hasattr(vlm_gen, "step_log_prob") and not hasattr(vlm_gen, "denoise_error")


# --------------------------------------------------------------------------- methods
EXPECTED_METHOD_ROLES = {
    "diffusion_dpo": set(),
    "vlm_dpo": {"OwnDataMethod"},
    "grpo": {"OnlineMethod"},
    "raft": {"OnlineMethod"},
    "online_dpo": {"OnlineMethod", "StatefulMethod"},
    "diffusion_nft": {"OnlineMethod", "StatefulMethod"},
    "diffusion_dro": {"OnlineMethod", "RewardOptionalMethod"},
    "d3po": {"OnlineMethod", "SetupMethod", "RewardOptionalMethod"},
    "rg_lcd": {"OnlineMethod", "SetupMethod", "AfterStepMethod", "StatefulMethod", "RewardOptionalMethod"},
}


REQUIRED_ARGS = {"diffusion_dro": {"experts": "unused.jsonl"}}  # (not validated: nothing is read)


@pytest.mark.parametrize("name", sorted(EXPECTED_METHOD_ROLES))
def test_each_method_plays_exactly_its_roles(name):
    entry = registry.lookup("method", name)
    method = entry.build(entry.config(**REQUIRED_ARGS.get(name, {})))
    assert isinstance(method, P.Method)
    assert roles(method, METHOD_ROLES) == EXPECTED_METHOD_ROLES[name]
    want = P.TokenGenerator if name == "vlm_dpo" else P.DiffusionGenerator
    assert method.generator_role is want


# --------------------------------------------------------------------------- rewards
def test_per_sample_rewards_and_judges(tiny_clip):
    from mmalign.rewards.common import build_reward

    clip = build_reward({"name": "clip", "model": f"local-dir:{tiny_clip}"}, "reward")
    assert roles(clip, REWARD_ROLES) == {"Reward", "MovesToDevice"}
    fx.register_test_rewards()
    plain = build_reward({"name": "test_mean_pixel"}, "reward")
    assert roles(plain, REWARD_ROLES) == {"Reward"}
    judge = build_reward({"name": "vlm_judge", "model": fx.tiny("llava")["model"]}, "reward")
    assert roles(judge, REWARD_ROLES) == {"Reward", "PairwiseJudge", "OrderedPairwiseJudge"}


def test_distribution_reward_contract():
    class MeanDistance:
        """A batch-level stub: distance of the batch's mean pixel from 0.5; contributions leave-one-out."""

        name, modality, higher_is_better = "mean_distance", "image", False

        def score_batch(self, samples, prompts):
            m = samples.images.flatten(1).mean(1)
            score = (m.mean() - 0.5).abs()
            loo = torch.stack([(torch.cat([m[:i], m[i + 1 :]]).mean() - 0.5).abs() for i in range(len(m))])
            return score, score - loo

    r = MeanDistance()
    assert roles(r, REWARD_ROLES) == {"DistributionReward"}  # not a per-sample reward
    score, contrib = r.score_batch(Samples(images=torch.rand(4, 3, 8, 8)), ["x"] * 4)
    assert score.ndim == 0 and contrib.shape == (4,)


# --------------------------------------------------------------------------- clear errors
def test_trainer_refuses_a_generator_without_the_methods_role(tmp_path, tiny_llava, tiny_clip, pairs_manifest):
    p = write_config(
        tmp_path / "c.yaml",
        tiny_llava,
        tiny_clip,
        pairs_manifest,
        generator={"name": "vlm", "pretrained": str(tiny_llava)},
    )
    with pytest.raises(TrainingError) as e:
        Trainer(load_config(p), run_dir=tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith(
        "method 'diffusion_dpo' needs a diffusion generator; generator 'vlm' (VLMGenerator) is not one (it lacks "
    )
    assert "denoise_error" in msg and "\n" not in msg


def test_guidance_refuses_a_generator_that_is_not_guidable(vlm_gen):
    from mmalign.guidance import best_of_n_sample, dynamic_cfg_sample

    def latent_score(x0, prompts):
        return x0.flatten(1).mean(1)

    with pytest.raises(
        ConfigError,
        match=r"^dynamic CFG needs a guidable generator; generator VLMGenerator is "
        r"not one \(it lacks .*cfg_outputs",
    ):
        dynamic_cfg_sample(vlm_gen, ["a"], latent_score, candidates=[1.0, 2.0], num_steps=2)
    with pytest.raises(TypeError):  # a RoleError is also a TypeError
        dynamic_cfg_sample(vlm_gen, ["a"], latent_score, candidates=[1.0, 2.0], num_steps=2)
    with pytest.raises(ConfigError, match="^best-of-N needs a diffusion generator; generator VLMGenerator is not one"):
        best_of_n_sample(vlm_gen, ["a"], latent_score, n=2, num_steps=2)


def test_require_names_the_missing_members():
    class HalfGuidable:
        prediction_type = "epsilon"

        def decode(self, latents):
            return Samples(images=latents)

    with pytest.raises(P.RoleError) as e:
        P.require(HalfGuidable(), P.GuidableGenerator, "beam search")
    assert str(e.value) == (
        "beam search needs a guidable generator; HalfGuidable is not one (it lacks alpha_sigma, "
        "cfg_outputs, encode_prompt, initial_latents, predicted_x0, sampler_step, "
        "sampling_timesteps, step_noise)"
    )
