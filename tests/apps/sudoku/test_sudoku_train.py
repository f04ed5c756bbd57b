"""The pieces of `sudoku train` and `sudoku eval` around the model: the completion cap check, the rubric's
weights, the bootstrapped scales' pairing, which puzzles GRPO and the evaluation read, and the status an
evaluation leaves on a training run. No training runs: the trainer is replaced where one would start."""

import types

import pytest

from apps.sudoku import train as sudoku_train
from apps.sudoku.data import PuzzleConfig, load_puzzles
from apps.sudoku.evaluate import SudokuEvalConfig, held_out_examples, run_eval
from apps.sudoku.model import create_model_dir
from apps.sudoku.puzzles import generate_puzzles
from apps.sudoku.serialize import to_example
from apps.sudoku.train import (
    SudokuTrainConfig,
    build_rubric,
    fit_bootstrap_scales,
    refuse_short_completions,
    run_train,
)
from core.config import config_to_dict
from core.data import InputError
from core.runs import RunDir


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
