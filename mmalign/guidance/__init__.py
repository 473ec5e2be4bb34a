"""Inference-time alignment: samplers that steer a generator by rewards without training.

    dynamic_cfg_sample     per-step, per-sample CFG scale chosen by evaluators (Papalampidi et al.)
    reward_guided_sample   reward-gradient (universal) guidance on the predicted clean sample
    best_of_n_sample       N samples per prompt, keep the best by a reward
    beam_search_sample     per-step beam search / rejection sampling by a reward

They need a few sampling hooks from the generator (see common.py); `mmalign sample
--guidance ...` runs them from the command line.
"""

from .common import Evaluator, parse_weight, weight_at
from .dynamic_cfg import dynamic_cfg_sample
from .reward_guidance import guide_prediction, reward_guided_sample
from .search import beam_search_sample, best_of_n_sample

__all__ = [
    "Evaluator",
    "parse_weight",
    "weight_at",
    "dynamic_cfg_sample",
    "reward_guided_sample",
    "guide_prediction",
    "best_of_n_sample",
    "beam_search_sample",
]
