"""`grpo-suite sudoku generate | sft | train | eval | pipeline` (entry point `apps.sudoku.cli:register`).

grpo-suite sudoku generate --size 9 --givens-min 30 --givens-max 40 --output puzzles.csv
grpo-suite sudoku pipeline                  # the main job: SFT x2 -> GRPO x2 -> one table, offline
"""

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from apps.sudoku.data import PuzzleConfig, puzzle_set
from apps.sudoku.evaluate import SudokuEvalConfig, run_eval
from apps.sudoku.pipeline import SudokuPipelineConfig, run_pipeline
from apps.sudoku.puzzles import holdout_split, write_puzzles
from apps.sudoku.train import SudokuSFTConfig, SudokuTrainConfig, run_sft, run_train
from core.cli import add_app, add_command
from core.runs import refuse_a_file_in_the_way

APP = "sudoku"


@dataclass
class SudokuGenerateConfig(PuzzleConfig):
    """Generate (or read and check) puzzles and write them as one CSV; every command that reads it with
    --data splits it the same way (by solution grid), so the file holds both sides."""

    output: str = field(
        default="runs/sudoku/puzzles.csv", metadata={"help": "CSV file to write (puzzle,solution)"}
    )

    def __post_init__(self):
        super().__post_init__()
        if Path(self.output).is_dir():
            raise ValueError(
                f"output {self.output} is a directory; give the CSV file to write, e.g. "
                f"{Path(self.output) / 'puzzles.csv'}"
            )
        try:  # before generating: mkdir's "[Errno 17] File exists" would not name the flag
            refuse_a_file_in_the_way(Path(self.output).parent, "the directory of output")
        except FileExistsError as err:
            raise ValueError(f"output: {err}") from None


def run_generate(config: SudokuGenerateConfig) -> None:
    start = time.perf_counter()
    puzzles = puzzle_set(config)
    train, held_out = holdout_split(puzzles, config.eval_fraction)
    seconds = time.perf_counter() - start
    write_puzzles(config.output, puzzles)  # in generation order: the first N (--num-puzzles) mix both sides
    if not train or not held_out:  # the file is written all the same: it is the split that is short
        warnings.warn(
            f"{config.output}: its {len(puzzles)} puzzles split into {len(train)} train / {len(held_out)} held "
            "out; sft, train and eval need both: generate more puzzles",
            stacklevel=2,
        )
    for name, side in (("train", train), ("held out", held_out)):
        givens = dict(sorted(Counter(p.givens for p in side).items()))
        hardest = dict(Counter(p.hardest for p in side))
        print(f"{name}: {len(side)} puzzles; givens {givens}; hardest strategy {hardest}")
    print(f"wrote {len(puzzles)} puzzles to {config.output} in {seconds:.1f}s")


SMOKE = {
    "num_puzzles": 64,
    "sft_steps": 2,
    "sft_batch_size": 8,
    "hidden_size": 32,
    "num_layers": 1,
    "eval_puzzles": 8,
    "max_steps": 2,
    "prompts_per_step": 2,
    "group_size": 4,
    "bootstrap_prompts": 2,
}
# The longer experiment of docs/sudoku.md (run with --seed 0, 1, 2).
EXPERIMENT = {"sft_steps": 600, "max_steps": 150, "eval_puzzles": 512, "mixtures": (1.0, 0.75)}


def _only(preset: dict, cls) -> dict:
    return {k: v for k, v in preset.items() if k in cls.__dataclass_fields__}


def register(apps) -> None:
    verbs = add_app(apps, APP, "Sudoku in solver order with bootstrapped cell:order rewards (offline)")
    add_command(
        verbs,
        "generate",
        SudokuGenerateConfig,
        run_generate,
        "write unique-solution puzzles as CSV",
        {"smoke": _only(SMOKE, SudokuGenerateConfig)},
    )
    add_command(
        verbs,
        "sft",
        SudokuSFTConfig,
        run_sft,
        "SFT a tiny model on ordered completions",
        {"smoke": _only(SMOKE, SudokuSFTConfig)},
    )
    add_command(
        verbs,
        "train",
        SudokuTrainConfig,
        run_train,
        "GRPO with the cell:order mixture",
        {"smoke": _only(SMOKE, SudokuTrainConfig)},
    )
    add_command(
        verbs,
        "eval",
        SudokuEvalConfig,
        run_eval,
        "evaluate a model on held-out puzzles",
        {"smoke": _only(SMOKE, SudokuEvalConfig)},
    )
    add_command(
        verbs,
        "pipeline",
        SudokuPipelineConfig,
        run_pipeline,
        "SFT x2 -> GRPO per mixture -> table",
        {"smoke": SMOKE, "default": {}, "experiment": EXPERIMENT},
    )
