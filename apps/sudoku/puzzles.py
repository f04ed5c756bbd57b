"""Sudoku puzzles: a solution counter, a logic solver that records its fill order, a seeded generator of
puzzles with a unique solution, and the one-line puzzle format (81 characters for 9x9, 16 for 4x4).

A grid is a list of n*n ints in row-major order, 0 for an empty cell (n = 4 or 9; boxes are sqrt(n) square).
Candidates are bitmasks: bit v-1 set = value v still possible.

    from apps.sudoku.puzzles import generate_puzzles, logic_solve
    puzzles = generate_puzzles(4, count=1000, seed=0, givens=(4, 6))   # a second or so
    steps = logic_solve(puzzles[0].grid, 4)   # [(cell, value, strategy), ...] in fill order

Strategies, easiest first (`STRATEGIES`): naked single, hidden single, eliminations (naked pairs and locked
candidates, which fill no cell themselves; the next fill is labelled "elimination"), and guess (the last
resort: the cell with the fewest candidates gets its value from the unique solution; recorded as such).
Ties among cells available to the same strategy go to the lowest cell index (row-major): a convention.
Tests: `pytest tests/apps/sudoku/test_sudoku_puzzles.py`.
"""

import codecs
import csv
import hashlib
import io
import math
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from core.data import InputError

STRATEGIES = ("naked_single", "hidden_single", "elimination", "guess")
SIZES = (4, 9)
EMPTY_CHARS = ".0"
DIGITS = "123456789"  # ASCII only: str.isdigit() also holds for "²" and "٢"
# first column names of a header row (this module's `puzzle,solution`, public sets' `quizzes,solutions`)
HEADER_NAMES = ("puzzle", "quizzes")
# a field of a header row (letters, '_' and spaces), never a puzzle (digits and '.')
COLUMN_NAME = re.compile(r"[A-Za-z][A-Za-z_ ]*")
# Fewest givens of a puzzle with a unique solution: 4 for 4x4; 17 for 9x9 (McGuire, Tugemann and Civario
# 2012, "There is no 16-clue Sudoku")
FEWEST_UNIQUE_GIVENS = {4: 4, 9: 17}


@dataclass(frozen=True)
class Geometry:
    """Units (rows, columns, boxes) and peers of every cell of an n x n grid."""

    n: int
    units: tuple[tuple[int, ...], ...]  # 3n units of n cells: rows, then columns, then boxes
    cell_units: tuple[tuple[int, int, int], ...]  # per cell: its row, column and box unit index
    peers: tuple[tuple[int, ...], ...]  # per cell: the other cells sharing a unit with it


@cache
def geometry(n: int) -> Geometry:
    if n not in SIZES:
        raise ValueError(f"grid size must be one of {SIZES}, got {n}")
    b = math.isqrt(n)
    rows = [tuple(r * n + c for c in range(n)) for r in range(n)]
    cols = [tuple(r * n + c for r in range(n)) for c in range(n)]
    boxes = [
        tuple((br * b + i) * n + bc * b + j for i in range(b) for j in range(b))
        for br in range(b)
        for bc in range(b)
    ]
    cell_units = tuple((i // n, n + i % n, 2 * n + (i // n // b) * b + (i % n) // b) for i in range(n * n))
    units = (*rows, *cols, *boxes)
    peers = tuple(tuple(sorted({p for u in cell_units[i] for p in units[u]} - {i})) for i in range(n * n))
    return Geometry(n, units, cell_units, peers)


def _bits(mask: int) -> list[int]:
    """Values (1-based) whose bits are set in `mask`."""
    return [v + 1 for v in range(mask.bit_length()) if mask >> v & 1]


def is_valid_solution(grid: list[int], n: int) -> bool:
    """Every unit holds each of 1..n exactly once."""
    g = geometry(n)
    return len(grid) == n * n and all(
        sorted(grid[i] for i in unit) == list(range(1, n + 1)) for unit in g.units
    )


def is_consistent(grid: list[int], n: int) -> bool:
    """No value repeats within a unit (empty cells ignored) and every value is in 0..n."""
    if len(grid) != n * n or any(not 0 <= v <= n for v in grid):
        return False
    for unit in geometry(n).units:
        values = [grid[i] for i in unit if grid[i]]
        if len(values) != len(set(values)):
            return False
    return True


def count_solutions(grid: list[int], n: int, limit: int = 2) -> tuple[int, list[int] | None]:
    """(number of solutions, counted up to `limit`; the first solution found or None). Backtracking on the
    cell with the fewest candidates. `grid` must be consistent."""
    g = geometry(n)
    used = [0] * (3 * n)  # per unit: bitmask of the values placed
    work = list(grid)
    for i, v in enumerate(work):
        if v:
            for u in g.cell_units[i]:
                used[u] |= 1 << (v - 1)
    full = (1 << n) - 1
    empties = [i for i, v in enumerate(work) if v == 0]
    found: list[list[int]] = []

    def search(count: int) -> int:
        best, best_mask, best_size = -1, 0, n + 1
        for i in empties:
            if work[i]:
                continue
            r, c, b = g.cell_units[i]
            mask = full & ~(used[r] | used[c] | used[b])
            size = mask.bit_count()
            if size < best_size:
                best, best_mask, best_size = i, mask, size
                if size <= 1:
                    break
        if best < 0:  # no empty cell left: a solution
            if not found:
                found.append(list(work))
            return count + 1
        r, c, b = g.cell_units[best]
        for v in _bits(best_mask):
            bit = 1 << (v - 1)
            work[best] = v
            used[r] |= bit
            used[c] |= bit
            used[b] |= bit
            count = search(count)
            used[r] &= ~bit
            used[c] &= ~bit
            used[b] &= ~bit
            work[best] = 0
            if count >= limit:
                break
        return count

    total = search(0)
    return total, (found[0] if found else None)


# ---------------------------------------------------------------------------------------------------------
# The logic solver
# ---------------------------------------------------------------------------------------------------------


def _candidates(grid: list[int], n: int) -> list[int]:
    g, full = geometry(n), (1 << n) - 1
    cands = [0 if v else full for v in grid]
    for i, v in enumerate(grid):
        if v:
            for p in g.peers[i]:
                cands[p] &= ~(1 << (v - 1))
    return cands


def _eliminate(cands: list[int], n: int) -> bool:
    """One pass of naked pairs and locked candidates (pointing and claiming); True if anything changed."""
    g, changed = geometry(n), False
    for unit in g.units:  # naked pairs
        pairs = [cands[i] for i in unit if cands[i].bit_count() == 2]
        for mask in {m for m in pairs if pairs.count(m) == 2}:
            for i in unit:
                if cands[i] and cands[i] != mask and cands[i] & mask:
                    cands[i] &= ~mask
                    changed = True
    boxes, lines = g.units[2 * n :], g.units[: 2 * n]
    for v in range(n):  # locked candidates: a value confined to one box-line intersection
        bit = 1 << v
        for box in boxes:
            for line in lines:
                inside = set(box) & set(line)
                if not inside:
                    continue
                for confined, other in ((box, line), (line, box)):
                    holders = [i for i in confined if cands[i] & bit]
                    if holders and all(i in inside for i in holders):
                        for i in other:
                            if i not in inside and cands[i] & bit:
                                cands[i] &= ~bit
                                changed = True
    return changed


def logic_solve(
    grid: list[int], n: int, max_strategy: str = "guess", solution: list[int] | None = None
) -> list[tuple[int, int, str]] | None:
    """The fill sequence [(cell, value, strategy), ...] of the empty cells of a puzzle with a unique
    solution, or None if it needs a strategy harder than `max_strategy`. `solution` (else counted here) is
    only read by guesses."""
    if max_strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {max_strategy!r}; valid: {', '.join(STRATEGIES)}")
    level = STRATEGIES.index(max_strategy)
    g = geometry(n)
    work, cands = list(grid), _candidates(grid, n)
    steps: list[tuple[int, int, str]] = []
    pending = 0  # the hardest strategy used since the last fill (eliminations fill nothing themselves)

    def fill(cell: int, value: int, strategy: int) -> None:
        work[cell], cands[cell] = value, 0
        for p in g.peers[cell]:
            cands[p] &= ~(1 << (value - 1))
        steps.append((cell, value, STRATEGIES[max(strategy, pending)]))

    while 0 in work:
        naked = [i for i, m in enumerate(cands) if m.bit_count() == 1]
        if naked:
            fill(naked[0], _bits(cands[naked[0]])[0], 0)
            pending = 0
            continue
        if level >= 1:
            hidden = []
            for unit in g.units:
                for v in range(n):
                    holders = [i for i in unit if cands[i] >> v & 1]
                    if len(holders) == 1:
                        hidden.append((holders[0], v + 1))
            if hidden:
                fill(*min(hidden), 1)
                pending = 0
                continue
        if level >= 2 and _eliminate(cands, n):
            pending = 2
            continue
        if level < 3:
            return None
        if solution is None:
            count, solution = count_solutions(grid, n)
            if count != 1:
                raise ValueError(f"logic_solve needs a puzzle with one solution, this one has {count}+")
        empty = [i for i, v in enumerate(work) if v == 0]
        cell = min(empty, key=lambda i: (cands[i].bit_count(), i))
        fill(cell, solution[cell], 3)
        pending = 0
    return steps


# ---------------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Puzzle:
    """A puzzle with its unique solution and the logic solver's fill sequence of its empty cells."""

    n: int
    grid: tuple[int, ...]  # n*n, 0 = empty
    solution: tuple[int, ...]  # n*n
    steps: tuple[tuple[int, int, str], ...]  # (cell, value, strategy) in the solver's fill order

    @property
    def givens(self) -> int:
        return sum(v > 0 for v in self.grid)

    @property
    def hardest(self) -> str:
        return max((s for _, _, s in self.steps), key=STRATEGIES.index, default=STRATEGIES[0])

    def to_line(self) -> str:
        return grid_to_line(self.grid)


def random_solution(n: int, rng: random.Random) -> list[int]:
    """A random complete grid: backtracking fill with values tried in a random order."""
    g = geometry(n)
    grid = [0] * (n * n)

    def fill(i: int) -> bool:
        if i == n * n:
            return True
        taken = {grid[p] for p in g.peers[i]}
        for v in rng.sample(range(1, n + 1), n):
            if v not in taken:
                grid[i] = v
                if fill(i + 1):
                    return True
        grid[i] = 0
        return False

    fill(0)
    return grid


def make_puzzle(
    solution: list[int], n: int, rng: random.Random, target_givens: int, max_strategy: str = "guess"
) -> Puzzle:
    """Remove cells of `solution` in a random order while the puzzle keeps a unique solution that the logic
    solver reaches within `max_strategy`; stop at `target_givens` (a minimal puzzle may keep more)."""
    grid = list(solution)
    for cell in rng.sample(range(n * n), n * n):
        if sum(v > 0 for v in grid) <= target_givens:
            break
        value, grid[cell] = grid[cell], 0
        if count_solutions(grid, n)[0] != 1 or (
            max_strategy != "guess" and logic_solve(grid, n, max_strategy, solution) is None
        ):
            grid[cell] = value
    steps = logic_solve(grid, n, max_strategy, solution)
    assert steps is not None  # every removal above kept the puzzle solvable within max_strategy
    return Puzzle(n, tuple(grid), tuple(solution), tuple(steps))


def check_givens(n: int, low: int, high: int) -> None:
    """Refuse a givens range (givens_min, givens_max) no n x n puzzle with an empty cell and a unique
    solution falls in."""
    if not 0 <= low <= high < n * n:
        raise ValueError(
            f"givens_min={low}, givens_max={high}: need 0 <= givens_min <= givens_max < {n * n} "
            f"(a {n}x{n} puzzle has at least one empty cell)"
        )
    if high < FEWEST_UNIQUE_GIVENS[n]:
        raise ValueError(
            f"no {n}x{n} puzzle with at most {high} givens has a unique solution (the fewest is "
            f"{FEWEST_UNIQUE_GIVENS[n]}); raise givens_max"
        )


def generate_puzzles(
    n: int,
    count: int,
    seed: int,
    givens: tuple[int, int],
    max_strategy: str = "guess",
    max_tries: int | None = None,
) -> list[Puzzle]:
    """`count` distinct puzzles with a unique solution and between givens[0] and givens[1] givens (the
    target drawn uniformly per puzzle), deterministic under `seed`. Raises if `max_tries` attempts
    (default 20 * count) do not give enough distinct puzzles."""
    low, high = givens
    check_givens(n, low, high)
    rng = random.Random(seed)
    seen: dict[tuple[int, ...], Puzzle] = {}
    tries = 0
    max_tries = 20 * count if max_tries is None else max_tries
    while len(seen) < count:
        if tries == max_tries:
            raise ValueError(
                f"only {len(seen)} distinct {n}x{n} puzzles with {low}-{high} givens in {max_tries} tries; "
                "widen the givens range or ask for fewer"
            )
        tries += 1
        puzzle = make_puzzle(random_solution(n, rng), n, rng, rng.randint(low, high), max_strategy)
        if puzzle.givens <= high and puzzle.grid not in seen:
            seen[puzzle.grid] = puzzle
    return list(seen.values())


def holdout_split(puzzles: list[Puzzle], eval_fraction: float) -> tuple[list[Puzzle], list[Puzzle]]:
    """(train, eval) split by solution grid, so no solution of an evaluation puzzle is seen in training
    (4x4 has only 288 grids). A grid's side depends on the grid alone (a hash), not on the seed or the set."""

    def side(p: Puzzle) -> float:
        digest = hashlib.blake2b(bytes(p.solution), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64

    unique = list({p.grid: p for p in puzzles}.values())
    return (
        [p for p in unique if side(p) >= eval_fraction],
        [p for p in unique if side(p) < eval_fraction],
    )


# ---------------------------------------------------------------------------------------------------------
# The one-line format: n*n characters, digits 1-n, '.' or '0' for an empty cell
# ---------------------------------------------------------------------------------------------------------


def grid_to_line(grid) -> str:
    return "".join(str(v) if v else "." for v in grid)


def line_to_grid(text: str, where: str) -> tuple[list[int], int]:
    """(grid, n) from a 16- or 81-character line; errors name `where` (file:line)."""
    text = text.strip()
    sizes = {n * n: n for n in SIZES}
    if len(text) not in sizes:
        raise InputError(
            f"{where}: expected 16 or 81 characters (4x4 or 9x9), got {len(text)}: {text[:90]!r}"
        )
    n = sizes[len(text)]
    grid = []
    for k, char in enumerate(text):
        if char in EMPTY_CHARS:
            grid.append(0)
        elif char in DIGITS[:n]:
            grid.append(int(char))
        else:
            raise InputError(f"{where}: character {k + 1} is {char!r}; expected 1-{n}, '.' or '0'")
    return grid, n


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line the row begins on, row) for each row of a CSV file read as UTF-8 (a byte order mark some editors
    write is dropped); a row spans lines when a quoted field holds line ends. Text that is not UTF-8 and a
    row the csv module cannot read (a field over its limit of 131,072 characters) are InputErrors naming the
    file and line."""
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = skip + err.start
        line = len((data[:at] + b"x").splitlines())  # bytes split on "\n", "\r\n" and "\r", as csv does
        raise InputError(f"{path}:{line}: not UTF-8 text (byte {at}: {data[at]:#04x})") from err
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1  # the line the next row begins on: reader.line_num counts the lines read so far
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise InputError(f"{path}:{start}: not readable as CSV ({err})") from err
        yield start, row
        start = reader.line_num + 1


def read_puzzles(path: str | Path, max_strategy: str = "guess") -> list[Puzzle]:
    """Puzzles from a text file of one puzzle per line, or a CSV whose rows are `puzzle[,solution]` (a first
    row whose first column is named `puzzle` or `quizzes`, any case, is a header and skipped; a first row of
    other column names is an error naming the header's columns; any other row is read as a puzzle). Each
    puzzle must have exactly one solution, which is checked (and found when absent); every error is an
    InputError naming the file and line. Puzzles that need a strategy harder than `max_strategy` are left out
    with a warning naming their lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"puzzle file {path} does not exist")
    puzzles, harder = [], []  # harder: line numbers of puzzles left out
    first = True  # the first row that is not blank or a comment, which may be a header
    for number, row in _csv_rows(path):
        where = f"{path}:{number}"
        cells = [c.strip() for c in row if c.strip()]
        if not cells or cells[0].startswith("#"):
            continue
        if first:
            first = False
            if cells[0].lower() in HEADER_NAMES:
                continue
            if all(COLUMN_NAME.fullmatch(c) for c in cells):
                raise InputError(
                    f"{where}: {','.join(cells)!r} is neither a puzzle nor a header; a header names its "
                    "columns `puzzle[,solution]` or `quizzes,solutions`"
                )
        if len(cells) > 2:
            raise InputError(f"{where}: expected `puzzle` or `puzzle,solution`, got {len(cells)} fields")
        grid, n = line_to_grid(cells[0], where)
        if all(grid):
            raise InputError(f"{where}: the puzzle has no empty cell")
        if not is_consistent(grid, n):
            raise InputError(f"{where}: the givens repeat a value within a row, column or box")
        count, found = count_solutions(grid, n)
        if count != 1:
            raise InputError(f"{where}: the puzzle has {'no' if count == 0 else 'more than one'} solution")
        if len(cells) == 2:
            solution, m = line_to_grid(cells[1], where + " (solution)")
            if m != n or solution != found:
                raise InputError(f"{where}: the solution does not solve the puzzle")
        steps = logic_solve(grid, n, max_strategy, found)
        if steps is None:
            harder.append(number)  # harder than max_strategy: left out, as the generator would
            continue
        puzzles.append(Puzzle(n, tuple(grid), tuple(found), tuple(steps)))
    if harder:
        lines = ", ".join(map(str, harder[:10])) + (", ..." if len(harder) > 10 else "")
        warnings.warn(
            f"{path}: {len(harder)} puzzle(s) need a strategy harder than {max_strategy!r} and are left out"
            f" (lines {lines})",
            stacklevel=2,
        )
    if not puzzles:
        raise InputError(f"puzzle file {path} has no puzzles")
    return puzzles


def write_puzzles(path: str | Path, puzzles: list[Puzzle]) -> None:
    """A CSV `puzzle,solution` with a header, readable by `read_puzzles` and by common public sets' tools."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["puzzle,solution"] + [f"{p.to_line()},{grid_to_line(p.solution)}" for p in puzzles]
    path.write_text("\n".join(lines) + "\n")
