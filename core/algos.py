"""GRPO math as pure tensor functions: group advantages, multi-reward aggregation, the clipped policy
loss with its aggregation modes and KL estimators, and the GTPO / EGPO / importance-weight / KD terms.

No model, no tokenizer, no distributed calls: trainers call these functions, never the reverse.
Shape letters used in the comments:
    N  completions in the batch        G  completions per prompt (group size), B = N // G groups
    T  completion tokens (padded)      K  reward components
`mask` is 1.0 on the completion tokens that count in the loss and 0.0 on padding (and, in multi-turn
rollouts, on observation tokens). Every loss and metric is computed in float32 whatever the input dtype.
"""

import math

import torch
from torch import Tensor

from core.registry import Registry

ADVANTAGE_SCALES = ("group", "batch", "none")
BASELINES = ("mean", "leave_one_out")
RATIO_LEVELS = ("token", "sequence")


def _one_of(field: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")


def _check_same_shape(**tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))


def _check_per_completion(name: str, x: Tensor, n: int) -> None:
    if tuple(x.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per completion), got {tuple(x.shape)}")


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """(N, ...) -> (B, G, ...), with a clear error when N is not a multiple of G."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} completions do not split into groups of {group_size}")
    return x.reshape(-1, group_size, *x.shape[1:])


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is 1; 0 (never NaN) where no position counts, whatever
    `x` holds where it is 0."""
    kept = torch.where(mask > 0, x, 0.0)
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1.0)
    return kept.sum(dim) / mask.sum(dim).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    baseline: str = "mean",
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages `A_i = (r_i - b_i) / (s + eps)`; rewards (N,) -> advantages (N,).

    GRPO: Shao et al. 2024, "DeepSeekMath", eq. 3 (outcome supervision). Options:
    - `baseline="mean"`: b_i = group mean; `"leave_one_out"`: mean of the other G-1 rewards
      (RLOO, Ahmadian et al. 2024).
    - `scale="group"`: s = the group's std, Bessel-corrected like verl's `compute_grpo_outcome_advantage`
      and TRL; `"batch"`: the whole batch's std (TRL `scale_rewards="batch"`); `"none"`: s = 1 and
      eps unused (Dr.GRPO, Liu et al. 2025, "Understanding R1-Zero-like training").
    A group whose rewards are all equal (zero spread, a group of one included) gets exactly 0: it carries
    no signal, and the float noise of `r - mean` must not be divided by eps. verl keeps a size-1 group's
    raw score instead; we do not, since there is no baseline to compare it with.
    """
    _one_of("advantage scale", scale, ADVANTAGE_SCALES)
    _one_of("advantage baseline", baseline, BASELINES)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; the rubric should have reported which example")
    rewards = rewards.float()
    grouped = _grouped(rewards, group_size)  # (B, G)
    zero_spread = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (B, 1)
    if baseline == "mean":
        base = grouped.mean(dim=1, keepdim=True)  # (B, 1)
    else:
        base = (grouped.sum(dim=1, keepdim=True) - grouped) / max(group_size - 1, 1)  # (B, G)
    centred = grouped - base  # (B, G)
    if scale == "group" and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)  # (B, G)
    elif scale == "batch" and rewards.numel() > 1:
        centred = centred / (rewards.std() + eps)  # (B, G)
    return torch.where(zero_spread, torch.zeros_like(centred), centred).reshape(-1)  # (N,)


MULTI_REWARD = Registry("multi-reward aggregation")


@MULTI_REWARD.register("sum_then_normalize")
def sum_then_normalize(
    components: Tensor,
    weights: Tensor,
    group_size: int,
    scale: str = "group",
    baseline: str = "mean",
    eps: float = 1e-6,
) -> Tensor:
    """Weighted sum of the K reward components, then group advantages: (N, K), (K,) -> (N,).
    The default of TRL (`multi_objective_aggregation="sum_then_normalize"`) and verl."""
    _check_components(components, weights)
    total = components.float() @ weights.float()  # (N,)
    return group_advantages(total, group_size, scale=scale, baseline=baseline, eps=eps)


@MULTI_REWARD.register("normalize_then_sum")
def normalize_then_sum(
    components: Tensor,
    weights: Tensor,
    group_size: int,
    scale: str = "group",
    baseline: str = "mean",
    eps: float = 1e-6,
) -> Tensor:
    """GDPO (group reward-decoupled normalization): each component gets its own group advantage, the
    weighted sum of those is divided by its batch std: (N, K), (K,) -> (N,).

    With `scale="group"` (the only scale the trainer allows here) this is TRL's
    `multi_objective_aggregation="normalize_then_sum"`, except that we do not subtract the batch mean
    again: each group's normalized components already sum to zero, so the re-centring only moves
    zero-spread groups away from exactly 0. Pass the weights without bootstrapped reward scales: the
    z-score removes a component's scale (`GRPOTrainer.advantage_weights`).
    """
    _check_components(components, weights)
    per_component = torch.stack(
        [
            group_advantages(components[:, k], group_size, scale, baseline, eps)
            for k in range(components.shape[1])
        ],
        dim=1,
    )  # (N, K)
    summed = per_component @ weights.float()  # (N,)
    # a group whose components' advantages cancel (c0 = [0, 1], c1 = [1, 0], equal weights) carries no
    # signal: exactly 0, so its float residue (~1e-7 of the terms summed) is not divided by a batch std of
    # the same size. The tolerance is each row's own: relative to the terms that went into its sum.
    tolerance = 1e-5 * (per_component.abs() @ weights.float().abs())  # (N,)
    residue = summed.abs() <= tolerance  # (N,)
    cancelled = _grouped(residue, group_size).all(dim=1, keepdim=True)  # (B, 1)
    summed = torch.where(cancelled, 0.0, _grouped(summed, group_size)).reshape(-1)  # (N,)
    if summed.numel() < 2:
        return summed
    return summed / (summed.std() + eps)  # (N,)


def _check_components(components: Tensor, weights: Tensor) -> None:
    if components.dim() != 2 or weights.dim() != 1 or components.shape[1] != weights.shape[0]:
        raise ValueError(
            "components must be (N, K) and weights (K,); "
            f"got {tuple(components.shape)} and {tuple(weights.shape)}"
        )


# ---------------------------------------------------------------------------------------------------
# KL estimators and loss aggregation
# ---------------------------------------------------------------------------------------------------

KL_ESTIMATORS = Registry("KL estimator")


# Schulman 2020, "Approximating KL Divergence": with samples from the policy and
# log r = ref_logp - logp, k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r.
@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp  # (N, T)


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (ref_logp - logp) ** 2  # (N, T)


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    log_r = ref_logp - logp  # (N, T)
    return torch.exp(log_r) - log_r - 1  # (N, T)


AGGREGATIONS = Registry("loss aggregation")

# The four modes of verl's `agg_loss`. `total_tokens` / `total_seqs` are the counts of the whole batch
# when a trainer splits it into micro-batches (gradient accumulation, processes): the micro-batch losses
# then add up to the full batch's loss exactly. Left None, they are this micro-batch's own counts.


@AGGREGATIONS.register("token-mean")
def agg_token_mean(loss: Tensor, mask: Tensor, total_tokens=None, total_seqs=None, max_length=None) -> Tensor:
    """Mean over all valid tokens of the batch (DAPO; TRL `bnpo` and `dapo`)."""
    denom = mask.sum() if total_tokens is None else torch.as_tensor(total_tokens, dtype=torch.float32)
    return (loss * mask).sum() / denom.clamp(min=1.0)


@AGGREGATIONS.register("seq-mean-token-mean")
def agg_seq_mean_token_mean(loss, mask, total_tokens=None, total_seqs=None, max_length=None) -> Tensor:
    """Each sequence's token mean, averaged over sequences (original GRPO; TRL `grpo`)."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (N,)
    return per_seq.sum() / (loss.shape[0] if total_seqs is None else total_seqs)


@AGGREGATIONS.register("seq-mean-token-sum")
def agg_seq_mean_token_sum(loss, mask, total_tokens=None, total_seqs=None, max_length=None) -> Tensor:
    """Each sequence's token sum, averaged over sequences."""
    per_seq = (loss * mask).sum(-1)  # (N,)
    return per_seq.sum() / (loss.shape[0] if total_seqs is None else total_seqs)


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def agg_seq_mean_token_sum_norm(loss, mask, total_tokens=None, total_seqs=None, max_length=None) -> Tensor:
    """Token sum divided by a constant max length, averaged over sequences (Dr.GRPO; TRL `dr_grpo`).
    verl's mode of this name omits the division by the number of sequences; we follow TRL."""
    if max_length is None or max_length < 1:
        raise ValueError(
            "aggregation 'seq-mean-token-sum-norm' needs max_length >= 1 (the max completion length)"
        )
    n_seqs = loss.shape[0] if total_seqs is None else total_seqs
    return (loss * mask).sum() / (n_seqs * max_length)


# ---------------------------------------------------------------------------------------------------
# The policy loss
# ---------------------------------------------------------------------------------------------------


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "seq-mean-token-mean",
    max_length: int | None = None,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    token_weights: Tensor | None = None,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate of PPO (Schulman et al. 2017) as GRPO uses it, plus its common variants.

    logp, old_logp, mask, ref_logp, token_weights, importance_weights: (N, T); advantages: (N,).
    Per token: `-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)` with `rho = exp(logp - old_logp)`.
    - `old_logp=None` means on-policy (one update per batch): rho = 1 with the gradient of logp.
    - `eps_high` > `eps_low` is DAPO's clip-higher (Yu et al. 2025); None means eps_high = eps_low.
    - `dual_clip=c` bounds the loss of negative-advantage tokens by `-c * A` (Ye et al. 2020; verl).
    - `ratio_level="sequence"` uses one ratio per completion, exp of the mean token log-ratio (GSPO,
      Zheng et al. 2025; TRL `importance_sampling_level="sequence"`).
    - `token_weights` multiply each token's policy-gradient term (GTPO's conflict weights);
      `importance_weights` too (off-policy corrections such as CoDistill's pi_L / pi_S).
    - `beta` > 0 adds `beta * KL(policy || ref)` per token with the named estimator (k3 in GRPO).
    Returns the aggregated loss (a scalar) and detached metrics.
    """
    _one_of("ratio_level", ratio_level, RATIO_LEVELS)
    aggregate = AGGREGATIONS.get(aggregation)
    kl_fn = KL_ESTIMATORS.get(kl_estimator)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (N, T), got {tuple(logp.shape)}")
    _check_same_shape(
        logp=logp,
        old_logp=old_logp,
        mask=mask,
        ref_logp=ref_logp,
        token_weights=token_weights,
        importance_weights=importance_weights,
    )
    _check_per_completion("advantages", advantages, logp.shape[0])
    eps_high = eps_low if eps_high is None else eps_high
    if not 0.0 <= eps_low < 1.0 or eps_high < 0.0:
        raise ValueError(
            f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}"
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if beta < 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0.0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's per-token logprobs)")

    mask = mask.float()
    valid = mask > 0
    # padding may hold anything (-inf under a vocabulary mask): 0 there, as inf * 0 in a masked sum is NaN
    logp = torch.where(valid, logp.float(), 0.0)
    old_logp = logp.detach() if old_logp is None else torch.where(valid, old_logp.float(), 0.0)
    if ref_logp is not None:
        ref_logp = torch.where(valid, ref_logp.float(), 0.0)
    adv = advantages.float().unsqueeze(-1)  # (N, 1)

    log_ratio = logp - old_logp  # (N, T)
    if ratio_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)  # (N, 1)
    ratio = torch.exp(log_ratio)  # (N, T) or (N, 1)
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg = -torch.minimum(ratio * adv, clipped_ratio * adv)  # (N, T) or (N, 1)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    pg = pg.expand_as(logp)  # (N, T)
    if token_weights is not None:
        pg = pg * torch.where(valid, token_weights.float(), 0.0)
    if importance_weights is not None:
        pg = pg * torch.where(valid, importance_weights.float(), 0.0)

    counts = dict(total_tokens=total_tokens, total_seqs=total_seqs, max_length=max_length)
    per_token = pg
    kl = None
    if ref_logp is not None:
        kl = kl_fn(logp, ref_logp)  # (N, T)
        if beta > 0.0:
            per_token = pg + beta * kl
    loss = aggregate(per_token, mask, **counts)

    with torch.no_grad():
        token_ratio = ratio.expand_as(logp)  # (N, T)
        # clip fractions count what was clipped: tokens, or completions at the sequence level (as TRL)
        clip_mask = (
            mask if ratio_level == "token" else (mask.sum(-1, keepdim=True) > 0).float()
        )  # (N, T) | (N, 1)
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
        metrics = {
            "pg_loss": aggregate(pg, mask, **counts).detach(),
            "clip/low_frac": masked_mean(low, clip_mask),
            "clip/high_frac": masked_mean(high, clip_mask),
            "clip/frac": masked_mean(torch.maximum(low, high), clip_mask),
            "ratio/mean": masked_mean(token_ratio, mask),
            # with no valid token, each extreme is its reduction's identity, so it never wins one
            "ratio/max": token_ratio[valid].max() if valid.any() else torch.tensor(-math.inf),
            "ratio/min": token_ratio[valid].min() if valid.any() else torch.tensor(math.inf),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# Variant terms: GTPO, EGPO, truncated importance weights, on-policy KD reward
# ---------------------------------------------------------------------------------------------------


def gtpo_conflict_tokens(completion_ids: Tensor, mask: Tensor, advantages: Tensor, group_size: int) -> Tensor:
    """GTPO's conflict tokens (Simoni et al. 2025, "GTPO: Trajectory-Based Policy Optimization").

    completion_ids, mask: (N, T); advantages: (N,) -> (N, T) bool.
    A valid token of completion i is a *conflict token* when the same token id stands at the same position
    in a valid token of another completion of its group whose advantage has the opposite sign.
    The paper defines conflicts position by position, as here; its official code compares the shared
    prefix and suffix runs, which is a subset of these positions.
    """
    _check_same_shape(completion_ids=completion_ids, mask=mask)
    _check_per_completion("advantages", advantages, completion_ids.shape[0])
    ids = _grouped(completion_ids, group_size)  # (B, G, T)
    valid = _grouped(mask, group_size) > 0  # (B, G, T)
    adv = _grouped(advantages, group_size)  # (B, G)
    positive, negative = adv > 0, adv < 0  # (B, G)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)  # (B, G, G, T)
    shared_with_negative = (same & negative[:, None, :, None]).any(dim=2)  # (B, G, T)
    shared_with_positive = (same & positive[:, None, :, None]).any(dim=2)  # (B, G, T)
    conflict = (positive[..., None] & shared_with_negative) | (negative[..., None] & shared_with_positive)
    return conflict.reshape(completion_ids.shape)  # (N, T)


def gtpo_token_weights(
    completion_ids: Tensor,
    mask: Tensor,
    advantages: Tensor,
    group_size: int,
    conflict_positive: float = 2.0,
    conflict_negative: float = 0.0,
    conflict: Tensor | None = None,
) -> Tensor:
    """GTPO's per-token weights (N, T): a conflict token (`gtpo_conflict_tokens`, or `conflict` when given)
    weighs `conflict_positive` (2.0: reinforce the shared token) when its completion's A > 0 and
    `conflict_negative` (0.0: do not push it down) when A < 0; every other valid token weighs 1, padding 0.
    """
    if conflict is None:
        conflict = gtpo_conflict_tokens(completion_ids, mask, advantages, group_size)  # (N, T)
    sign = advantages[:, None]  # (N, 1)
    weights = torch.ones(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)  # (N, T)
    weights = torch.where(conflict & (sign > 0), conflict_positive, weights)
    weights = torch.where(conflict & (sign < 0), conflict_negative, weights)
    return weights * (mask > 0)  # (N, T)


def gtpo_entropy_advantages(
    advantages: Tensor, mean_entropy: Tensor, gamma: float = 0.1, max_entropy: float = math.log(2)
) -> Tensor:
    """GTPO's entropy control on advantages (N,), with `mean_entropy` (N,) each completion's mean token
    entropy (taken without gradient). A completion above `max_entropy` (ln 2 in the paper; 0.7 in the
    official code) is dropped (A = 0); the others get `A - gamma * H` (gamma 0.1)."""
    _check_same_shape(advantages=advantages, mean_entropy=mean_entropy)
    entropy = mean_entropy.detach().float()  # (N,)
    penalized = advantages.float() - gamma * entropy  # (N,)
    return torch.where(entropy > max_entropy, torch.zeros_like(penalized), penalized)  # (N,)


def egpo_advantages(advantages: Tensor, mean_entropy: Tensor, lam: float = 0.4, alpha: float = 2.0) -> Tensor:
    """EGPO's entropy bonus: `A + lam * clip(H, -|A| / alpha, |A| / alpha)`; (N,), (N,) -> (N,).

    Defaults lam 0.4, alpha 2 from the EGPO paper. Because |bonus| <= (lam / alpha) |A| and we require
    lam < alpha, the bonus never flips the sign of A and is 0 where A = 0 (zero-spread groups)."""
    _check_same_shape(advantages=advantages, mean_entropy=mean_entropy)
    if not 0.0 <= lam < alpha:
        raise ValueError(
            f"EGPO needs 0 <= lam < alpha so the bonus cannot flip an advantage; got lam={lam}, alpha={alpha}"
        )
    adv = advantages.float()  # (N,)
    bound = adv.abs() / alpha  # (N,)
    bonus = lam * torch.clamp(mean_entropy.detach().float(), -bound, bound)  # (N,)
    return adv + bonus  # (N,)


def truncated_importance_weights(
    target_logp: Tensor, behavior_logp: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, Tensor]:
    """Per-token weights `w_t = min(exp(target - behavior), cap)`, both logprobs taken without gradient,
    and their effective sample size as a fraction of the valid tokens, `(sum w)^2 / (n * sum w^2)` in (0, 1].
    target_logp, behavior_logp, mask: (N, T) -> weights (N, T) (0 on padding), ess_fraction (scalar).
    Truncated importance sampling: Ionides 2008; used by CoDistill-GRPO to train L on S's rollouts."""
    _check_same_shape(target_logp=target_logp, behavior_logp=behavior_logp, mask=mask)
    if cap <= 0:
        raise ValueError(f"importance weight cap must be > 0, got {cap}")
    mask = mask.float()
    valid = mask > 0
    # padding may hold anything (-inf under a vocabulary mask): 0 there, as -inf * 0 is NaN
    log_w = torch.where(valid, target_logp.detach().float() - behavior_logp.detach().float(), 0.0)  # (N, T)
    weights = torch.exp(log_w).clamp(max=cap) * mask  # (N, T)
    n = mask.sum()
    ess_fraction = weights.sum() ** 2 / (n * (weights**2).sum()).clamp(min=1e-30)
    return weights, torch.where(n > 0, ess_fraction, torch.ones_like(ess_fraction))


def kd_reward(teacher_logp: Tensor, student_logp: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """CoDistill-GRPO's on-policy KD reward, `alpha * mean_t(log pi_T(o_t) - log pi_S(o_t))` per sequence:
    a negative reverse-KL estimate on the student's own samples (PAPERS.md sec. 1, our reading).
    (N, T) x3 -> (N,), without gradient: it is a reward, added before group normalization."""
    _check_same_shape(teacher_logp=teacher_logp, student_logp=student_logp, mask=mask)
    diff = teacher_logp.detach().float() - student_logp.detach().float()  # (N, T)
    return alpha * masked_mean(diff, mask.float(), dim=-1)  # (N,)
