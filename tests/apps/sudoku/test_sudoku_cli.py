"""Every `grpo-suite sudoku` subcommand smoke-run with a 2-step budget, through the command line."""

import json

import pytest

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

    assert main(["sudoku", "eval", "--preset", "smoke", "--model", str(pipe / "grpo-w1" / "final")]) == 0
    assert "cell_accuracy" in json.loads((pipe / "grpo-w1" / "eval.json").read_text())

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
    with pytest.raises(ValueError, match="bad.txt:2"):
        main(["sudoku", "generate", "--data", str(bad), "--output", str(tmp_path / "o")])
