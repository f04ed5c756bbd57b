"""Rewards and metrics against hand-computed values, malformed completions included; the serialization."""

import random

import pytest

from apps.sudoku.puzzles import generate_puzzles
from apps.sudoku.rewards import cell_reward, kendall_tau, order_reward, puzzle_metrics, read_completion
from apps.sudoku.serialize import build_tokenizer, completion_text, fill_order, prompt_text, to_example

# solution 1234 / 3412 / 2143 / 4321; the puzzle misses (1,1)=1 (1,2)=2 (2,1)=3 (4,4)=1; the solver fills
# them in the order (4,4), (1,2), (1,1), (2,1)
EXAMPLE = {
    "n": 4,
    "puzzle": "..34.4122143432.",
    "solution": "1234341221434321",
    "solver_order": [15, 1, 0, 4],
}


def test_example_fixture_is_what_the_comment_says():
    assert [i for i, c in enumerate(EXAMPLE["puzzle"]) if c == "."] == [0, 1, 4, 15]


@pytest.mark.parametrize(
    "completion, cell, order",
    [
        # all right, in solver order: E/E and 4 * 1/(1+0)
        ("r4 c4 v1 r1 c2 v2 r1 c1 v1 r2 c1 v3", 1.0, 4.0),
        # all right, row-major: positions 0,1,2,3 vs solver 2,1,3,0 -> 1/3 + 1 + 1/2 + 1/4
        ("r1 c1 v1 r1 c2 v2 r2 c1 v3 r4 c4 v1", 1.0, 1 / 3 + 1 + 1 / 2 + 1 / 4),
        # one wrong value (r1c1 = 4): 3/4 right; order over the right ones only
        ("r1 c1 v4 r1 c2 v2 r2 c1 v3 r4 c4 v1", 0.75, 1 + 1 / 2 + 1 / 4),
        # a repeat: only the first emission counts (r1c2 first wrong, then right: still wrong)
        ("r1 c2 v3 r1 c2 v2 r1 c1 v1 r2 c1 v3", 0.5, 1 / (1 + 0) + 1 / (1 + 0)),
        # a triplet on a given cell and a malformed group keep their positions but score nothing
        ("r1 c3 v3 xx yy zz r4 c4 v1 r1 c2 v2", 0.5, 1 / (1 + 2) + 1 / (1 + 2)),
        # trailing words, out-of-range indices, wrong word order, empty completion
        ("r4 c4 v1 r1", 0.25, 1.0),
        ("r5 c1 v1 r1 c1 v9 c1 r1 v1", 0.0, 0.0),
        # non-ASCII digits ("²", Arabic-Indic 2) are malformed groups, not a crash or a 2
        ("r1 c2 v\u00b2 r1 c2 v\u0662 r4 c4 v1", 0.25, 1 / (1 + 2)),
        ("", 0.0, 0.0),
        # a two-digit index ("r12") is malformed, not read as its first digit (r1): r4c4 at position 1
        ("r12 c2 v2 r4 c4 v1", 0.25, 1 / (1 + 1)),
    ],
)
def test_rewards_hand_computed(completion, cell, order):
    assert cell_reward(completion, EXAMPLE) == pytest.approx(cell)
    assert order_reward(completion, EXAMPLE) == pytest.approx(order)


def test_reading_and_metrics_of_malformed_completions():
    reading = read_completion("r1 c3 v3 xx yy zz r4 c4 v1 r4 c4 v2 r1", EXAMPLE)
    assert (reading.groups, reading.malformed, reading.on_givens, reading.repeats) == (5, 2, 1, 1)
    assert reading.first == {15: (2, 1)} and not reading.format_valid
    valid = "r4 c4 v1 r1 c2 v2 r1 c1 v1 r2 c1 v3"
    assert puzzle_metrics(valid, EXAMPLE) == {
        "cell_accuracy": 1.0,
        "solved": 1.0,
        "order_reward_norm": 1.0,
        "kendall_tau": 1.0,
        "format_valid": 1.0,
    }
    reverse = "r2 c1 v3 r1 c1 v1 r1 c2 v2 r4 c4 v1"
    assert kendall_tau(reverse, EXAMPLE) == -1.0 and puzzle_metrics(reverse, EXAMPLE)["solved"] == 1.0
    # right values but a fifth, repeated triplet: solved needs format validity too
    assert puzzle_metrics(valid + " r4 c4 v1", EXAMPLE)["solved"] == 0.0
    # tau over first emissions right or wrong: row-major with r4c4 wrong, positions 0-3 against solver
    # 2, 1, 3, 0: 2 concordant, 4 discordant pairs (over the 3 right cells alone it would be +1/3)
    assert kendall_tau("r1 c1 v1 r1 c2 v2 r2 c1 v3 r4 c4 v2", EXAMPLE) == pytest.approx(-1 / 3)
    # the order reward is divided by the E empty cells, not by the cells emitted
    assert puzzle_metrics("r4 c4 v1", EXAMPLE)["order_reward_norm"] == 0.25
    # a word longer than prefix + one digit is no index: "r12" makes its group malformed
    reading = read_completion("r12 c2 v2 r4 c4 v1", EXAMPLE)
    assert (reading.groups, reading.malformed, reading.first) == (2, 1, {15: (1, 1)})


def test_serialization_orders_and_tokenizer_round_trip():
    puzzle = generate_puzzles(4, 1, seed=0, givens=(5, 5))[0]
    tokenizer = build_tokenizer()
    prompt = prompt_text(puzzle)
    assert prompt.startswith("<n4> ") and prompt.endswith(" <sol>") and len(prompt.split()) == 3 * 5 + 2
    assert tokenizer.decode(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == prompt
    example = to_example(puzzle, 0, "train")
    empty = [i for i, v in enumerate(puzzle.grid) if v == 0]
    assert fill_order(puzzle, "row-major") == empty
    assert fill_order(puzzle, "solver") == example["solver_order"]
    shuffled = fill_order(puzzle, "random", random.Random(0))
    assert sorted(shuffled) == empty
    for cells in (empty, shuffled, example["solver_order"]):
        text = completion_text(puzzle, cells)
        assert cell_reward(text, example) == 1.0 and puzzle_metrics(text, example)["format_valid"] == 1.0
    assert order_reward(completion_text(puzzle, example["solver_order"]), example) == len(empty)
    with pytest.raises(ValueError, match="unknown order"):
        fill_order(puzzle, "diagonal")


def test_tokenizer_ids_follow_the_vocabulary_and_a_batch_pads_on_the_left():
    """Ids in VOCAB order (pad, eos, sol, <n4>, <n9>, r1-r9, c1-c9, v1-v9); left padding, as batched
    generation needs (a saved model's tokenizer is read with these ids and this side)."""
    tokenizer = build_tokenizer()
    assert len(tokenizer) == 32 and (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer("<n9> r1 c2 v3 r9 c9 v9 <sol>", add_special_tokens=False)["input_ids"]
    assert ids == [4, 5, 15, 25, 13, 22, 31, 2]
    batch = tokenizer(["<n4> <sol>", "<sol>"], padding=True, add_special_tokens=False)
    assert batch["input_ids"] == [[3, 2], [0, 2]] and batch["attention_mask"] == [[1, 1], [0, 1]]


def test_example_ids_name_size_split_and_index():
    """Train and eval examples of the same index get different ids (the split is part of the id)."""
    puzzle = generate_puzzles(4, 1, seed=0, givens=(5, 5))[0]
    assert to_example(puzzle, 0, "train")["id"] == "sudoku4-train-0"
    assert to_example(puzzle, 3, "eval")["id"] == "sudoku4-eval-3"
    assert to_example(puzzle, 0, "train")["id"] != to_example(puzzle, 0, "eval")["id"]


def test_a_9x9_prompt_opens_with_its_size_token():
    """The size token follows the puzzle: <n9> for 9x9, not <n4>."""
    from apps.sudoku.puzzles import Puzzle, count_solutions, logic_solve

    line = "96...........9...1...5..27...6.5794.3.82.....4.9.....26...71...1...........8.5.3."
    grid = [0 if c == "." else int(c) for c in line]
    solution = count_solutions(grid, 9)[1]
    puzzle = Puzzle(9, tuple(grid), tuple(solution), tuple(logic_solve(grid, 9, solution=solution)))
    prompt = prompt_text(puzzle)
    assert prompt.split()[0] == "<n9>" and prompt.split()[1:4] == ["r1", "c1", "v9"]
    assert len(prompt.split()) == 3 * puzzle.givens + 2


def test_a_random_order_without_a_generator_is_refused():
    """fill_order(..., "random") needs an explicit random.Random: no silent fixed seed."""
    puzzle = generate_puzzles(4, 1, seed=0, givens=(5, 5))[0]
    with pytest.raises(ValueError, match=r"order 'random' needs a random.Random"):
        fill_order(puzzle, "random")


def test_a_puzzle_line_may_mark_empty_cells_with_zeros():
    """The rewards read '0' as an empty cell as they read '.': E counts both."""
    zeros = EXAMPLE | {"puzzle": EXAMPLE["puzzle"].replace(".", "0")}
    completion = "r4 c4 v1 r1 c2 v2"
    assert read_completion(completion, zeros).empty == 4
    assert cell_reward(completion, zeros) == cell_reward(completion, EXAMPLE) == 0.5


def test_the_example_names_the_hardest_strategy_the_puzzle_needs():
    """`hardest` is the hardest label of the fill sequence, not that of its last fill."""
    from apps.sudoku.puzzles import Puzzle

    solution = (1, 2, 3, 4, 3, 4, 1, 2, 2, 1, 4, 3, 4, 3, 2, 1)
    steps = ((0, 1, "hidden_single"), (1, 2, "naked_single"))
    puzzle = Puzzle(4, (0, 0) + solution[2:], solution, steps)
    assert to_example(puzzle, 0, "train")["hardest"] == "hidden_single"
