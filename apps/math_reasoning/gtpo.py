"""GTPO (PAPERS.md sec. 3) as trainer hooks: conflict-token weights on the policy term and the entropy
filter on advantages. The rest of GTPO is configuration, checked and set by `train.py` for `--algo gtpo`: no
reference model (beta = 0; another beta is refused) and by default advantages `r - mean_g` without the std
division (advantage_scale "auto" = "none"; another scale given is an ablation).
The entropy of the filter is each micro-batch's, from the forward of the update: with mu > 1 or several
mini-batches, later passes see the policy after the earlier optimizer steps (our choice; no extra pass).
The math lives in `core.algos.gtpo_conflict_tokens`, `gtpo_token_weights` and `core.algos.gtpo_entropy_advantages`.
"""

import math

import torch

from core import algos
from core.trainer import TrainerHooks, all_reduce_sum


class GTPOHooks(TrainerHooks):
    """Conflict tokens weigh `conflict_positive` in positive completions and `conflict_negative` in
    negative ones; a completion of mean entropy above `max_entropy` is dropped, else A -= gamma * H.

    The paper applies the penalty to every completion, zero-spread groups included, where it makes every
    advantage negative; `skip_zero_advantage` (opt-in, our departure) leaves A = 0 completions at 0.
    Positive and negative completions (for the conflict weights) are those of the group advantage
    `r - mean_g`, before the entropy penalty: the paper is silent on the order; so a completion barely
    above its group's mean whose penalty makes A < 0 keeps weight 2 on its conflict tokens.
    """

    def __init__(
        self,
        conflict_positive: float = 2.0,
        conflict_negative: float = 0.0,
        gamma: float = 0.1,
        max_entropy: float = math.log(2),
        skip_zero_advantage: bool = False,
    ):
        self.conflict_positive = conflict_positive
        self.conflict_negative = conflict_negative
        self.gamma = gamma
        self.max_entropy = max_entropy
        self.skip_zero_advantage = skip_zero_advantage
        # this step's conflict tokens, valid tokens, completions dropped by the entropy filter, seen
        self._counts = torch.zeros(4, dtype=torch.float64)

    def token_weights(self, trainer, rollouts, advantages: torch.Tensor) -> torch.Tensor:
        conflict = algos.gtpo_conflict_tokens(
            rollouts.completion_ids, rollouts.loss_mask, advantages, trainer.config.group_size
        )  # (N, T)
        weights = algos.gtpo_token_weights(
            rollouts.completion_ids,
            rollouts.loss_mask,
            advantages,
            trainer.config.group_size,
            self.conflict_positive,
            self.conflict_negative,
            conflict=conflict,
        )  # (N, T)
        mask = rollouts.loss_mask > 0  # (N, T)
        self._counts = torch.tensor([(conflict & mask).sum(), mask.sum(), 0, 0], dtype=torch.float64)
        return weights

    def adjust_advantages(self, advantages: torch.Tensor, mean_entropy: torch.Tensor) -> torch.Tensor:
        self._counts[2] += int((mean_entropy > self.max_entropy).sum())
        self._counts[3] += len(mean_entropy)
        adjusted = algos.gtpo_entropy_advantages(advantages, mean_entropy, self.gamma, self.max_entropy)
        if self.skip_zero_advantage:  # (N,): A = 0 stays 0 instead of -gamma * H
            adjusted = torch.where(advantages == 0, torch.zeros_like(adjusted), adjusted)
        return adjusted

    def after_update(self, trainer, batch) -> dict:
        """The step's fractions over every process's share."""
        conflict, tokens, dropped, seen = all_reduce_sum(self._counts.clone()).tolist()
        return {
            "gtpo/conflict_token_frac": conflict / max(tokens, 1),
            "gtpo/entropy_dropped_frac": dropped / max(seen, 1),
        }
