"""Puzzles as token sequences: each cell is three tokens (row, column, value); the prompt is the givens,
the completion the empty cells' triplets in an order (`random`, `solver` or `row-major`), then eos.

    <n4> r1 c2 v3 r2 c4 v1 ... <sol>   |   r1 c1 v2 r1 c3 v4 ... <eos>

Rows, columns and values are 1-based. The tokenizer is a WordLevel `PreTrainedTokenizerFast` over these
32 words, built locally (`build_tokenizer`). An example (the trainer's and the rewards' input) is a plain
JSON-able dict: id, prompt, n, puzzle/solution lines, and the solver's fill order of the empty cells.
Tests: `pytest tests/apps/sudoku/test_sudoku_rewards.py`.
"""

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from apps.sudoku.puzzles import Puzzle, grid_to_line

PAD, EOS, SOL = "<pad>", "<eos>", "<sol>"
SIZE_TOKENS = {4: "<n4>", 9: "<n9>"}
ORDERS = ("random", "solver", "row-major")
ROWS = tuple(f"r{i}" for i in range(1, 10))
COLS = tuple(f"c{i}" for i in range(1, 10))
VALUES = tuple(f"v{i}" for i in range(1, 10))
VOCAB = (PAD, EOS, SOL, *SIZE_TOKENS.values(), *ROWS, *COLS, *VALUES)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer of `VOCAB` (ids in that order); words are separated by spaces."""
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def triplet(cell: int, value: int, n: int) -> str:
    return f"r{cell // n + 1} c{cell % n + 1} v{value}"


def prompt_text(puzzle: Puzzle) -> str:
    cells = [triplet(i, v, puzzle.n) for i, v in enumerate(puzzle.grid) if v]
    return " ".join([SIZE_TOKENS[puzzle.n], *cells, SOL])


def fill_order(puzzle: Puzzle, order: str, rng: random.Random | None = None) -> list[int]:
    """The empty cells in the given order; `random` needs `rng`."""
    if order == "solver":
        return [cell for cell, _, _ in puzzle.steps]
    empty = [i for i, v in enumerate(puzzle.grid) if v == 0]
    if order == "row-major":
        return empty
    if order == "random":
        if rng is None:
            raise ValueError("order 'random' needs a random.Random")
        return rng.sample(empty, len(empty))
    raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")


def completion_text(puzzle: Puzzle, cells: list[int]) -> str:
    """The triplets of `cells` (with their solution values), without eos."""
    return " ".join(triplet(i, puzzle.solution[i], puzzle.n) for i in cells)


def to_example(puzzle: Puzzle, index: int, split: str) -> dict:
    """The example dict the trainer, the rewards and the evaluation read."""
    return {
        "id": f"sudoku{puzzle.n}-{split}-{index}",
        "prompt": prompt_text(puzzle),
        "n": puzzle.n,
        "puzzle": puzzle.to_line(),
        "solution": grid_to_line(puzzle.solution),
        "solver_order": [cell for cell, _, _ in puzzle.steps],
        "hardest": puzzle.hardest,
    }
