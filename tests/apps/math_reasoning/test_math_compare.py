"""apps/math_reasoning/compare.py by hand: the per-run summary, the table's rows and cells, the arms' train
configs, and the reuse of earlier runs (with a fake train function: no training)."""

from dataclasses import replace
from pathlib import Path

import pytest

from apps.math_reasoning import compare as compare_module
from apps.math_reasoning.compare import (
    MathCompareConfig,
    _check_earlier_run,
    _finished,
    _stats,
    arm_values,
    format_table,
    run_summary,
    table_rows,
)
from apps.math_reasoning.train import MathTrainConfig
from core.config import config_to_dict
from core.runs import RunDir


def _eval(pass1: float, fmt: float) -> dict:
    """An evaluation's results as `evaluate_model` gives them (2 samples, no level rows)."""
    return {"samples": 2, "all": {"pass@1": pass1, "pass@2": 1.0, "maj@2": 0.5, "format_rate": fmt}}


def test_run_summary_takes_the_entropy_of_the_last_quarter():
    """8 steps of entropy 1..8: entropy_end is the mean of the last 2 steps, 7.5 (not the first 2's)."""
    history = [{"entropy": float(e), "step_time": 1.0} for e in range(1, 9)]
    summary = run_summary({"history": history, "eval": {"eval": _eval(0.25, 0.5)}, "run_dir": "r"})
    assert summary["entropy_end"] == 7.5 and summary["step_time"] == 1.0
    assert (summary["pass@1"], summary["maj@k"], summary["format"]) == (0.25, 0.5, 0.5)
    assert summary["hard_pass@1"] is None and "large_pass@1" not in summary


def test_codistill_rows_split_the_step_time_and_keep_ls_columns():
    """One CoDistill seed, step 5 s of which L took 2 s: S's row has 3 s, L's 2 s; L's row has L's
    evaluation, its format rate included."""
    history = [{"step_time": 5.0, "codistill/large_time": 2.0}]
    evals = {"eval": _eval(0.25, 0.5), "eval_large": _eval(0.75, 0.9)}
    rows = table_rows({"codistill": [run_summary({"history": history, "eval": evals, "run_dir": "r"})]})
    small, large = rows
    assert small["arm"] == "codistill:S" and large["arm"] == "codistill:L"
    assert small["step_time"] == (3.0, 0.0, 1) and large["step_time"] == (2.0, 0.0, 1)
    assert small["format"] == (0.5, 0.0, 1) and small["pass@1"] == (0.25, 0.0, 1)
    assert large["format"] == (0.9, 0.0, 1) and large["pass@1"] == (0.75, 0.0, 1)


def test_stats_and_table_cells():
    """Mean and the sample std (n - 1): (1, 2, 3) -> (2, 1, 3); a cell reads "mean ± std"."""
    assert _stats([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert _stats([4.0, None]) == (4.0, 0.0, 1) and _stats([None]) is None
    table = format_table([{"arm": "grpo", "pass@1": (0.5, 0.1, 2)}])
    assert table.splitlines()[2] == "| grpo | 0.500 ± 0.100 | - | - | - | - | - | - | - |"
    assert "over 2 seed(s)" in table


def _recorded_training(monkeypatch) -> list:
    """The run configs compare trains, in order, each run faked: one step of 1 s, no evaluation."""
    trained = []

    def fake_train(run_config):
        trained.append(run_config)
        return {"history": [{"step_time": 1.0}], "eval": {}, "run_dir": run_config.run_dir}

    monkeypatch.setattr(compare_module, "_train_or_resume", fake_train)
    return trained


def test_grpo_large_is_grpo_on_the_large_model(small_dir, large_dir, tmp_path, monkeypatch):
    """The grpo_large arm trains with algo grpo, from the --large-model."""
    assert arm_values({}, "grpo_large") == {"algo": "grpo"}
    trained = _recorded_training(monkeypatch)
    config = MathCompareConfig(
        algos=("grpo", "grpo_large"), seeds=(0,), out_dir=str(tmp_path / "c"), model=str(small_dir),
        large_model=str(large_dir),
    )  # fmt: skip
    compare_module.compare(config)
    assert [(c.algo, c.model) for c in trained] == [("grpo", str(small_dir)), ("grpo", str(large_dir))]
    assert [c.size for c in trained] == ["small", "large"]  # the Math page averages the large model's apart


def test_an_earlier_run_that_was_resumed_is_one_of_these_settings(tmp_path):
    """A run a compare resumed stores resume = True as its latest config; the next compare with the same
    settings (resume False) must reuse it, not refuse it as a run of other settings."""
    run_config = MathTrainConfig(run_dir=str(tmp_path / "run"), max_steps=2)
    for resumed in (False, True):
        RunDir.create(
            run_config.run_dir, config_to_dict(replace(run_config, resume=resumed)), app="math",
            algorithm="grpo", exist_ok_for_resume=resumed,
        )  # fmt: skip
    _check_earlier_run(run_config)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(max_steps\)"):
        _check_earlier_run(replace(run_config, max_steps=3))


def test_a_finished_run_without_its_evaluation_is_not_reused(tmp_path):
    """final/ is there but eval.json is not: with eval_samples the run is not finished (its evaluation is
    still to run); without, it is."""
    run_config = MathTrainConfig(run_dir=str(tmp_path / "run"), eval_samples=1)
    config = config_to_dict(run_config)
    RunDir.create(run_config.run_dir, config, app="math", algorithm="grpo", exist_ok_for_resume=False)
    (tmp_path / "run" / "final").mkdir()
    assert _finished(run_config) is None
    reused = _finished(replace(run_config, eval_samples=0))
    assert reused is not None and reused["eval"] == {} and reused["run_dir"] == run_config.run_dir


def test_run_summary_means_keep_zeros_and_a_short_run_ends_on_its_last_step():
    """3 steps: the last quarter rounds to 0 steps, so entropy_end is the last step's (6), not the mean of all;
    zero_spread is over every step and a step at 0.0 counts (0.3, not 0.45 without it or 0.6 of the tail)."""
    history = [
        {"entropy": 1.0, "zero_spread_frac": 0.0, "step_time": 1.0},
        {"entropy": 2.0, "zero_spread_frac": 0.3, "step_time": 2.0},
        {"entropy": 6.0, "zero_spread_frac": 0.6, "step_time": 3.0},
    ]
    summary = run_summary({"history": history, "eval": {}, "run_dir": "r"})
    assert summary["entropy_end"] == 6.0 and summary["step_time"] == 2.0
    assert summary["zero_spread"] == pytest.approx(0.3)
    assert summary["all_fail"] is None and "pass@1" not in summary


def test_hard_pass_at_1_is_the_offline_hard_tail_only():
    """hard_pass@1 reads the "hard" entry; a level3 row of another benchmark (no "hard") gives None."""
    offline = _eval(0.5, 1.0) | {"level3": {"pass@1": 0.1}, "hard": {"pass@1": 0.1}}
    other = _eval(0.5, 1.0) | {"level3": {"pass@1": 0.2}}
    for evals, expected in ((offline, 0.1), (other, None)):
        summary = run_summary({"history": [{"step_time": 1.0}], "eval": {"eval": evals}, "run_dir": "r"})
        assert summary["hard_pass@1"] == expected


def test_table_counts_the_most_seeds_of_any_cell():
    """A column with 2 of 3 seeds (one run without the metric) does not make the table say 2 seeds."""
    table = format_table([{"arm": "grpo", "pass@1": (0.5, 0.1, 3), "entropy_end": (1.0, 0.0, 2)}])
    assert "over 3 seed(s)" in table
    assert table.splitlines()[2] == "| grpo | 0.500 ± 0.100 | - | - | - | 1.000 ± 0.000 (n=2) | - | - | - |"


def test_generated_tokens_count_the_batch_and_scafs_hint_search():
    """Step 1: 100 tokens/s for 2 s = 200 tokens, plus 50 of hints; step 2: 300 tokens; step 3 logged no
    speed. The mean over the steps that did: (250 + 300) / 2."""
    history = [
        {"tokens_per_s": 100.0, "step_time": 2.0, "scaf/hint_tokens": 50.0},
        {"tokens_per_s": 300.0, "step_time": 1.0, "scaf/hint_tokens": 0.0},
        {"step_time": 1.0},
    ]
    summary = run_summary({"history": history, "eval": {"eval": _eval(0.25, 0.5)}, "run_dir": "r"})
    assert summary["gen_tokens"] == 275.0
    plain = run_summary({"history": history[1:2], "eval": {"eval": _eval(0.25, 0.5)}, "run_dir": "r"})
    assert plain["gen_tokens"] == 300.0


def test_codistill_row_without_ls_time_has_no_step_time():
    """A CoDistill summary without L's time (no step logged it): S's step time is unknown, not a crash."""
    summary = {"step_time": 5.0, "large_time": None, "pass@1": 0.5}
    small, large = table_rows({"codistill": [summary]})
    assert small["arm"] == "codistill:S" and small["step_time"] is None and small["pass@1"] == (0.5, 0.0, 1)
    assert large["arm"] == "codistill:L" and large["step_time"] is None


def test_seeds_vary_the_rl_run_only(small_dir, large_dir, tmp_path, monkeypatch):
    """Each arm x seed is a run of its own directory and seed; the data seed is the train default for all,
    and only CoDistill gets the large model as its L."""
    trained = _recorded_training(monkeypatch)
    config = MathCompareConfig(
        algos=("grpo", "codistill", "grpo_large"), seeds=(3, 5), out_dir=str(tmp_path / "c"),
        model=str(small_dir), large_model=str(large_dir),
    )  # fmt: skip
    compare_module.compare(config)
    assert [(c.algo, c.seed) for c in trained] == [
        ("grpo", 3), ("grpo", 5), ("codistill", 3), ("codistill", 5), ("grpo", 3), ("grpo", 5)
    ]  # fmt: skip
    names = ["grpo-seed3", "grpo-seed5", "codistill-seed3", "codistill-seed5", "grpo_large-seed3"]
    assert [Path(c.run_dir).name for c in trained][:5] == names
    assert {c.data_seed for c in trained} == {MathTrainConfig.data_seed}
    assert [c.large_model for c in trained] == [None, None, str(large_dir), str(large_dir), None, None]


def test_an_earlier_run_made_before_a_setting_existed_counts_it_at_its_default(tmp_path):
    """Runs of a compare made before eval_data_format existed were refused as runs of other settings."""
    run_config = MathTrainConfig(run_dir=str(tmp_path / "run"))
    older = {k: v for k, v in config_to_dict(run_config).items() if k != "eval_data_format"}
    RunDir.create(run_config.run_dir, older, app="math", algorithm="grpo", exist_ok_for_resume=False)
    _check_earlier_run(run_config)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(eval_data_format\)"):
        _check_earlier_run(replace(run_config, eval_data_format="math"))


def test_runs_made_by_other_code_are_named_under_the_table(tmp_path, monkeypatch):
    """A reused run (or one resumed) of other code may differ from a run now (maj@k's tie rule changed):
    the table says which; none said when every run is of this code."""
    run = RunDir.create(tmp_path / "r", {}, app="math", algorithm="grpo", exist_ok_for_resume=False)
    assert compare_module._sources(run) == {"other_code": False}
    monkeypatch.setattr(compare_module, "source_digest", lambda: "changed since")
    assert compare_module._sources(run) == {"other_code": True}
    runs = {"grpo": [{"run_dir": "a", "other_code": False}, {"run_dir": "b", "other_code": True}]}
    assert compare_module._code_note(runs).startswith("\nnote: 1 run(s) made in part by other code than this")
    assert compare_module._code_note(runs).endswith(": b; a new --out-dir compares on this code alone")
    assert compare_module._code_note({"grpo": [{"run_dir": "a", "other_code": False}]}) == ""


def test_a_shared_setting_an_arm_trains_without_is_said():
    """beta 0.04 from a train config reached grpo and scaf, not gtpo, without a word; a default beta (0) or
    the small size (CoDistill's policy anyway) is no difference to tell."""
    from apps.math_reasoning.compare import shared_settings_left_out

    lines = shared_settings_left_out({"beta": 0.04, "size": "large"}, ["grpo", "gtpo", "codistill", "scaf"])
    assert lines == [
        "gtpo trains without beta 0.04 (the other arms have it)",
        "codistill trains without size large (the other arms have it)",
    ]
    assert shared_settings_left_out({"beta": 0.0, "size": "small"}, ["gtpo", "codistill"]) == []
