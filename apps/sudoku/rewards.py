"""The Sudoku rewards (PAPERS.md section 6): `cell` = |correct triplets| / |empty cells| and
`order` = sum over correct cells of 1 / (1 + |solver position - emitted position|), plus the metrics the
evaluation reports and the board fields the dashboard reads. All are pure functions of (completion text,
example).

How a completion is read (the documented rule for malformed output):
- Its words are taken in consecutive groups of three; group k is emission position k (0-based).
- A group is well-formed if it is `r<i> c<j> v<v>` with i, j, v in 1..n; any other group (a wrong word in a
  slot, a size token, a trailing group of 1-2 words) is malformed: it scores nothing but keeps its position.
- A well-formed group on a given (prompt) cell scores nothing; so does any group on a cell that was already
  emitted: only the first emission of each empty cell counts, right or wrong.
- The completion is format-valid when it is exactly E well-formed groups covering each of the E empty cells
  once. Decoding constrained by `apps.sudoku.model` always gives 3E well-formed words; only cells repeat.

Tests: `pytest tests/apps/sudoku/test_sudoku_rewards.py`.
"""

from dataclasses import dataclass

from apps.sudoku.puzzles import DIGITS


@dataclass(frozen=True)
class Reading:
    """What a completion says about a puzzle's empty cells."""

    empty: int  # E, empty cells of the puzzle
    groups: int  # groups of three words read (the last may be short)
    first: dict[int, tuple[int, int]]  # empty cell -> (emission position, value) of its first emission
    malformed: int  # groups that are not a triplet in range
    on_givens: int  # well-formed groups on given cells
    repeats: int  # well-formed groups on an empty cell emitted before

    @property
    def format_valid(self) -> bool:
        return self.groups == self.empty == len(self.first) and not (
            self.malformed or self.on_givens or self.repeats
        )


def _index(word: str, prefix: str, n: int) -> int | None:
    """1-based index of a word such as `r3` with the given prefix, if in 1..n."""
    if len(word) == 2 and word[0] == prefix and word[1] in DIGITS[:n]:
        return int(word[1])
    return None


def read_completion(completion: str, example: dict) -> Reading:
    """Parse `completion` against the example's puzzle (see the module docstring for the rule).

    >>> ex = {"n": 4, "puzzle": "1...............", "solution": "1234341221434321", "solver_order": [1, 2]}
    >>> r = read_completion("r1 c2 v2 r1 c1 v1 r1 c2 v3 c9 r1", ex)
    >>> r.first, r.on_givens, r.repeats, r.malformed, r.groups
    ({1: (0, 2)}, 1, 1, 1, 4)
    """
    n, puzzle = example["n"], example["puzzle"]
    words = completion.split()
    first: dict[int, tuple[int, int]] = {}
    malformed = on_givens = repeats = 0
    groups = (len(words) + 2) // 3
    for k in range(groups):
        group = words[3 * k : 3 * k + 3]
        parts = [_index(w, p, n) for w, p in zip(group, "rcv", strict=False)] if len(group) == 3 else [None]
        if None in parts:
            malformed += 1
            continue
        row, col, value = parts
        cell = (row - 1) * n + col - 1
        if puzzle[cell] not in ".0":
            on_givens += 1
        elif cell in first:
            repeats += 1
        else:
            first[cell] = (k, value)
    empty = sum(ch in ".0" for ch in puzzle)
    return Reading(empty, groups, first, malformed, on_givens, repeats)


def _correct(reading: Reading, example: dict) -> dict[int, int]:
    """Correct first emissions: cell -> emission position."""
    solution = example["solution"]
    return {cell: k for cell, (k, value) in reading.first.items() if int(solution[cell]) == value}


def cell_reward(completion: str, example: dict) -> float:
    """|correct first emissions| / |empty cells|.

    >>> ex = {"n": 4, "puzzle": "1...............", "solution": "1234341221434321", "solver_order": [1, 2]}
    >>> cell_reward("r1 c2 v2 r1 c3 v4", ex) * 15
    1.0
    """
    reading = read_completion(completion, example)
    return len(_correct(reading, example)) / reading.empty if reading.empty else 0.0


def order_reward(completion: str, example: dict) -> float:
    """sum over correct cells of 1 / (1 + |solver position - emitted position|) (0-based positions).

    >>> ex = {"n": 4, "puzzle": "1...............", "solution": "1234341221434321", "solver_order": [2, 1]}
    >>> order_reward("r1 c2 v2 r1 c3 v3", ex)  # c2 right at 0 (solver 1); c3 right at 1 (solver 0)
    1.0
    """
    reading = read_completion(completion, example)
    solver = {cell: k for k, cell in enumerate(example["solver_order"])}
    return sum(1.0 / (1.0 + abs(solver[cell] - k)) for cell, k in _correct(reading, example).items())


def kendall_tau(completion: str, example: dict) -> float:
    """Kendall's tau between emitted and solver positions over the first emissions of empty cells (right
    or wrong); 0 with fewer than two such cells. 1 = the solver's order, -1 = its reverse.

    >>> ex = {"n": 4, "puzzle": "1...............", "solution": "1234341221434321", "solver_order": [1, 2, 3]}
    >>> kendall_tau("r1 c2 v1 r1 c3 v1 r1 c4 v1", ex), kendall_tau("r1 c4 v1 r1 c3 v1 r1 c2 v1", ex)
    (1.0, -1.0)
    """
    reading = read_completion(completion, example)
    solver = {cell: k for k, cell in enumerate(example["solver_order"])}
    pairs = [(k, solver[cell]) for cell, (k, _) in reading.first.items()]
    m = len(pairs)
    if m < 2:
        return 0.0
    score = sum(
        (1 if (a[0] - b[0]) * (a[1] - b[1]) > 0 else -1) for i, a in enumerate(pairs) for b in pairs[i + 1 :]
    )
    return score / (m * (m - 1) / 2)


def board_fields(completion: str, example: dict) -> dict:
    """The fields the dashboard's Sudoku page reads from a rollouts.jsonl row (docs/dashboards.md): the
    puzzle and solution lines, `emitted` = [row, col, value] of each first emission into an empty cell in
    emission order (0-based rows and columns; repeats, givens and malformed groups left out, as in the
    rewards), and `solver_order` = [row, col] of the empty cells in the solver's fill order.

    >>> ex = {"n": 4, "puzzle": "1...............", "solution": "1234341221434321", "solver_order": [5, 1]}
    >>> fields = board_fields("r2 c2 v4 r1 c1 v3 r1 c2 v1 r2 c2 v2", ex)
    >>> fields["emitted"], fields["solver_order"]
    ([[1, 1, 4], [0, 1, 1]], [[1, 1], [0, 1]])
    """
    n = example["n"]
    first = read_completion(completion, example).first
    emitted = sorted(first.items(), key=lambda item: item[1][0])  # by emission position
    return {
        "puzzle": example["puzzle"],
        "solution": example["solution"],
        "emitted": [[cell // n, cell % n, value] for cell, (_, value) in emitted],
        "solver_order": [[cell // n, cell % n] for cell in example["solver_order"]],
    }


def puzzle_metrics(completion: str, example: dict) -> dict[str, float]:
    """The evaluation's per-puzzle numbers: cell accuracy, solved (all cells right), order reward divided
    by E (1 = every cell right and in the solver's position), Kendall tau, format validity."""
    reading = read_completion(completion, example)
    cell = cell_reward(completion, example)
    return {
        "cell_accuracy": cell,
        "solved": float(cell == 1.0 and reading.format_valid),
        "order_reward_norm": order_reward(completion, example) / max(reading.empty, 1),
        "kendall_tau": kendall_tau(completion, example),
        "format_valid": float(reading.format_valid),
    }
