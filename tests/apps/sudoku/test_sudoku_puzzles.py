"""The generator (uniqueness, validity, determinism), the logic solver's fill order and the puzzle file format."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.sudoku.puzzles import (
    _bits,
    _candidates,
    count_solutions,
    generate_puzzles,
    geometry,
    holdout_split,
    is_valid_solution,
    logic_solve,
    read_puzzles,
    write_puzzles,
)
from core.data import InputError

SOLUTION_4 = [1, 2, 3, 4, 3, 4, 1, 2, 2, 1, 4, 3, 4, 3, 2, 1]


def replay(grid: list[int], n: int, steps, check_labels: bool = True) -> list[int]:
    """Apply the fill sequence, checking each value (and single label) against the candidates of the grid
    filled so far. Labels are only checkable without eliminations, whose candidate removals persist."""
    g, work = geometry(n), list(grid)
    for cell, value, strategy in steps:
        assert work[cell] == 0, f"cell {cell} filled twice"
        cands = _candidates(work, n)
        assert value in _bits(cands[cell])
        if check_labels and strategy == "naked_single":
            assert _bits(cands[cell]) == [value]
        elif check_labels and strategy == "hidden_single":
            assert any(
                [i for i in g.units[u] if cands[i] >> (value - 1) & 1] == [cell] for u in g.cell_units[cell]
            )
        work[cell] = value
    return work


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), size=st.sampled_from([4, 9]))
def test_generated_puzzles_are_unique_valid_and_solved_in_a_valid_order(seed, size):
    givens = (4, 6) if size == 4 else (34, 40)
    for puzzle in generate_puzzles(size, 3, seed, givens, max_strategy="hidden_single"):
        assert count_solutions(list(puzzle.grid), size) == (1, list(puzzle.solution))
        assert is_valid_solution(list(puzzle.solution), size)
        assert all(g in (0, s) for g, s in zip(puzzle.grid, puzzle.solution, strict=True))
        assert givens[0] <= puzzle.givens <= givens[1]
        assert replay(list(puzzle.grid), size, puzzle.steps) == list(puzzle.solution)
        assert {s for _, _, s in puzzle.steps} <= {"naked_single", "hidden_single"}


def test_generation_is_deterministic_and_difficulty_controls_strategies():
    a = generate_puzzles(4, 50, seed=3, givens=(4, 5))
    assert a == generate_puzzles(4, 50, seed=3, givens=(4, 5))
    assert a != generate_puzzles(4, 50, seed=4, givens=(4, 5))
    assert len({p.grid for p in a}) == 50
    naked = generate_puzzles(9, 5, seed=0, givens=(40, 45), max_strategy="naked_single")
    assert all(s == "naked_single" for p in naked for _, _, s in p.steps)
    assert all(p.givens <= 45 for p in naked)


def test_solver_order_on_known_fill_sequences():
    # row 1 misses 1 and 2: both cells are naked singles; ties go to the lower cell index
    grid = [0, 0, 3, 4] + SOLUTION_4[4:]
    assert logic_solve(grid, 4) == [(0, 1, "naked_single"), (1, 2, "naked_single")]
    # the last cell of each row missing: four naked singles in row-major order
    grid = [0 if i % 4 == 3 else v for i, v in enumerate(SOLUTION_4)]
    assert logic_solve(grid, 4) == [
        (3, 4, "naked_single"),
        (7, 2, "naked_single"),
        (11, 3, "naked_single"),
        (15, 1, "naked_single"),
    ]
    # a hard 9x9 puzzle (Arto Inkala's) needs guesses after the eliminations, recorded as such
    hard = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."
    grid = [0 if c == "." else int(c) for c in hard]
    assert logic_solve(grid, 9, max_strategy="elimination") is None
    steps = logic_solve(grid, 9)
    assert any(s == "guess" for _, _, s in steps)
    assert replay(grid, 9, steps, check_labels=False) == count_solutions(grid, 9)[1]


def test_givens_below_the_fewest_for_a_unique_solution_are_refused_at_once():
    with pytest.raises(ValueError, match=r"no 9x9 puzzle with at most 16 givens has a unique solution"):
        generate_puzzles(9, 5, seed=0, givens=(4, 16))
    with pytest.raises(ValueError, match=r"no 4x4 puzzle with at most 3 givens"):
        generate_puzzles(4, 5, seed=0, givens=(2, 3))


def test_givens_default_by_size():
    from apps.sudoku.data import PuzzleConfig

    assert (PuzzleConfig().givens_min, PuzzleConfig().givens_max) == (4, 6)
    assert (PuzzleConfig(size=9).givens_min, PuzzleConfig(size=9).givens_max) == (30, 40)
    assert PuzzleConfig(size=9, givens_min=25).givens_min == 25


def test_holdout_split_keeps_each_solution_grid_on_one_side():
    train, held_out = holdout_split(generate_puzzles(4, 400, seed=0, givens=(4, 6)), 0.2)
    assert not {p.solution for p in train} & {p.solution for p in held_out}
    assert 0.1 < len(held_out) / (len(train) + len(held_out)) < 0.3


def test_puzzle_files_round_trip_and_malformed_lines_are_named(tmp_path):
    puzzles = generate_puzzles(4, 5, seed=0, givens=(4, 6))
    path = tmp_path / "p.csv"
    write_puzzles(path, puzzles)
    assert read_puzzles(path) == puzzles
    plain = tmp_path / "plain.txt"  # one puzzle per line, '0' for empty, no solution
    plain.write_text("\n".join(p.to_line().replace(".", "0") for p in puzzles) + "\n")
    assert read_puzzles(plain) == puzzles

    bad = tmp_path / "bad.csv"
    bad.write_text(f"quizzes,solutions\n{puzzles[0].to_line()}\n12x4............\n")
    with pytest.raises(InputError, match=r"bad.csv:3: character 3 is 'x'"):
        read_puzzles(bad)
    bad.write_text(f"{puzzles[0].to_line()}\n123\n")
    with pytest.raises(InputError, match=r"bad.csv:2: expected 16 or 81 characters"):
        read_puzzles(bad)
    commented = tmp_path / "commented.csv"  # the header may follow comments and blank lines
    commented.write_text("# from a generator\n\nquizzes,solutions\n" + path.read_text().split("\n", 1)[1])
    assert read_puzzles(commented) == puzzles
    bad.write_text(f"{puzzles[0].to_line()}\nquizzes,solutions\n")  # a header only opens the file
    with pytest.raises(InputError, match=r"bad.csv:2: expected 16 or 81 characters"):
        read_puzzles(bad)
    # a first line is a header only by its column name: a malformed first puzzle is an error, not skipped
    rest = "\n".join(p.to_line() for p in puzzles) + "\n"
    # a first line of column names says which a header has (it was read as a puzzle: "expected 16 or 81
    # characters, got 3: 'foo'")
    header = (
        "is neither a puzzle nor a header; a header names its columns `puzzle[,solution]` or "
        "`quizzes,solutions`"
    )
    for first, error in (
        ("x234341221434321", "character 1 is 'x'"),
        ("ab..cd....ba..dc", "character 1 is 'a'"),
        ("sudoku,solution", f"'sudoku,solution' {header}"),
        ("foo,bar", f"'foo,bar' {header}"),
        ("xxxxxxxxxxxxxxxx", f"'xxxxxxxxxxxxxxxx' {header}"),
    ):
        bad.write_text(f"{first}\n{rest}")
        with pytest.raises(InputError, match=rf"bad.csv:1: {re.escape(error)}"):
            read_puzzles(bad)
    bad.write_text(f"Puzzle,Solution\n{rest}")
    assert read_puzzles(bad) == puzzles
    for digit in ("\u00b2", "\u0662"):  # str.isdigit() holds for both; int() reads the second as 2
        bad.write_text("1" + digit + "..341221434321\n")
        with pytest.raises(InputError, match=rf"bad.csv:1: character 2 is '{digit}'"):
            read_puzzles(bad)
    bad.write_text("11..............\n")
    with pytest.raises(InputError, match=r"bad.csv:1: the givens repeat"):
        read_puzzles(bad)
    bad.write_text("1...............\n")
    with pytest.raises(InputError, match=r"bad.csv:1: the puzzle has more than one solution"):
        read_puzzles(bad)
    wrong = "".join("1" if c == "2" else c for c in "".join(map(str, puzzles[0].solution)))
    bad.write_text(f"{puzzles[0].to_line()},{wrong}\n")
    with pytest.raises(InputError, match=r"bad.csv:1: the solution does not solve"):
        read_puzzles(bad)


def test_puzzles_harder_than_the_strategy_cap_are_left_out_with_a_warning(tmp_path):
    puzzles = generate_puzzles(9, 6, seed=0, givens=(24, 28))
    hard = [p for p in puzzles if any(s == "guess" for *_, s in p.steps)]
    easy = [p for p in puzzles if p not in hard]
    assert hard and len(easy) >= 2
    path = tmp_path / "p.csv"
    write_puzzles(path, [easy[0], hard[0], easy[1]])  # a header, then the puzzles on lines 2-4
    left_out = r"p.csv: 1 puzzle\(s\) need a strategy harder than 'elimination'.*lines 3\)"
    with pytest.warns(UserWarning, match=left_out):
        assert read_puzzles(path, max_strategy="elimination") == [easy[0], easy[1]]


def test_puzzle_settings_are_checked_up_front():
    from apps.sudoku.data import PuzzleConfig

    with pytest.raises(ValueError, match=r"no 4x4 puzzle with at most 3 givens"):
        PuzzleConfig(givens_min=2, givens_max=3)
    with pytest.raises(
        ValueError, match=r"givens_min=6, givens_max=4: need 0 <= givens_min <= givens_max < 16"
    ):
        PuzzleConfig(givens_min=6, givens_max=4)
    with pytest.raises(ValueError, match=r"givens_min=4, givens_max=16: .*at least one empty cell"):
        PuzzleConfig(givens_max=16)  # a full grid is no puzzle
    with pytest.raises(ValueError, match=r"givens_max=81: .*at least one empty cell"):
        generate_puzzles(9, 5, seed=0, givens=(70, 81))
    with pytest.raises(
        ValueError, match=r"num_puzzles must be >= 2 \(split into train and held out\), got 0"
    ):
        PuzzleConfig(num_puzzles=0)


def test_a_puzzle_file_takes_no_generation_settings_but_its_first_num_puzzles(tmp_path):
    from apps.sudoku.data import PuzzleConfig, load_puzzles

    path = tmp_path / "p.csv"
    puzzles = generate_puzzles(4, 40, seed=0, givens=(4, 6))
    write_puzzles(path, puzzles)
    with pytest.raises(ValueError, match=r"givens_max=5, data_seed=3: settings of generated puzzles, but"):
        PuzzleConfig(data=str(path), givens_max=5, data_seed=3)
    with pytest.raises(ValueError, match=r"p.csv: holds 4x4 puzzles, not size 9"):
        load_puzzles(PuzzleConfig(data=str(path), size=9))
    with pytest.raises(ValueError, match=r"p.csv: holds 40 puzzles, fewer than num_puzzles=50"):
        load_puzzles(PuzzleConfig(data=str(path), num_puzzles=50))
    train, held_out = load_puzzles(PuzzleConfig(data=str(path), num_puzzles=30))
    assert {p.grid for p in train + held_out} == {p.grid for p in puzzles[:30]}
    config = PuzzleConfig(data=str(path))  # the file's own size and every puzzle in it
    assert config.size is None and len(sum(load_puzzles(config), [])) == 40


def test_full_grids_are_refused_and_a_byte_order_mark_is_read(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1234341221434321\n")
    with pytest.raises(InputError, match=r"bad.csv:1: the puzzle has no empty cell"):
        read_puzzles(bad)
    puzzles = generate_puzzles(4, 3, seed=0, givens=(4, 6))
    bom = tmp_path / "bom.csv"
    bom.write_text(
        "\ufeffpuzzle,solution\n" + "\n".join(p.to_line() for p in puzzles) + "\n", encoding="utf-8"
    )
    assert read_puzzles(bom) == puzzles


def test_a_puzzle_file_that_is_not_utf8_is_an_error_naming_the_line_and_byte(tmp_path):
    # a UnicodeDecodeError traceback before
    line = generate_puzzles(4, 1, seed=0, givens=(4, 6))[0].to_line()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(f"{line}\n".encode() + b"\xe9\xff\n")
    with pytest.raises(InputError, match=r"latin1.txt:2: not UTF-8 text \(byte 17: 0xe9\)"):
        read_puzzles(bad)
    bad.write_bytes(b"\xef\xbb\xbf" + f"{line}\r\n{line}\r\n".encode() + b"\xe9\n")  # the byte counts the BOM
    with pytest.raises(InputError, match=r"latin1.txt:3: not UTF-8 text \(byte 39: 0xe9\)"):
        read_puzzles(bad)


def test_a_line_too_long_for_the_csv_reader_is_an_error_naming_it(tmp_path):
    # "_csv.Error: field larger than field limit (131072)" with a traceback before
    line = generate_puzzles(4, 1, seed=0, givens=(4, 6))[0].to_line()
    huge = tmp_path / "huge.txt"
    huge.write_text(f"{line}\n\n{'1' * 200_000}\n")
    with pytest.raises(InputError, match=r"huge.txt:3: not readable as CSV \(field larger than field limit"):
        read_puzzles(huge)


def test_rows_are_named_by_the_line_they_begin_on_past_a_quoted_field_of_several_lines(tmp_path):
    puzzles = generate_puzzles(4, 3, seed=0, givens=(4, 6))
    lines = [p.to_line() for p in puzzles]
    path = tmp_path / "p.csv"  # a comment with a quoted line end takes lines 2-3: enumerate named line 4 as 3
    path.write_text(f'{lines[0]}\n"# a note\nover two lines"\n{lines[1]}\n12x4............\n')
    with pytest.raises(InputError, match=r"p.csv:5: character 3 is 'x'"):
        read_puzzles(path)
    path.write_text(f'{lines[0]}\n"{lines[1]}\n{lines[2]}"\n12x4............\n')
    with pytest.raises(InputError, match=r"p.csv:2: expected 16 or 81 characters"):  # the row's first line
        read_puzzles(path)
    path.write_text(f'{lines[0]}\r\n"# a\r\nnote"\r\n{lines[1]}\r\n12x4............\r\n')
    with pytest.raises(InputError, match=r"p.csv:5: character 3 is 'x'"):
        read_puzzles(path)


def _grid(line: str) -> list[int]:
    return [0 if c == "." else int(c) for c in line]


def test_a_value_above_the_grid_size_is_inconsistent():
    """A 5 in a 4x4 grid is no valid value (not only values above 9)."""
    from apps.sudoku.puzzles import is_consistent

    assert is_consistent([4] + [0] * 15, 4)
    assert not is_consistent([5] + [0] * 15, 4)


def test_hidden_single_ties_go_to_the_lowest_cell():
    """With several hidden singles at once the solver fills the lowest cell index first (the documented
    convention), not the highest."""
    line = "96...........9...1...5..27...6.5794.3.82.....4.9.....26...71...1...........8.5.3."
    steps = logic_solve(_grid(line), 9)
    assert [s for *_, s in steps[:7]] == ["naked_single"] * 7
    assert steps[7] == (26, 9, "hidden_single")
    assert steps[8] == (8, 3, "hidden_single")


def test_a_guess_goes_to_the_lowest_cell_among_the_fewest_candidates():
    """A guess goes to a cell with the fewest candidates, the lowest index among those, when the solver must
    guess."""
    line = "....5...2....719...48..9.....9.82.5....1..7...1..3.2.8.2.8....6.8...3....947....."
    steps = logic_solve(_grid(line), 9)
    assert [s for *_, s in steps[:12]].count("guess") == 0
    assert steps[12] == (1, 7, "guess")
    assert replay(_grid(line), 9, steps, check_labels=False) == count_solutions(_grid(line), 9)[1]
    # after the hidden single at cell 10, cells 0-7 have 3 candidates and cell 8 has 2: the guess is cell 8,
    # not the lowest empty cell
    grid, solution = [0] * 11 + [1, 3, 1, 0, 0], [1, 2, 4, 3, 4, 3, 1, 2, 2, 4, 3, 1, 3, 1, 2, 4]
    assert logic_solve(grid, 4, solution=solution)[:2] == [(10, 3, "hidden_single"), (8, 2, "guess")]


def test_generated_puzzles_never_exceed_givens_max():
    """A minimal puzzle that keeps more givens than the range allows is left out, not returned."""
    puzzles = generate_puzzles(4, 20, seed=0, givens=(4, 4))
    assert len(puzzles) == 20
    assert [p.givens for p in puzzles] == [4] * 20


def test_count_solutions_stops_at_its_limit():
    """The empty 4x4 grid has 288 solutions; the count stops at the limit (default 2), not one past it."""
    assert count_solutions([0] * 16, 4)[0] == 2
    assert count_solutions([0] * 16, 4, limit=1) == (1, SOLUTION_4)
    assert count_solutions([0] * 16, 4, limit=5)[0] == 5


def test_one_puzzle_is_refused_and_a_split_without_held_out_puzzles_is_an_error():
    """num_puzzles=1 cannot split into train and held out; a set whose held-out side is empty is refused."""
    from apps.sudoku.data import PuzzleConfig, split_puzzles

    with pytest.raises(
        ValueError, match=r"num_puzzles must be >= 2 \(split into train and held out\), got 1"
    ):
        PuzzleConfig(num_puzzles=1)
    assert PuzzleConfig(num_puzzles=2).num_puzzles == 2
    config = PuzzleConfig(num_puzzles=40)
    train, held_out = holdout_split(generate_puzzles(4, 40, seed=0, givens=(4, 6)), config.eval_fraction)
    assert train and held_out
    assert split_puzzles(config, train + held_out) == (train, held_out)
    with pytest.raises(ValueError, match=rf"split into {len(train)} train / 0 held out"):
        split_puzzles(config, train)
    with pytest.raises(ValueError, match=rf"split into 0 train / {len(held_out)} held out"):
        split_puzzles(config, held_out)


def test_every_unit_kind_counts_for_validity_and_consistency():
    """A grid whose rows and columns are all right but whose boxes repeat values is neither a solution nor
    consistent: boxes are units too."""
    from apps.sudoku.puzzles import is_consistent

    latin = [1, 2, 3, 4, 2, 3, 4, 1, 3, 4, 1, 2, 4, 1, 2, 3]  # a Latin square: box 0 holds 1, 2, 2, 3
    assert not is_valid_solution(latin, 4)
    assert not is_consistent(latin, 4)
    assert is_valid_solution(SOLUTION_4, 4) and is_consistent(SOLUTION_4, 4)
    # two 1s in box 0 only (row 0, col 0 and row 1, col 1): no row or column repeats
    assert not is_consistent([1, 0, 0, 0, 0, 1] + [0] * 10, 4)


def test_the_fill_after_an_elimination_is_labelled_elimination():
    """This 9x9 puzzle needs locked candidates or naked pairs: the fill that follows them is recorded as
    "elimination" (step 16), and a solver capped at hidden singles gives up on it."""
    line = ".82.3...71.....3.8.......6.9.57....6..4.86...6..5....23.6.4.....9..7..4......98.."
    grid = _grid(line)
    assert logic_solve(grid, 9, max_strategy="hidden_single") is None
    steps = logic_solve(grid, 9, max_strategy="elimination")
    assert steps[16] == (5, 1, "elimination")
    assert [s for *_, s in steps].count("elimination") == 1
    assert {s for *_, s in steps[:16]} <= {"naked_single", "hidden_single"}
    assert replay(grid, 9, steps, check_labels=False) == count_solutions(grid, 9)[1]


def test_a_puzzles_hardest_strategy_is_by_difficulty_not_by_name():
    """ "hidden_single" is harder than "naked_single" though it sorts before it; no steps: the easiest."""
    from apps.sudoku.puzzles import Puzzle

    steps = ((0, 1, "hidden_single"), (1, 2, "naked_single"))
    assert Puzzle(4, (0,) * 16, tuple(SOLUTION_4), steps).hardest == "hidden_single"
    steps = ((0, 1, "elimination"), (1, 2, "guess"), (2, 3, "naked_single"))
    assert Puzzle(4, (0,) * 16, tuple(SOLUTION_4), steps).hardest == "guess"
    assert Puzzle(4, (0,) * 16, tuple(SOLUTION_4), ()).hardest == "naked_single"


def test_a_digit_above_the_grid_size_is_named_as_a_bad_character(tmp_path):
    """A 5 in a 16-character (4x4) line is no value of the grid: named by its position, like any other
    character that is not 1-4, '.' or '0'."""
    bad = tmp_path / "bad.txt"
    bad.write_text("5...............\n")
    with pytest.raises(InputError, match=r"bad.txt:1: character 1 is '5'; expected 1-4"):
        read_puzzles(bad)


def test_a_givens_range_is_refused_by_its_most_givens_only():
    """Fewer than the fewest unique givens is fine for givens_min as long as givens_max reaches it."""
    from apps.sudoku.puzzles import check_givens

    check_givens(4, 2, 6)
    check_givens(9, 10, 17)
    assert all(4 <= p.givens <= 6 for p in generate_puzzles(4, 5, seed=0, givens=(2, 6)))


def test_holdout_split_drops_repeated_puzzles():
    """The same puzzle twice in the input is one puzzle in the split."""
    puzzles = generate_puzzles(4, 30, seed=0, givens=(4, 6))
    train, held_out = holdout_split(puzzles + puzzles[:10], 0.2)
    assert sorted(p.grid for p in train + held_out) == sorted(p.grid for p in puzzles)


def test_a_puzzle_file_mixing_sizes_is_refused(tmp_path):
    from apps.sudoku.data import PuzzleConfig, load_puzzles

    four = generate_puzzles(4, 1, seed=0, givens=(4, 6))[0]
    line9 = "96...........9...1...5..27...6.5794.3.82.....4.9.....26...71...1...........8.5.3."
    path = tmp_path / "mixed.txt"
    path.write_text(f"{four.to_line()}\n{line9}\n")
    with pytest.raises(ValueError, match=r"mixed.txt: mixes 4x4 and 9x9 puzzles"):
        load_puzzles(PuzzleConfig(data=str(path)))


def test_eval_fraction_must_leave_both_sides_and_generated_sets_default_to_4000():
    from apps.sudoku.data import PuzzleConfig

    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"eval_fraction must be in \(0, 1\)"):
            PuzzleConfig(eval_fraction=fraction)
    assert PuzzleConfig().num_puzzles == 4000
