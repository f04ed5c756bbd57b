"""Checks shared by the rollout tests (tests/core/test_rollout.py, test_rollout_groups.py)."""

import pytest
from torch import Tensor


def _assert_sampled_within_top_k_and_top_p(
    step_logp: Tensor, completion_ids: Tensor, completion_mask: Tensor, top_k: int, top_p: float
) -> None:
    """Every completion token (padding after a row's end skipped) is one of the top_k most likely at its
    step, and in the nucleus top_p of that top-k renormalised (HF's order: top-k, then top-p): the mass
    of the strictly more likely tokens is below top_p. 1e-4 of slack for ties and float noise.
    step_logp (N, T, V): the full forward's log_softmax(logits / temperature) at each completion step."""
    chosen = step_logp.gather(-1, completion_ids.unsqueeze(-1))  # (N, T, 1)
    above = step_logp > chosen + 1e-4  # (N, T, V): strictly more likely than the sampled token
    valid = completion_mask.bool()  # (N, T)
    assert valid.any()
    ranks = above.sum(-1)[valid]  # tokens ranked before each sampled one
    assert ranks.max() < top_k, f"a sampled token ranked {int(ranks.max())} (0-based), not in the top {top_k}"
    probs = step_logp.exp()  # (N, T, V)
    top_k_mass = probs.topk(top_k, dim=-1).values.sum(-1)  # (N, T)
    mass_above = ((probs * above).sum(-1) / top_k_mass)[valid]  # inside the top-k, renormalised
    assert mass_above.max() < top_p + 1e-4, f"a sampled token lies outside the {top_p} nucleus"


@pytest.fixture
def assert_sampled_within_top_k_and_top_p():
    return _assert_sampled_within_top_k_and_top_p
