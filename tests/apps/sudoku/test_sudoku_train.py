"""The pieces of `sudoku train` and `sudoku eval` around the model: the completion cap check, the rubric's
weights, the bootstrapped scales' pairing, which puzzles GRPO and the evaluation read, and the status an
evaluation leaves on a training run. No training runs: the trainer is replaced where one would start."""

import contextlib
import dataclasses
import types

import pytest

from apps.sudoku import train as sudoku_train
from apps.sudoku.data import PuzzleConfig, load_puzzles
from apps.sudoku.evaluate import SudokuEvalConfig, held_out_examples, run_eval
from apps.sudoku.model import create_model_dir
from apps.sudoku.puzzles import generate_puzzles
from apps.sudoku.serialize import to_example
from apps.sudoku.train import (
    SudokuSFTConfig,
    SudokuTrainConfig,
    build_rubric,
    fit_bootstrap_scales,
    refuse_short_completions,
    run_sft,
    run_train,
)
from core.config import config_to_dict
from core.data import InputError
from core.runs import RunDir


def tiny_sft_config(**overrides) -> SudokuSFTConfig:
    """An SFT config of a 32-wide 1-layer model, 2 puzzles a step, 2 evaluated."""
    return SudokuSFTConfig(**dict(sft_batch_size=2, hidden_size=32, num_layers=1, eval_puzzles=2) | overrides)


@pytest.fixture(scope="module")
def puzzles():
    return generate_puzzles(4, 6, seed=0, givens=(4, 6))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_model_dir(
        tmp_path_factory.mktemp("m") / "model", hidden_size=32, num_layers=1, num_heads=4, seed=0
    )


def test_the_completion_cap_must_hold_3e_plus_1_tokens():
    """A 4x4 puzzle with 4 givens has E = 12 empty cells: decoding emits 3E + 1 = 37 tokens, so a cap of 36
    is refused and 37 is enough."""
    four = generate_puzzles(4, 1, seed=0, givens=(4, 4))
    assert four[0].givens == 4
    with pytest.raises(InputError, match=r"--max-new-tokens 36 is below 3E \+ 1 = 37 tokens .*\(E = 12\)"):
        refuse_short_completions(four, 36)
    refuse_short_completions(four, 37)


def test_the_rubric_weighs_cell_by_the_cell_weight_and_order_by_the_rest():
    """R = w * cell + (1 - w) * order: cell_weight goes to the cell reward, not to the order reward."""
    assert build_rubric(SudokuTrainConfig(cell_weight=0.75)).weights == {"cell": 0.75, "order": 0.25}
    assert build_rubric(SudokuTrainConfig(cell_weight=1.0)).weights == {"cell": 1.0, "order": 0.0}
    assert build_rubric(SudokuTrainConfig(cell_weight=0.0)).weights == {"cell": 0.0, "order": 1.0}


def test_bootstrap_scales_score_each_rollout_against_its_own_prompts_example(puzzles):
    """Prompts are repeated group_size times each (row-major); the examples scored must be repeated the same
    way, so each completion is scored against the puzzle it answers."""
    examples = [to_example(p, i, "train") for i, p in enumerate(puzzles[:3])]
    config = SudokuTrainConfig(bootstrap_prompts=2, group_size=2)
    seen = {}

    class Backend:
        def generate(self, prompts, settings, seed):
            seen["prompts"] = list(prompts)
            return types.SimpleNamespace(completions=[f"answer to {p}" for p in prompts])

    class Rubric:
        def score(self, completions, repeated):
            seen["pairs"] = list(zip(completions, repeated, strict=True))
            return "table"

        def fit_scales(self, table):
            return {"from": table}

    trainer = types.SimpleNamespace(backend=Backend())
    assert fit_bootstrap_scales(trainer, Rubric(), examples, config) == {"from": "table"}
    ex0, ex1 = examples[:2]
    assert seen["prompts"] == [ex0["prompt"], ex0["prompt"], ex1["prompt"], ex1["prompt"]]
    assert [ex for _, ex in seen["pairs"]] == [ex0, ex0, ex1, ex1]
    assert all(completion == f"answer to {ex['prompt']}" for completion, ex in seen["pairs"])


def test_grpo_trains_on_the_train_puzzles_only(puzzles, model_dir, tmp_path, monkeypatch):
    """The trainer's examples are the train side of the split: no held-out solution is trained on."""
    train, held_out = puzzles[:4], puzzles[4:]
    captured = {}

    class Stop(Exception):
        pass

    def trainer(config, model, tokenizer, examples, *args, **kwargs):
        captured["examples"] = examples
        raise Stop

    monkeypatch.setattr(sudoku_train, "GRPOTrainer", trainer)
    config = SudokuTrainConfig(model=str(model_dir), run_dir=str(tmp_path / "run"), eval_puzzles=0)
    with pytest.raises(Stop):
        run_train(config, (train, held_out))
    trained = {ex["solution"] for ex in captured["examples"]}
    assert [ex["puzzle"] for ex in captured["examples"]] == [p.to_line() for p in train]
    assert not trained & {to_example(p, 0, "eval")["solution"] for p in held_out}


def test_a_run_whose_scales_fit_fails_is_marked_failed(puzzles, model_dir, tmp_path, monkeypatch):
    """The bootstrapped scales are drawn after the trainer made the run: a failure (or Ctrl-C) there had
    left it "running"."""

    def broken_fit(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sudoku_train, "fit_bootstrap_scales", broken_fit)
    config = SudokuTrainConfig(model=str(model_dir), run_dir=str(tmp_path / "run"), eval_puzzles=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_train(config, (puzzles[:4], puzzles[4:]))
    status = RunDir(tmp_path / "run").read_status()
    assert (status["status"], status["error"]) == ("failed", "RuntimeError: out of memory")


def test_sft_and_grpo_runs_evaluate_the_held_out_puzzles(puzzles, model_dir, tmp_path, monkeypatch):
    """The evaluation at the end of an SFT and of a GRPO run reads the held-out side, never train."""
    train, held_out = puzzles[:4], puzzles[4:]
    evaluated, written = [], {}
    metrics = {"cell_accuracy": 0.0, "solved": 0.0, "order_reward_norm": 0.0, "kendall_tau": 0.0}

    def evaluate(model, tokenizer, examples, *args, **kwargs):
        evaluated.append([ex["puzzle"] for ex in examples])
        return dict(metrics, format_valid=1.0)

    class Trainer:
        def __init__(self, *args, **kwargs):
            pass

        def until_finished(self):
            return contextlib.nullcontext()

        def train(self):
            return []

        def save_final(self):
            return str(tmp_path / "grpo" / "final")

        def write_eval(self, data):
            written.update(data)

    monkeypatch.setattr(sudoku_train, "evaluate_model", evaluate)
    monkeypatch.setattr(sudoku_train, "GRPOTrainer", Trainer)
    sft_config = tiny_sft_config(run_dir=str(tmp_path / "sft"), sft_steps=1)
    run_sft(sft_config, (train, held_out))
    config = SudokuTrainConfig(
        model=str(model_dir), run_dir=str(tmp_path / "grpo"), eval_puzzles=2, bootstrap_scaling=False
    )
    run_train(config, (train, held_out))
    rubric = build_rubric(config)
    assert evaluated == [[p.to_line() for p in held_out[:2]]] * 2
    # the GRPO run's eval.json holds its reward scales (not bootstrapped here: the rubric's own)
    assert written == {
        "model": str(tmp_path / "grpo" / "final"),
        "scales": rubric.scales,
        **metrics,
        "format_valid": 1.0,
    }


def test_held_out_examples_are_the_held_out_puzzles_in_order():
    """The evaluation reads the held-out side of the split (its first `limit` puzzles), never train."""
    config = PuzzleConfig(num_puzzles=40)
    train, held_out = load_puzzles(config)
    assert len(held_out) > 3
    examples = held_out_examples(config, 3)
    assert examples == [to_example(p, i, "eval") for i, p in enumerate(held_out[:3])]
    assert not {ex["solution"] for ex in examples} & {to_example(p, 0, "x")["solution"] for p in train}


def test_an_eval_into_a_training_run_leaves_its_status(model_dir, tmp_path):
    """Evaluating into a run that has a status (a training run, here still running at step 5) adds its
    result to eval.json and does not mark the run finished at step 0."""
    config = SudokuEvalConfig(
        model=str(model_dir), run_dir=str(tmp_path / "run"), num_puzzles=40, eval_puzzles=2, batch_size=2
    )
    run = RunDir.create(
        tmp_path / "run", config_to_dict(config), app="sudoku", algorithm="grpo", exist_ok_for_resume=False
    )
    run.set_status("running", step=5)
    result = run_eval(config)
    assert result["puzzles"] == 2 and run.read_eval()["eval"]["puzzles"] == 2
    status = run.read_status()
    assert (status["status"], status["step"]) == ("running", 5)


def test_the_evaluation_table_heads_each_column_with_its_metric():
    from apps.sudoku.evaluate import table

    result = {"cell_accuracy": 0.5, "solved": 0.25, "order_reward_norm": 0.125, "kendall_tau": -1.0}
    lines = table({"m": result | {"format_valid": 1.0}}).splitlines()
    assert lines[0].split() == ["model", "cell", "acc", "solved", "order", "tau", "valid"]
    assert lines[1].split() == ["m", "0.500", "0.250", "0.125", "-1.000", "1.000"]


def test_an_eval_keeps_what_the_run_wrote_to_eval_json_and_warns_of_other_settings(model_dir, tmp_path):
    """The result goes under "eval" next to the run's own keys; puzzle settings other than the run's are
    named in a warning."""
    config = SudokuEvalConfig(
        model=str(model_dir), run_dir=str(tmp_path / "run"), num_puzzles=40, eval_puzzles=2, batch_size=2
    )
    trained = SudokuEvalConfig(model=str(model_dir), num_puzzles=40, data_seed=3)
    run = RunDir.create(
        tmp_path / "run", config_to_dict(trained), app="sudoku", algorithm="grpo", exist_ok_for_resume=False
    )
    run.write_eval({"model": "final", "solved": 0.5})
    with pytest.warns(UserWarning, match=r"other settings than the run's: data_seed=0 \(run: 3\)"):
        run_eval(config)
    saved = run.read_eval()
    assert (saved["model"], saved["solved"], saved["eval"]["puzzles"]) == ("final", 0.5, 2)


def test_evaluation_decodes_greedily(model_dir):
    """evaluate_model's numbers are those of the greedy (argmax) completions, not of samples."""
    from apps.sudoku.evaluate import evaluate_model
    from apps.sudoku.model import ConstrainedBackend
    from apps.sudoku.rewards import puzzle_metrics
    from core.policy import load_policy
    from core.rollout import SamplingSettings

    model, tokenizer = load_policy(model_dir)
    examples = [to_example(p, i, "eval") for i, p in enumerate(generate_puzzles(4, 4, seed=1, givens=(4, 6)))]
    greedy = ConstrainedBackend(model, tokenizer).generate(
        [ex["prompt"] for ex in examples], SamplingSettings(max_new_tokens=64, greedy=True), seed=5
    )
    rows = [puzzle_metrics(c, ex) for c, ex in zip(greedy.completions, examples, strict=True)]
    result = evaluate_model(model, tokenizer, examples, batch_size=3)
    assert result["puzzles"] == 4
    assert result["cell_accuracy"] == pytest.approx(sum(r["cell_accuracy"] for r in rows) / 4)
    assert result["kendall_tau"] == pytest.approx(sum(r["kendall_tau"] for r in rows) / 4)


def test_train_without_a_model_first_sfts_on_random_order(puzzles, tmp_path, monkeypatch):
    """No --model: the base model is SFT'd on random-order completions (as the paper does), without an
    evaluation, into <run>/sft-random."""
    captured = {}

    class Stop(Exception):
        pass

    def fake_sft(config, puzzles, *, resume):
        captured.update(config=config, resume=resume)
        raise Stop

    monkeypatch.setattr(sudoku_train, "run_sft", fake_sft)
    config = SudokuTrainConfig(run_dir=str(tmp_path / "run"), eval_puzzles=0, sft_steps=7)
    with pytest.raises(Stop):
        run_train(config, (puzzles[:4], puzzles[4:]))
    sft_config = captured["config"]
    assert (sft_config.order, sft_config.eval_puzzles, sft_config.sft_steps) == ("random", 0, 7)
    assert sft_config.run_dir == str(tmp_path / "run" / "sft-random") and captured["resume"] is True


def test_a_finished_sft_run_records_its_last_step(puzzles, tmp_path):
    config = tiny_sft_config(run_dir=str(tmp_path / "run"), sft_steps=2, eval_puzzles=0)
    run_sft(config, (puzzles[:4], puzzles[4:]))
    status = RunDir(tmp_path / "run").read_status()
    assert (status["status"], status["step"]) == ("finished", 2)


def test_a_failed_sft_run_records_the_last_step_it_logged(puzzles, tmp_path, monkeypatch):
    """Every failed SFT run (its evaluation after the last step, or a crash mid-way) had recorded step 0."""
    real_sft = sudoku_train.sft

    def crash_after(step_count):
        def sft(*args, log, **kwargs):
            def logged(step, metrics):
                log(step, metrics)
                if step == step_count:
                    raise RuntimeError(f"killed at step {step}")

            return real_sft(*args, log=logged, **kwargs)

        return sft

    config = tiny_sft_config(sft_steps=3)
    monkeypatch.setattr(sudoku_train, "sft", crash_after(2))
    with pytest.raises(RuntimeError, match="killed at step 2"):
        run_sft(dataclasses.replace(config, run_dir=str(tmp_path / "mid")), (puzzles[:4], puzzles[4:]))
    status = RunDir(tmp_path / "mid").read_status()
    assert (status["status"], status["step"]) == ("failed", 2)
    monkeypatch.setattr(sudoku_train, "sft", crash_after(None))
    monkeypatch.setattr(
        sudoku_train, "evaluate_model", lambda *a: (_ for _ in ()).throw(RuntimeError("eval"))
    )
    with pytest.raises(RuntimeError, match="eval"):
        run_sft(dataclasses.replace(config, run_dir=str(tmp_path / "eval")), (puzzles[:4], puzzles[4:]))
    status = RunDir(tmp_path / "eval").read_status()
    assert (status["status"], status["step"]) == ("failed", 3)


def _fake_result():
    return {
        "cell_accuracy": 0.5,
        "solved": 0.0,
        "order_reward_norm": 0.5,
        "kendall_tau": 0.0,
        "format_valid": 1.0,
        "puzzles": 8,
    }


def test_the_pipeline_trains_each_mixture_from_the_random_order_sft_model(tmp_path, monkeypatch):
    """The stages in order: SFT random and solver, then one GRPO run per cell weight, each starting from
    sft-random/final; rows named by their mixture; the run finishes with its rows as its step."""
    from apps.sudoku import pipeline
    from apps.sudoku.cli import SMOKE

    calls = []
    monkeypatch.setattr(
        pipeline, "run_sft", lambda config, puzzles, resume: calls.append(("sft", config)) or _fake_result()
    )
    monkeypatch.setattr(
        pipeline, "run_train", lambda config, puzzles: calls.append(("grpo", config)) or _fake_result()
    )
    root = tmp_path / "pipe"
    config = pipeline.SudokuPipelineConfig(**SMOKE, run_dir=str(root), mixtures=(1.0, 0.75))
    rows = pipeline.run_pipeline(config)
    assert [(kind, getattr(c, "order", None)) for kind, c in calls[:2]] == [
        ("sft", "random"),
        ("sft", "solver"),
    ]
    grpo = [c for kind, c in calls if kind == "grpo"]
    assert [c.cell_weight for c in grpo] == [1.0, 0.75]
    assert all(c.model == str(root / "sft-random" / "final") for c in grpo)
    assert [c.run_dir for c in grpo] == [str(root / "grpo-w1"), str(root / "grpo-w0.75")]
    assert list(rows) == ["sft-random", "sft-solver", "grpo cell-only", "grpo mixed 0.75:0.25"]
    status = RunDir(root).read_status()
    assert (status["status"], status["step"]) == ("finished", 4)
    calls.clear()
    no_baseline = pipeline.SudokuPipelineConfig(
        **SMOKE, run_dir=str(tmp_path / "p2"), mixtures=(0.25,), solver_baseline=False
    )
    assert list(pipeline.run_pipeline(no_baseline)) == ["sft-random", "grpo mixed 0.25:0.75"]
    assert [kind for kind, _ in calls] == ["sft", "grpo"]


def test_an_eval_records_the_puzzle_settings_it_measured_on(model_dir, tmp_path):
    """eval.json's puzzle settings are the evaluation's own (data_seed 0), not the run's (3)."""
    config = SudokuEvalConfig(
        model=str(model_dir), run_dir=str(tmp_path / "run"), num_puzzles=40, eval_puzzles=2, batch_size=2
    )
    trained = SudokuEvalConfig(model=str(model_dir), num_puzzles=40, data_seed=3)
    run = RunDir.create(
        tmp_path / "run", config_to_dict(trained), app="sudoku", algorithm="grpo", exist_ok_for_resume=False
    )
    with pytest.warns(UserWarning, match="data_seed=0"):
        run_eval(config)
    settings = run.read_eval()["eval"]["puzzle_settings"]
    assert (settings["data_seed"], settings["num_puzzles"], settings["eval_fraction"]) == (0, 40, 0.2)


def test_an_eval_into_a_run_whose_config_lacks_a_puzzle_setting_does_not_warn(model_dir, tmp_path):
    """A setting the run's config.json does not hold (an older run's) is not a difference, nor an error."""
    import warnings

    config = SudokuEvalConfig(
        model=str(model_dir), run_dir=str(tmp_path / "run"), num_puzzles=40, eval_puzzles=2, batch_size=2
    )
    older = {k: v for k, v in config_to_dict(config).items() if k != "max_strategy"}
    run = RunDir.create(tmp_path / "run", older, app="sudoku", algorithm="grpo", exist_ok_for_resume=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_eval(config)["puzzles"] == 2
    assert run.read_eval()["eval"]["puzzles"] == 2


def test_a_model_named_final_outside_a_run_gets_an_eval_run_of_its_own(model_dir, tmp_path, monkeypatch):
    """<dir>/final is a run's model only when <dir> holds a run (config.json); else a new run directory
    under runs/sudoku holds the result and <dir> is left alone."""
    import shutil

    monkeypatch.chdir(tmp_path)
    loose = tmp_path / "loose"
    shutil.copytree(model_dir, loose / "final")
    run_eval(SudokuEvalConfig(model=str(loose / "final"), num_puzzles=40, eval_puzzles=2, batch_size=2))
    assert sorted(p.name for p in loose.iterdir()) == ["final"]
    [run_path] = (tmp_path / "runs" / "sudoku").iterdir()
    assert RunDir(run_path).read_eval()["eval"]["puzzles"] == 2
