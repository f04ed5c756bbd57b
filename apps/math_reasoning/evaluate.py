"""Evaluation: pass@1 (mean over k samples), pass@k and maj@k, format rate, overall and per level (the
offline set's level 3 is the hard tail), on the held-out offline set or any benchmark file.

    grpo-suite math eval --model runs/math/<run>/final                  # held-out offline set, k = 8
    grpo-suite math eval --model DIR --data math500.jsonl --template boxed --samples 4

Hints are never shown (Scaf-GRPO is measured without them). Results go to <run>/eval.json when the model
is a run's `final` (or `final_large`) directory, else to --run-dir. The policy's (`final`) pass@1 and
pass@k also go to eval.json's `pass_at_k` {benchmark: {"1", "k"}} for the dashboard's Math page; each
benchmark evaluated into the same run adds its entry, replacing that benchmark's entry of an earlier
evaluation (training's `offline` included): the page shows the latest evaluation of each benchmark.
"""

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from apps.math_reasoning.data import (
    FORMATS,
    HARD_LEVEL,
    MIXES,
    check_data_format,
    level_number,
    load_examples,
    mix_levels,
    offline_sets,
)
from apps.math_reasoning.rewards import format_rewards, same_answer
from apps.math_reasoning.templates import TEMPLATES, Template, get_template
from core.config import config_to_dict
from core.data import InputError, check_prompt_lengths
from core.policy import load_policy
from core.rollout import HFGenerateBackend, SamplingSettings, derive_seed
from core.runs import (
    RunDir,
    default_run_dir,
    is_run_dir,
    latest_config,
    refuse_a_file_in_the_way,
    refuse_another_apps_run,
    training_run,
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], gold: str) -> float:
    """maj@k of one problem: 1 when the most frequent extracted answer equals the gold; a tie between m
    answers counts 1/m when the gold is one of them (the expected score of breaking the tie at random: with
    k = 4 and four different answers, "the first one" would make maj@4 the first sample's correctness).
    None and an empty answer (`<answer> </answer>`) never vote. Votes go to classes of equal answers
    (`same_answer`), so "1,000" and "1000" vote together.

    >>> majority_correct(["3", "4", "4", None], "4"), majority_correct([None, None], "4")
    (1.0, 0.0)
    >>> majority_correct(["7", "1,000", "1000"], "1000"), majority_correct(["7", "8", "9", "8", "7"], "8")
    (1.0, 0.5)
    """
    # identical texts counted first: math-verify (up to its timeout each) compares distinct texts only
    votes = Counter(a.strip() for a in answers if a is not None and a.strip())
    classes: list[list] = []  # [first text, votes]; each holds equal answers
    for answer, count in votes.items():
        home = next((c for c in classes if same_answer(answer, c[0])), None)
        if home is None:
            classes.append([answer, count])
        else:
            home[1] += count
    if not classes:
        return 0.0
    most = max(count for _, count in classes)
    winners = [answer for answer, count in classes if count == most]
    return sum(same_answer(answer, gold) for answer in winners) / len(winners)


def check_eval_prompts(
    examples: list[dict], template: Template, tokenizer, max_new_tokens: int, max_context: int | None
) -> None:
    """InputError naming the first evaluation problem whose prompt (the template's, without hints) plus
    `max_new_tokens` does not fit the model's context: generation would fail on it with an IndexError."""
    if max_context is None:
        return
    prompts = [
        {"id": ex.get("id", i), "prompt": template.render(ex["question"])} for i, ex in enumerate(examples)
    ]
    try:
        check_prompt_lengths(prompts, tokenizer, max_new_tokens, max_context)
    except InputError as err:
        raise InputError(f"evaluation set: {err}") from err


def evaluate_model(
    model,
    tokenizer,
    examples: list[dict],
    template: Template,
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_rows: int = 64,
    device: str = "cpu",
) -> dict:
    """Sample `samples` completions per example; summary metrics overall and per level."""
    backend = HFGenerateBackend(model, tokenizer, device=device)
    check_eval_prompts(examples, template, tokenizer, max_new_tokens, backend.max_context)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    formats = format_rewards(template)
    per_chunk = max(1, batch_rows // samples)
    records = []
    start = time.perf_counter()
    for first in range(0, len(examples), per_chunk):
        chunk = examples[first : first + per_chunk]
        prompts = [template.render(ex["question"]) for ex in chunk for _ in range(samples)]
        # each problem's k samples from its own generator: the same whatever --batch-rows groups them with
        seeds = [derive_seed(seed, first + i) for i in range(len(chunk))]
        out = backend.generate_groups(prompts, settings, seeds, samples)
        for i, ex in enumerate(chunk):
            completions = out.completions[i * samples : (i + 1) * samples]
            answers = [template.extract(text) for text in completions]
            correct = [a is not None and same_answer(a, str(ex["answer"])) for a in answers]
            formatted = [all(fn(text, ex) for fn in formats.values()) for text in completions]
            records.append(
                {
                    "level": ex.get("level"),
                    "correct": sum(correct),
                    "majority": majority_correct(answers, str(ex["answer"])),
                    "formatted": sum(formatted),
                }
            )
    results = {"all": _summary(records, samples), "samples": samples, "seconds": time.perf_counter() - start}
    by_level: dict[tuple, list[dict]] = {}
    for r in records:
        if r["level"] is not None:
            by_level.setdefault(_level(r["level"]), []).append(r)
    for (_, name), group in sorted(by_level.items()):
        results[name] = _summary(group, samples)
    if f"level{HARD_LEVEL}" in results and all(ex.get("source") == "offline" for ex in examples):
        results["hard"] = results[f"level{HARD_LEVEL}"]  # the offline set's hard tail, not MATH's level 3
    return results


def _level(level) -> tuple[tuple, str]:
    """Where a level's results go among the others, and their key: a numbered level ("level3", from 3 or
    MATH's "Level 3") in order of its number, then any other ("level one") in order of its text.

    >>> _level(3), _level("Level 3"), _level("one")
    (((0, 3, ''), 'level3'), ((0, 3, ''), 'level3'), ((1, 0, 'one'), 'level one'))
    """
    number = level_number(level)
    if number is None:
        return (1, 0, str(level)), f"level {level}"
    return (0, number, ""), f"level{number}"


def _summary(records: list[dict], samples: int) -> dict:
    n = len(records)
    return {
        "examples": n,
        "pass@1": sum(pass_at_k(samples, r["correct"], 1) for r in records) / n,
        f"pass@{samples}": sum(pass_at_k(samples, r["correct"], samples) for r in records) / n,
        f"maj@{samples}": sum(r["majority"] for r in records) / n,
        "format_rate": sum(r["formatted"] for r in records) / (n * samples),
    }


def benchmark_name(data: str | None) -> str:
    """The `pass_at_k` key of an evaluation set: the benchmark file's stem, or "offline" (the held-out set).

    >>> benchmark_name("data/math500.jsonl"), benchmark_name(None)
    ('math500', 'offline')
    """
    return Path(data).stem if data else "offline"


def pass_at_k_entry(results: dict) -> dict[str, float]:
    """{"1": pass@1, "k": pass@k} of `evaluate_model`'s results over all problems (one key when k = 1).

    >>> pass_at_k_entry({"samples": 4, "all": {"pass@1": 0.25, "pass@4": 0.5}})
    {'1': 0.25, '4': 0.5}
    """
    k = results["samples"]
    return {str(n): results["all"][f"pass@{n}"] for n in sorted({1, k})}


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class MathEvalConfig:
    """`grpo-suite math eval`: sample k completions per problem and report pass@1, pass@k, maj@k."""

    model: str | None = _help("HF model directory to evaluate (e.g. runs/math/<run>/final)", None)
    data: str | None = _help(
        "benchmark file (JSONL/JSON/CSV/Parquet); default: the held-out offline set", None
    )
    data_format: str = _help(f"one of {', '.join(FORMATS)}", "auto")
    data_seed: int | None = _help("seed of the offline sets; default: the run's, else 1234", None)
    data_mix: str | None = _help(
        f"difficulty mix of the offline sets: {', '.join(MIXES)}; default: the run's, else default", None
    )
    template: str | None = _help(
        f"prompt template: one of {', '.join(TEMPLATES)}; default: the run's, else r1_short", None
    )
    samples: int = _help("completions per problem (k)", 8)
    temperature: float = _help("sampling temperature", 1.0)
    max_new_tokens: int | None = _help("completion length cap; default: the run's, else 80", None)
    max_examples: int = _help("evaluate N evenly spaced problems; 0 = all", 0)
    batch_rows: int = _help(
        "completions generated per call (each problem's samples draw from their own seed, whatever the call)",
        64,
    )
    seed: int = _help("sampling seed", 0)
    device: str = _help("cpu or cuda", "cpu")
    run_dir: str | None = _help("where eval.json goes; default: the model's run, else runs/math/<time>", None)

    def __post_init__(self):
        if self.model is None:
            raise ValueError("--model is required (an HF model directory, e.g. runs/math/<run>/final)")
        # unset: as the model's training run was (its config.json), else the train command's defaults
        run = training_run(self.model, "math")
        trained = latest_config(run.read_config()) if run else {}
        for name, fallback in RUN_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, trained.get(name, fallback))
        get_template(self.template)
        mix_levels(self.data_mix)
        check_data_format(self.data_format)  # before a model is built or loaded
        if self.samples < 1 or self.max_new_tokens < 1 or self.max_examples < 0 or self.batch_rows < 1:
            raise ValueError("samples, max_new_tokens and batch_rows must be >= 1, max_examples >= 0")
        if not self.temperature > 0:  # nan too
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


RUN_DEFAULTS = {"data_seed": 1234, "data_mix": "default", "template": "r1_short", "max_new_tokens": 80}


def spread_subset(examples: list[dict], n: int) -> list[dict]:
    """`n` evenly spaced examples (all of them when n is 0 or too large): a prefix of the offline test set
    would hold only its first level.

    >>> [e["i"] for e in spread_subset([{"i": i} for i in range(10)], 3)]
    [0, 3, 7]
    """
    if not n or n >= len(examples):
        return examples
    return [examples[round(i * len(examples) / n)] for i in range(n)]


def load_eval_examples(
    data: str | None, data_format: str, data_seed: int, max_examples: int, data_mix: str = "default"
) -> list[dict]:
    examples = load_examples(data, data_format) if data else offline_sets(data_seed, mix=data_mix).test
    return spread_subset(examples, max_examples)


def run_eval(config: MathEvalConfig) -> dict:
    trained = training_run(config.model, "math")
    run_path = Path(config.run_dir) if config.run_dir else None
    if run_path is None:
        run_path = trained.path if trained else default_run_dir("math")
    refuse_a_file_in_the_way(run_path, "--run-dir")  # before the evaluation, not after it
    refuse_another_apps_run(run_path, "math")
    model, tokenizer = load_policy(config.model, device=config.device)
    examples = load_eval_examples(
        config.data, config.data_format, config.data_seed, config.max_examples, config.data_mix
    )
    results = evaluate_model(
        model,
        tokenizer,
        examples,
        get_template(config.template),
        samples=config.samples,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
        batch_rows=config.batch_rows,
        device=config.device,
    )
    results |= {"model": config.model, "template": config.template, "max_new_tokens": config.max_new_tokens}
    results["data"] = config.data or (
        f"offline held-out set (data_seed {config.data_seed}, mix {config.data_mix})"
    )
    if is_run_dir(run_path):
        target = RunDir(run_path)
    else:  # a run of its own, so the dashboard lists it, under the algorithm that trained the model
        algorithm = trained.read_config()["algorithm"] if trained else "eval"
        target = RunDir.create(
            run_path, config_to_dict(config), app="math", algorithm=algorithm, exist_ok_for_resume=False
        )
    previous = target.read_eval() if target.eval_path.is_file() else {}
    # eval_<benchmark>: what `train` wrote under eval / eval_large stays; the run's other models have
    # their own keys, so that they do not overwrite the trained policy's
    roles = {"final_large": "large_", "base_model": "base_", "base_model_large": "base_large_"}
    role = roles.get(Path(config.model).name, "")
    benchmark = benchmark_name(config.data)
    key = f"eval_{role}{benchmark}"
    update = {key: results}
    if not role:  # the trained policy's numbers only: CoDistill's large model or the base are not the run's
        update["pass_at_k"] = previous.get("pass_at_k", {}) | {benchmark: pass_at_k_entry(results)}
    target.write_eval(previous | update)
    if not target.status_path.is_file():  # a run of its own, written whole here; a training run keeps its own
        target.set_status("finished", step=0)
    print(format_results(results))
    print(f"results written to {target.eval_path} under {key!r}")
    return results


def format_results(results: dict) -> str:
    """The results as a table, a row per subset; pass@k is left out when k is 1 (it is pass@1)."""
    k = results["samples"]
    columns = [f"pass@{n}" for n in sorted({1, k})] + [f"maj@{k}", "format_rate"]
    lines = [f"{'subset':<8} {'n':>5} " + " ".join(f"{c.removesuffix('_rate'):>7}" for c in columns)]
    for name, row in results.items():
        if isinstance(row, dict) and "pass@1" in row and name != "hard":
            lines.append(f"{name:<8} {row['examples']:>5} " + " ".join(f"{row[c]:>7.3f}" for c in columns))
    return "\n".join(lines)
