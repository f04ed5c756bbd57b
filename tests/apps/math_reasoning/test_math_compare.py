"""apps/math_reasoning/compare.py by hand: the per-run summary, the table's rows and cells, the arms' train
configs, and the reuse of earlier runs (with a fake train function: no training)."""

from dataclasses import replace

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
    assert table.splitlines()[2] == "| grpo | 0.500 ± 0.100 | - | - | - | - | - | - |"
    assert "over 2 seed(s)" in table


def test_grpo_large_is_grpo_on_the_large_model(small_dir, large_dir, tmp_path, monkeypatch):
    """The grpo_large arm trains with algo grpo, from the --large-model."""
    assert arm_values({}, "grpo_large") == {"algo": "grpo"}
    trained = []

    def fake_train(run_config):
        trained.append(run_config)
        return {"history": [{"step_time": 1.0}], "eval": {}, "run_dir": run_config.run_dir}

    monkeypatch.setattr(compare_module, "_train_or_resume", fake_train)
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
