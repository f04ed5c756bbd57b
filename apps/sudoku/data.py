"""The puzzle set every Sudoku command reads: generated from a seed, or a user's puzzle file, then split
into training and held-out puzzles by solution grid (4x4 has only 288 grids; a puzzle-level split would
leak solutions into the evaluation)."""

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from apps.sudoku.puzzles import (
    STRATEGIES,
    Puzzle,
    check_givens,
    generate_puzzles,
    holdout_split,
    read_puzzles,
)
from core.data import InputError

# (fewest, most) givens of a generated puzzle by size; 4x4's are the default preset's, 9x9's the range the
# docs use (every 9x9 puzzle with a unique solution has at least 17 givens)
DEFAULT_GIVENS = {4: (4, 6), 9: (30, 40)}


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class PuzzleConfig:
    """Which puzzles: size, difficulty, how many, and the held-out share."""

    data: str | None = _help(
        "puzzle file (one 16/81-character puzzle per line, or CSV puzzle[,solution]); default: generated",
        None,
    )
    size: int | None = _help(
        "grid size of generated puzzles: 4 or 9; default 4 (with --data: the file's)", None
    )
    givens_min: int | None = _help(
        "fewest givens of a generated puzzle (difficulty: fewer is harder); default 4 for 4x4, 30 for 9x9",
        None,
    )
    givens_max: int | None = _help("most givens of a generated puzzle; default 6 for 4x4, 40 for 9x9", None)
    max_strategy: Literal["naked_single", "hidden_single", "elimination", "guess"] = _help(
        "hardest strategy a puzzle may need (difficulty); harder puzzles are not generated / are skipped",
        "guess",
    )
    num_puzzles: int | None = _help(
        "distinct puzzles before the split: generated (default 4000), or the first N of --data (default all)",
        None,
    )
    eval_fraction: float = _help("share of solution grids held out for evaluation", 0.2)
    data_seed: int = _help("seed of the puzzle generator (kept apart from the training seed)", 0)

    def __post_init__(self):
        if self.size is not None and self.size not in (4, 9):
            raise ValueError(f"size must be 4 or 9, got {self.size}")
        if self.num_puzzles is not None and self.num_puzzles < 2:
            raise ValueError(
                f"num_puzzles must be >= 2 (split into train and held out), got {self.num_puzzles}"
            )
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_strategy not in STRATEGIES:
            raise ValueError(
                f"max_strategy must be one of {', '.join(STRATEGIES)}, got {self.max_strategy!r}"
            )
        if self.data:
            if Path(self.data).is_dir():  # read_puzzles would say it does not exist
                raise ValueError(f"data: {self.data} is a directory; expected a puzzle file (text or CSV)")
            generated = ("givens_min", "givens_max", "data_seed")
            defaults = PuzzleConfig.__dataclass_fields__
            given = [f"{k}={getattr(self, k)}" for k in generated if getattr(self, k) != defaults[k].default]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: settings of generated puzzles, but --data reads them from "
                    f"{self.data}; leave them out"
                )
            return
        self.size = 4 if self.size is None else self.size
        self.num_puzzles = 4000 if self.num_puzzles is None else self.num_puzzles
        low, high = DEFAULT_GIVENS[self.size]
        self.givens_min = low if self.givens_min is None else self.givens_min
        self.givens_max = high if self.givens_max is None else self.givens_max
        check_givens(self.size, self.givens_min, self.givens_max)


def load_puzzles(config: PuzzleConfig) -> tuple[list[Puzzle], list[Puzzle]]:
    """(train, held-out) puzzles of the config, split by solution grid."""
    return split_puzzles(config, puzzle_set(config))


def puzzle_set(config: PuzzleConfig) -> list[Puzzle]:
    """The config's puzzles before the split: generated, or the first `num_puzzles` of --data."""
    if not config.data:
        givens = (config.givens_min, config.givens_max)
        return generate_puzzles(
            config.size, config.num_puzzles, config.data_seed, givens, config.max_strategy
        )
    puzzles = read_puzzles(config.data, config.max_strategy)
    sizes = {p.n for p in puzzles}
    if len(sizes) != 1:
        raise ValueError(f"{config.data}: mixes 4x4 and 9x9 puzzles; use one size per file")
    if config.size is not None and sizes != {config.size}:
        n = sizes.pop()
        raise ValueError(f"{config.data}: holds {n}x{n} puzzles, not size {config.size}")
    if config.num_puzzles is not None and len(puzzles) < config.num_puzzles:
        raise ValueError(
            f"{config.data}: holds {len(puzzles)} puzzles, fewer than num_puzzles={config.num_puzzles}"
        )
    chosen = puzzles[: config.num_puzzles]
    repeats = len(chosen) - len({p.grid for p in chosen})
    if repeats:  # the split keeps one of each
        warnings.warn(
            f"{config.data}: {repeats} of its {len(chosen)} puzzles repeat an earlier one; each is used once",
            stacklevel=2,
        )
    return chosen


def split_puzzles(config: PuzzleConfig, puzzles: list[Puzzle]) -> tuple[list[Puzzle], list[Puzzle]]:
    """(train, held-out) by solution grid; both must be non-empty."""
    train, held_out = holdout_split(puzzles, config.eval_fraction)
    if not train or not held_out:
        raise InputError(
            f"{config.data or 'generated puzzles'}: {len(puzzles)} puzzles split into {len(train)} train / "
            f"{len(held_out)} held out; use more puzzles (--num-puzzles) or another --eval-fraction"
        )
    return train, held_out
