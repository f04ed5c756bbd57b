"""The de-biasing rubric: one reward per head of the reward model (fairness, relevance, quality), all three
served by one batched forward.

The reward model is an object loaded once (`RewardModelScorer`); each head is a `HeadReward`, a batched
rubric function (`batched = True`, see core/rewards.py) that reads its column from the scorer's scores
of the batch. The scorer keeps the last batch's scores, so the rubric's three calls cost one forward. The
reward model sees the example's plain `question` (not the policy's formatted prompt) and the completion.
Each reward is the head's sigmoid probability in [0, 1]; the rubric's weights and `on_error` apply.
"""

from collections.abc import Mapping, Sequence

from core.rewards import Rubric
from reward_models.score import RewardModelScorer


class HeadReward:
    """Scores a batch of completions with one head of a shared scorer."""

    batched = True

    def __init__(self, scorer: RewardModelScorer, head: str):
        if head not in scorer.heads:
            raise ValueError(f"the reward model has no head {head!r}; its heads: {', '.join(scorer.heads)}")
        self.scorer = scorer
        self.head = head

    def __call__(self, completions: Sequence[str], examples: Sequence[Mapping]) -> list[float]:
        questions = [example["question"] for example in examples]
        return self.scorer.score(questions, list(completions))[self.head]


def debias_rubric(scorer: RewardModelScorer, weights: Mapping[str, float], on_error: str = "raise") -> Rubric:
    """A Rubric with one batched function per head named in `weights` (a head with weight 0 is still
    scored and logged, it just does not count)."""
    return Rubric(
        {head: HeadReward(scorer, head) for head in weights}, weights=dict(weights), on_error=on_error
    )
