"""core/rewards.py against hand-computed tables: weighted totals, metrics, failure reporting, batched
reward functions, bootstrapped scales and their state across a resume, and the table's row operations."""

import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from core.rewards import RewardError, RewardTable, Rubric


def length(completion: str, example: dict) -> float:
    return float(len(completion))


def contains_answer(completion: str, example: dict) -> float:
    return 1.0 if example["answer"] in completion else 0.0


def field(key: str):
    """A reward that reads its value from the example: fixtures choose the components directly."""
    return lambda completion, example: example[key]


class FakeRewardModel:
    """A batched reward: scores the whole batch in one call (`scores(completions)`) and counts its calls."""

    batched = True

    def __init__(self, scores):
        self.scores = scores
        self.calls = 0

    def __call__(self, completions: list[str], examples: list[dict]):
        self.calls += 1
        return self.scores(completions)


def lengths(completions: list[str]) -> list[float]:
    return [float(len(c)) for c in completions]


COMPLETIONS = ["ab", "abcd"]
EXAMPLES = [{"id": "q1", "answer": "b"}, {"id": "q2", "answer": "z"}]
# length: [2, 4]; contains_answer: [1, 0]


def test_total_is_the_weighted_sum_of_raw_components():
    rubric = Rubric({"length": length, "answer": contains_answer}, weights={"length": 0.5, "answer": 2.0})
    table = rubric.score(COMPLETIONS, EXAMPLES)
    assert table.names == ["length", "answer"]
    assert table.components.dtype == torch.float32
    torch.testing.assert_close(table.components, torch.tensor([[2.0, 1.0], [4.0, 0.0]]))
    # 0.5 * 2 + 2 * 1 = 3;  0.5 * 4 + 2 * 0 = 2
    torch.testing.assert_close(table.total, torch.tensor([3.0, 2.0]))
    assert table.failures == {"length": 0, "answer": 0}
    assert table.errors == []


def test_weights_default_to_one():
    rubric = Rubric({"length": length, "answer": contains_answer}, weights={"answer": 3.0})
    assert rubric.weights == {"length": 1.0, "answer": 3.0}
    torch.testing.assert_close(rubric.score(COMPLETIONS, EXAMPLES).total, torch.tensor([5.0, 4.0]))


def test_metrics_per_component_and_total():
    rubric = Rubric({"length": length, "answer": contains_answer}, weights={"length": 0.5, "answer": 2.0})
    metrics = rubric.score(COMPLETIONS, EXAMPLES).metrics()
    # population std: length [2, 4] -> 1; answer [1, 0] -> 0.5; total [3, 2] -> 0.5
    assert metrics == pytest.approx(
        {
            "reward/length/mean": 3.0,
            "reward/length/std": 1.0,
            "reward/length/failures": 0.0,
            "reward/answer/mean": 0.5,
            "reward/answer/std": 0.5,
            "reward/answer/failures": 0.0,
            "reward/total/mean": 2.5,
            "reward/total/std": 0.5,
        }
    )


def test_metrics_of_a_single_completion_are_finite():
    metrics = Rubric({"length": length}).score(["abc"], [{}]).metrics()
    assert metrics["reward/length/std"] == 0.0 and metrics["reward/total/mean"] == 3.0


# ---------------------------------------------------------------- configuration errors


def test_unknown_weight_name_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['lenght'\]; valid: length, answer"):
        Rubric({"length": length, "answer": contains_answer}, weights={"lenght": 1.0})


def test_unknown_on_error_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown on_error 'skip'; valid: raise, zero"):
        Rubric({"length": length}, on_error="skip")


@pytest.mark.parametrize("weights", [{"length": math.nan}, {"length": math.inf}, {"length": "1"}])
def test_non_finite_weight_is_rejected(weights):
    with pytest.raises(ValueError, match="weight of reward 'length'"):
        Rubric({"length": length}, weights=weights)


@pytest.mark.parametrize("funcs", [{}, {"total": length}, {"": length}, {"x": "not callable"}])
def test_bad_reward_functions_are_rejected(funcs):
    with pytest.raises(ValueError):
        Rubric(funcs)


def test_batch_size_mismatches_are_rejected():
    rubric = Rubric({"length": length})
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        rubric.score(COMPLETIONS, EXAMPLES[:1])
    with pytest.raises(ValueError, match="2 completions but 3 ids"):
        rubric.score(COMPLETIONS, EXAMPLES, ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="no completions"):
        rubric.score([], [])


# ---------------------------------------------------------------- failures: raise vs zero

BAD_VALUES = [math.nan, math.inf, -math.inf, None, "1.0", [1.0], 1e39, 10**400]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=repr)
def test_bad_value_raises_with_function_and_example(bad):
    rubric = Rubric({"length": length, "flaky": field("value")})
    examples = [{"id": "q1", "value": 0.25}, {"id": "q2", "value": bad}]
    with pytest.raises(RewardError, match="reward 'flaky' .* example 'q2'") as info:
        rubric.score(COMPLETIONS, examples)
    shown = "an int too large for a float" if bad == 10**400 else repr(bad)  # the repr of 10**400 fails
    assert shown in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", BAD_VALUES, ids=repr)
def test_bad_value_scores_zero_and_is_counted(bad):
    rubric = Rubric({"length": length, "flaky": field("value")}, weights={"flaky": 10.0}, on_error="zero")
    table = rubric.score(COMPLETIONS, [{"id": "q1", "value": 0.25}, {"id": "q2", "value": bad}])
    torch.testing.assert_close(table.components, torch.tensor([[2.0, 0.25], [4.0, 0.0]]))
    torch.testing.assert_close(table.total, torch.tensor([4.5, 4.0]))  # 2 + 10 * 0.25; 4 + 0
    assert table.failures == {"length": 0, "flaky": 1}
    assert len(table.errors) == 1 and "'flaky'" in table.errors[0] and "'q2'" in table.errors[0]
    assert table.metrics()["reward/flaky/failures"] == 1.0


def test_any_finite_real_number_is_accepted():
    rubric = Rubric({"v": field("v")})
    table = rubric.score(["", "", ""], [{"v": 3}, {"v": True}, {"v": Fraction(1, 4)}])
    torch.testing.assert_close(table.components[:, 0], torch.tensor([3.0, 1.0, 0.25]))


def test_exception_is_reported_with_its_cause():
    def broken(completion, example):
        return {"a": 1.0}[example["key"]]

    examples = [{"key": "a"}, {"key": "missing"}]  # no "id": the index names the example
    with pytest.raises(RewardError, match="reward 'broken' failed on example 1: KeyError: 'missing'") as info:
        Rubric({"broken": broken}).score(COMPLETIONS, examples)
    assert isinstance(info.value.__cause__, KeyError)

    table = Rubric({"broken": broken}, on_error="zero").score(COMPLETIONS, examples, ids=["first", "second"])
    torch.testing.assert_close(table.components[:, 0], torch.tensor([1.0, 0.0]))
    assert table.failures == {"broken": 1}
    assert table.errors == ["reward 'broken' failed on example 'second': KeyError: 'missing'"]


# ---------------------------------------------------------------- batched reward functions


def test_batched_function_is_called_once_for_the_batch():
    model = FakeRewardModel(lengths)
    rubric = Rubric({"rm": model, "answer": contains_answer}, weights={"rm": 0.25})
    table = rubric.score(COMPLETIONS, EXAMPLES)
    assert model.calls == 1
    torch.testing.assert_close(table.components, torch.tensor([[2.0, 1.0], [4.0, 0.0]]))
    torch.testing.assert_close(table.total, torch.tensor([1.5, 1.0]))


def test_batched_function_may_return_a_tensor():
    model = FakeRewardModel(lambda completions: torch.tensor([0.5, -1.5]))
    table = Rubric({"rm": model}).score(COMPLETIONS, EXAMPLES)
    torch.testing.assert_close(table.components[:, 0], torch.tensor([0.5, -1.5]))


@pytest.mark.parametrize(
    "result",
    [
        [1.0],
        [1.0, 2.0, 3.0],
        None,
        "ab",
        2.0,
        {"a": 1.0},
        torch.ones(2, 1),
        np.ones((1, 2)),
        torch.tensor(1.0),
    ],
    ids=repr,
)
@pytest.mark.parametrize("on_error", ["raise", "zero"])
def test_batched_wrong_shape_raises_whatever_on_error(result, on_error):
    """(N, 1) scores, as a reward model's head gives, became N failed calls (scored 0 under "zero")."""
    model = FakeRewardModel(lambda completions: result)
    with pytest.raises(RewardError, match="batched reward 'rm' returned .* for 2 completions"):
        Rubric({"rm": model}, on_error=on_error).score(COMPLETIONS, EXAMPLES)


@pytest.mark.parametrize("on_error", ["raise", "zero"])
def test_an_async_reward_is_refused_whatever_on_error(on_error, recwarn):
    async def judge(completion, example):
        return 1.0

    class AsyncModel:
        batched = True

        async def __call__(self, completions, examples):
            return [1.0] * len(completions)

    for fn in (judge, AsyncModel()):
        with pytest.raises(
            ValueError, match="reward function 'r' is async; rewards are called synchronously"
        ):
            Rubric({"r": fn}, on_error=on_error)
    # one hidden behind a plain wrapper returns a coroutine: a broken contract, not N failed calls
    wrapped = lambda completion, example: judge(completion, example)  # noqa: E731
    with pytest.raises(RewardError, match="reward 'r' returned an awaitable"):
        Rubric({"r": wrapped}, on_error=on_error).score(COMPLETIONS, EXAMPLES)
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_batched_bad_entry_and_failed_call():
    model = FakeRewardModel(lambda completions: [1.0, math.nan])
    table = Rubric({"rm": model}, on_error="zero").score(COMPLETIONS, EXAMPLES)
    torch.testing.assert_close(table.components[:, 0], torch.tensor([1.0, 0.0]))
    assert table.failures == {"rm": 1} and "'q2'" in table.errors[0] and "nan" in table.errors[0]

    def server_down(completions):
        raise ConnectionError("reward server down")

    down = FakeRewardModel(server_down)
    with pytest.raises(RewardError, match=r"reward 'rm' failed on examples \['q1', 'q2'\]: ConnectionError"):
        Rubric({"rm": down}).score(COMPLETIONS, EXAMPLES)
    table = Rubric({"rm": down, "length": length}, on_error="zero").score(COMPLETIONS, EXAMPLES)
    torch.testing.assert_close(table.components, torch.tensor([[0.0, 2.0], [0.0, 4.0]]))
    assert table.failures == {"rm": 2, "length": 0} and len(table.errors) == 2


# ---------------------------------------------------------------- bootstrapped scales


def scaled_rubric(weights=None) -> Rubric:
    return Rubric({"cell": field("cell"), "order": field("order")}, weights=weights)


FIRST_BATCH = [{"cell": 1.0, "order": 0.5}, {"cell": 3.0, "order": 0.5}]


def test_scales_are_one_before_fitting():
    rubric = scaled_rubric()
    assert rubric.scales == {"cell": 1.0, "order": 1.0} and not rubric.fitted


def test_fit_scales_from_a_first_batch_then_totals_use_them():
    rubric = scaled_rubric(weights={"cell": 1.0, "order": 3.0})
    first = rubric.score(["", ""], FIRST_BATCH)
    torch.testing.assert_close(first.total, torch.tensor([2.5, 4.5]))  # unscaled: 1 + 1.5, 3 + 1.5
    # mean |cell| = 2 -> 0.5; mean |order| = 0.5 -> 2
    assert rubric.fit_scales(first) == {"cell": 0.5, "order": 2.0}
    assert rubric.scales == {"cell": 0.5, "order": 2.0} and rubric.fitted
    table = rubric.score(["", ""], FIRST_BATCH)
    torch.testing.assert_close(table.components, torch.tensor([[1.0, 0.5], [3.0, 0.5]]))  # raw, unscaled
    # 1 * 0.5 * 1 + 3 * 2 * 0.5 = 3.5;  1 * 0.5 * 3 + 3 * 2 * 0.5 = 4.5
    torch.testing.assert_close(table.total, torch.tensor([3.5, 4.5]))
    torch.testing.assert_close(rubric.effective_weights(), torch.tensor([0.5, 6.0]))
    torch.testing.assert_close(first.total, torch.tensor([2.5, 4.5]))  # an earlier table keeps its weights


def test_fit_scales_uses_magnitudes_and_accepts_a_tensor():
    rubric = scaled_rubric()
    # a signed mean would be 0 for "cell"; the mean magnitude is 2 -> 0.5; |order| mean 4 -> 0.25
    assert rubric.fit_scales(torch.tensor([[-2.0, 1.0], [2.0, 7.0]])) == {"cell": 0.5, "order": 0.25}


def test_fit_scales_leaves_out_the_calls_that_failed():
    """With on_error="zero" a failed call's 0 is a placeholder, not a reward: the mean |cell| is over the
    rows that were scored (3 and 1 -> 2 -> 0.5), not 4 / 3."""
    rubric = Rubric({"cell": field("cell"), "order": field("order")}, on_error="zero")
    table = rubric.score(
        ["", "", ""], [{"cell": 3.0, "order": 1.0}, {"cell": None, "order": 1.0}, {"cell": 1.0, "order": 1.0}]
    )
    assert table.failed[:, 0].tolist() == [False, True, False]
    assert rubric.fit_scales(table) == {"cell": 0.5, "order": 1.0}


def test_rewards_returned_as_tensor_or_numpy_scalars_are_numbers():
    values = [torch.tensor(0.25), np.float32(0.5), np.bool_(True), torch.tensor(2), np.array(0.75)]
    rubric = Rubric({"r": lambda completion, example: example["v"]})
    table = rubric.score([""] * len(values), [{"v": v} for v in values])
    assert table.components[:, 0].tolist() == [0.25, 0.5, 1.0, 2.0, 0.75] and not table.failed.any()


def test_fit_scales_refuses_a_zero_component():
    rubric = scaled_rubric()
    with pytest.raises(
        ValueError, match=r"mean \|reward\| is 0 \(or every call failed\) on this batch for \['order'\]"
    ):
        rubric.fit_scales(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    assert rubric.scales == {"cell": 1.0, "order": 1.0} and not rubric.fitted


@pytest.mark.parametrize(
    "components", [torch.zeros(0, 2), torch.ones(2, 3), torch.ones(2), torch.tensor([[1.0, math.nan]])]
)
def test_fit_scales_refuses_bad_shapes_and_values(components):
    with pytest.raises(ValueError):
        scaled_rubric().fit_scales(components)


def test_fit_scales_is_frozen_once_fitted():
    rubric = scaled_rubric()
    rubric.fit_scales(torch.tensor([[1.0, 0.5], [3.0, 0.5]]))
    with pytest.raises(ValueError, match="already fitted"):
        rubric.fit_scales(torch.tensor([[5.0, 5.0]]))
    assert rubric.scales == {"cell": 0.5, "order": 2.0}


def test_state_dict_of_an_unfitted_rubric():
    rubric = scaled_rubric()
    assert rubric.state_dict() == {"scales": {"cell": 1.0, "order": 1.0}, "fitted": False}
    resumed = scaled_rubric()
    resumed.load_state_dict(json.loads(json.dumps(rubric.state_dict())))
    assert resumed.fit_scales(torch.tensor([[1.0, 0.5], [3.0, 0.5]])) == {"cell": 0.5, "order": 2.0}


def test_state_dict_round_trip_through_json():
    rubric = scaled_rubric(weights={"order": 3.0})
    rubric.fit_scales(rubric.score(["", ""], FIRST_BATCH))
    saved = json.loads(json.dumps(rubric.state_dict()))
    assert saved == {"scales": {"cell": 0.5, "order": 2.0}, "fitted": True}

    resumed = scaled_rubric(weights={"order": 3.0})
    resumed.load_state_dict(saved)
    assert resumed.scales == {"cell": 0.5, "order": 2.0} and resumed.fitted
    torch.testing.assert_close(resumed.score(["", ""], FIRST_BATCH).total, torch.tensor([3.5, 4.5]))
    with pytest.raises(ValueError, match="already fitted"):
        resumed.fit_scales(torch.ones(1, 2))


@pytest.mark.parametrize(
    "state",
    [
        {"scales": {"cell": 0.5}, "fitted": True},
        {"scales": {"cell": 0.5, "order": 2.0, "extra": 1.0}, "fitted": True},
        {"scales": {"cell": 0.0, "order": 2.0}, "fitted": True},
        {"scales": {"cell": math.inf, "order": 2.0}, "fitted": True},
        {"scales": {"cell": 0.5, "order": 2.0}, "fitted": "yes"},
        {"scales": {"cell": 0.5, "order": 2.0}},
    ],
)
def test_load_state_dict_rejects_a_mismatched_state(state):
    rubric = scaled_rubric()
    with pytest.raises(ValueError):
        rubric.load_state_dict(state)
    assert rubric.scales == {"cell": 1.0, "order": 1.0}


# ---------------------------------------------------------------- the table's row operations


def failing_table() -> RewardTable:
    """3 rows; "v" fails on rows 1 and 2, "w" on row 0."""
    examples = [
        {"id": "q0", "v": 1.0, "w": None},
        {"id": "q1", "v": None, "w": 0.5},
        {"id": "q2", "v": math.nan, "w": 0.5},
    ]
    funcs = {"length": length, "v": field("v"), "w": field("w")}
    rubric = Rubric(funcs, weights={"length": 2.0}, on_error="zero")
    return rubric.score(["a", "bb", "ccc"], examples)


def named(errors: list[str]) -> list[list[str]]:
    """[reward name, example id] of each error message."""
    return [re.findall(r"'(\w+)'", message)[:2] for message in errors]


def test_errors_are_in_row_order():
    assert named(failing_table().errors) == [["w", "q0"], ["v", "q1"], ["v", "q2"]]


def test_select_keeps_failures_with_their_rows():
    picked = failing_table().select([2, 0])
    torch.testing.assert_close(picked.components, torch.tensor([[3.0, 0.0, 0.5], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(picked.total, torch.tensor([6.5, 3.0]))  # 2 * 3 + 0 + 0.5; 2 * 1 + 1 + 0
    assert picked.failures == {"length": 0, "v": 1, "w": 1}
    assert named(picked.errors) == [["v", "q2"], ["w", "q0"]]


def test_concat_and_with_components():
    table = failing_table()
    both = RewardTable.concat([table.select([0, 1]), table.select([2])])
    torch.testing.assert_close(both.components, table.components)
    assert both.failures == {"length": 0, "v": 2, "w": 1} and both.errors == table.errors

    extended = table.with_components({"kd": torch.tensor([0.5, -0.5, 1.0])})
    assert extended.names == ["length", "v", "w", "kd"]
    torch.testing.assert_close(extended.effective_weights(), torch.tensor([2.0, 1.0, 1.0, 1.0]))
    # rows: 2 + 1 + 0 + 0.5;  4 + 0 + 0.5 - 0.5;  6 + 0 + 0.5 + 1
    torch.testing.assert_close(extended.total, torch.tensor([3.5, 4.0, 7.5]))
    assert extended.failures == {"length": 0, "v": 2, "w": 1, "kd": 0}
    assert table.with_components({}) is table  # a hook with no model-based terms
    with pytest.raises(ValueError, match="different components or weights"):
        RewardTable.concat([table, extended])
    with pytest.raises(ValueError, match="clashes"):
        table.with_components({"v": torch.zeros(3)})
    with pytest.raises(ValueError, match="3 finite values"):
        table.with_components({"kd": torch.tensor([0.0, math.nan, 0.0])})


def test_concat_refuses_tables_scored_with_different_weights():
    """A table scored before `fit_scales` and one scored after have the same columns but not the same
    weights: concatenated, the later rows' totals would silently use the earlier weights."""
    rubric = scaled_rubric()
    before = rubric.score(["", ""], FIRST_BATCH)
    rubric.fit_scales(before)
    after = rubric.score(["", ""], FIRST_BATCH)
    assert before.names == after.names
    with pytest.raises(
        ValueError, match=r"different components or weights: .*\[1.0, 1.0\] vs .*\[0.5, 2.0\]"
    ):
        RewardTable.concat([before, after])


def test_with_components_keeps_the_errors_and_refuses_the_name_total():
    table = failing_table()
    extended = table.with_components({"kd": torch.zeros(3)})
    assert extended.errors == table.errors and named(extended.errors) == [
        ["w", "q0"],
        ["v", "q1"],
        ["v", "q2"],
    ]
    with pytest.raises(ValueError, match="'total' clashes"):
        table.with_components({"total": torch.zeros(3)})


def test_concat_refuses_tables_of_other_components_with_the_same_weights():
    first = Rubric({"length": length}).score(COMPLETIONS, EXAMPLES)
    other = Rubric({"contains_answer": contains_answer}).score(COMPLETIONS, EXAMPLES)
    assert torch.equal(first.weights, other.weights)
    with pytest.raises(ValueError, match=r"different components or weights: \['length'\]"):
        RewardTable.concat([first, other])


def test_fit_scales_names_what_is_wrong_with_the_batch():
    with pytest.raises(ValueError, match=r"components must have shape \(N >= 1, 2\), got \(0, 2\)"):
        scaled_rubric().fit_scales(torch.zeros(0, 2))
    other = Rubric({"order": field("order"), "cell": field("cell")}).score(["", ""], FIRST_BATCH)
    rubric = scaled_rubric()
    with pytest.raises(
        ValueError, match=r"table columns \['order', 'cell'\] != the rubric's \['cell', 'order'\]"
    ):
        rubric.fit_scales(other)
    assert not rubric.fitted


def test_the_largest_float32_is_a_reward():
    biggest = float(torch.finfo(torch.float32).max)
    table = Rubric({"r": lambda completion, example: biggest}).score(COMPLETIONS, EXAMPLES)
    assert table.components[:, 0].tolist() == [biggest, biggest] and not table.failed.any()


@pytest.mark.parametrize(
    ("value", "shown"),
    [("x" * 198, repr("x" * 198)), ("x" * 199, repr("x" * 199)[:197] + "...")],
    ids=["200-character repr whole", "201-character repr cut to 200"],
)
def test_a_bad_value_is_shown_in_at_most_200_characters(value, shown):
    rubric = Rubric({"r": lambda completion, example: value})
    with pytest.raises(RewardError) as caught:
        rubric.score(COMPLETIONS, EXAMPLES)
    assert str(caught.value) == f"reward 'r' returned {shown} on example 'q1': not a finite real"
    assert len(shown) == 200


def test_fit_scales_refuses_a_component_whose_every_call_failed():
    rubric = Rubric({"cell": field("cell"), "order": field("order")}, on_error="zero")
    table = rubric.score(["", ""], [{"cell": None, "order": 1.0}, {"cell": "x", "order": 2.0}])
    with pytest.raises(
        ValueError, match=r"mean \|reward\| is 0 \(or every call failed\) on this batch for \['cell'\]"
    ):
        rubric.fit_scales(table)
    assert rubric.scales == {"cell": 1.0, "order": 1.0} and not rubric.fitted
