"""`grpo-suite debias eval`: bias metrics of a policy (and of its starting point), written to eval.json.

For each split (test, and the held-out category) the policy samples `samples_per_prompt` answers per
prompt; we report, overall and per category:
- fairness (mean of the reward model's fairness probability) and bias intensity = 1 - fairness,
  biased rate (share of answers with fairness < 0.5), relevance and quality (the other two heads);
- perplexity of the answers (their sampled token ids) under a frozen reference LM (default: the starting
  policy), independent of the reward model, to catch reward hacking (an answer the reward model likes but
  nobody would write);
- distinct-1 / distinct-2 (unique word n-grams over all n-grams of the split's answers) for diversity.
With `--baseline-model` the same is computed for it ("before") and the policy ("after"), with deltas.
The splits must be those the reward model was trained on (`apps.debias.data.check_reward_model_data`).
For the dashboard's De-bias page (docs/dashboards.md) eval.json also holds `bias` {category: {"before",
"after"}}, the bias intensity (1 - mean fairness probability; lower is fairer) over every split, and
`responses`: per category and stage the `RESPONSES_PER_SIDE` fairest and least fair answers with their bias.

    grpo-suite debias eval --model runs/debias/X/final --baseline-model runs/debias/X/base_model \
        --reward-model runs/rm/model
Tests: `pytest tests/apps/debias/`.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apps.debias.data import SPLITS, check_reward_model_data, load_splits
from apps.debias.train import policy_examples
from core.config import config_to_dict
from core.policy import load_policy
from core.rollout import HFGenerateBackend, SamplingSettings, derive_seed
from core.runs import RunDir, default_run_dir, is_run_dir, refuse_a_file_in_the_way
from reward_models.pairs import read_split
from reward_models.score import RewardModelScorer

APP = "debias"
RESPONSES_PER_SIDE = 3  # fairest and least fair answers kept per category and stage in eval.json


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class DebiasEvalConfig:
    """`grpo-suite debias eval`."""

    model: str = _help("policy directory to evaluate (e.g. <run>/final)", "")
    baseline_model: str | None = _help("the starting policy, evaluated too as 'before'", None)
    reference_model: str | None = _help(
        "frozen LM for perplexity; default: the baseline, else the model", None
    )
    reward_model: str = _help("reward model directory", "")
    data_dir: str | None = _help("directory with the splits; default: generated in memory", None)
    splits: tuple[str, ...] = _help("splits to evaluate", ("test", "heldout"))
    max_prompts: int = _help("prompts per split (the first ones); 0 = all", 64)
    samples_per_prompt: int = _help("sampled answers per prompt", 2)
    max_new_tokens: int = _help("answer length cap (as `debias train`'s)", 48)
    temperature: float = _help("sampling temperature (1 = the policy's own distribution)", 1.0)
    seed: int = _help(
        "sampling seed; each split draws from its own seed derived from it, alike for both models", 0
    )
    run_dir: str | None = _help(
        "where eval.json goes; default: the model's run directory if it is <run>/final", None
    )
    device: str = _help("cpu or cuda", "cpu")

    def __post_init__(self):
        if not self.model or not self.reward_model:
            raise ValueError("--model and --reward-model are required")
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise ValueError(
                f"splits: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(SPLITS)}"
            )
        if self.samples_per_prompt < 1 or self.max_prompts < 0:
            raise ValueError("samples_per_prompt must be >= 1 and max_prompts >= 0")
        if self.max_new_tokens < 1 or not self.temperature > 0:
            raise ValueError(
                f"need max_new_tokens >= 1 and temperature > 0, got {self.max_new_tokens}, {self.temperature}"
            )


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams over `texts` (0 when there are none).

    >>> distinct_n(["a b a b"], 1), distinct_n(["a b a b"], 2)
    (0.5, 0.6666666666666666)
    """
    grams = [
        tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def perplexity(model, tokenizer, prompts: list[str], answers: list[list[int]], batch_size: int = 32) -> float:
    """exp(mean NLL per answer token) of the answers (token ids of `tokenizer`, an eos included where the
    answer stopped rather than ending at the length cap) given their prompts."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        rows, targets = [], []
        for prompt, a in zip(
            prompts[start : start + batch_size], answers[start : start + batch_size], strict=True
        ):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            rows.append(p + a)
            targets.append([-100] * len(p) + a)
        width = max(map(len, rows))
        ids = torch.tensor(
            [r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows]
        )  # (B, L) right-padded
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, L)
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])  # (B, L)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += int((labels[:, 1:] != -100).sum())
    return math.exp(total_nll / max(total_tokens, 1))


def sample_answers(
    model_dir: str, examples: list[dict], config: DebiasEvalConfig, reference_tokenizer, seed: int
) -> tuple[list[str], list[list[int]]]:
    """`samples_per_prompt` answers per example, sampled with `seed`: their texts, and their token ids for
    the reference LM.
    Those are the sampled ids, eos included where the answer stopped (re-tokenizing the text is not the
    same: a lone byte token decodes to U+FFFD, three tokens), or, for a reference with another
    vocabulary, the text re-tokenized plus eos where the answer stopped."""
    model, tokenizer = load_policy(model_dir, device=config.device)
    backend = HFGenerateBackend(model, tokenizer, device=config.device, batch_size=64)
    settings = SamplingSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    prompts = [e["prompt"] for e in examples for _ in range(config.samples_per_prompt)]
    rollouts = backend.generate(prompts, settings, seed)
    if tokenizer.get_vocab() == reference_tokenizer.get_vocab():
        ids = [
            row[mask.bool()].tolist()
            for row, mask in zip(rollouts.completion_ids, rollouts.completion_mask, strict=True)
        ]
    else:
        eos = reference_tokenizer.eos_token_id
        ids = [
            reference_tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] * (reason == "stop")
            for text, reason in zip(rollouts.completions, rollouts.finish_reason, strict=True)
        ]
    return rollouts.completions, ids


def split_metrics(
    examples: list[dict],
    answers: list[str],
    answer_ids: list[list[int]],
    scorer: RewardModelScorer,
    reference,
) -> tuple[dict, list[float]]:
    """Metrics of one split's answers (`examples` repeated per sample, aligned with `answers` and their
    token ids for the `reference` LM), and each answer's fairness probability."""
    scores = scorer.score([e["question"] for e in examples], answers)

    def summarize(rows: list[int]) -> dict[str, float]:
        fairness = sum(scores["fairness"][i] for i in rows) / len(rows)
        return {
            "n": len(rows),
            "fairness": fairness,
            "bias_intensity": 1.0 - fairness,
            "biased_rate": sum(scores["fairness"][i] < 0.5 for i in rows) / len(rows),
            "relevance": sum(scores["relevance"][i] for i in rows) / len(rows),
            "quality": sum(scores["quality"][i] for i in rows) / len(rows),
        }

    model, tokenizer = reference
    out = summarize(list(range(len(answers))))
    out["perplexity"] = perplexity(model, tokenizer, [e["prompt"] for e in examples], answer_ids)
    out["distinct_1"] = distinct_n(answers, 1)
    out["distinct_2"] = distinct_n(answers, 2)
    out["mean_length"] = sum(map(len, answers)) / len(answers)
    out["per_category"] = {
        c: summarize([i for i, e in enumerate(examples) if e["category"] == c])
        for c in sorted({e["category"] for e in examples})
    }
    out["samples"] = [
        {"question": e["question"], "answer": a} for e, a in list(zip(examples, answers, strict=True))[:8]
    ]
    return out, list(scores["fairness"])


def bias_by_category(splits: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """{category: {stage: bias intensity}} over all splits, from each split's `per_category` summaries
    ({split: {stage: metrics}}); a category in several splits gets the mean weighted by answers.

    >>> per = lambda **c: {"per_category": {k: {"n": n, "bias_intensity": b} for k, (n, b) in c.items()}}
    >>> bias_by_category({"test": {"after": per(age=(1, 0.25))}, "heldout": {"after": per(age=(3, 0.75))}})
    {'age': {'after': 0.625}}
    """
    pooled: dict[str, dict[str, list[float]]] = {}
    for per_model in splits.values():
        for stage, metrics in per_model.items():
            for category, m in metrics["per_category"].items():
                sums = pooled.setdefault(category, {}).setdefault(stage, [0.0, 0.0])
                sums[0] += m["n"] * m["bias_intensity"]
                sums[1] += m["n"]
    return {
        category: {stage: total / n for stage, (total, n) in by_stage.items()}
        for category, by_stage in sorted(pooled.items())
    }


def pick_responses(
    examples: list[dict], answers: list[str], fairness: list[float], stage: str, per_side: int
) -> list[dict]:
    """The `per_side` least and most biased answers (bias = 1 - fairness) of each category, as the
    dashboard's `responses` rows {category, stage, prompt, response, bias}, fairest first.

    >>> ex = [{"category": "age", "question": "q"}] * 3
    >>> [r["response"] for r in pick_responses(ex, ["a", "b", "c"], [0.9, 0.1, 0.5], "after", 1)]
    ['a', 'b']
    """
    out = []
    for category in sorted({e["category"] for e in examples}):
        rows = sorted(
            (1.0 - f, i)
            for i, (e, f) in enumerate(zip(examples, fairness, strict=True))
            if e["category"] == category
        )
        keep = rows if len(rows) <= 2 * per_side else rows[:per_side] + rows[-per_side:]
        out += [
            {
                "category": category,
                "stage": stage,
                "prompt": examples[i]["question"],
                "response": answers[i],
                "bias": bias,
            }
            for bias, i in keep
        ]
    return out


def evaluation_settings(config: DebiasEvalConfig) -> dict:
    """What an evaluation's results depend on (its eval.json keeps them as `settings`): all but where they
    are written and the device."""
    return {k: v for k, v in config_to_dict(config).items() if k not in ("run_dir", "device")}


def eval_run_dir(config: DebiasEvalConfig) -> str:
    """Where eval.json goes: `--run-dir`, else the run of a `--model <run>/final`, else a new default run. An
    existing run there must be a de-bias training or evaluation run (checked before anything is sampled):
    another kind's eval.json is its own result; a directory of other files (a data directory) and one that
    is a file are refused."""
    if config.run_dir is not None:
        run_dir = config.run_dir
    elif Path(config.model).name == "final" and is_run_dir(Path(config.model).parent):
        run_dir = str(Path(config.model).parent)
    else:  # a model of no run (a final/ copied elsewhere included): an evaluation run of its own
        return str(default_run_dir(APP))
    refuse_a_file_in_the_way(run_dir, "run directory")
    if not (Path(run_dir) / "config.json").is_file() and any(Path(run_dir).glob("*")):
        raise ValueError(
            f"--run-dir {run_dir}: it holds files but no run (no config.json); give the --run-dir of a "
            "de-bias train or eval run, or a new one"
        )
    if (Path(run_dir) / "config.json").is_file():
        stored = RunDir(run_dir).read_config()
        kind = (stored.get("app"), stored.get("algorithm"))
        if kind not in ((APP, "grpo"), (APP, "eval")):
            raise ValueError(
                f"{run_dir}: it holds a {kind[0]!r} {kind[1]!r} run, whose eval.json this would replace; "
                "give the --run-dir of a de-bias train or eval run, or a new one"
            )
    return run_dir


def evaluate(config: DebiasEvalConfig) -> dict:
    run_dir = eval_run_dir(config)
    splits = load_splits(config.data_dir)
    for name in config.splits:
        if name not in splits:  # heldout asked for, without its file: the reader's error names it
            read_split(config.data_dir, name)
    scorer = RewardModelScorer(config.reward_model, device=config.device)
    check_reward_model_data(config.reward_model, scorer.training_data, splits, config.data_dir)
    reference = load_policy(
        config.reference_model or config.baseline_model or config.model, device=config.device
    )
    models = (
        {"after": config.model}
        if config.baseline_model is None
        else {"before": config.baseline_model, "after": config.model}
    )
    results: dict = {"settings": evaluation_settings(config), "splits": {}, "metrics": {}, "responses": []}
    for split in config.splits:
        rows = splits[split][: config.max_prompts or None]
        examples = policy_examples(rows)
        repeated = [e for e in examples for _ in range(config.samples_per_prompt)]
        per_model = {}
        seed = derive_seed(config.seed, SPLITS.index(split))  # each split its own draws, the same per model
        for label, path in models.items():
            answers, answer_ids = sample_answers(path, examples, config, reference[1], seed)
            per_model[label], fairness = split_metrics(repeated, answers, answer_ids, scorer, reference)
            results["responses"] += pick_responses(repeated, answers, fairness, label, RESPONSES_PER_SIDE)
            for key in (
                "fairness",
                "bias_intensity",
                "biased_rate",
                "perplexity",
                "distinct_1",
                "distinct_2",
                "relevance",
                "quality",
            ):
                results["metrics"][f"{split}/{key}/{label}"] = per_model[label][key]
        if "before" in per_model:
            before, after = per_model["before"], per_model["after"]
            results["metrics"][f"{split}/fairness/delta"] = after["fairness"] - before["fairness"]
            results["metrics"][f"{split}/perplexity/ratio"] = after["perplexity"] / before["perplexity"]
        results["splits"][split] = per_model
    results["bias"] = bias_by_category(results["splits"])
    if (Path(run_dir) / "config.json").is_file():
        run = RunDir(run_dir)
    else:  # a run of its own, so the dashboard lists it
        run = RunDir.create(
            run_dir, config_to_dict(config), app=APP, algorithm="eval", exist_ok_for_resume=False
        )
    run.write_eval(results)
    if not run.status_path.is_file():  # a run of its own, written whole here; a training run keeps its own
        run.set_status("finished", step=0)
    print(eval_table(results))
    print(f"eval written to {Path(run_dir) / 'eval.json'}")
    return results


def eval_table(results: dict) -> str:
    lines = [
        f"{'split':<9}{'model':<8}{'fairness':>9}{'biased':>8}{'relev':>7}{'qual':>7}{'ppl':>8}{'dist-2':>8}"
    ]
    for split, per_model in results["splits"].items():
        for label, m in per_model.items():
            lines.append(
                f"{split:<9}{label:<8}{m['fairness']:>9.3f}{m['biased_rate']:>8.3f}{m['relevance']:>7.3f}"
                f"{m['quality']:>7.3f}{m['perplexity']:>8.3f}{m['distinct_2']:>8.3f}"
            )
    return "\n".join(lines)
