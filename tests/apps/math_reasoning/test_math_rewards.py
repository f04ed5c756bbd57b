"""apps/math_reasoning rewards and templates on hand-written completions: right answer in the wrong format,
unicode, huge numbers, LaTeX fractions; and the evaluation statistics and bookkeeping (a scripted sampler,
no model)."""

import types

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
    # a box left open holds no answer and earns no format reward; one cut off after a closed box leaves it
    completions = [r"The answer is \boxed{5", r"\boxed{5} and then \boxed{"]
    table = rubric_for(BOXED).score(completions, [{"answer": "5"}] * 2)
    assert table.components.tolist() == [[0.0, 0.0], [1.0, 1.0]]


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
    assert majority_correct(["1", "2"], "1") == majority_correct(["2", "1"], "1") == 0.5  # a tie: 1/2 each
    assert not majority_correct([None, None, "3"], "4")
    # an empty answer (`<answer> </answer>`) is no vote, as None is: it cannot win the tie
    assert majority_correct([None, "4"], "4") and majority_correct(["", "4"], "4")
    assert majority_correct([" ", "4"], "4")
    # equal answers written differently vote together
    assert majority_correct(["7", "1,000", "1000"], "1000")
    assert majority_correct(["\\frac{1}{2}", "3", "0.5"], "1/2")
    assert majority_correct(["3", "0.5", "3", "1/2", "4"], "0.5") == 0.5  # 2 against 2
    assert (
        majority_correct(["5", "6", "7", "8"], "6") == 0.25
        and majority_correct(["5", "6", "7", "8"], "9") == 0
    )


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
    assert majority_correct(["9^{9^{9}}"] * 8 + ["4"] * 8, "4") == 0.5  # a tie: each winner against the gold
    assert calls == [("4", "9^{9^{9}}"), ("9^{9^{9}}", "4"), ("4", "4")]
    calls.clear()
    assert majority_correct(["4", "9^{9^{9}}", "4"], "4") and len(calls) == 2


class _RuleBackend:
    """Stands in for `HFGenerateBackend` in `evaluate_model`: completion j of each problem is `texts[j]`."""

    texts: list[str] = []
    max_context = None

    def __init__(self, *args, **kwargs):
        pass

    def generate_groups(self, prompts, settings, seeds, samples):
        return types.SimpleNamespace(completions=[self.texts[j % samples] for j in range(len(prompts))])


def _evaluate(monkeypatch, examples, texts):
    import apps.math_reasoning.evaluate as evaluate

    monkeypatch.setattr(evaluate, "HFGenerateBackend", _RuleBackend)
    monkeypatch.setattr(_RuleBackend, "texts", texts)
    return evaluate.evaluate_model(
        None, None, examples, R1, samples=len(texts), temperature=1.0, max_new_tokens=8, seed=0
    )


def test_hard_tail_only_when_every_problem_is_the_offline_sets(monkeypatch):
    """Level 3 is the hard tail of the offline set only: one problem from elsewhere among them and the
    results have no "hard" entry."""
    offline = [
        {"question": f"{a} + 1?", "answer": str(a + 1), "level": 3, "source": "offline"} for a in (1, 2)
    ]
    texts = ["x</think><answer>2</answer>"]
    results = _evaluate(monkeypatch, offline, texts)
    assert results["hard"] == results["level3"] and results["hard"]["pass@1"] == 0.5
    other = {"question": "1 + 1?", "answer": "2", "level": 3, "source": "math500"}
    assert "hard" not in _evaluate(monkeypatch, [*offline, other], texts)


def test_a_completion_is_formatted_only_with_every_format_tag(monkeypatch):
    """2 samples: one has </think> but no answer tags, one both: format rate 1/2 (and pass@1 1/2)."""
    example = {"question": "1 + 1?", "answer": "2"}
    results = _evaluate(monkeypatch, [example], ["x</think>2", "x</think><answer>2</answer>"])
    assert results["all"]["format_rate"] == 0.5 and results["all"]["pass@1"] == 0.5


def test_eval_config_refuses_a_negative_max_examples(tmp_path):
    from apps.math_reasoning.evaluate import MathEvalConfig

    with pytest.raises(ValueError, match="max_examples >= 0"):
        MathEvalConfig(model=str(tmp_path / "m"), max_examples=-1)


def test_eval_of_a_runs_large_model_keeps_the_policys_entries(tmp_path, monkeypatch):
    """<run>/final_large (CoDistill's L) is written under eval_large_<benchmark>; the run's pass_at_k, the
    trained policy's numbers, is left as it was."""
    import apps.math_reasoning.evaluate as evaluate
    from core.runs import RunDir

    path = tmp_path / "run"
    run = RunDir.create(
        path, {"max_new_tokens": 8}, app="math", algorithm="codistill", exist_ok_for_resume=False
    )
    before = {"eval": {"samples": 2}, "pass_at_k": {"offline": {"1": 0.1, "2": 0.2}}}
    run.write_eval(before)
    (path / "final_large").mkdir()
    results = {"all": {"examples": 1, "pass@1": 0.5, "pass@2": 1.0, "maj@2": 1.0, "format_rate": 1.0}}
    monkeypatch.setattr(evaluate, "load_policy", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(evaluate, "load_eval_examples", lambda *args: [])
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *args, **kwargs: results | {"samples": 2})
    evaluate.run_eval(evaluate.MathEvalConfig(model=str(path / "final_large"), samples=2))
    saved = run.read_eval()
    assert sorted(saved) == ["eval", "eval_large_offline", "pass_at_k"]
    assert saved["pass_at_k"] == before["pass_at_k"] and saved["eval_large_offline"]["all"] == results["all"]


def test_pass_at_k_refuses_k_outside_one_to_n():
    """k above the n samples (or 0) has no unbiased estimate: refused, not read as 1.0 or 0.0."""
    for n, c, k in ((4, 1, 5), (4, 0, 5), (4, 1, 0)):
        with pytest.raises(ValueError, match="1 <= k <= n"):
            pass_at_k(n, c, k)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0  # k = n is allowed


def test_majority_vote_counts_every_identical_text_in_its_class():
    """ "7" twice; "1000" once and "1,000" twice are one class of 3 votes: it wins (3 against 2), which it
    would not if a text's repeats counted once in the class it joined (2 against 2: "7" came first)."""
    assert majority_correct(["7", "7", "1000", "1,000", "1,000"], "1000")
    assert not majority_correct(["7", "7", "7", "1000", "1,000"], "1000")


def test_majority_vote_strips_answers_before_counting_identical_texts(monkeypatch):
    """ "4" and " 4 " are one text once stripped: one comparison, with the gold, and no other."""
    import apps.math_reasoning.evaluate as evaluate

    calls = []
    monkeypatch.setattr(evaluate, "same_answer", lambda a, b: calls.append((a, b)) or a == b)
    assert majority_correct(["4", " 4 ", "9"], "4")
    assert calls == [("9", "4"), ("4", "4")]


def test_spread_subset_rounds_to_the_nearest_index():
    """10 problems, 4 taken: indices round(0, 2.5, 5, 7.5) = 0, 2, 5, 8 (banker's rounding), not floors."""
    from apps.math_reasoning.evaluate import spread_subset

    items = [{"i": i} for i in range(10)]
    assert [e["i"] for e in spread_subset(items, 3)] == [0, 3, 7]
    assert [e["i"] for e in spread_subset(items, 4)] == [0, 2, 5, 8]
    assert spread_subset(items, 0) == items and spread_subset(items, 10) == items


def test_maj_at_k_votes_with_every_sample(monkeypatch):
    """2 samples, "2" and "3", gold 2: a tie, in either order maj@2 is 1/2 (pass@1 1/2); "2" twice: 1."""
    example = {"question": "1 + 1?", "answer": "2"}
    results = _evaluate(
        monkeypatch, [example], ["x</think><answer>2</answer>", "x</think><answer>3</answer>"]
    )
    assert results["all"]["maj@2"] == 0.5 and results["all"]["pass@1"] == 0.5
    results = _evaluate(
        monkeypatch, [example], ["x</think><answer>3</answer>", "x</think><answer>2</answer>"]
    )
    assert results["all"]["maj@2"] == 0.5
    results = _evaluate(
        monkeypatch, [example], ["x</think><answer>2</answer>", "x</think><answer> 2 </answer>"]
    )
    assert results["all"]["maj@2"] == 1.0


def test_format_results_prints_the_hard_tail_once():
    """ "hard" is a second name of level 3's row: the table has it once, under level3."""
    from apps.math_reasoning.evaluate import format_results

    row = {"examples": 2, "pass@1": 0.5, "pass@2": 1.0, "maj@2": 0.5, "format_rate": 0.75}
    text = format_results({"samples": 2, "all": row, "level3": row, "hard": row, "seconds": 1.0})
    lines = text.splitlines()
    assert [line.split()[0] for line in lines] == ["subset", "all", "level3"]
    assert lines[1].split() == ["all", "2", "0.500", "1.000", "0.500", "0.750"]


def test_thousands_of_boxes_are_read_in_linear_time():
    """Each box never closed scanned to the end of the text: 8,000 `\\boxed{` (a degenerate completion)
    took a minute to score. An alarm turns such a hang into a failure."""
    import signal

    from apps.math_reasoning.data import last_boxed
    from apps.math_reasoning.rewards import closed_box

    def hang(signum, frame):
        raise TimeoutError("a box is read by a scan to the end of the text")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        opened = "\\boxed{\n" * 40_000
        assert (last_boxed(opened), closed_box(opened, {})) == (None, 0.0)
        assert last_boxed("\\boxed{7}" + opened) == "7" and closed_box(opened + "\\boxed{7}", {}) == 1.0
        assert last_boxed("\\boxed" * 40_000 + " 5") is not None and last_boxed("\\fbox" * 40_000) is not None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
