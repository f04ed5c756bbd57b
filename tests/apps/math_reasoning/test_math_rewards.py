"""apps/math_reasoning rewards and templates on hand-written completions: right answer in the wrong format,
unicode, huge numbers, LaTeX fractions; and the evaluation statistics."""

import pytest

from apps.math_reasoning.evaluate import _summary, majority_correct, pass_at_k
from apps.math_reasoning.rewards import correctness, rubric_for, same_answer
from apps.math_reasoning.templates import answer_in_tags, get_template

R1 = get_template("r1_short")
BOXED = get_template("boxed")
HUGE = "9" * 5000  # past Python's 4300-digit int-to-str limit


@pytest.mark.parametrize(
    "completion, gold, correct, think, answer",
    [
        ("3+4=7</think><answer>7</answer>", "7", 1.0, 1.0, 1.0),
        ("3+4=7</think> <answer> 7 </answer>", "7", 1.0, 1.0, 1.0),
        ("3+4=7 so 7", "7", 0.0, 0.0, 0.0),  # right answer, no tags
        ("3+4=7</think>7", "7", 0.0, 1.0, 0.0),  # right answer outside <answer>
        ("</think><answer>8</answer>", "7", 0.0, 1.0, 1.0),  # format only
        ("<answer>7", "7", 0.0, 0.0, 0.0),  # unclosed
        ("</think><answer>1,000</answer>", "1000", 1.0, 1.0, 1.0),
        ("</think><answer>007</answer>", "7", 1.0, 1.0, 1.0),
        ("</think><answer>-0</answer>", "0", 1.0, 1.0, 1.0),
        (f"</think><answer>{HUGE}</answer>", HUGE, 1.0, 1.0, 1.0),
        (f"</think><answer>{HUGE}8</answer>", HUGE + "9", 0.0, 1.0, 1.0),
        ("</think><answer>\\frac{1}{2}</answer>", "0.5", 1.0, 1.0, 1.0),
        ("</think><answer>\\frac{2}{4}</answer>", "\\frac{1}{2}", 1.0, 1.0, 1.0),
        ("</think><answer>\\frac{1}{3}</answer>", "0.5", 0.0, 1.0, 1.0),
        ("verständlich ✓ 七</think><answer>七</answer>", "7", 0.0, 1.0, 1.0),  # unicode, no crash
        ("ünïcödé</think><answer>12</answer>", "12", 1.0, 1.0, 1.0),
    ],
)
def test_r1_rubric_components(completion, gold, correct, think, answer):
    table = rubric_for(R1).score([completion], [{"id": "x", "answer": gold}])
    assert table.components[0].tolist() == [correct, think, answer]
    assert float(table.total[0]) == pytest.approx(correct + 0.25 * (think + answer))


def test_boxed_template_and_rubric():
    assert BOXED.extract(r"so \boxed{\frac{3}{4}}.") == r"\frac{3}{4}"
    table = rubric_for(BOXED).score([r"\boxed{0.75}", "0.75"], [{"answer": r"\frac{3}{4}"}] * 2)
    assert table.names == ["correct", "format_boxed"]
    assert table.components.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert "\\boxed{}" in BOXED.render("q") and "{question}" not in BOXED.render("q")


def test_boxed_format_reward_needs_the_brace():
    table = rubric_for(BOXED).score([r"so \boxed 5", r"so \boxed{5}"], [{"answer": "5"}] * 2)
    assert table.names == ["correct", "format_boxed"]
    # `\boxed 5` is read as the answer 5, but only `\boxed{` earns the format reward
    assert table.components.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert table.total.tolist() == pytest.approx([1.0, 1.25])


def test_templates_render_hints_and_targets():
    assert R1.render("What?") == "User: What?\nAssistant: <think>"
    assert R1.render("What?", "Add 3.") == "User: What? Hint: Add 3.\nAssistant: <think>"
    target = R1.target(["1+2=3", "3+4=7"], "7")
    assert target == "1+2=3, 3+4=7</think><answer>7</answer>"
    assert correctness(target, {"answer": "7"}, R1) == 1.0
    assert correctness(BOXED.target(["1+2=3"], "3"), {"answer": "3"}, BOXED) == 1.0
    assert get_template("r1_zero").render("Q").endswith("User: Q\nAssistant: <think>")
    with pytest.raises(ValueError, match="valid: r1_zero, r1_short, boxed"):
        get_template("nope")


def test_answer_extraction_takes_the_last_complete_answer():
    assert answer_in_tags("<answer>1</answer> <answer>2</answer>") == "2"
    assert answer_in_tags("</answer><answer>") is None


def test_same_answer_fast_path_and_math_verify():
    assert same_answer("+5", "5") and not same_answer("5", "-5")
    assert same_answer("x^2 + 1", "1 + x^2")
    assert not same_answer("garbage ((", "5")
    # commas group thousands only; anything else is a list of values, compared by math-verify
    assert same_answer("-1,234,567", "-1234567") and not same_answer("1,3", "13")
    assert not same_answer("-2,2", "-22") and same_answer("3,1", "1,3")
    assert same_answer("\u22121,000", "-1000") and not same_answer("\u22121,000", "1000")  # U+2212 minus
    # a first group of 0 is no thousands separator: "0,500" (a decimal comma) is not 500
    assert not same_answer("0,500", "500") and not same_answer("012,345", "12345")


def test_pass_at_k_against_the_product_formula():
    n, c, k = 10, 3, 4
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1 - k / i  # Chen et al. 2021, the numerically stable form
    assert pass_at_k(n, c, k) == pytest.approx(1 - miss)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote():
    assert majority_correct(["1", "2", "2"], "2")
    assert not majority_correct(["1", "1", "2"], "2")
    assert majority_correct(["1", "2"], "1")  # a tie goes to the earliest
    assert not majority_correct([None, None, "3"], "4")
    # an empty answer (`<answer> </answer>`) is no vote, as None is: it cannot win the tie
    assert majority_correct([None, "4"], "4") and majority_correct(["", "4"], "4")
    assert majority_correct([" ", "4"], "4")
    # equal answers written differently vote together
    assert majority_correct(["7", "1,000", "1000"], "1000")
    assert majority_correct(["\\frac{1}{2}", "3", "0.5"], "1/2")
    assert not majority_correct(["3", "0.5", "3", "1/2", "4"], "0.5")  # 2 against 2: "3" came first


def test_the_evaluation_summary_by_hand():
    """4 samples per problem: one problem 1 right (2 formatted, majority right), one 0 right (4 formatted)."""
    records = [
        {"level": 1, "correct": 1, "majority": True, "formatted": 2},
        {"level": 1, "correct": 0, "majority": False, "formatted": 4},
    ]
    summary = _summary(records, 4)
    # pass@1: (1/4 + 0) / 2; pass@4: (1 + 0) / 2; maj@4: 1/2; format: 6 of 8 completions
    assert summary == {"examples": 2, "pass@1": 0.125, "pass@4": 0.5, "maj@4": 0.5, "format_rate": 0.75}


def test_majority_vote_compares_each_distinct_answer_once(monkeypatch):
    """Identical texts are counted before math-verify compares anything: 16 samples of 2 texts cost one
    comparison between them and one with the gold (each could take math-verify's 5 s timeout)."""
    import apps.math_reasoning.evaluate as evaluate

    calls = []
    monkeypatch.setattr(evaluate, "same_answer", lambda a, b: calls.append((a, b)) or a == b)
    assert not majority_correct(["9^{9^{9}}"] * 8 + ["4"] * 8, "4")  # a tie: the first seen wins
    assert calls == [("4", "9^{9^{9}}"), ("9^{9^{9}}", "4")]
    calls.clear()
    assert majority_correct(["4", "9^{9^{9}}", "4"], "4") and len(calls) == 2
