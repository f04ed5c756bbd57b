"""core/algos.py against hand-computed values and plain-loop references (verl's definitions)."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core import algos

# ---------------------------------------------------------------- group advantages, hand values


@pytest.mark.parametrize(
    ("scale", "baseline", "expected"),
    [
        # group [1, 0, 0, 1]: mean 0.5, Bessel std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.866025
        ("group", "mean", [0.866025, -0.866025, -0.866025, 0.866025]),
        # batch std of [1,0,0,1,2,2,2,2] = sqrt(5.5 / 7) = 0.886405 -> +-0.5 / 0.886405
        ("batch", "mean", [0.564076, -0.564076, -0.564076, 0.564076]),
        ("none", "mean", [0.5, -0.5, -0.5, 0.5]),
        # leave-one-out: r=1 -> 1 - 1/3, r=0 -> 0 - 2/3
        ("none", "leave_one_out", [2 / 3, -2 / 3, -2 / 3, 2 / 3]),
    ],
)
def test_group_advantages_hand_values(scale, baseline, expected):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = algos.group_advantages(rewards, 4, scale=scale, baseline=baseline, eps=0.0)
    # second group has zero spread: exactly 0 whatever the scale
    torch.testing.assert_close(adv, torch.tensor(expected + [0.0] * 4), atol=1e-6, rtol=0)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_zero_spread_is_exactly_zero_despite_float_noise():
    # the mean of three 0.1s is not exactly 0.1 in float32; the advantage must still be exactly 0
    rewards = torch.tensor([0.1, 0.1, 0.1])
    assert torch.equal(algos.group_advantages(rewards, 3), torch.zeros(3))


def test_group_of_one_gets_zero():
    rewards = torch.tensor([3.0, -1.0, 7.0])
    for scale in algos.ADVANTAGE_SCALES:
        assert torch.equal(algos.group_advantages(rewards, 1, scale=scale), torch.zeros(3))


def test_group_advantages_matches_verl_loop():
    """verl `compute_grpo_outcome_advantage`: (score - mean) / (std + eps), torch.std unbiased."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(6 * 5, generator=gen)
    expected = []
    for g in range(6):
        group = rewards[g * 5 : (g + 1) * 5].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        expected += [(r - mean) / (std + 1e-6) for r in group]
    torch.testing.assert_close(algos.group_advantages(rewards, 5, eps=1e-6), torch.tensor(expected))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rewards=torch.ones(5), group_size=2), "do not split into groups of 2"),
        (dict(rewards=torch.ones(4), group_size=0), "group_size must be >= 1"),
        (dict(rewards=torch.tensor([1.0, float("nan")]), group_size=2), "NaN"),
        (dict(rewards=torch.ones(2, 2), group_size=2), r"shape \(N,\)"),
        (dict(rewards=torch.ones(4), group_size=2, scale="max"), "valid: group, batch, none"),
        (dict(rewards=torch.ones(4), group_size=2, baseline="median"), "valid: mean, leave_one_out"),
    ],
)
def test_group_advantages_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        algos.group_advantages(**kwargs)


# ---------------------------------------------------------------- multi-reward


def test_sum_then_normalize_hand_values():
    components = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    weights = torch.tensor([1.0, 0.5])
    # totals [1, .5, 1.5, 0]; each group of 2 normalizes to +-1/sqrt(2)
    adv = algos.MULTI_REWARD.get("sum_then_normalize")(components, weights, 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1, -1, 1, -1]) / math.sqrt(2))


def test_normalize_then_sum_matches_trl_definition():
    """TRL `multi_objective_aggregation="normalize_then_sum"`: per-component group z-score (eps 1e-4),
    weighted sum, then batch z-score. Binary rewards keep the group means exact."""
    gen = torch.Generator().manual_seed(1)
    components = torch.randint(0, 2, (4 * 6, 3), generator=gen).float()
    weights = torch.tensor([1.0, 0.5, 2.0])
    grouped = components.view(-1, 6, 3)
    per = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    summed = (per.view(-1, 3) * weights).sum(1)
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    adv = algos.normalize_then_sum(components, weights, 6, eps=1e-4)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)


def test_normalize_then_sum_keeps_zero_spread_groups_at_zero():
    components = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    adv = algos.normalize_then_sum(components, torch.tensor([1.0, 1.0]), 2)
    assert torch.equal(adv[2:], torch.zeros(2))


def test_normalize_then_sum_gives_cancelling_components_exactly_zero():
    """c0 = [0, 0.1], c1 = [0.3, 0]: z-scores of equal size and opposite sign but for eps, so their sum
    is float residue (1e-5), which the batch std divided back up to +-0.64; the other group keeps its
    signal."""
    components = torch.tensor([[0.0, 0.1], [0.3, 0.0], [1.0, 0.0], [0.0, 0.0]])
    adv = algos.normalize_then_sum(components, torch.tensor([1.0, 1.0]), 2)
    assert torch.equal(adv[:2], torch.zeros(2))
    assert adv[2].item() == pytest.approx(-adv[3].item()) and adv[2].item() > 1
    # a small weight's real spread is signal, whatever the other weights: the tolerance is each row's own
    varied = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])  # c0 constant, c1 spreads
    spread = varied[:, 1] - varied[:, 1].mean()  # (4,)
    for weights in ([1.0, 1e-6], [2e5, 1.0]):  # a weight sum of ~1 or 2e5: both had zeroed the group
        adv = algos.normalize_then_sum(varied, torch.tensor(weights), 4)
        torch.testing.assert_close(adv / adv.norm(), spread / spread.norm())


def test_normalize_then_sum_cancels_under_a_negative_weight():
    """c0 = [0, 0.1] and c1 = [0, 0.3] have the same z-scores, so weights [1, -1] cancel them: the group
    gets exactly 0. The tolerance is taken over |weight|: signed, it is ~0 and the residue survives."""
    components = torch.tensor([[0.0, 0.0], [0.1, 0.3], [1.0, 0.0], [0.0, 0.0]])
    adv = algos.normalize_then_sum(components, torch.tensor([1.0, -1.0]), 2)
    assert torch.equal(adv[:2], torch.zeros(2))
    # the other group: [0.707, -0.707] over a batch std of sqrt(1/3) -> +-sqrt(1.5)
    torch.testing.assert_close(adv[2:], torch.tensor([1.0, -1.0]) * math.sqrt(1.5))


def test_normalize_then_sum_a_row_at_the_group_mean_keeps_its_group():
    """Only a group whose every row cancels is zeroed: the middle of [0, 1, 2] has advantage 0, and its
    neighbours keep theirs."""
    adv = algos.normalize_then_sum(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([1.0]), 3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]))


def test_multi_reward_registry_and_shapes():
    with pytest.raises(ValueError, match="valid: normalize_then_sum, sum_then_normalize"):
        algos.MULTI_REWARD.get("average")
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        algos.sum_then_normalize(torch.ones(4, 2), torch.ones(3), 2)


# ---------------------------------------------------------------- aggregation modes


def test_aggregation_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    agg = algos.AGGREGATIONS.get
    assert agg("token-mean")(loss, mask).item() == pytest.approx(7 / 3)
    assert agg("seq-mean-token-mean")(loss, mask).item() == pytest.approx(2.75)
    assert agg("seq-mean-token-sum")(loss, mask).item() == pytest.approx(3.5)
    assert agg("seq-mean-token-sum-norm")(loss, mask, max_length=3).item() == pytest.approx(7 / 6)
    with pytest.raises(ValueError, match="needs max_length"):
        agg("seq-mean-token-sum-norm")(loss, mask)
    with pytest.raises(ValueError, match="valid: seq-mean-token-mean, seq-mean-token-sum"):
        agg("sum")


def _verl_agg_loop(loss, mask, mode, max_length):
    """verl `agg_loss`, written as plain Python loops (the norm mode divided by N as in TRL's dr_grpo)."""
    rows = [
        [(value, m) for value, m in zip(row, mrow, strict=True)]
        for row, mrow in zip(loss.tolist(), mask.tolist(), strict=True)
    ]
    if mode == "token-mean":
        return sum(v * m for row in rows for v, m in row) / max(sum(m for row in rows for _, m in row), 1)
    seq = []
    for row in rows:
        token_sum = sum(v * m for v, m in row)
        count = sum(m for _, m in row)
        if mode == "seq-mean-token-mean":
            seq.append(token_sum / max(count, 1))
        elif mode == "seq-mean-token-sum":
            seq.append(token_sum)
        else:
            seq.append(token_sum / max_length)
    return sum(seq) / len(seq)


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_aggregation_matches_plain_loop(mode):
    gen = torch.Generator().manual_seed(2)
    loss = torch.randn(5, 7, generator=gen)
    mask = (torch.rand(5, 7, generator=gen) > 0.3).float()
    mask[3] = 0  # an all-masked completion
    got = algos.AGGREGATIONS.get(mode)(loss, mask, max_length=7).item()
    assert got == pytest.approx(_verl_agg_loop(loss, mask, mode, 7), abs=1e-6)


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_micro_batches_add_up_to_the_full_batch(mode):
    """With the global counts passed in, micro-batch losses sum to the full-batch loss (grad accumulation)."""
    gen = torch.Generator().manual_seed(3)
    loss = torch.randn(6, 4, generator=gen)
    mask = (torch.rand(6, 4, generator=gen) > 0.4).float()
    agg = algos.AGGREGATIONS.get(mode)
    full = agg(loss, mask, max_length=4)
    totals = dict(total_tokens=mask.sum(), total_seqs=6, max_length=4)
    parts = agg(loss[:2], mask[:2], **totals) + agg(loss[2:], mask[2:], **totals)
    torch.testing.assert_close(parts, full)


# ---------------------------------------------------------------- policy loss, hand values


def _one_token(logp, old_logp, adv, **kwargs):
    loss, metrics = algos.policy_loss(
        torch.tensor([[logp]]), torch.tensor([[old_logp]]), torch.tensor([adv]), torch.ones(1, 1), **kwargs
    )
    return loss.item(), metrics


def test_clipped_surrogate_hand_values():
    # ratio 1.5, A = +1: clipped at 1.2
    assert _one_token(math.log(1.5), 0.0, 1.0)[0] == pytest.approx(-1.2)
    # clip-higher: eps_high 0.28
    assert _one_token(math.log(1.5), 0.0, 1.0, eps_high=0.28)[0] == pytest.approx(-1.28)
    # ratio 0.5, A = -1: -min(-0.5, -0.8) = 0.8
    assert _one_token(math.log(0.5), 0.0, -1.0)[0] == pytest.approx(0.8)
    # ratio 5, A = -1: unclipped loss 5; dual clip c = 3 bounds it at 3
    assert _one_token(math.log(5.0), 0.0, -1.0)[0] == pytest.approx(5.0)
    assert _one_token(math.log(5.0), 0.0, -1.0, dual_clip=3.0)[0] == pytest.approx(3.0)
    # dual clip only bounds A < 0: with A = +1 it keeps the ordinary values, not min(., -c * A) = -3
    assert _one_token(math.log(1.5), 0.0, 1.0, dual_clip=3.0)[0] == pytest.approx(-1.2)
    assert _one_token(math.log(0.5), 0.0, 1.0, dual_clip=3.0)[0] == pytest.approx(-0.5)
    # ratio 0.9 inside the clip range: -0.9 * 2
    loss, metrics = _one_token(math.log(0.9), 0.0, 2.0)
    assert loss == pytest.approx(-1.8)
    assert metrics["clip/frac"].item() == 0.0


def test_clip_metrics_count_the_right_tokens():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.5]]))
    _, metrics = algos.policy_loss(logp, torch.zeros(1, 4), torch.tensor([1.0]), torch.ones(1, 4))
    # A > 0: only the 1.5 ratios are clipped (high); 0.5 with A > 0 is not a clipped token
    assert metrics["clip/high_frac"].item() == pytest.approx(0.5)
    assert metrics["clip/low_frac"].item() == 0.0
    assert metrics["ratio/max"].item() == pytest.approx(1.5)
    assert metrics["ratio/min"].item() == pytest.approx(0.5)
    # no valid token: each extreme is its reduction's identity, not a ratio of 1 that could win a max or min
    _, empty = algos.policy_loss(logp, torch.zeros(1, 4), torch.tensor([1.0]), torch.zeros(1, 4))
    assert empty["ratio/max"].item() == -math.inf and empty["ratio/min"].item() == math.inf


def test_policy_loss_metrics_hand_values():
    """Metrics over valid tokens only: the padded position (ratio 1 there) is left out of ratio/mean;
    clip/frac counts a token clipped on either side; pg_loss is the policy term without the KL term."""
    logp = torch.log(torch.tensor([[1.5, 1.0, 1.0], [0.5, 4.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss, metrics = algos.policy_loss(
        logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask, aggregation="token-mean",
        ref_logp=torch.zeros(2, 3), beta=0.5, kl_estimator="k1",
    )  # fmt: skip
    # valid ratios [1.5, 1, 0.5, 4] -> mean 1.75 (9 / 6 = 1.5 with the two padded 1s counted)
    assert metrics["ratio/mean"].item() == pytest.approx(1.75)
    # 1.5 with A > 0 is clipped high, 0.5 with A < 0 clipped low: 2 of 4 valid tokens
    assert metrics["clip/high_frac"].item() == pytest.approx(0.25)
    assert metrics["clip/low_frac"].item() == pytest.approx(0.25)
    assert metrics["clip/frac"].item() == pytest.approx(0.5)
    # per token: -1.2, -1, +0.8, +4 -> token mean 0.65; k1 = logp: log(1.5 * 0.5 * 4) / 4 = log(3) / 4
    assert metrics["pg_loss"].item() == pytest.approx(0.65)
    assert metrics["kl"].item() == pytest.approx(math.log(3) / 4)
    assert loss.item() == pytest.approx(0.65 + 0.5 * math.log(3) / 4)


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [("k1", -math.log(2)), ("k2", 0.5 * math.log(2) ** 2), ("k3", 2 - math.log(2) - 1)],
)
def test_kl_estimators_hand_values(estimator, expected):
    # logp = 0, ref = log 2; on-policy ratio 1 and A = 0, so the loss is beta * KL
    loss, metrics = algos.policy_loss(
        torch.zeros(1, 1),
        None,
        torch.zeros(1),
        torch.ones(1, 1),
        ref_logp=torch.tensor([[math.log(2)]]),
        beta=0.5,
        kl_estimator=estimator,
    )
    assert metrics["kl"].item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(0.5 * expected)


def test_sequence_level_ratio_hand_values():
    # token log-ratios [log 2, 0] -> sequence ratio sqrt(2) = 1.414 > 1.2: clipped on both tokens
    logp = torch.tensor([[math.log(2), 0.0]])
    loss, metrics = algos.policy_loss(
        logp, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), ratio_level="sequence"
    )
    assert loss.item() == pytest.approx(-1.2)
    assert metrics["ratio/mean"].item() == pytest.approx(math.sqrt(2))


def test_token_and_importance_weights_scale_the_policy_term():
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = algos.policy_loss(
        logp,
        None,
        torch.ones(1),
        torch.ones(1, 3),
        aggregation="token-mean",
        token_weights=torch.tensor([[2.0, 1.0, 0.0]]),
        importance_weights=torch.tensor([[0.5, 1.0, 1.0]]),
    )
    loss.backward()
    # d/dlogp of -(rho * A * w) / 3 at rho = 1
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0, 0.0]]) / 3)


def test_all_masked_completions_give_zero_loss_and_gradient():
    logp = torch.randn(3, 4, requires_grad=True)
    for aggregation in algos.AGGREGATIONS.names():
        loss, metrics = algos.policy_loss(
            logp,
            logp.detach() - 0.1,
            torch.tensor([1.0, -1.0, 2.0]),
            torch.zeros(3, 4),
            aggregation=aggregation,
            max_length=4,
            ref_logp=torch.zeros(3, 4),
            beta=0.1,
        )
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros(3, 4))
        assert metrics["kl"].item() == 0.0


def test_a_masked_completion_gets_no_gradient():
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    loss, _ = algos.policy_loss(logp, None, torch.tensor([1.0, 1.0]), mask)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.equal(grad[1], torch.zeros(3))
    assert (grad[0] != 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mask=torch.ones(2, 4)), "shape mismatch"),
        (dict(advantages=torch.ones(3)), r"advantages must have shape \(2,\)"),
        (dict(beta=0.1), "needs ref_logp"),
        (dict(eps_low=1.2), "eps_low"),
        (dict(dual_clip=0.5), "dual_clip must be > 1"),
        (dict(ratio_level="batch"), "valid: token, sequence"),
        (dict(aggregation="mean"), "unknown loss aggregation 'mean'"),
        (dict(kl_estimator="k4"), "valid: k1, k2, k3"),
    ],
)
def test_policy_loss_bad_input(kwargs, message):
    args = (
        dict(logp=torch.zeros(2, 3), old_logp=None, advantages=torch.ones(2), mask=torch.ones(2, 3)) | kwargs
    )
    with pytest.raises(ValueError, match=message):
        algos.policy_loss(**args)


# ---------------------------------------------------------------- GTPO


def test_gtpo_token_weights_hand_values():
    ids = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 6, 7]])
    adv = torch.tensor([1.0, -1.0, 0.0])
    weights = algos.gtpo_token_weights(ids, torch.ones(3, 3), adv, group_size=3)
    # token 6 at position 1 is shared with a zero-advantage completion only: no conflict
    expected = torch.tensor([[2.0, 1.0, 2.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.equal(weights, expected)
    # a padded position neither counts as a conflict partner nor gets a weight
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    weights = algos.gtpo_token_weights(ids, mask, adv, group_size=3)
    assert torch.equal(weights, torch.tensor([[2.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))


def test_gtpo_conflict_tokens_do_not_depend_on_the_weights():
    ids = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 6, 7]])
    adv = torch.tensor([1.0, -1.0, 0.0])
    conflict = algos.gtpo_conflict_tokens(ids, torch.ones(3, 3), adv, group_size=3)
    expected = torch.tensor([[True, False, True], [True, False, True], [False, False, False]])
    assert torch.equal(conflict, expected)
    # weights of 1 / 1 leave every token at 1, while the conflicts stay what they are
    same = algos.gtpo_token_weights(
        ids, torch.ones(3, 3), adv, 3, conflict_positive=1.0, conflict_negative=1.0
    )
    assert torch.equal(same, torch.ones(3, 3))


def _gtpo_weights_loop(ids, mask, adv, group_size):
    n, t = len(ids), len(ids[0])
    out = [[0.0] * t for _ in range(n)]
    for i in range(n):
        group = range(i // group_size * group_size, (i // group_size + 1) * group_size)
        for p in range(t):
            if not mask[i][p]:
                continue
            partners = [j for j in group if j != i and mask[j][p] and ids[j][p] == ids[i][p]]
            if adv[i] > 0 and any(adv[j] < 0 for j in partners):
                out[i][p] = 2.0
            elif adv[i] < 0 and any(adv[j] > 0 for j in partners):
                out[i][p] = 0.0
            else:
                out[i][p] = 1.0
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), group_size=st.integers(1, 4), groups=st.integers(1, 3), length=st.integers(1, 5))
def test_gtpo_weights_are_0_1_2_exactly_where_defined(data, group_size, groups, length):
    n = group_size * groups
    ids = data.draw(
        st.lists(st.lists(st.integers(0, 2), min_size=length, max_size=length), min_size=n, max_size=n)
    )
    mask = data.draw(
        st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=n, max_size=n)
    )
    adv = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0]), min_size=n, max_size=n))
    weights = algos.gtpo_token_weights(
        torch.tensor(ids), torch.tensor(mask).float(), torch.tensor(adv), group_size
    )
    assert weights.tolist() == _gtpo_weights_loop(ids, mask, adv, group_size)
    assert set(weights.unique().tolist()) <= {0.0, 1.0, 2.0}


def test_gtpo_entropy_advantages_hand_values():
    adv = torch.tensor([1.0, -1.0, 0.5])
    entropy = torch.tensor([0.1, 0.8, 0.3])  # 0.8 > ln 2: dropped
    torch.testing.assert_close(algos.gtpo_entropy_advantages(adv, entropy), torch.tensor([0.99, 0.0, 0.47]))
    # only a completion *above* max_entropy is dropped: one exactly at it keeps A - gamma * H
    at_bound = algos.gtpo_entropy_advantages(
        torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.625]), max_entropy=0.5
    )
    torch.testing.assert_close(at_bound, torch.tensor([0.95, 0.0]))


# ---------------------------------------------------------------- EGPO


def test_egpo_hand_values():
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5])
    entropy = torch.tensor([0.3, 5.0, 1.0, 0.1])
    # bounds |A| / 2 = [.5, .5, 0, .25] -> clipped H [.3, .5, 0, .1] -> bonus 0.4 * that
    torch.testing.assert_close(algos.egpo_advantages(adv, entropy), torch.tensor([1.12, -0.8, 0.0, 0.54]))
    with pytest.raises(ValueError, match="lam < alpha"):
        algos.egpo_advantages(adv, entropy, lam=2.0, alpha=2.0)


# No subnormals: scaling -1e-45 by any factor below 1 underflows to 0, which is float32, not the method.
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    adv=st.lists(finite, min_size=1, max_size=16),
    data=st.data(),
    lam=st.floats(0.0, 0.99),
    alpha=st.floats(1.0, 10.0),
)
def test_egpo_bonus_never_flips_a_sign(adv, data, lam, alpha):
    entropy = data.draw(
        st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=len(adv), max_size=len(adv))
    )
    a = torch.tensor(adv)
    out = algos.egpo_advantages(a, torch.tensor(entropy), lam=lam, alpha=alpha)
    assert torch.equal(torch.sign(out), torch.sign(a))


# ---------------------------------------------------------------- importance weights and KD reward


def test_truncated_importance_weights_hand_values():
    target = torch.log(torch.tensor([[2.0, 8.0, 1.0, 3.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, ess = algos.truncated_importance_weights(target, torch.zeros(1, 4), mask, cap=5.0)
    assert torch.allclose(weights, torch.tensor([[2.0, 5.0, 1.0, 0.0]]))
    # (2 + 5 + 1)^2 / (3 * (4 + 25 + 1))
    assert ess.item() == pytest.approx(64 / 90)
    uniform, ess_uniform = algos.truncated_importance_weights(
        torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), 3
    )
    assert ess_uniform.item() == pytest.approx(1.0)
    # padding holding -inf or NaN (a vocabulary mask) weighs 0 and leaves the ESS as it was
    padded = target.clone()
    padded[0, 3] = -math.inf
    weights, ess = algos.truncated_importance_weights(
        padded, torch.tensor([[0.0, 0, 0, math.nan]]), mask, 5.0
    )
    assert torch.equal(weights, torch.tensor([[2.0, 5.0, 1.0, 0.0]])) and ess.item() == pytest.approx(64 / 90)


def test_weights_that_are_not_finite_on_padding_leave_the_loss_finite():
    logp = torch.zeros(1, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    nan_on_padding = torch.tensor([[2.0, 1.0, math.nan]])
    loss, _ = algos.policy_loss(
        logp, None, torch.ones(1), mask, aggregation="token-mean",
        token_weights=nan_on_padding, importance_weights=nan_on_padding,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(-(4.0 + 1.0) / 2)
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -0.5, 0.0]]))


def test_importance_weights_carry_no_gradient():
    target = torch.zeros(1, 2, requires_grad=True)
    weights, _ = algos.truncated_importance_weights(target, torch.zeros(1, 2), torch.ones(1, 2), cap=2.0)
    assert not weights.requires_grad


def test_kd_reward_hand_values():
    teacher = torch.tensor([[-1.0, -2.0, -9.0]])
    student = torch.tensor([[-2.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert algos.kd_reward(teacher, student, mask, alpha=0.5).tolist() == [0.25]


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_whatever_padding_holds_the_loss_and_gradients_are_those_of_zeros(aggregation, ratio_level):
    """-inf on a padded position (a vocabulary mask's) made the loss NaN through inf * 0 in a masked sum."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    finite = torch.randn(2, 3, generator=g) - 2.0
    advantages = torch.tensor([1.0, -0.5])
    results = []
    for pad in (0.0, -math.inf, math.nan):
        logp = finite.clone()
        logp[0, 2] = pad
        logp.requires_grad_(True)
        old, ref = finite + 0.1, finite - 0.2
        old[0, 2], ref[0, 2] = pad, pad
        loss, metrics = algos.policy_loss(
            logp, old, advantages, mask, ratio_level=ratio_level, aggregation=aggregation, max_length=3,
            ref_logp=ref, beta=0.04,
        )  # fmt: skip
        loss.backward()
        results.append((loss.detach(), logp.grad, metrics["kl"]))
    for loss, grad, kl in results[1:]:
        assert (
            torch.equal(loss, results[0][0])
            and torch.equal(grad, results[0][1])
            and torch.equal(kl, results[0][2])
        )
    assert torch.isfinite(results[0][0]) and results[0][1][0, 2] == 0.0


# ---------------------------------------------------------------- planted-bug guards


def test_masked_mean_ignores_what_masked_positions_hold_and_is_zero_with_none_kept():
    x = torch.tensor([[1.0, 3.0, math.inf], [math.nan, -math.inf, 5.0], [math.nan, math.inf, -math.inf]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert algos.masked_mean(x, mask, dim=-1).tolist() == [2.0, 5.0, 0.0]
    assert algos.masked_mean(x, mask).item() == pytest.approx(3.0)
    assert algos.masked_mean(x, torch.zeros(3, 3)).item() == 0.0


def test_group_advantages_default_eps_is_1e_6():
    """The default eps barely moves a small but real spread: [0, 1e-4] -> +-5e-5 / (std + 1e-6)."""
    adv = algos.group_advantages(torch.tensor([0.0, 1e-4]), 2)
    std = 1e-4 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([-5e-5, 5e-5]) / (std + 1e-6), rtol=1e-4, atol=0.0)


def test_normalize_then_sum_of_one_completion_is_zero_not_nan():
    adv = algos.normalize_then_sum(torch.tensor([[0.3, 2.0]]), torch.tensor([1.0, 1.0]), 1)
    assert adv.tolist() == [0.0]


def test_normalize_then_sum_keeps_a_small_genuine_imbalance():
    """Components that nearly cancel (weights 1 and 0.99) are not zeroed as float residue: their small sum
    is normalized by its batch std like any other."""
    components = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    adv = algos.normalize_then_sum(components, torch.tensor([1.0, 0.99]), 2)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]) / math.sqrt(2), rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("aggregate", [algos.sum_then_normalize, algos.normalize_then_sum])
def test_multi_reward_refuses_weights_that_are_not_one_per_component(aggregate):
    with pytest.raises(ValueError, match=r"weights \(K,\); got \(4, 2\) and \(2, 1\)"):
        aggregate(torch.ones(4, 2), torch.ones(2, 1), 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(eps_low=1.0), "need 0 <= eps_low < 1"),
        (dict(eps_low=-0.1), "need 0 <= eps_low < 1"),
        (dict(eps_high=-0.5), "eps_high >= 0"),
        (dict(dual_clip=1.0), "dual_clip must be > 1"),
        (dict(beta=-0.5, ref_logp=torch.zeros(2, 3)), "beta must be >= 0"),
        (dict(aggregation="seq-mean-token-sum-norm", max_length=0), "needs max_length >= 1"),
    ],
)
def test_policy_loss_refuses_settings_just_past_their_bounds(kwargs, message):
    args = dict(logp=torch.zeros(2, 3), old_logp=None, advantages=torch.ones(2), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=message):
        algos.policy_loss(**(args | kwargs))


def test_policy_loss_accepts_the_edges_of_its_bounds():
    """eps_low 0, eps_high 0 and beta 0 are allowed: a ratio of exactly 1 is then the only unclipped one."""
    loss, metrics = algos.policy_loss(
        torch.zeros(1, 2), None, torch.tensor([-1.0]), torch.ones(1, 2), eps_low=0.0, eps_high=0.0, beta=0.0
    )
    assert loss.item() == 1.0 and metrics["clip/frac"].item() == 0.0


def test_sequence_level_clip_fractions_leave_out_fully_masked_completions():
    logp = torch.tensor([[math.log(2), 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    _, metrics = algos.policy_loss(
        logp, torch.zeros(2, 2), torch.ones(2), mask, ratio_level="sequence"
    )  # fmt: skip
    assert metrics["clip/high_frac"].item() == 1.0 and metrics["clip/frac"].item() == 1.0


def test_clip_metrics_count_no_token_of_zero_advantage():
    """A ratio outside the clip range with A = 0 is not clipped on either side (its term is 0 anyway)."""
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    _, metrics = algos.policy_loss(logp, torch.zeros(2, 2), torch.tensor([0.0, 1.0]), torch.ones(2, 2))
    assert metrics["clip/high_frac"].item() == 0.25 and metrics["clip/low_frac"].item() == 0.0


def test_ratio_extremes_are_over_valid_tokens_only():
    """A padded position has ratio 1; it wins neither the max of ratios all below 1 nor the min of ratios
    all above 1."""
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    below = torch.log(torch.tensor([[0.5, 0.8, 1.0]]))
    _, metrics = algos.policy_loss(below, torch.zeros(1, 3), torch.ones(1), mask)
    assert metrics["ratio/max"].item() == pytest.approx(0.8) and metrics["ratio/min"].item() == pytest.approx(
        0.5
    )
    above = torch.log(torch.tensor([[1.5, 1.1, 1.0]]))
    _, metrics = algos.policy_loss(above, torch.zeros(1, 3), torch.ones(1), mask)
    assert metrics["ratio/max"].item() == pytest.approx(1.5) and metrics["ratio/min"].item() == pytest.approx(
        1.1
    )


def test_gtpo_a_padded_position_is_never_a_conflict_token():
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    conflict = algos.gtpo_conflict_tokens(ids, mask, torch.tensor([1.0, -1.0]), group_size=2)
    assert conflict.tolist() == [[True, True, False], [True, True, False]]


def test_gtpo_entropy_bound_defaults_to_ln_2():
    """ln 2 = 0.6931: a completion at 0.695 is dropped, one at 0.69 keeps A - 0.1 H."""
    out = algos.gtpo_entropy_advantages(torch.tensor([1.0, 1.0]), torch.tensor([0.69, 0.695]))
    torch.testing.assert_close(out, torch.tensor([0.931, 0.0]))


@pytest.mark.parametrize("shape_advantages", [algos.gtpo_entropy_advantages, algos.egpo_advantages])
def test_entropy_terms_of_the_advantages_carry_no_gradient(shape_advantages):
    entropy = torch.tensor([0.1, 0.3], requires_grad=True)
    assert not shape_advantages(torch.tensor([1.0, -1.0]), entropy).requires_grad


def test_truncated_importance_weights_refuse_a_zero_cap_and_give_an_empty_batch_full_ess():
    with pytest.raises(ValueError, match="cap must be > 0, got 0"):
        algos.truncated_importance_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), cap=0.0)
    weights, ess = algos.truncated_importance_weights(
        torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), cap=2.0
    )
    assert weights.tolist() == [[0.0, 0.0]] and ess.item() == 1.0


def test_kd_reward_carries_no_gradient():
    student = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    reward = algos.kd_reward(teacher, student, torch.ones(1, 2), alpha=1.0)
    assert not reward.requires_grad and reward.tolist() == [0.75]


def test_gtpo_refuses_advantages_that_are_not_one_per_completion():
    """Two advantages for four completions would broadcast against the groups without a word."""
    with pytest.raises(ValueError, match=r"advantages must have shape \(4,\)"):
        algos.gtpo_conflict_tokens(torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3), torch.ones(2), 2)


def test_sum_then_normalize_uses_the_baseline_it_is_given():
    adv = algos.sum_then_normalize(
        torch.tensor([[1.0], [0.0], [0.0], [1.0]]), torch.ones(1), 4, scale="none", baseline="leave_one_out"
    )
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


def test_pg_loss_metric_uses_the_whole_batch_counts():
    """A micro-batch's pg_loss is its share of the full batch's, as its loss is: 2 of 4 tokens at -1."""
    loss, metrics = algos.policy_loss(
        torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2), aggregation="token-mean", total_tokens=4
    )
    assert loss.item() == -0.5 and metrics["pg_loss"].item() == -0.5


def test_kl_is_logged_with_a_reference_even_at_beta_zero():
    loss, metrics = algos.policy_loss(
        torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1),
        ref_logp=torch.tensor([[math.log(2)]]), beta=0.0, kl_estimator="k1",
    )  # fmt: skip
    assert metrics["kl"].item() == pytest.approx(-math.log(2)) and loss.item() == 0.0
