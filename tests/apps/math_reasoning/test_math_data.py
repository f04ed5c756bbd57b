"""apps/math_reasoning data: the generated set (difficulty, determinism, disjoint splits, hints) and the
benchmark loaders on small fixture files, malformed ones included."""

import json
import random

import pytest

from apps.math_reasoning.data import (
    ADD_VERBS,
    HARD_LEVEL,
    HINT_TIERS,
    LEVELS,
    MIXES,
    Difficulty,
    carries,
    generate_problem,
    generate_set,
    last_boxed,
    load_examples,
    mix_levels,
    offline_sets,
    write_jsonl,
)


def _evaluate_steps(problem: dict) -> int:
    value = None
    for step in problem["steps"]:
        left, result = step.split("=")
        op = "+" if "+" in left else "-"
        a, b = (int(x) for x in left.split(op))
        assert value is None or a == value
        assert int(result) == (a + b if op == "+" else a - b)
        value = int(result)
    return value


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_generated_problems_are_consistent_and_respect_the_knobs(level):
    rng = random.Random(0)
    difficulty = LEVELS[level]
    for _ in range(50):
        problem = generate_problem(rng, difficulty)
        assert _evaluate_steps(problem) == int(problem["answer"]) >= 0
        assert len(problem["steps"]) == difficulty.steps
        assert problem["carries"] >= difficulty.min_carries
        operands = [
            int(x) for s in problem["steps"] for x in s.split("=")[0].replace("-", "+").split("+")[1:]
        ]
        assert all(len(str(b)) == difficulty.digits for b in operands)
        assert set(problem["hints"]) == set(HINT_TIERS)
        assert len(problem["hints"]["planning"]) == difficulty.steps + 1
        assert problem["hints"]["solution"] == [f"{s}." for s in problem["steps"]]


def test_carries_against_hand_values():
    assert carries(999, 1, "+") == 3
    assert carries(1000, 1, "-") == 3
    assert carries(55, 44, "+") == 0
    assert carries(50, 5, "-") == 1


def test_a_min_carries_at_the_reachable_maximum_is_met_exactly():
    # one digit, one step: at most one carry exists, so min_carries=1 is met by exactly one carry
    rng = random.Random(0)
    for _ in range(20):
        problem = generate_problem(rng, Difficulty(1, 1, 1))
        assert problem["carries"] == 1
        left = problem["steps"][0].split("=")[0]
        op = "+" if "+" in left else "-"
        a, b = (int(x) for x in left.split(op))
        assert carries(a, b, op) == 1
    # a seeded level draws problems with exactly min_carries carries, not only with more
    for level in (MIXES["micro"][3], LEVELS[2]):
        rng = random.Random(1)
        counts = [generate_problem(rng, level)["carries"] for _ in range(100)]
        assert min(counts) == level.min_carries


def test_no_split_repeats_a_question():
    for mix in ("default", "micro"):
        sets = offline_sets(5, mix=mix)  # the app's sizes: without the check, seed 5 repeats in both mixes
        for split in (sets.train, sets.test, sets.sft):
            questions = [e["question"] for e in split]
            assert len(set(questions)) == len(questions), mix


def test_sets_are_seeded_and_disjoint():
    a, b = offline_sets(7, 50, 25, 40), offline_sets(7, 50, 25, 40)
    assert a == b
    assert offline_sets(8, 50, 25, 40).test != a.test
    questions = [{e["question"] for e in s} for s in (a.train, a.test, a.sft)]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    assert {e["level"] for e in a.sft} == {1, 2}  # the hard tail is left for RL
    assert {e["level"] for e in a.test} == {1, 2, 3}
    # sizes that are not multiples of 5 are met exactly (2:2:1, the remainder to level 3)
    odd = offline_sets(7, 7, 9, 4)
    assert (len(odd.train), len(odd.test)) == (7, 9)
    assert [sum(e["level"] == level for e in odd.test) for level in (1, 2, 3)] == [3, 3, 3]


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_each_mix_draws_its_own_levels(mix):
    sets = offline_sets(3, 40, 20, 30, mix=mix)
    for example in sets.train + sets.test + sets.sft:
        difficulty = MIXES[mix][example["level"]]
        assert len(example["steps"]) == difficulty.steps and example["carries"] >= difficulty.min_carries
        first = int(example["steps"][0].split("+")[0].split("-")[0])
        assert len(str(first)) == difficulty.digits  # the start amount has the level's digits
    assert {e["level"] for e in sets.sft} == {1, 2}
    assert offline_sets(3, 40, 20, 30) == offline_sets(3, 40, 20, 30, mix="default")


def test_micro_mix_is_easier_than_default_and_unknown_mixes_fail():
    micro, default = mix_levels("micro"), mix_levels("default")
    assert all(micro[level].digits <= default[level].digits for level in (1, 2, 3))
    assert micro[3].min_carries > 0  # the hard tail needs carries a one-digit SFT never showed
    with pytest.raises(ValueError, match="unknown difficulty mix 'nope'; valid: default, micro"):
        offline_sets(0, mix="nope")


def test_difficulty_and_level_errors():
    with pytest.raises(ValueError, match="at most"):
        Difficulty(1, 1, 5)
    with pytest.raises(ValueError, match="unknown level"):
        generate_set({9: 1}, 0, "x")


def test_last_boxed_handles_nesting():
    assert last_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"a \boxed{1} b \boxed{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{unclosed") is None


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loaders_of_each_format(tmp_path):
    gsm = _write(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "2+2=4\n#### 1,004"}])
    assert load_examples(gsm)[0] | {"id": None} == {
        "id": None,
        "source": "gsm8k",
        "question": "2+2?",
        "answer": "1004",
    }
    math_rows = [
        {"problem": "half?", "solution": r"It is \boxed{\frac{1}{2}}."},
        {"problem": "p", "answer": "3", "solution": r"\boxed{4}"},
        {"problem": "p", "answer": " \n", "solution": r"\boxed{5}"},  # a blank answer is a missing one
    ]
    loaded = load_examples(_write(tmp_path / "math.jsonl", math_rows))
    assert [e["answer"] for e in loaded] == [r"\frac{1}{2}", "3", "5"]  # an explicit answer wins
    aime = load_examples(_write(tmp_path / "aime.jsonl", [{"problem": "p", "answer": 204}]), "aime")
    assert aime[0]["answer"] == "204" and aime[0]["source"] == "aime"
    minerva = load_examples(
        _write(tmp_path / "m.jsonl", [{"problem": "p", "solution": r"\boxed{7}"}]), "minerva"
    )
    assert minerva[0]["answer"] == "7"


def test_parquet_and_offline_round_trip(tmp_path):
    from datasets import Dataset

    path = tmp_path / "math.parquet"
    Dataset.from_list([{"problem": "p", "answer": "5"}]).to_parquet(str(path))
    assert load_examples(path)[0]["answer"] == "5"
    sets = offline_sets(0, 10, 5, 10)
    write_jsonl(tmp_path / "off.jsonl", sets.test)
    loaded = load_examples(tmp_path / "off.jsonl")
    assert [e["answer"] for e in loaded] == [e["answer"] for e in sets.test]
    assert loaded[0]["hints"] == sets.test[0]["hints"] and loaded[0]["source"] == "offline"


@pytest.mark.parametrize(
    "rows, fmt, message",
    [
        ([{"question": "q", "answer": "no final line"}], "auto", r"bad.jsonl:line 1 .*'####"),
        ([{"question": "q", "answer": "a #### 5\n#### 6"}], "gsm8k", r"line 1 .*more than one '####'"),
        ([{"question": "q", "answer": "#### 5\nso 5"}], "gsm8k", r"line 1 .*must end with one '####"),
        ([{"question": "q", "answer": "5 ####  "}], "gsm8k", r"line 1 .*must end with one '####"),
        (
            [{"question": "q", "answer": "#### 1"}, {"question": "q2"}],
            "gsm8k",
            r"bad.jsonl:line 2 .*missing field 'answer'",
        ),
        ([{"problem": "p", "solution": "no box"}], "math", r"bad.jsonl:line 1 .*no \\boxed"),
        ([{"problem": "p", "solution": "so \\boxed{ }"}], "math", r"bad.jsonl:line 1 .*no \\boxed"),  # empty
        ([{"problem": "p"}], "math", "missing field 'answer'"),
        ([{"problem": "p", "answer": " ", "solution": " "}], "math", "missing field 'answer'"),
        ([{"problem": "p", "answer": ""}], "aime", "missing field 'answer'"),
        ([{"problem": "p", "answer": [1]}], "amc", "must be text or a number"),
        ([{"text": "x"}], "auto", "cannot tell the format"),
        ([{"question": "q", "answer": "1", "hints": {"knowledge": []}}], "auto", "field 'hints'"),
        (
            [
                {
                    "question": "q",
                    "answer": "1",
                    "hints": {"knowledge": [1, 2], "planning": [], "solution": []},
                }
            ],
            "auto",
            r"bad.jsonl:line 1 .*field 'hints': each knowledge chunk must be non-empty text",
        ),
    ],
)
def test_malformed_files_name_file_row_and_field(tmp_path, rows, fmt, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as err:
        load_examples(path, fmt)
    assert "bad.jsonl" in str(err.value)


def test_json_files_are_read_as_written(tmp_path):
    path = tmp_path / "aime.json"
    path.write_text(json.dumps([{"problem": "a", "answer": 7}, {"problem": "b", "answer": "042"}]))
    assert [e["answer"] for e in load_examples(path, "aime")] == ["7", "042"]  # "042" stays text
    path.write_text(json.dumps({"problem": ["a", "b"], "answer": ["1", "2"]}))  # an object of columns
    assert [(e["id"], e["answer"]) for e in load_examples(path, "aime")] == [("aime-0", "1"), ("aime-1", "2")]
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n')  # one object per line
    with pytest.raises(ValueError, match=r"aime.json:line 2 \(id 'aime-1'\): missing field 'answer'"):
        load_examples(path, "aime")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[\n{"problem": "a", "answer": "1"},\n{"problem": "b", "answer": }\n]',
            r"bad.json:3:28: not valid JSON",
        ),
        ('[{"problem": "a", "answer": "1"}, 5]', r"bad.json:row 2: expected a JSON object, got int"),
        ('{"problem": ["a", "b"], "answer": ["1"]}', r"bad.json: columns of different lengths"),
        ('"text"', r"bad.json: expected a list of objects or an object of columns"),
    ],
)
def test_malformed_json_files_name_the_file_and_the_line_or_row(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_examples(path, "aime")


def test_errors_give_the_jsonl_line_not_the_row_index(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n\n\n{"question": "q2", "answer": "none"}\n')
    with pytest.raises(ValueError, match=r"gaps.jsonl:line 4 \(id 'gaps-1'\)"):
        load_examples(path, "gsm8k")


def test_broken_json_line_and_unknown_format(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        load_examples(path)
    with pytest.raises(ValueError, match="unknown data format"):
        load_examples(path, "csv-ish")
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "missing.jsonl")


def test_writing_into_an_out_dir_that_is_a_file_says_so(tmp_path):
    """`math data --out-dir od` with a file od: not mkdir's "[Errno 17] File exists: 'od'"."""
    (tmp_path / "od").write_text("x")
    with pytest.raises(FileExistsError, match=r"^output directory \S+od is a file, not a directory$"):
        write_jsonl(tmp_path / "od" / "train.jsonl", [{"a": 1}])


def test_last_boxed_without_braces_or_with_a_space():
    """`\\boxed 5` and `\\boxed {5}` are boxes (TeX reads them; so does the MATH reference extractor): an
    earlier `\\boxed{3}` had been taken as the answer."""
    assert last_boxed(r"\boxed{3} hmm actually \boxed 5.") == "5"
    assert last_boxed(r"so \boxed {5}") == "5"
    assert last_boxed(r"$\boxed 3.5$") == "3.5"
    assert last_boxed(r"\boxedx{3}") is None and last_boxed(r"\boxed") is None


def test_math_rows_keep_their_level(tmp_path):
    rows = [
        {"problem": "p", "solution": r"\boxed{1}", "level": "Level 5"},
        {"problem": "q", "answer": "2", "level": "Level ?"},
        {"problem": "r", "answer": "3", "level": 2},
        {"problem": "s", "answer": "4", "level": " easy "},
        {"problem": "t", "answer": "5"},
    ]
    loaded = load_examples(_write(tmp_path / "math.jsonl", rows))
    # a level that is not a number is kept as its text (`math eval` reports it as "level easy"); it was dropped
    assert [e.get("level") for e in loaded] == [5, "Level ?", 2, "easy", None]
    gsm = [
        {"question": "q", "answer": "so #### 1", "level": "hard"},
        {"question": "r", "answer": "#### 2", "level": 1},
        {"question": "s", "answer": "#### 3"},
    ]
    assert [e.get("level") for e in load_examples(_write(tmp_path / "gsm.jsonl", gsm))] == ["hard", 1, None]
    with pytest.raises(
        ValueError, match=r"bad.jsonl:line 1 .*field 'level' must be text or a number, got list"
    ):
        load_examples(_write(tmp_path / "bad.jsonl", [{"problem": "p", "answer": "1", "level": [1]}]))


def test_a_nan_answer_is_missing_and_the_solutions_box_is_taken(tmp_path):
    """JSON's NaN (or a blank Parquet cell) was read as the answer "nan"."""
    path = tmp_path / "nan.jsonl"
    path.write_text(
        json.dumps({"problem": "1+2?", "answer": float("nan"), "solution": r"so \boxed{3}"}) + "\n"
    )
    assert load_examples(path, "math")[0]["answer"] == "3"


def test_a_problem_and_its_hints_by_hand():
    """Seed 0 at two digits, two steps: 59 + 63 = 122 (two carries), 122 - 15 = 107 (one borrow)."""
    problem = generate_problem(random.Random(0), Difficulty(2, 2, 1))
    assert problem["question"] == "Ivy has 59 shells. Ivy buys 63 more. Ivy sells 15. How many shells now?"
    assert (problem["answer"], problem["steps"], problem["carries"]) == (
        "107",
        ["59+63=122", "122-15=107"],
        3,
    )
    assert problem["hints"] == {
        "knowledge": [
            "'buys' means add.",
            "'sells' means subtract.",
            "Work right to left and carry or borrow 1 between columns.",
        ],
        "planning": ["Start at 59.", "Add 63.", "Subtract 15."],
        "solution": ["59+63=122.", "122-15=107."],
    }
    # no carry nor borrow: no carrying hint (3 - 2 = 1, 1 + 8 = 9)
    easy = generate_problem(random.Random(1), Difficulty(1, 2))
    assert easy["steps"] == ["3-2=1", "1+8=9"] and easy["carries"] == 0
    assert easy["hints"]["knowledge"] == ["'gives away' means subtract.", "'buys' means add."]
    assert easy["hints"]["planning"] == ["Start at 3.", "Subtract 2.", "Add 8."]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_hints_follow_the_steps_in_order(level):
    """Planning names each operation in the order of the steps; knowledge says what each verb means, and
    has the carrying chunk exactly when the solution carries or borrows."""
    rng = random.Random(level)
    for _ in range(30):
        problem = generate_problem(rng, LEVELS[level])
        ops = [("+" if "+" in s else "-", s.split("=")[0]) for s in problem["steps"]]
        first = int(ops[0][1].split(ops[0][0])[0])
        expected = [f"Start at {first}."]
        expected += [f"{'Add' if op == '+' else 'Subtract'} {left.split(op)[1]}." for op, left in ops]
        assert problem["hints"]["planning"] == expected
        knowledge = problem["hints"]["knowledge"]
        for chunk in knowledge[: len(knowledge) - bool(problem["carries"])]:
            verb = chunk.split("'")[1]
            assert chunk.endswith("means add." if verb in ADD_VERBS else "means subtract.")
            assert f" {verb} " in problem["question"]
        carry_chunk = "Work right to left and carry or borrow 1 between columns."
        assert (carry_chunk in knowledge) == (problem["carries"] > 0)
        recount = sum(carries(*(int(x) for x in left.split(op)), op) for op, left in ops)
        assert recount == problem["carries"]


def test_the_hard_tail_needs_many_carries():
    """Default level 3 (three digits, four steps) is the hard tail: at least 5 carries or borrows each."""
    assert (LEVELS[HARD_LEVEL].digits, LEVELS[HARD_LEVEL].steps) == (3, 4)
    rng = random.Random(0)
    assert min(generate_problem(rng, LEVELS[HARD_LEVEL])["carries"] for _ in range(30)) >= 5


def test_splits_are_disjoint_where_questions_repeat_often():
    """The micro mix at the app's sizes draws one-digit problems, which repeat across splits unless each
    split excludes the ones before it (test, then train, then SFT)."""
    sets = offline_sets(5, mix="micro")
    train, test, sft = ({e["question"] for e in s} for s in (sets.train, sets.test, sets.sft))
    assert (len(train), len(test), len(sft)) == (600, 300, 2000)
    assert not train & test and not sft & (train | test)


def test_an_offline_file_keeps_level_steps_and_carries(tmp_path):
    sets = offline_sets(0, 10, 5, 10)
    write_jsonl(tmp_path / "off.jsonl", sets.test)
    loaded = load_examples(tmp_path / "off.jsonl")
    keys = ("level", "steps", "carries")
    assert [{k: e[k] for k in keys} for e in loaded] == [{k: e[k] for k in keys} for e in sets.test]
    assert [e["level"] for e in loaded] == [1, 1, 2, 2, 3]


def test_sft_examples_carry_hints_at_the_given_share():
    """hint_fraction 0: no prompt has a hint; 1: every prompt has one, a tier's first chunks (1 or more,
    from the first); the completion is the template's target either way."""
    from apps.math_reasoning.models import sft_examples
    from apps.math_reasoning.templates import get_template

    sets = offline_sets(0, 5, 5, 20)
    template = get_template("r1_short")
    plain = sft_examples(sets, template, 0.0, seed=0)
    assert [e["prompt"] for e in plain] == [template.render(e["question"]) for e in sets.sft]
    assert [e["completion"] for e in plain] == [template.target(e["steps"], e["answer"]) for e in sets.sft]
    hinted = sft_examples(sets, template, 1.0, seed=0)
    for pair, example in zip(hinted, sets.sft, strict=True):
        assert pair["prompt"].startswith(f"User: {example['question']} Hint: ")
        hint = pair["prompt"].split(" Hint: ")[1].removesuffix("\nAssistant: <think>")
        prefixes = [
            " ".join(example["hints"][tier][:k])
            for tier in HINT_TIERS
            for k in range(1, len(example["hints"][tier]) + 1)
        ]
        assert hint in prefixes, hint
    half = sft_examples(sets, template, 0.5, seed=0)
    assert 0 < sum(" Hint: " in e["prompt"] for e in half) < 20
