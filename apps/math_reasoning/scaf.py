"""Scaf-GRPO (PAPERS.md sec. 2) as a `TrainerHooks.transform_rollouts`: hinted successes for groups that
all failed.

After the guidance-exemption steps, for every group whose G rollouts all have correctness 0 [choice: the
format terms are ignored here, "scored 0" means "not one correct answer"], hinted prompts
`question + " Hint: " + hint` are sampled, one completion each, tier by tier (knowledge, planning,
solution; within a tier 1, 2, ... chunks when progressive). The first tier with a success stops the search;
the success with the least hint (fewest chunks of the earliest tier) replaces the group's first rollout
[choice: paper is silent on which; all are failures]. That row keeps its hinted prompt ids, so its old and
new logprobs (the ratio) are taken on the hinted prompt. A group where no hint works stays all-zero. A
hinted prompt that with max_new_tokens would not fit the model's context is skipped (the trainer refuses
such prompts in the data; a hint must not slip one past it).
The loss is unchanged GRPO.

Metrics are over every group sampled in the step, on every process: with dynamic sampling that is all
rounds' groups, including those the batch then leaves out.
"""

import math

import torch

from apps.math_reasoning.data import HINT_TIERS
from apps.math_reasoning.templates import Template
from core.rewards import RewardTable
from core.rollout import Rollouts, derive_seed
from core.trainer import TrainerHooks, all_reduce_sum

_SCAF_SEED_KEY = 5_000_011  # keeps hint sampling seeds apart from the trainer's group seeds


def hint_levels(example: dict, tiers: tuple[str, ...], progressive: bool) -> list[list[str]]:
    """Hint texts from least to most help, one list per tier.

    >>> ex = {"hints": {"knowledge": ["k1"], "planning": ["p1", "p2"], "solution": ["s1"]}}
    >>> hint_levels(ex, ("knowledge", "planning"), True)
    [['k1'], ['p1', 'p1 p2']]
    >>> hint_levels(ex, ("planning",), False)
    [['p1 p2']]
    """
    if "hints" not in example:
        raise ValueError(
            f"example {example.get('id')!r} has no 'hints'; Scaf-GRPO needs hinted data (the offline set)"
        )
    levels = []
    for tier in tiers:
        chunks = example["hints"][tier]
        if not chunks:
            levels.append([])
            continue
        counts = range(1, len(chunks) + 1) if progressive else [len(chunks)]
        levels.append([" ".join(chunks[:k]) for k in counts])
    return levels


def exemption_steps(fraction: float, max_steps: int) -> int:
    """Steps without guidance at the start: `fraction` of the run, rounded up.

    >>> exemption_steps(0.15, 100), exemption_steps(0.0, 100)
    (15, 0)
    """
    return math.ceil(fraction * max_steps)


class ScafHooks(TrainerHooks):
    """Swaps in the least-hint success for all-failed groups; its metrics come out of `after_update`."""

    data_dependent_forwards = True  # a hint search runs only for the groups that failed

    def __init__(self, template: Template, tiers: tuple[str, ...], progressive: bool, exempt_steps: int):
        unknown = [t for t in tiers if t not in HINT_TIERS]
        if unknown or not tiers:
            raise ValueError(f"scaf tiers must be a non-empty subset of {HINT_TIERS}, got {tiers}")
        self.template = template
        self.tiers = tiers
        self.progressive = progressive
        self.exempt_steps = exempt_steps
        self._counts = self._no_counts()

    def _no_counts(self) -> torch.Tensor:
        """This step's sums: groups, groups all failed, groups rescued, their hint levels, hinted completions
        sampled, their tokens, rescues per tier."""
        return torch.zeros(6 + len(self.tiers), dtype=torch.float64)

    def transform_rollouts(
        self, trainer, rollouts: Rollouts, examples: list[dict], table: RewardTable, round_: int
    ):
        if table.names != trainer.rubric.names:
            raise ValueError(
                f"scaf needs the rubric's table {trainer.rubric.names}, got columns {table.names}"
            )
        size = trainer.config.group_size
        correct = table.components[:, table.names.index("correct")].view(-1, size)  # (B, G)
        failed = [g for g in range(len(examples)) if float(correct[g].max()) == 0.0]
        self._counts[:2] += torch.tensor([len(examples), len(failed)])
        if trainer.step < self.exempt_steps or not failed:
            return rollouts, table
        rescued: dict[int, tuple[Rollouts, RewardTable, int, int]] = {}
        first_group = trainer.rank * len(examples)  # seeds use the group's index in the global batch
        for g in failed:
            found = self._search(trainer, examples[g], first_group + g, round_)
            if found is not None:
                rescued[g] = found
        row_parts, table_parts = [], []
        for g in range(len(examples)):
            rows = range(g * size, (g + 1) * size)
            if g in rescued:
                hinted, hinted_table, _, _ = rescued[g]
                # generated but not in the batch: the replaced rollout in, the success swapped in (counted
                # with the search's samples, and held by the batch) out
                replaced = rollouts.select([rows[0]]).num_completion_tokens
                self._counts[5] += replaced - hinted.num_completion_tokens
                row_parts.append(hinted)
                table_parts.append(hinted_table)
                if size > 1:
                    row_parts.append(rollouts.select(rows[1:]))
                    table_parts.append(table.select(rows[1:]))
            else:
                row_parts.append(rollouts.select(rows))
                table_parts.append(table.select(rows))
        self._counts[2] += len(rescued)
        self._counts[3] += sum(r[2] for r in rescued.values())
        for t in range(len(self.tiers)):
            self._counts[6 + t] += sum(r[3] == t for r in rescued.values())
        return Rollouts.concat(row_parts), RewardTable.concat(table_parts)

    def _search(self, trainer, example: dict, group: int, round_: int):
        """(hinted rollout, its table row, overall level from 1, tier index) of the least-hint success."""
        level_offset = 0
        for t, texts in enumerate(hint_levels(example, self.tiers, self.progressive)):
            if not texts:
                continue
            prompts = [self.template.render(example["question"], hint) for hint in texts]
            fitting = [k for k, prompt in enumerate(prompts) if _fits(trainer, prompt)]  # hints lengthen it
            prompts = [prompts[k] for k in fitting]
            if not prompts:
                level_offset += len(texts)
                continue
            # a later sampling round's group g is another prompt: it gets its own seeds (round 0 keeps the
            # seeds of a run without dynamic sampling)
            rounds = (round_,) if round_ else ()
            seed = derive_seed(trainer.config.seed, trainer.step, _SCAF_SEED_KEY, group, t, *rounds)
            out = trainer.backend.generate(prompts, trainer.config.sampling(), seed)
            self._counts[4:6] += torch.tensor([len(prompts), out.num_completion_tokens])
            scored = trainer.rubric.score(out.completions, [example] * len(prompts))
            wins = (scored.components[:, scored.names.index("correct")] > 0).nonzero().flatten()  # (W,)
            if len(wins):
                k = int(wins[0])
                return out.select([k]), scored.select([k]), level_offset + fitting[k] + 1, t
            level_offset += len(texts)
        return None

    def after_update(self, trainer, batch) -> dict:
        counts, self._counts = all_reduce_sum(self._counts), self._no_counts()
        groups, failed, rescued, levels, samples, tokens = counts[:6].tolist()
        metrics = {
            "scaf/exempt": float(trainer.step < self.exempt_steps),
            "scaf/all_fail_frac": failed / groups,
            "scaf/rescued_frac": rescued / groups,
            "scaf/all_fail_frac_after": (failed - rescued) / groups,
            # 1 = the first chunk of the first tier; larger = more help was needed
            "scaf/hint_level": levels / rescued if rescued else math.nan,
            # the search's own generation: its hinted completions, and the completion tokens generated in
            # the step that the batch (which `tokens_per_s` counts) does not hold: the hinted completions not
            # swapped in and the rollouts the successes replaced
            "scaf/hint_samples": samples,
            "scaf/hint_tokens": tokens,
        }
        for t, tier in enumerate(self.tiers):
            metrics[f"scaf/tier_{tier}_frac"] = float(counts[6 + t]) / groups
        return metrics


def _fits(trainer, prompt: str) -> bool:
    """Whether `prompt` and max_new_tokens fit the model's context (the trainer's check of its prompts)."""
    if trainer.max_context is None:
        return True
    length = len(trainer.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return length + trainer.config.max_new_tokens <= trainer.max_context
