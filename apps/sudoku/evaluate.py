"""`grpo-suite sudoku eval`: greedy, structurally constrained decoding of held-out puzzles; cell accuracy,
complete-puzzle accuracy, order agreement with the logic solver (mean order reward / E and Kendall tau) and
format validity, written to the run directory's eval.json and printed as a table.

grpo-suite sudoku eval --model runs/sudoku/<run>/final      # eval.json next to the model's run

The result goes under the key "eval" of eval.json, next to what the run's training wrote there, with the
puzzle settings it was measured on; settings that differ from the run's own are named in a warning.
"""

import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apps.sudoku.data import PuzzleConfig, load_puzzles
from apps.sudoku.model import ConstrainedBackend, load_sudoku_policy
from apps.sudoku.rewards import puzzle_metrics
from apps.sudoku.serialize import to_example
from core.config import config_to_dict
from core.rollout import SamplingSettings
from core.runs import RunDir, default_run_dir, latest_config, refuse_another_apps_run

METRICS = ("cell_accuracy", "solved", "order_reward_norm", "kendall_tau", "format_valid")
HEADERS = ("cell acc", "solved", "order", "tau", "valid")


@dataclass
class ThreadsField:
    """torch's CPU threads, for every command that runs a model."""

    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default"})

    def __post_init__(self):
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {self.threads}")

    def set_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)


@dataclass
class SudokuEvalConfig(ThreadsField, PuzzleConfig):
    """Evaluate one model directory on held-out puzzles."""

    model: str | None = field(default=None, metadata={"help": "HF model directory to evaluate (required)"})
    run_dir: str | None = field(
        default=None,
        metadata={
            "help": "run directory for eval.json; default: the model's run (<run>/final), else a new one"
        },
    )
    eval_puzzles: int = field(default=256, metadata={"help": "held-out puzzles evaluated (the first N)"})
    batch_size: int = field(default=256, metadata={"help": "puzzles decoded at once"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})

    def __post_init__(self):
        ThreadsField.__post_init__(self)
        PuzzleConfig.__post_init__(self)
        if self.eval_puzzles < 1:
            raise ValueError(f"eval_puzzles must be >= 1 (the puzzles to evaluate), got {self.eval_puzzles}")
        if self.batch_size < 1:  # else found after the model loads: "range() arg 3 must not be zero"
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def evaluate_model(model, tokenizer, examples: list[dict], batch_size: int = 256) -> dict[str, float]:
    """Mean per-puzzle metrics (apps.sudoku.rewards.puzzle_metrics) of greedy completions, plus counts."""
    backend = ConstrainedBackend(model, tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    settings = SamplingSettings(max_new_tokens=3 * 81 + 1, greedy=True)
    rollouts = backend.generate([ex["prompt"] for ex in examples], settings, seed=0)
    rows = [puzzle_metrics(c, ex) for c, ex in zip(rollouts.completions, examples, strict=True)]
    out = {name: statistics.fmean(row[name] for row in rows) for name in METRICS}
    out["puzzles"] = len(examples)
    out["seconds"] = time.perf_counter() - start
    return out


def table(rows: dict[str, dict]) -> str:
    """A fixed-width table: one row per named result."""
    width = max(len(name) for name in rows) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{h:>10}" for h in HEADERS)]
    for name, result in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{result[m]:>10.3f}" for m in METRICS))
    return "\n".join(lines)


def held_out_examples(config: PuzzleConfig, limit: int) -> list[dict]:
    _, held_out = load_puzzles(config)
    return [to_example(p, i, "eval") for i, p in enumerate(held_out[:limit])]


def run_eval(config: SudokuEvalConfig) -> dict:
    if config.model is None:
        raise FileNotFoundError("sudoku eval needs --model DIR (an HF model directory, e.g. <run>/final)")
    config.set_threads()
    examples = held_out_examples(config, config.eval_puzzles)  # a bad puzzle file stops here, before a run
    model_path = Path(config.model)
    if config.run_dir:
        run_path = Path(config.run_dir)
    elif model_path.name == "final" and (model_path.parent / "config.json").is_file():
        run_path = model_path.parent
    else:
        run_path = default_run_dir("sudoku")
    refuse_another_apps_run(run_path, "sudoku")  # before the model is loaded and evaluated
    model, tokenizer = load_sudoku_policy(config.model, device=config.device)
    print(f"run directory: {run_path}")
    settings = {name: getattr(config, name) for name in PuzzleConfig.__dataclass_fields__}
    if (run_path / "config.json").is_file():
        run = RunDir(run_path)
        trained_on = latest_config(run.read_config())
        differ = [
            f"{k}={v!r} (run: {trained_on[k]!r})" for k, v in settings.items() if trained_on.get(k, v) != v
        ]
        if differ:
            warnings.warn(
                f"{run_path}: held-out puzzles built with other settings than the run's: {', '.join(differ)}",
                stacklevel=1,
            )
    else:
        run = RunDir.create(
            run_path, config_to_dict(config), app="sudoku", algorithm="eval", exist_ok_for_resume=False
        )
    result = evaluate_model(model, tokenizer, examples, config.batch_size)
    previous = run.read_eval() if run.eval_path.is_file() else {}
    run.write_eval(previous | {"eval": {"model": str(model_path), "puzzle_settings": settings, **result}})
    if not run.status_path.is_file():  # a run of its own, written whole here; a training run keeps its own
        run.set_status("finished", step=0)
    print(table({model_path.parent.name or str(model_path): result}))
    print(f"results written to {run.eval_path} under 'eval'")
    return result
