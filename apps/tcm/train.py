"""`grpo-suite tcm train`: GRPO on TCM QA with the Ladder-base recipe (PAPERS.md sec. 9).

Paper defaults: G = 6, beta = 0 (no reference model), lr 5e-7, LoRA on a local Qwen2.5-Instruct-style
model, rewards accuracy : strict format : tag count = 5 : 1 : 1, an 80/10/10 split (preset `paper` adds
its 2 epochs). The test split is evaluated greedily before and after training; both go to eval.json.

    grpo-suite tcm train --model /models/Qwen2.5-7B-Instruct --data ladder.jsonl --preset paper --device cuda
    grpo-suite tcm train --preset tiny      # offline: tiny model + SFT base skill + GRPO (minutes on CPU)
    grpo-suite tcm train --preset smoke     # a few steps, to see it run

Without --model the offline default is built into <run_dir>/base_model (docs/tcm.md, "What the offline
model knows"): a character-level tiny Qwen2 whose tokenizer also has the four tags and the knowledge
table's words (names, natures, clauses) as single tokens (`--word-tokens`); a reading stage, SFT on the
textbook of the whole table, an entry per entity and each sentence alone (`--reading-steps`, the
stand-in for pretraining); then SFT (core.tiny.sft) on reference answers to the training questions, of
which only `--sft-format-fraction` are in the strict format (the others put the tags inline), with the
textbook replayed. Held-out test questions ask about facts the model has read but was never asked about.
"""

import tempfile
import warnings
from dataclasses import dataclass, field, replace
from math import ceil
from pathlib import Path
from typing import ClassVar, Literal

import torch

from apps.tcm.data import generate_examples, load_examples, split_by_fact, textbook, textbook_entries
from apps.tcm.evaluate import dashboard_keys, evaluate_model, format_table
from apps.tcm.knowledge import terms
from apps.tcm.prompts import (
    SYSTEM_PROMPTS,
    TAGS,
    TYPE_LABELS,
    build_prompt,
    inline_completion,
    reference_completion,
)
from apps.tcm.rewards import build_rubric
from core.launch import policy_for, summary_table, with_run_dir
from core.tiny import create_tiny_model_dir, sft
from core.trainer import GRPOConfig, GRPOTrainer

APP = "tcm"
TINY_MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4}  # the offline default's size
TEXTBOOK_PROMPT = "知识：\n"  # the reading stage's prompt: this, then the entity's name and a newline
READING_BATCH = 16  # texts per reading step (82 entries + 264 sentences: about 22 steps per pass)


@dataclass
class TcmTrainConfig(GRPOConfig):
    """The core's GRPO fields with the paper's defaults, plus the TCM rewards, data and offline model."""

    OFFLINE_MODEL_FIELDS: ClassVar = (
        "reading_steps",
        "sft_steps",
        "sft_lr",
        "sft_textbook",
        "sft_fact_fraction",
        "sft_format_fraction",
        "word_tokens",
    )

    group_size: int = field(default=6, metadata={"help": "completions per prompt (G; paper 6)"})
    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate (paper 5e-7)"})
    lora: bool = field(default=True, metadata={"help": "train a LoRA adapter (paper: LoRA on the 7B model)"})
    max_new_tokens: int = field(default=512, metadata={"help": "completion length cap (paper is silent)"})
    epochs: float | None = field(
        default=None,
        metadata={
            "help": "if set, max_steps = ceil(epochs * train questions / prompts_per_step): it overrides a "
            "preset's max_steps; --max-steps with it is an error (--epochs none after a preset that sets it)"
        },
    )
    system_prompt: Literal["paper", "short"] = field(
        default="paper", metadata={"help": "the paper-style system prompt, or a short one (tiny models)"}
    )
    accuracy_weight: float = field(default=5.0, metadata={"help": "weight of the accuracy reward"})
    format_weight: float = field(default=1.0, metadata={"help": "weight of the strict format reward"})
    tag_weight: float = field(default=1.0, metadata={"help": "weight of the tag-count reward"})
    eval_split: Literal["val", "test", "none"] = field(
        default="test", metadata={"help": "split evaluated before and after training"}
    )
    eval_max: int = field(default=0, metadata={"help": "evaluate the first N of that split; 0 = all"})
    eval_batch_size: int = field(default=32, metadata={"help": "prompts per generate call in evaluation"})
    reading_steps: int = field(
        default=2000,
        metadata={
            "help": "offline model only: steps (16 texts each) of the reading stage, SFT on the textbook: an "
            "entry per entity of the table and each sentence alone (the stand-in for pretraining); 0 = none"
        },
    )
    sft_steps: int = field(
        default=600, metadata={"help": "offline model only: steps (8 examples each) of the QA SFT"}
    )
    sft_lr: float = field(default=3e-3, metadata={"help": "offline model only: learning rate of both SFTs"})
    sft_textbook: bool = field(
        default=True, metadata={"help": "offline model only: the QA SFT also replays the textbook"}
    )
    sft_fact_fraction: float = field(
        default=1.0,
        metadata={
            "help": "offline model only: share of the training facts whose questions the QA SFT shows; "
            "GRPO trains on all of them, so part of what it rewards is knowledge only read, never drilled"
        },
    )
    sft_format_fraction: float = field(
        default=0.5,
        metadata={
            "help": "offline model only: share of QA SFT targets in the strict format; the others put the "
            "tags inline (no newlines), so the base model follows the format only sometimes"
        },
    )
    word_tokens: bool = field(
        default=True,
        metadata={
            "help": "offline model only: the table's words (names, natures, clauses) are single tokens"
        },
    )

    @staticmethod
    def check_given(values: dict, given: set[str]) -> None:
        """core.config.build_config's check: epochs sets max_steps, so a max_steps given too (a flag or a
        file; not a preset's, or the resumed run's, which its epochs computed) would be overridden without a
        word."""
        if values.get("epochs") is not None and "max_steps" in given:
            raise ValueError(
                f"epochs: {values['epochs']} would override max_steps {values.get('max_steps')}; give one of "
                "them (--epochs none trains by max_steps)"
            )

    def __post_init__(self):
        super().__post_init__()
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 or none, got {self.epochs}")
        if min(self.eval_max, self.sft_steps, self.reading_steps) < 0 or self.eval_batch_size < 1:
            raise ValueError("eval_max, sft_steps and reading_steps must be >= 0, eval_batch_size >= 1")
        for name in ("sft_format_fraction", "sft_fact_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


PRESETS = {
    "paper": {"epochs": 2.0, "lora": True, "learning_rate": 5e-7, "group_size": 6, "beta": 0.0},
    # Offline: full fine-tuning of the tiny SFT'd model at a rate for tiny models (a departure, named here);
    # 8 groups per generate call (the same samples per group seed, several times faster on a CPU).
    "tiny": {
        "lora": False,
        "learning_rate": 1e-4,
        "max_new_tokens": 80,
        "system_prompt": "short",
        "max_steps": 120,
        "prompts_per_step": 8,
        "generation_groups": 8,
    },
    "smoke": {
        "lora": False,
        "learning_rate": 1e-4,
        "max_new_tokens": 12,
        "system_prompt": "short",
        "max_steps": 2,
        "prompts_per_step": 2,
        "group_size": 3,
        "reading_steps": 2,
        "sft_steps": 2,
        "eval_max": 4,
    },
}


def raw_splits(data: str | None, seed: int) -> dict[str, list[dict]]:
    """Train/val/test of a TCM-Ladder-style file (split by `fact` column or question) or of the offline set
    (split by fact group)."""
    examples = load_examples(data) if data else generate_examples(seed)
    return split_by_fact(examples, seed)


def prepared_splits(data: str | None, seed: int, tokenizer, system_prompt: str) -> dict[str, list[dict]]:
    """The splits with each example's chat-templated `prompt`."""
    return with_prompts(raw_splits(data, seed), tokenizer, system_prompt)


def with_prompts(splits: dict[str, list[dict]], tokenizer, system_prompt: str) -> dict[str, list[dict]]:
    """Loaded splits (`raw_splits`) with each example's chat-templated `prompt`."""
    system = SYSTEM_PROMPTS[system_prompt]
    return {
        name: [{**example, "prompt": build_prompt(example, tokenizer, system)} for example in examples]
        for name, examples in splits.items()
    }


def nonempty_split(splits: dict[str, list[dict]], name: str, data: str | None) -> list[dict]:
    """The split `name`, or an error naming the data file when the 80/10/10 split left it empty."""
    if not splits[name]:
        rows = sum(map(len, splits.values()))
        raise ValueError(f"{data}: the {name} split is empty ({rows} rows split 80/10/10); give more rows")
    return splits[name]


def build_default_model(path: Path, config: TcmTrainConfig) -> Path:
    """The offline tiny model (module docstring): a tokenizer over every text of the task, a tiny Qwen2, a
    reading stage on the textbook entries, then SFT on answers to the training questions."""
    examples = generate_examples(config.seed)
    entries = textbook_entries(config.seed)
    texts = [*SYSTEM_PROMPTS.values(), *TYPE_LABELS.values(), TEXTBOOK_PROMPT, "ABCDE. ：\n"]
    for example in examples:
        texts += [example["question"], example["answer"], example["think"], *example["options"].values()]
    words = terms() if config.word_tokens else ()
    # "<think>" etc. before the words: the tags keep the ids they have without word tokens
    extra_tokens = (*TAGS, *words)
    # The textbook twice: an entry per entity under its name (teaches to carry a name from the prompt into
    # the text) and each sentence alone (a fact not tied to its place in an entry, which is how a QA
    # think states it): entries alone left held-out facts recallable in the entry but not in a think.
    book = [{"prompt": f"{TEXTBOOK_PROMPT}{name}\n", "completion": text} for name, text in entries.items()]
    book += [{"prompt": TEXTBOOK_PROMPT, "completion": sentence} for sentence in textbook(config.seed)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        model_dir = create_tiny_model_dir(
            Path(scratch) / "init", texts, extra_tokens=extra_tokens, seed=config.seed, **TINY_MODEL
        )
        if config.reading_steps:
            model_dir = sft(
                model_dir,
                book,
                Path(scratch) / "read",
                lr=config.sft_lr,
                max_steps=config.reading_steps,
                batch_size=READING_BATCH,
                seed=config.seed,
            )
        if config.sft_steps == 0:
            return Path(model_dir).rename(path)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        train = prepared_splits(None, config.seed, tokenizer, config.system_prompt)["train"]
        facts = sorted({e["fact"] for e in train})
        shown = {facts[i] for i in seeded_subset(len(facts), config.sft_fact_fraction, config.seed)}
        train = [e for e in train if e["fact"] in shown]
        strict = seeded_subset(len(train), config.sft_format_fraction, config.seed)
        pairs = [
            {
                "prompt": e["prompt"],
                "completion": reference_completion(e) if i in strict else inline_completion(e),
            }
            for i, e in enumerate(train)
        ]
        if config.sft_textbook:
            pairs += book
        return sft(model_dir, pairs, path, lr=config.sft_lr, max_steps=config.sft_steps, seed=config.seed)


def seeded_subset(n: int, fraction: float, seed: int) -> set[int]:
    """round(fraction * n) of the indices 0..n-1, drawn by a seeded shuffle (the facts the QA SFT shows,
    the SFT targets in strict format).

    >>> len(seeded_subset(10, 0.3, seed=1)), seeded_subset(3, 1.0, seed=0)
    (3, {0, 1, 2})
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return set(order[: round(fraction * n)])


def train(config: TcmTrainConfig) -> list[dict]:
    # the data first: a bad --data file stops the command before the base model is built into the run
    raw = raw_splits(config.data, config.seed)
    nonempty_split(raw, "train", config.data)
    if config.eval_split != "none":
        nonempty_split(raw, config.eval_split, config.data)
    if config.epochs is not None:
        steps = ceil(config.epochs * len(raw["train"]) / config.prompts_per_step)
        print(f"{config.epochs} epochs of {len(raw['train'])} questions: {steps} steps")
        # the run's config holds the steps, so that a resume (which reads it) trains as many
        config = replace(config, epochs=None, max_steps=steps)
    config = with_run_dir(config, APP)
    if config.data and not config.model:
        warnings.warn(
            f"--data {config.data} without --model: GRPO trains the offline tiny model, whose tokenizer and "
            "knowledge are of the offline table, on your questions; give --model for a real model",
            stacklevel=2,
        )
    model, tokenizer = policy_for(config, lambda path: build_default_model(path, config))
    splits = with_prompts(raw, tokenizer, config.system_prompt)
    rubric = build_rubric(
        config.accuracy_weight, config.format_weight, config.tag_weight, config.on_reward_error
    )
    held_out = [] if config.eval_split == "none" else splits[config.eval_split]
    held_out = held_out[: config.eval_max] if config.eval_max else held_out

    def evaluate() -> dict:
        metrics, _ = evaluate_model(
            model,
            tokenizer,
            held_out,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.eval_batch_size,
            device=config.device,
            seed=config.seed,
        )
        return metrics

    before = evaluate() if held_out else None
    trainer = GRPOTrainer(config, model, tokenizer, splits["train"], rubric, app=APP)
    with trainer.until_finished():  # finished once saved and evaluated
        history = trainer.train()
        final = trainer.save_final()
        print(summary_table(history))
        if held_out:
            after = evaluate()
            # the dashboard's top-level keys describe the trained model (`after`)
            results = {"split": config.eval_split, "before": before, "after": after}
            trainer.write_eval({**results, **dashboard_keys(after)})
            print(f"{config.eval_split} split, greedy, before and after GRPO:")
            print(format_table({"before": before, "after": after}))
    print(f"model saved to {final}")
    return history
