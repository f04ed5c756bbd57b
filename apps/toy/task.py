"""The toy task: the prompt names a letter; a completion earns the fraction of its characters that are
that letter, plus a smaller shaping reward for characters of the task's alphabet at all. A randomly
initialised tiny model starts near 0 on both, and GRPO alone teaches it the mapping."""

import random
from pathlib import Path

from core.data import InputError, read_located_examples

LETTERS = "ab"


def make_examples(n: int, seed: int) -> list[dict]:
    """`n` prompts `Repeat <letter>` with the letter drawn from a seeded generator."""
    rng = random.Random(seed)
    letters = [rng.choice(LETTERS) for _ in range(n)]
    return [
        {"id": f"toy-{i}", "prompt": f"Repeat {letter}", "letter": letter} for i, letter in enumerate(letters)
    ]


def read_data_file(path: str | Path) -> list[dict]:
    """The rows (prompt, letter) of a `--data` file. A letter that is not one of LETTERS is an error naming
    the file and the line: no completion could earn the letter reward on it."""
    examples = []
    for where, row in read_located_examples(path, required=("prompt", "letter")):
        if not isinstance(row["prompt"], str):
            raise InputError(f"{where}: prompt must be text, got {type(row['prompt']).__name__}")
        if row["letter"] not in tuple(LETTERS):  # one whole letter: "ab" is in the string LETTERS
            raise InputError(f"{where}: letter {row['letter']!r} is not one of {', '.join(LETTERS)}")
        examples.append(row)
    return examples


def letter_fraction(completion: str, example: dict) -> float:
    """Share of the completion's characters equal to the example's letter; 0 for an empty completion.

    >>> letter_fraction("aab", {"letter": "a"})
    0.6666666666666666
    >>> letter_fraction("", {"letter": "a"})
    0.0
    """
    if not completion:
        return 0.0
    return sum(char == example["letter"] for char in completion) / len(completion)


def alphabet_fraction(completion: str, example: dict) -> float:
    """Share of the completion's characters that are any of the task's letters (a shaping reward: a
    random model emits ~270 distinct tokens, so the exact letter alone is too rare a signal at first).

    >>> alphabet_fraction("ab?", {"letter": "a"})
    0.6666666666666666
    """
    if not completion:
        return 0.0
    return sum(char in LETTERS for char in completion) / len(completion)
