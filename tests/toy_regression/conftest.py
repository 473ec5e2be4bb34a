"""The slow suite's split between .ci/run's two pytest-xdist workers (`--dist loadgroup`).

Each test is pinned to a group by name; the groups hold about equal CPU time (one thread per
worker) and keep the tests of one base model together, so that a worker computes that model's
held-out evaluation once (tests/toy_regression/test_toy_alignment.py caches it per process).
A new slow test must be added to one of the groups (collection fails otherwise).
"""

import pytest

CI_GROUPS = {
    # the toy flow model, and D3PO (the longest UNet run) to even the halves
    "flow_and_d3po": [
        "test_shipped_sd3_toy_is_imperfect_on_purpose",
        "test_flow_grpo_raises_heldout_proxy_and_keeps_gold",
        "test_shipped_method_raises_heldout_gold[flow_dpo.yaml]",
        "test_shipped_method_raises_heldout_gold[diffusion_nft_variant.yaml]",
        "test_shipped_method_raises_heldout_gold[d3po.yaml]",
        "test_shipped_audio_toy_is_imperfect_on_purpose",
    ],
    # the toy UNet model's other methods, and the toy VLM
    "unet_and_vlm": [
        "test_shipped_base_model_is_imperfect_on_purpose",
        "test_demo_runs_end_to_end_and_raises_heldout_gold",
        "test_shipped_method_raises_heldout_gold[grpo.yaml]",
        "test_shipped_method_raises_heldout_gold[raft.yaml]",
        "test_shipped_method_raises_heldout_gold[online_dpo.yaml]",
        "test_shipped_method_raises_heldout_gold[diffusion_dro_final_sample.yaml]",
        "test_reward_backprop_raises_heldout_gold",
        "test_dpo_on_the_toy_config_lowers_heldout_hallucination",
        "test_kill_9_at_random_moments_resumes_bitwise[offline]",
        "test_kill_9_at_random_moments_resumes_bitwise[online]",
    ],
}
_GROUP_OF = {name: group for group, names in CI_GROUPS.items() for name in names}


@pytest.hookimpl(trylast=True)  # after xdist's own hook, so that ours has the last word on the node ids
def pytest_collection_modifyitems(config, items):
    loadgroup = getattr(config.option, "loadgroup", False)  # set on the xdist workers of --dist loadgroup
    for item in items:
        if item.get_closest_marker("slow") is None:
            continue
        if item.name not in _GROUP_OF:
            raise pytest.UsageError(f"slow test {item.nodeid} is in no CI group (tests/toy_regression/conftest.py)")
        item.add_marker(pytest.mark.xdist_group(_GROUP_OF[item.name]))
        if loadgroup:
            _pin_to_group(item, _GROUP_OF[item.name])


def _pin_to_group(item, group: str) -> None:
    """xdist's loadgroup scheduler groups tests by an `@group` suffix of their node ids, which its
    worker hook writes to `item._nodeid`; pytest 9.2 keeps a node's id in `item._id` instead, so
    that write no longer takes effect (and a mark added by a conftest comes after xdist's hook
    anyway). Write the suffix where this pytest reads it."""
    if item.nodeid.endswith(f"@{group}"):
        return
    try:
        from _pytest.nodeid import coerce_node_id  # pytest >= 9.2
    except ImportError:
        item._nodeid = f"{item.nodeid}@{group}"
    else:
        item._id = coerce_node_id(f"{item.nodeid}@{group}")
