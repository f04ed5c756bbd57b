"""Every `grpo-suite sudoku` subcommand smoke-run with a 2-step budget, through the command line."""

import json

import pytest
import torch

from core.cli import main


def test_every_subcommand_runs(tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["sudoku", "generate", "--preset", "smoke", "--output", str(out)]) == 0
    assert out.read_text().startswith("puzzle,solution\n")

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
    bad.write_text("1234341221434321\n12\n")
    with pytest.raises(SystemExit):  # one line, no traceback
        main(["sudoku", "generate", "--data", str(bad), "--output", str(tmp_path / "o")])
    assert f"error: {bad}:2" in capsys.readouterr().err


def test_a_resumed_pipeline_runs_only_the_stages_it_had_not_finished(tmp_path, capsys):
    pipe = tmp_path / "pipe"
    args = ["sudoku", "pipeline", "--preset", "smoke", "--run-dir", str(pipe), "--mixtures", "1,0.5"]
    assert main(args) == 0
    full = json.loads((pipe / "eval.json").read_text())
    # cut off during the last GRPO stage: its row is not in the pipeline's eval.json yet
    rows = dict(full["rows"])
    del rows["grpo mixed 0.5:0.5"]
    (pipe / "eval.json").write_text(json.dumps(full | {"rows": rows}))
    sft_model = (pipe / "sft-random" / "final" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        main(args)
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    resumed = json.loads((pipe / "eval.json").read_text())
    # the redone stage resumed from its final checkpoint: the same result
    assert _timeless(resumed["rows"]) == _timeless(full["rows"])
    assert (pipe / "sft-random" / "final" / "model.safetensors").stat().st_mtime_ns == sft_model
    assert resumed["total_seconds"] > full["total_seconds"] - full["seconds"]["grpo mixed 0.5:0.5"]


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
