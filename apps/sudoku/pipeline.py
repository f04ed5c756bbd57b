"""`grpo-suite sudoku pipeline`: the paper's comparison in one command, offline. SFT on random-order and on
solver-order completions, GRPO from the random-order model at each cell:order mixture, then one held-out
evaluation table: SFT-random, SFT-solver, GRPO cell-only (w = 1), GRPO mixed (w < 1).

grpo-suite sudoku pipeline                        # the default preset: 4x4, minutes on 2 CPU cores
grpo-suite sudoku pipeline --preset experiment --seed 1   # the longer experiment (docs/sudoku.md)

The run directory holds sft-random/, sft-solver/, grpo-w<w>/ (each a run with its own eval.json) and the
pipeline's own eval.json with every row of the table, rewritten after each stage. `--resume` skips the stages
whose row is there, continues a GRPO stage from its newest checkpoint (saved every `save_every` steps) and
restarts an unfinished SFT stage (SFT keeps no checkpoints). It refuses settings other than the run's own,
naming them: the rows it keeps were computed with those.
"""

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from apps.sudoku.data import load_puzzles
from apps.sudoku.evaluate import table
from apps.sudoku.model import load_sudoku_policy
from apps.sudoku.train import (
    SudokuSFTConfig,
    SudokuTrainConfig,
    refuse_short_completions,
    run_sft,
    run_train,
    sft_config_from,
)
from core.config import config_to_dict
from core.launch import with_run_dir
from core.runs import RunDir, failure_recorded, refuse_changed_pipeline

APP = "sudoku"
# fields a resumed pipeline may change: where and how it runs, not what it computes
HOW_IT_RUNS = ("resume", "run_dir", "threads", "device")


@dataclass
class SudokuPipelineConfig(SudokuTrainConfig):
    """Every SFT and GRPO field, plus the mixtures to train."""

    # each SFT stage starts from --model when one is given, so only the shape goes unread then
    OFFLINE_MODEL_FIELDS: ClassVar = SudokuSFTConfig.OFFLINE_MODEL_FIELDS

    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the pipeline in --run-dir with its own settings: skip the stages that have their "
            "row in its eval.json, continue an unfinished GRPO stage from its newest checkpoint and start an "
            "unfinished SFT stage over; only --threads and --device may change"
        },
    )
    cell_weight: float = field(
        default=SudokuTrainConfig.cell_weight,
        metadata={
            "help": "not used: the pipeline takes its cell weights from --mixtures and refuses a value other "
            "than the default"
        },
    )
    mixtures: tuple[float, ...] = field(
        default=(1.0, 0.75),
        metadata={"help": "cell weights w of the GRPO runs, comma-separated (1 = cell only)"},
    )
    solver_baseline: bool = field(default=True, metadata={"help": "also SFT on solver order (a baseline)"})

    def __post_init__(self):
        super().__post_init__()
        if not self.mixtures or any(not 0 <= w <= 1 for w in self.mixtures):
            raise ValueError(f"mixtures must be cell weights in [0, 1], got {self.mixtures}")
        for i, w in enumerate(self.mixtures):  # else a later stage would take an earlier one's directory
            for v in self.mixtures[:i]:
                if v == w or stage_name(v) == stage_name(w):
                    raise ValueError(
                        f"mixtures {v!r} and {w!r} would share the stage directory {stage_name(w)} (a cell "
                        "weight is named by its first 6 significant digits); give weights that differ there"
                    )
        if not self.eval_puzzles:
            raise ValueError("the pipeline compares held-out results: eval_puzzles must be > 0")
        if self.cell_weight != SudokuTrainConfig.cell_weight:
            raise ValueError(
                f"cell_weight={self.cell_weight}: the pipeline trains one GRPO run per cell weight in "
                "--mixtures; set them there"
            )


def stage_name(w: float) -> str:
    """The directory of the GRPO stage with cell weight w."""
    return f"grpo-w{w:g}"


def row_name(w: float) -> str:
    return "grpo cell-only" if w == 1.0 else f"grpo mixed {w:g}:{1 - w:g}"


def run_pipeline(config: SudokuPipelineConfig) -> dict[str, dict]:
    start, cpu_start = time.perf_counter(), time.process_time()
    config = with_run_dir(config, APP, "pipeline")  # --resume needs the directory of an earlier pipeline
    root = Path(config.run_dir)
    if config.resume:
        refuse_changed_pipeline(root, config_to_dict(config), HOW_IT_RUNS)  # it reuses finished rows
    puzzles = load_puzzles(config)  # bad puzzle settings or a bad file stop here, before a run exists
    refuse_short_completions(puzzles[0], config.max_new_tokens)  # the training puzzles
    if config.model:  # and so does a bad --model (each SFT stage loads it again)
        load_sudoku_policy(config.model)
    run = RunDir.create(
        root, config_to_dict(config), app=APP, algorithm="pipeline", exist_ok_for_resume=config.resume
    )
    done = run.read_eval() if config.resume and run.eval_path.is_file() else {}
    rows: dict[str, dict] = done.get("rows", {})  # the status step of a pipeline: its finished rows
    run.set_status("running", step=len(rows))
    times: dict[str, float] = done.get("seconds", {})
    earlier_total, earlier_cpu = done.get("total_seconds", 0.0), done.get("cpu_seconds", 0.0)
    orders = ["random", "solver"] if config.solver_baseline else ["random"]
    names = [f"sft-{o}" for o in orders] + [row_name(w) for w in config.mixtures]

    def record(name: str, result: dict, began: float) -> None:
        rows[name], times[name] = result, time.perf_counter() - began
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        run.write_eval(
            {
                "rows": {n: rows[n] for n in names if n in rows},  # the table's order, whatever ran first
                "seconds": times,
                "total_seconds": earlier_total + total,
                "cpu_seconds": earlier_cpu + cpu,
            }
        )
        run.set_status("running", step=len(rows))

    print(f"puzzles: {len(puzzles[0])} train, {len(puzzles[1])} held out (split by solution grid)")
    with failure_recorded(run, step=lambda: len(rows)):
        for order in (o for o in orders if f"sft-{o}" not in rows):
            began = time.perf_counter()
            sft_config = sft_config_from(
                config, model=config.model, run_dir=str(root / f"sft-{order}"), order=order
            )
            record(f"sft-{order}", run_sft(sft_config, puzzles, resume=config.resume), began)
        for w in (w for w in config.mixtures if row_name(w) not in rows):
            began = time.perf_counter()
            stage = root / stage_name(w)
            train_config = SudokuTrainConfig(
                **{k: getattr(config, k) for k in _train_fields()}
                | {
                    "model": str(root / "sft-random" / "final"),
                    "run_dir": str(stage),
                    "cell_weight": w,
                    "resume": config.resume and (stage / "config.json").is_file(),  # a stage begun before
                }
            )
            record(row_name(w), run_train(train_config, puzzles), began)
    run.set_status("finished", step=len(rows))
    rows = {name: rows[name] for name in names}
    n = puzzles[0][0].n
    print(
        f"\nheld-out {n}x{n} puzzles: {rows['sft-random']['puzzles']}, "
        f"total {run.read_eval()['total_seconds']:.0f}s"
    )
    print(table(rows))
    return rows


def _train_fields() -> list[str]:
    return [f.name for f in fields(SudokuTrainConfig)]
