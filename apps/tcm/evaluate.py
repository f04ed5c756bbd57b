"""TCM QA evaluation: greedy answers on a split, scored per question type, written to eval.json.

Per type: accuracy (choice: letters as in the accuracy reward; fill-in and open: normalized exact match),
format-compliance rate (the strict format reward), mean tag count, and for the free-text types ROUGE-L F1
(rouge-score) and corpus BLEU-4 (nltk, smoothing method 1), both on jieba words.

    grpo-suite tcm evaluate --model runs/tcm/<run>/final --split test
    grpo-suite tcm evaluate --model DIR --data ladder.jsonl --split test --max-examples 500

Tests: `pytest tests/apps/tcm/test_tcm_eval.py`.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

from apps.tcm.data import TYPES
from apps.tcm.rewards import (
    accuracy,
    answer_text,
    fill_answer,
    free_answer,
    normalized_match,
    rouge_l,
    strict_format,
    tag_count,
    zh_tokens,
)
from core.data import check_prompt_lengths
from core.policy import load_policy
from core.rollout import HFGenerateBackend, SamplingSettings
from core.runs import latest_config, training_run

FREE_TEXT = ("fill", "open")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 on jieba words (nltk, smoothing method 1: short answers have no 4-grams)."""
    hypotheses = [zh_tokens(p) for p in predictions]
    refs = [[zh_tokens(r)] for r in references]
    if not any(hypotheses):
        return 0.0
    return float(corpus_bleu(refs, hypotheses, smoothing_function=SmoothingFunction().method1))


def score_completions(completions: Sequence[str], examples: Sequence[dict]) -> dict:
    """{"overall": {...}, "by_type": {type: {...}}} for completions answering `examples` (pure)."""
    if len(completions) != len(examples) or not examples:
        raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
    rows = []
    for completion, example in zip(completions, examples, strict=True):
        free = example["type"] in FREE_TEXT
        if example["type"] == "fill":
            prediction = fill_answer(completion, example["question"])
        else:
            prediction = free_answer(completion) if free else answer_text(completion)
        rows.append(
            {
                "type": example["type"],
                "accuracy": float(normalized_match(prediction, example["answer"]))
                if free
                else accuracy(completion, example),
                "format": strict_format(completion, example),
                "tags": tag_count(completion, example),
                "prediction": prediction,
                "reference": example["answer"],
            }
        )

    def summary(group: list[dict]) -> dict:
        out = {
            "n": len(group),
            "accuracy": sum(r["accuracy"] for r in group) / len(group),
            "format_rate": sum(r["format"] for r in group) / len(group),
            "tag_count": sum(r["tags"] for r in group) / len(group),
        }
        if group[0]["type"] in FREE_TEXT:
            out["rouge_l"] = sum(rouge_l(r["prediction"], r["reference"]) for r in group) / len(group)
            out["bleu"] = bleu([r["prediction"] for r in group], [r["reference"] for r in group])
        return out

    by_type = {t: summary(g) for t in TYPES if (g := [r for r in rows if r["type"] == t])}
    overall = {key: sum(r[key] for r in rows) / len(rows) for key in ("accuracy", "format")}
    return {
        "overall": {"n": len(rows), "accuracy": overall["accuracy"], "format_rate": overall["format"]},
        "by_type": by_type,
    }


def dashboard_keys(metrics: dict) -> dict:
    """The dashboard's eval.json keys (docs/dashboards.md, "TCM: eval.json") of one `score_completions`
    result: {"accuracy_by_type": {type: accuracy}, "count_by_type": {type: n}}.

    >>> dashboard_keys({"overall": {}, "by_type": {"single": {"n": 4, "accuracy": 0.5, "format_rate": 1.0}}})
    {'accuracy_by_type': {'single': 0.5}, 'count_by_type': {'single': 4}}
    """
    by_type = metrics["by_type"]
    return {
        "accuracy_by_type": {kind: row["accuracy"] for kind, row in by_type.items()},
        "count_by_type": {kind: row["n"] for kind, row in by_type.items()},
    }


def evaluate_model(
    model,
    tokenizer,
    examples: Sequence[dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: str,
    seed: int,
) -> tuple[dict, list[str]]:
    """Greedy completions of the examples' prompts and their scores: (metrics, completions)."""
    backend = HFGenerateBackend(model, tokenizer, device=device, batch_size=batch_size)
    if backend.max_context is not None:  # a prompt too long for it would fail generation with an IndexError
        check_prompt_lengths(examples, tokenizer, max_new_tokens, backend.max_context)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, greedy=True)
    rollouts = backend.generate([example["prompt"] for example in examples], settings, seed)
    return score_completions(rollouts.completions, examples), rollouts.completions


def format_table(results: dict[str, dict]) -> str:
    """A per-type table of accuracy and format rate for one or more named results ("before", "after")."""
    lines = [f"{'type':<10}" + "".join(f"{name + ' acc':>13}{name + ' fmt':>13}" for name in results)]
    any_result = next(iter(results.values()))
    for kind in [*any_result["by_type"], "overall"]:
        cells = []
        for result in results.values():
            row = result["overall"] if kind == "overall" else result["by_type"][kind]
            cells.append(f"{row['accuracy']:>13.3f}{row['format_rate']:>13.3f}")
        lines.append(f"{kind:<10}" + "".join(cells))
    return "\n".join(lines)


RUN_DEFAULTS = {"data": None, "seed": 0, "max_new_tokens": 512, "system_prompt": "paper"}


@dataclass
class TcmEvalConfig:
    """Evaluate a model directory (full model or LoRA adapter) on a split of the TCM QA data."""

    model: str | None = field(
        default=None, metadata={"help": "HF model or PEFT adapter directory (required)"}
    )
    data: str | None = field(
        default=None,
        metadata={"help": "TCM-Ladder-style file; default: the model's run's, else the offline set"},
    )
    run_dir: str | None = field(
        default=None, metadata={"help": "where eval.json goes; default runs/tcm/<time>"}
    )
    split: Literal["train", "val", "test"] = field(default="test", metadata={"help": "split to evaluate"})
    seed: int | None = field(
        default=None,
        metadata={"help": "seed of the offline set and of the split; default: the model's run's, else 0"},
    )
    max_examples: int = field(default=0, metadata={"help": "evaluate the first N of the split; 0 = all"})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "completion length cap; default: the model's run's, else 512"}
    )
    batch_size: int = field(default=32, metadata={"help": "prompts per generate call"})
    system_prompt: Literal["paper", "short"] | None = field(
        default=None, metadata={"help": "system prompt; default: the model's run's, else paper"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})

    def __post_init__(self):
        if self.model is None:
            raise ValueError("--model is required: the model directory to evaluate")
        # unset: as the model was trained (its run's config.json): the split depends on the seed, so
        # another seed would score the model on facts it was trained on
        run = training_run(self.model, "tcm")
        trained = latest_config(run.read_config()) if run else {}
        for name, fallback in RUN_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, trained.get(name, fallback))
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")


def main(config: TcmEvalConfig) -> dict:
    from apps.tcm.train import (
        nonempty_split,
        raw_splits,
        with_prompts,
    )  # the same data and prompts as training
    from core.config import config_to_dict
    from core.runs import RunDir, default_run_dir, refuse_a_file_in_the_way, refuse_existing_run

    run_dir = config.run_dir or str(default_run_dir("tcm"))
    refuse_a_file_in_the_way(run_dir, "--run-dir")  # both before the evaluation, not after it
    refuse_existing_run(run_dir)
    print(f"run directory: {run_dir}")
    splits = raw_splits(config.data, config.seed)  # a bad file is named before a (large) model loads
    nonempty_split(splits, config.split, config.data)
    model, tokenizer = load_policy(config.model, device=config.device)
    examples = nonempty_split(
        with_prompts(splits, tokenizer, config.system_prompt), config.split, config.data
    )
    if config.max_examples:
        examples = examples[: config.max_examples]
    metrics, completions = evaluate_model(
        model,
        tokenizer,
        examples,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        device=config.device,
        seed=config.seed,
    )
    run = RunDir.create(
        run_dir, config_to_dict(config), app="tcm", algorithm="eval", exist_ok_for_resume=False
    )
    run.write_eval(
        {"split": config.split, "model": config.model, config.split: metrics, **dashboard_keys(metrics)}
    )
    run.set_status("finished", step=0)  # its own run, written whole here
    print(format_table({config.split: metrics}))
    return metrics
