"""Every `grpo-suite sudoku` subcommand smoke-run with a 2-step budget, through the command line."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from apps.sudoku.cli import SMOKE
from apps.sudoku.model import create_model_dir
from apps.sudoku.pipeline import SudokuPipelineConfig
from apps.sudoku.puzzles import generate_puzzles, holdout_split, read_puzzles
from apps.sudoku.train import SudokuSFTConfig, SudokuTrainConfig
from core.cli import main
from core.config import config_to_dict
from core.runs import RunDir
from core.tiny import create_tiny_model_dir


def test_every_subcommand_runs(tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["sudoku", "generate", "--preset", "smoke", "--output", str(out)]) == 0
    assert out.read_text().startswith("puzzle,solution\n")
    # in generation order, so that the first N (--num-puzzles with --data) hold both sides of the split
    assert read_puzzles(out) == generate_puzzles(4, 64, seed=0, givens=(4, 6))

    # the pipeline runs sft (random, solver) and train (w = 1, 0.75), each with its held-out evaluation
    pipe = tmp_path / "pipe"
    assert (
        main(
            [
                "sudoku",
                "pipeline",
                "--preset",
                "smoke",
                "--data",
                str(out),
                "--run-dir",
                str(pipe),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for row in ("sft-random", "sft-solver", "grpo cell-only", "grpo mixed 0.75:0.25"):
        assert row in printed
    rows = json.loads((pipe / "eval.json").read_text())["rows"]
    assert set(rows) == {"sft-random", "sft-solver", "grpo cell-only", "grpo mixed 0.75:0.25"}
    status = json.loads((pipe / "status.json").read_text())
    assert (status["status"], status["step"]) == ("finished", 4)  # a pipeline's step: its finished rows
    assert all(0 <= r[m] <= 1 for r in rows.values() for m in ("cell_accuracy", "solved", "format_valid"))
    metrics = [json.loads(line) for line in (pipe / "grpo-w0.75" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and {"reward/cell", "reward/order"} <= set(metrics[0])
    assert json.loads((pipe / "grpo-w0.75" / "eval.json").read_text())["scales"]["order"] > 0

    # eval of a run's model adds its result under "eval" and keeps what training wrote; other puzzle
    # settings than the run's are named
    trained = json.loads((pipe / "grpo-w1" / "eval.json").read_text())
    with pytest.warns(UserWarning, match=r"num_puzzles=4000 \(run: 64\)"):
        assert (
            main(["sudoku", "eval", "--model", str(pipe / "grpo-w1" / "final"), "--eval-puzzles", "4"]) == 0
        )
    evaluated = json.loads((pipe / "grpo-w1" / "eval.json").read_text())
    assert evaluated.pop("eval")["puzzles"] == 4 and evaluated == trained
    # a model outside a run gets an eval run of its own, finished (not "unknown" on the dashboard)
    own = tmp_path / "own_eval"
    args = [
        "sudoku",
        "eval",
        "--model",
        str(tmp_path / "m_copy"),
        "--eval-puzzles",
        "2",
        "--run-dir",
        str(own),
    ]
    shutil.copytree(pipe / "grpo-w1" / "final", tmp_path / "m_copy")
    assert main(args) == 0
    assert json.loads((own / "status.json").read_text())["status"] == "finished"

    # train without --model builds and SFTs its own base model first; sft alone writes a model
    assert main(["sudoku", "train", "--preset", "smoke", "--run-dir", str(tmp_path / "train")]) == 0
    assert (tmp_path / "train" / "base_model" / "config.json").is_file()
    assert (
        main(
            ["sudoku", "sft", "--preset", "smoke", "--order", "row-major", "--run-dir", str(tmp_path / "sft")]
        )
        == 0
    )
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()


def test_bad_puzzle_file_is_a_command_line_error_naming_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text(".234341221434321\n12\n")
    with pytest.raises(SystemExit):  # one line, no traceback
        main(["sudoku", "generate", "--data", str(bad), "--output", str(tmp_path / "o")])
    assert f"error: {bad}:2" in capsys.readouterr().err


def test_a_resumed_pipeline_runs_only_the_stages_it_had_not_finished(tmp_path, capsys):
    pipe = tmp_path / "pipe"
    args = ["sudoku", "pipeline", "--preset", "smoke", "--run-dir", str(pipe), "--mixtures", "1,0.5"]
    assert main(args) == 0
    full = json.loads((pipe / "eval.json").read_text())
    # cut off during the first GRPO stage: its row is not in the pipeline's eval.json yet
    rows = dict(full["rows"])
    del rows["grpo cell-only"]
    (pipe / "eval.json").write_text(json.dumps(full | {"rows": rows}))
    sft_model = (pipe / "sft-random" / "final" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        main(args)
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    resumed = json.loads((pipe / "eval.json").read_text())
    # the redone stage resumed from its final checkpoint: the same result, and the rows in the table's order
    assert _timeless(resumed["rows"]) == _timeless(full["rows"])
    assert list(resumed["rows"]) == ["sft-random", "sft-solver", "grpo cell-only", "grpo mixed 0.5:0.5"]
    printed = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()[-4:]]
    assert printed == ["sft-random", "sft-solver", "grpo cell-only", "grpo mixed 0.5:0.5"]
    assert (pipe / "sft-random" / "final" / "model.safetensors").stat().st_mtime_ns == sft_model
    assert resumed["total_seconds"] > full["total_seconds"] - full["seconds"]["grpo cell-only"]


def test_a_resumed_pipeline_refuses_other_settings_naming_them(tmp_path, capsys):
    pipe = tmp_path / "pipe"  # a smoke pipeline's run directory, as the pipeline writes it
    config = config_to_dict(SudokuPipelineConfig(**SMOKE, run_dir=str(pipe)))
    RunDir.create(pipe, config, app="sudoku", algorithm="pipeline", exist_ok_for_resume=False)
    args = ["sudoku", "pipeline", "--preset", "smoke", "--run-dir", str(pipe), "--resume"]
    with pytest.raises(SystemExit):
        main([*args, "--sft-steps", "5", "--seed", "7", "--num-puzzles", "100"])
    assert "other settings (num_puzzles 64 -> 100; seed 0 -> 7; sft_steps 2 -> 5)" in capsys.readouterr().err
    assert "resumes" not in RunDir(pipe).read_config()  # refused before the run was reopened


def test_a_resumed_pipeline_needs_an_earlier_run(tmp_path, capsys):
    args = ["sudoku", "pipeline", "--preset", "smoke", "--resume"]
    with pytest.raises(SystemExit):
        main(args)
    assert "--resume continues an earlier run: give its --run-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--run-dir", str(tmp_path / "typo")])
    assert f"{tmp_path / 'typo'} holds no run to continue" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_bad_puzzle_settings_stop_the_pipeline_before_its_run_directory_exists(tmp_path, capsys):
    pipe = tmp_path / "p3"
    with pytest.raises(SystemExit):
        main(["sudoku", "pipeline", "--givens-min", "6", "--givens-max", "4", "--run-dir", str(pipe)])
    assert "givens_min=6, givens_max=4: need 0 <= givens_min <= givens_max < 16" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("1234341221434321\n")
    with pytest.raises(SystemExit):
        main(["sudoku", "pipeline", "--data", str(bad), "--run-dir", str(pipe)])
    assert f"{bad}:1: the puzzle has no empty cell" in capsys.readouterr().err
    assert not pipe.exists()


def test_settings_sudoku_would_ignore_or_fail_on_are_command_line_errors(capsys):
    with pytest.raises(SystemExit):
        main(["sudoku", "sft", "--preset", "smoke", "--sft-steps", "0"])
    assert "sft_steps must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sudoku", "train", "--generation-groups", "2", "--compile-decode", "--autocast", "bfloat16"])
    assert (
        "generation_groups=2, compile_decode=True, autocast=bfloat16: Sudoku's constrained decoder has no "
        "grouped generation" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):  # not the core's "set generation_groups > 1 too"
        main(["sudoku", "pipeline", "--compile-decode"])
    assert "compile_decode=True: Sudoku's constrained decoder" in capsys.readouterr().err
    # these had failed at the first GRPO step, after the SFT stages, and a resume could not change them
    with pytest.raises(SystemExit):
        main(["sudoku", "pipeline", "--top-p", "0.9", "--top-k", "5", "--min-new-tokens", "3"])
    assert "top_p=0.9, top_k=5, min_new_tokens=3: Sudoku's constrained decoder" in capsys.readouterr().err


def test_a_completion_cap_below_3e_plus_1_is_refused_before_any_stage(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit):  # 4x4 smoke puzzles: 4-6 givens, so E up to 12 and 3E + 1 = 37
        main(["sudoku", "pipeline", "--preset", "smoke", "--max-new-tokens", "20", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert "--max-new-tokens 20 is below 3E + 1 = " in err and "raise it" in err
    assert not run.exists()
    with pytest.raises(SystemExit):
        main(["sudoku", "train", "--preset", "smoke", "--max-new-tokens", "20", "--run-dir", str(run)])
    assert "--max-new-tokens 20 is below 3E + 1" in capsys.readouterr().err and not run.exists()


def test_eval_puzzles_below_zero_and_an_eval_of_none_are_command_line_errors(tmp_path, capsys):
    # -1 evaluated all held-out puzzles but the last (sft and train took it as "on"); eval's 0 crashed in
    # transformers
    for command in ("sft", "train", "pipeline", "eval"):
        run = tmp_path / command
        with pytest.raises(SystemExit):
            main(["sudoku", command, "--preset", "smoke", "--eval-puzzles=-1", "--run-dir", str(run)])
        wanted = (
            "eval_puzzles must be >= 1 (the puzzles" if command == "eval" else "eval_puzzles must be >= 0"
        )
        assert wanted in capsys.readouterr().err and not run.exists()
    with pytest.raises(SystemExit):
        main(["sudoku", "eval", "--preset", "smoke", "--eval-puzzles", "0"])
    assert "eval_puzzles must be >= 1 (the puzzles to evaluate), got 0" in capsys.readouterr().err


def test_a_bad_puzzle_file_stops_eval_before_its_run_directory_exists(tmp_path, capsys):
    # the run directory made first was later taken for a training run's
    model = create_model_dir(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=4, seed=0)
    bad = tmp_path / "bad.txt"
    bad.write_text("1234341221434321\n")
    run = tmp_path / "eval"
    with pytest.raises(SystemExit):
        main(["sudoku", "eval", "--model", str(model), "--data", str(bad), "--run-dir", str(run)])
    assert f"{bad}:1: the puzzle has no empty cell" in capsys.readouterr().err
    assert not run.exists()


def test_eval_refuses_another_apps_run_before_evaluating(tmp_path, capsys):
    """Its results replaced the `eval` a math training run had written."""
    model = create_model_dir(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=4, seed=0)
    other = RunDir.create(tmp_path / "math", {}, app="math", algorithm="grpo", exist_ok_for_resume=False)
    other.write_eval({"eval": {"all": {"pass@1": 0.25}}})
    with pytest.raises(SystemExit) as exit_info:
        main(["sudoku", "eval", "--preset", "smoke", "--model", str(model), "--run-dir", str(other.path)])
    message = f"error: {other.path}: it holds a 'math' run, whose eval.json this would change"
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert other.read_eval() == {"eval": {"all": {"pass@1": 0.25}}}


@pytest.mark.parametrize("command", ["sft", "train", "pipeline", "eval"])
def test_negative_threads_are_a_command_line_error(command, capsys):
    with pytest.raises(SystemExit):  # a RuntimeError traceback from torch.set_num_threads before
        main(["sudoku", command, "--threads", "-1", "--model", "m"])
    assert "threads must be >= 0 (0 = torch's default), got -1" in capsys.readouterr().err


def test_eval_takes_threads_as_the_other_commands_do(tmp_path, monkeypatch):
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    model = create_model_dir(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=4, seed=0)
    run = tmp_path / "eval"
    args = ["sudoku", "eval", "--preset", "smoke", "--model", str(model), "--run-dir", str(run)]
    assert main([*args, "--threads", "1"]) == 0
    assert set_to == [1] and json.loads((run / "eval.json").read_text())["eval"]["puzzles"] == 8


def test_a_grpo_run_checkpoints_every_ten_steps(tmp_path):
    model = create_model_dir(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=4, seed=0)
    run = tmp_path / "run"
    args = ["sudoku", "train", "--preset", "smoke", "--model", str(model), "--run-dir", str(run)]
    assert main([*args, "--max-steps", "11", "--eval-puzzles", "0"]) == 0
    assert [p.name for p in RunDir(run).list_checkpoints()] == ["step-10", "step-11"]


def test_train_continues_after_a_crash_in_its_own_sft(tmp_path, monkeypatch):
    import apps.sudoku.train as train_module

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    run = tmp_path / "run"
    args = ["sudoku", "train", "--preset", "smoke", "--run-dir", str(run), "--eval-puzzles", "0"]
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "sft", crash)
        with pytest.raises(RuntimeError, match="killed"):
            main(args)
    assert (run / "sft-random" / "config.json").is_file() and not (run / "config.json").exists()
    assert main(args) == 0  # the cut-off SFT starts over; no --resume (the GRPO run had not begun)
    steps = [
        json.loads(line)["step"] for line in (run / "sft-random" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2] and (run / "base_model" / "config.json").is_file()


def test_an_unfinished_sft_stage_is_started_over_on_resume(tmp_path):
    pipe = tmp_path / "pipe"
    args = ["sudoku", "pipeline", "--preset", "smoke", "--run-dir", str(pipe), "--mixtures", "1"]
    assert main(args) == 0
    full = json.loads((pipe / "eval.json").read_text())
    (pipe / "eval.json").unlink()  # cut off before the first stage's row was written
    (pipe / "sft-random" / "status.json").unlink()
    assert main([*args, "--resume"]) == 0
    assert _timeless(json.loads((pipe / "eval.json").read_text())["rows"]) == _timeless(
        full["rows"]
    )  # seeded
    steps = [
        json.loads(line)["step"] for line in (pipe / "sft-random" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]  # one run's log, not two


def test_the_pipeline_refuses_a_cell_weight_it_would_ignore(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "sudoku",
                "pipeline",
                "--preset",
                "smoke",
                "--cell-weight",
                "0.2",
                "--run-dir",
                str(tmp_path / "p"),
            ]
        )
    assert "one GRPO run per cell weight in --mixtures" in capsys.readouterr().err


def test_the_pipeline_help_says_what_resume_and_cell_weight_do(capsys):
    with pytest.raises(SystemExit):
        main(["sudoku", "pipeline", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help texts
    assert "skip the stages that have their row in its eval.json" in text
    assert "start an unfinished SFT stage over; only --threads and --device may change" in text
    assert "not used: the pipeline takes its cell weights from --mixtures" in text


def _timeless(rows: dict[str, dict]) -> dict[str, dict]:
    return {name: {k: v for k, v in row.items() if k != "seconds"} for name, row in rows.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pipeline_runs_on_a_gpu(tmp_path):
    """SFT batches and the constrained sampler follow the model onto the device."""
    pipe = tmp_path / "pipe"
    assert main(["sudoku", "pipeline", "--preset", "smoke", "--device", "cuda", "--run-dir", str(pipe)]) == 0
    rows = json.loads((pipe / "eval.json").read_text())["rows"]
    assert all(0 <= row["cell_accuracy"] <= 1 for row in rows.values())


def test_a_pipeline_whose_stage_fails_is_marked_failed(tmp_path, monkeypatch):
    """The pipeline's own status.json said "running" forever after a stage raised (or a kill)."""
    import apps.sudoku.pipeline as pipeline

    def broken_train(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipeline, "run_sft", lambda config, puzzles, resume: {"solved": 0.0})
    monkeypatch.setattr(pipeline, "run_train", broken_train)
    pipe = tmp_path / "pipe"
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["sudoku", "pipeline", "--preset", "smoke", "--run-dir", str(pipe)])
    status = json.loads((pipe / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "RuntimeError: out of memory"
    assert status["step"] == 2  # the two SFT rows it finished


def test_repeated_puzzles_in_a_file_are_said_not_silently_dropped(tmp_path):
    """--num-puzzles 5 of a file whose first 5 hold two repeats used 3 puzzles without a word."""
    from apps.sudoku.puzzles import grid_to_line

    puzzles = generate_puzzles(4, 6, seed=0, givens=(4, 6))
    lines = [f"{grid_to_line(p.grid)},{grid_to_line(p.solution)}" for p in puzzles]
    data = tmp_path / "dups.csv"
    data.write_text(
        "\n".join(["puzzle,solution", lines[0], lines[1], lines[0], lines[2], lines[1], *lines[3:]])
    )
    out = tmp_path / "out.csv"
    with pytest.warns(
        UserWarning, match=r"dups.csv: 2 of its 5 puzzles repeat an earlier one; each is used once"
    ):
        main(["sudoku", "generate", "--data", str(data), "--num-puzzles", "5", "--output", str(out)])
    assert len(read_puzzles(out)) == 5  # the first 5 as they are; the split takes each once


def test_generate_refuses_an_output_that_is_a_directory(tmp_path, capsys):
    # it wrote the puzzles with open(), an IsADirectoryError traceback after generating them all
    with pytest.raises(SystemExit):
        main(["sudoku", "generate", "--preset", "smoke", "--output", str(tmp_path)])
    assert f"error: output {tmp_path} is a directory; give the CSV file to write" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):  # "[Errno 17] File exists: 'afile'" after generating, before
        main(["sudoku", "generate", "--preset", "smoke", "--output", str(tmp_path / "afile" / "p.csv")])
    err = capsys.readouterr().err
    assert f"error: output: the directory of output {tmp_path / 'afile'} is a file, not a directory" in err


def test_generate_writes_a_few_puzzles_and_warns_that_they_do_not_split(tmp_path):
    """generate only writes a file, but refused 5 puzzles (all of one side of the split) with a traceback."""
    out = tmp_path / "p.csv"
    with pytest.warns(UserWarning, match=r"p.csv: its 5 puzzles split into \d train / \d held out; sft"):
        assert main(["sudoku", "generate", "--size", "9", "--num-puzzles", "5", "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1 + 5  # the header and the puzzles


def test_generate_prints_each_side_of_its_split_at_the_eval_fraction(tmp_path, capsys):
    """One line per side of the split at --eval-fraction: its puzzles, givens and hardest strategies."""
    out = tmp_path / "p.csv"
    args = ["--num-puzzles", "12", "--eval-fraction", "0.5", "--output", str(out)]
    assert main(["sudoku", "generate", *args]) == 0
    printed = capsys.readouterr().out.splitlines()
    puzzles = read_puzzles(out)
    train, held_out = holdout_split(puzzles, 0.5)
    assert (len(train), len(held_out)) == (3, 9)  # by solution grid: 0.2 would split these 6 / 6
    for name, side, line in (("train", train, printed[0]), ("held out", held_out, printed[1])):
        givens = {g: sum(p.givens == g for p in side) for g in sorted({p.givens for p in side})}
        hardest = {h: sum(p.hardest == h for p in side) for h in dict.fromkeys(p.hardest for p in side)}
        assert line == f"{name}: {len(side)} puzzles; givens {givens}; hardest strategy {hardest}"
    assert printed[2].startswith(f"wrote 12 puzzles to {out} in ")


def test_a_puzzle_file_that_is_a_directory_is_named_as_one(tmp_path, capsys):
    # read_puzzles said "puzzle file DIR does not exist"
    with pytest.raises(SystemExit):
        main(["sudoku", "generate", "--data", str(tmp_path), "--output", str(tmp_path / "p.csv")])
    assert f"error: data: {tmp_path} is a directory; expected a puzzle file" in capsys.readouterr().err


def test_a_puzzle_file_without_puzzles_is_an_error_before_the_run_directory_exists(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("# no puzzles yet\n\n")
    run = tmp_path / "run"
    with pytest.raises(SystemExit):  # a ValueError with a traceback before
        main(["sudoku", "train", "--preset", "smoke", "--data", str(empty), "--run-dir", str(run)])
    assert f"error: puzzle file {empty} has no puzzles" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("command", ["sft", "train", "pipeline"])
def test_generated_puzzles_that_leave_a_side_of_the_split_empty_are_a_command_line_error(
    tmp_path, capsys, command
):
    run = tmp_path / "run"
    args = ["--preset", "smoke", "--num-puzzles", "2", "--eval-fraction", "0.01", "--run-dir", str(run)]
    with pytest.raises(SystemExit) as exit_info:  # a ValueError with a traceback before
        main(["sudoku", command, *args])
    message = "error: generated puzzles: 2 puzzles split into 2 train / 0 held out; use more puzzles"
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not run.exists()


def test_a_model_shape_the_model_cannot_have_is_a_command_line_error(tmp_path, capsys):
    # the model was built (and failed, with a traceback) after the run directory's config.json was written
    run = tmp_path / "run"
    for hidden, heads, error in (
        ("30", "4", "hidden_size 30 is not divisible by num_heads 4"),
        ("12", "4", "hidden_size 12 / num_heads 4 gives an odd head size 3; rotary positions need an even"),
        ("32", "0", "num_heads must be >= 1, got 0"),
    ):
        args = ["--preset", "smoke", "--hidden-size", hidden, "--num-heads", heads, "--run-dir", str(run)]
        for command in ("sft", "train"):
            with pytest.raises(SystemExit):
                main(["sudoku", command, *args])
            assert error in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("model", ["not_for_sudoku", "missing"])
def test_a_bad_model_is_named_before_a_run_directory_exists(tmp_path, capsys, model):
    """A model whose tokenizer has no Sudoku words gave a KeyError 'r1' traceback in the constrained decoder;
    a missing one let sft and the pipeline write their run's config.json first."""
    if model == "missing":
        path, message = tmp_path / "typo", f"error: {tmp_path / 'typo'} does not exist"
    else:
        path = create_tiny_model_dir(tmp_path / "other", ["abc"], hidden_size=32, num_layers=1, num_heads=4)
        message = f"error: {path}: its tokenizer has no Sudoku cell tokens"
    run = tmp_path / "run"
    for command in ("sft", "train", "eval", "pipeline"):
        with pytest.raises(SystemExit):
            main(["sudoku", command, "--preset", "smoke", "--model", str(path), "--run-dir", str(run)])
        assert message in capsys.readouterr().err
        assert not run.exists()


def test_bootstrap_prompts_below_one_is_refused_before_any_stage(tmp_path, capsys):
    """0 failed with an IndexError after both SFT stages; a negative count sliced most of the training set."""
    for count in ("0", "-3"):
        run = tmp_path / f"p{count}"
        with pytest.raises(SystemExit):
            main(
                [
                    "sudoku",
                    "pipeline",
                    "--preset",
                    "smoke",
                    "--bootstrap-prompts",
                    count,
                    "--run-dir",
                    str(run),
                ]
            )
        assert (
            f"bootstrap_prompts must be >= 1 with bootstrap_scaling, got {count}" in capsys.readouterr().err
        )
        assert not run.exists()
    assert SudokuTrainConfig(bootstrap_prompts=0, bootstrap_scaling=False).bootstrap_prompts == 0


def test_an_sft_run_is_finished_once_evaluated_and_failed_if_its_evaluation_dies(tmp_path, monkeypatch):
    """The SFT run was marked finished before its evaluation, so a failure there left it finished with no
    eval.json."""
    from apps.sudoku import train as sudoku_train

    config = SudokuSFTConfig(**{k: v for k, v in SMOKE.items() if k in SudokuSFTConfig.__dataclass_fields__})
    sudoku_train.run_sft(replace(config, run_dir=str(tmp_path / "ok")))
    assert RunDir(tmp_path / "ok").read_status()["status"] == "finished"
    assert (tmp_path / "ok" / "eval.json").is_file()

    def dies(*args, **kwargs):
        raise RuntimeError("killed while evaluating")

    monkeypatch.setattr(sudoku_train, "evaluate_model", dies)
    with pytest.raises(RuntimeError):
        sudoku_train.run_sft(replace(config, run_dir=str(tmp_path / "cut")))
    status = RunDir(tmp_path / "cut").read_status()
    assert (status["status"], status["error"]) == ("failed", "RuntimeError: killed while evaluating")


def test_an_eval_batch_size_below_one_is_a_command_line_error(tmp_path, capsys):
    # 0 failed with "range() arg 3 must not be zero" after the model had loaded
    from apps.sudoku.evaluate import SudokuEvalConfig

    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        SudokuEvalConfig(batch_size=0)
    run = tmp_path / "eval"
    with pytest.raises(SystemExit):
        main(
            [
                "sudoku",
                "eval",
                "--preset",
                "smoke",
                "--model",
                "m",
                "--batch-size",
                "-2",
                "--run-dir",
                str(run),
            ]
        )
    assert "batch_size must be >= 1, got -2" in capsys.readouterr().err and not run.exists()


def test_an_sft_learning_rate_that_is_not_positive_and_finite_is_a_command_line_error(tmp_path, capsys):
    # -1 failed in torch's AdamW after the run directory was made
    for rate in (0.0, -1.0, float("inf"), float("nan")):
        for cls in (SudokuSFTConfig, SudokuTrainConfig, SudokuPipelineConfig):
            with pytest.raises(ValueError, match=rf"sft_learning_rate must be > 0 and finite, got {rate}"):
                cls(sft_learning_rate=rate)
    run = tmp_path / "run"
    for command in ("sft", "train", "pipeline"):
        with pytest.raises(SystemExit):
            main(["sudoku", command, "--preset", "smoke", "--sft-learning-rate=-1", "--run-dir", str(run)])
        assert "sft_learning_rate must be > 0 and finite, got -1.0" in capsys.readouterr().err
        assert not run.exists()


def test_mixtures_that_would_share_a_stage_directory_are_refused(tmp_path, capsys):
    # 0.3333331 and 0.3333334 were both grpo-w0.333333: the second stage took the first one's directory
    run = tmp_path / "p"
    with pytest.raises(SystemExit):
        main(
            [
                "sudoku",
                "pipeline",
                "--preset",
                "smoke",
                "--mixtures",
                "0.3333331,0.3333334",
                "--run-dir",
                str(run),
            ]
        )
    err = capsys.readouterr().err
    assert "mixtures 0.3333331 and 0.3333334 would share the stage directory grpo-w0.333333" in err
    assert not run.exists()
    for mixtures, pair in (
        ((1.0, 0.5, 0.9999999), r"1.0 and 0.9999999 would share the stage directory grpo-w1 "),
        ((0.75, 0.75), r"0.75 and 0.75 would share the stage directory grpo-w0.75 "),
    ):
        with pytest.raises(ValueError, match=rf"^mixtures {pair}\(a cell weight is named by its first 6"):
            SudokuPipelineConfig(mixtures=mixtures)
    assert SudokuPipelineConfig(mixtures=(1.0, 0.75, 0.5, 0.25, 0.333333, 0.333334)).mixtures[-1] == 0.333334
