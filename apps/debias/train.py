"""`grpo-suite debias train`: multi-reward GRPO de-biasing against the DeBERTa reward model's three heads.

The policy: `--model DIR` (any HF causal LM; add `--lora` for an adapter), or the offline default, a tiny
LM (characters, plus the corpus's words as single tokens) given SFT on the training prompts, each
answered by its neutral or its biased response (`biased_share` of them biased), so that it starts biased
about half the time. The rubric has one batched reward per head (apps/debias/rewards.py), weights from
the config; `--multi-reward` picks sum_then_normalize (default) or normalize_then_sum (GDPO). GRPO keeps a
KL term to the SFT policy (`--beta`). The held-out category is never trained on.

    grpo-suite debias train --reward-model runs/rm/model --preset demo
Tests: `pytest tests/apps/debias/`.
"""

import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from apps.debias.data import check_reward_model_data, load_splits
from apps.debias.rewards import debias_rubric
from core.launch import policy_for, summary_table, with_run_dir
from core.tiny import create_tiny_model_dir, sft
from core.trainer import GRPOConfig, GRPOTrainer
from reward_models.score import RewardModelScorer

APP = "debias"


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


def policy_prompt(question: str) -> str:
    """The text the policy continues (plain text: the tiny default has no chat training). It ends on a
    newline, which no word token contains, so the answer's first token is the same in SFT and generation.

    >>> policy_prompt("Should they?")
    'Question: Should they?\\nAnswer:\\n'
    """
    return f"Question: {question}\nAnswer:\n"


def policy_examples(rows: list[dict]) -> list[dict]:
    """Trainer examples: `prompt` for the policy, `question` for the reward model."""
    return [
        {
            "id": r["id"],
            "prompt": policy_prompt(r["prompt"]),
            "question": r["prompt"],
            "category": r["category"],
        }
        for r in rows
    ]


@dataclass
class DebiasTrainConfig(GRPOConfig):
    """The core's GRPO fields, defaults sized for the tiny offline policy, and the de-biasing fields."""

    OFFLINE_MODEL_FIELDS: ClassVar = (
        "biased_share",
        "sft_epochs",
        "sft_lr",
        "word_tokens",
        "hidden_size",
        "num_layers",
    )

    # the core's single-file flag, kept (refused in __post_init__) so that its help says what to use instead
    data: str | None = _help("not read: debias reads a directory of splits, pass --data-dir DIR", None)
    reward_model: str | None = _help("reward model directory (from `grpo-suite reward-model train`)", None)
    data_dir: str | None = _help("directory with train/.../heldout.jsonl; default: generated in memory", None)
    fairness_weight: float = _help("rubric weight of the fairness head", 1.0)
    relevance_weight: float = _help(
        "rubric weight of the relevance head (our choice: keeps answers on topic)", 0.5
    )
    quality_weight: float = _help("rubric weight of the quality head (our choice: keeps answers fluent)", 0.5)
    rm_batch_size: int = _help("sequences per reward-model forward", 64)
    biased_share: float = _help("tiny default: share of SFT answers that are the biased response", 0.5)
    sft_epochs: float = _help("tiny default: SFT epochs over the training prompts", 2.0)
    sft_lr: float = _help("tiny default: SFT learning rate", 3e-3)
    word_tokens: bool = _help(
        "tiny default: every word of the training texts is one token (with and without its leading "
        "space), so an answer takes about one token per word instead of one per character",
        True,
    )
    hidden_size: int = _help("tiny default: hidden size", 96)
    num_layers: int = _help("tiny default: layers", 2)
    max_steps: int = _help("training steps", 40)
    prompts_per_step: int = _help("prompts per step", 8)
    group_size: int = _help("completions per prompt (G)", 8)
    max_new_tokens: int = _help(
        "completion length cap (the longest response: about 30 tokens with word tokens, 140 characters "
        "without; raise it with --no-word-tokens)",
        48,
    )
    beta: float = _help(
        "KL coefficient to the starting (SFT) policy (our choice, the paper gives none: it reports fluency "
        "unchanged; on the tiny policy beta 0 and 0.04 drift into spliced templates, perplexity x1.5-2, "
        "0.2 keeps it within 10% on every seed, docs/debias.md)",
        0.2,
    )
    learning_rate: float = _help("AdamW learning rate (tiny model; use ~1e-5 with LoRA on a real LM)", 2e-4)
    micro_batch_size: int = _help("completions per forward/backward", 32)

    def __post_init__(self):
        super().__post_init__()
        if self.data is not None:  # the core's single-file flag: this app reads a directory of splits
            raise ValueError("debias reads a directory of splits: use --data-dir DIR, not --data")
        if not 0 <= self.biased_share <= 1:
            raise ValueError(f"biased_share must be in [0, 1], got {self.biased_share}")
        if not self.sft_epochs > 0:
            raise ValueError(f"sft_epochs must be > 0, got {self.sft_epochs}")
        if self.rm_batch_size < 1:
            raise ValueError(f"rm_batch_size must be >= 1, got {self.rm_batch_size}")
        if not self.reward_model:  # checked before anything is built
            raise ValueError("--reward-model is required (train one with `grpo-suite reward-model train`)")
        if not Path(self.reward_model).is_dir():
            raise ValueError(f"reward_model: {self.reward_model} is not a directory")

    def weights(self) -> dict[str, float]:
        return {
            "fairness": self.fairness_weight,
            "relevance": self.relevance_weight,
            "quality": self.quality_weight,
        }


PRESETS = {
    "demo": {},
    "smoke": {
        "max_steps": 2,
        "prompts_per_step": 2,
        "group_size": 4,
        "max_new_tokens": 24,
        "sft_epochs": 0.02,
        "hidden_size": 32,
        "num_layers": 1,
    },
}


def sft_examples(rows: list[dict], biased_share: float, seed: int) -> list[dict]:
    """Each training prompt answered by its biased response with probability `biased_share`, else neutral."""
    rng = random.Random(seed)
    return [
        {
            "prompt": policy_prompt(r["prompt"]),
            "completion": r["biased"] if rng.random() < biased_share else r["neutral"],
        }
        for r in rows
    ]


def word_tokens(texts: list[str]) -> list[str]:
    """Every word of two or more letters in `texts`, bare and with a leading space, in first-seen order
    (single tokens of the tiny policy's tokenizer; added tokens match the longest first).

    >>> word_tokens(["Women are all", "are a"])
    ['Women', ' Women', 'are', ' are', 'all', ' all']
    """
    words = dict.fromkeys(w for text in texts for w in re.findall(r"[A-Za-z']{2,}", text))
    return [form for w in words for form in (w, f" {w}")]


def build_sft_policy(path: str | Path, rows: list[dict], config: DebiasTrainConfig) -> Path:
    """The tiny default policy: a character-level LM on the training texts (its words single tokens with
    `word_tokens`), then SFT on a neutral/biased mix. The untrained model goes to a temporary directory
    beside `path` (a kill leaves nothing a rebuild trips on); `path` gets the SFT model."""
    path = Path(path)
    texts = [policy_prompt(r["prompt"]) for r in rows] + [r[k] for r in rows for k in ("neutral", "biased")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        init = create_tiny_model_dir(
            Path(scratch) / "init",
            texts,
            extra_tokens=word_tokens(texts) if config.word_tokens else (),
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=4 if config.hidden_size % 4 == 0 else 1,
            seed=config.seed,
        )
        examples = sft_examples(rows, config.biased_share, config.seed)
        return sft(
            init, examples, path, epochs=config.sft_epochs, lr=config.sft_lr, batch_size=16, seed=config.seed
        )


def train(config: DebiasTrainConfig) -> list[dict]:
    config = with_run_dir(config, APP)
    splits = load_splits(config.data_dir)  # the same rows whatever the run seed
    scorer = RewardModelScorer(config.reward_model, device=config.device, batch_size=config.rm_batch_size)
    check_reward_model_data(config.reward_model, scorer.training_data, splits, config.data_dir)
    model, tokenizer = policy_for(config, lambda path: build_sft_policy(path, splits["train"], config))
    rubric = debias_rubric(scorer, config.weights(), on_error=config.on_reward_error)
    trainer = GRPOTrainer(config, model, tokenizer, policy_examples(splits["train"]), rubric, app=APP)
    with trainer.until_finished():  # finished once saved and evaluated
        history = trainer.train()
        final = trainer.save_final()
    print(summary_table(history))
    print(f"model saved to {final}")
    return history
