"""Each app's OFFLINE_MODEL_FIELDS: real fields, and refused on the command line with --model
(core.config._refuse_unread_model_fields)."""

import dataclasses

import pytest

from apps.debias.train import DebiasTrainConfig
from apps.math_reasoning.train import MathTrainConfig
from apps.sudoku.pipeline import SudokuPipelineConfig
from apps.sudoku.train import SudokuSFTConfig, SudokuTrainConfig
from apps.tcm.train import TcmTrainConfig
from core.cli import main

CONFIGS = [
    DebiasTrainConfig,
    MathTrainConfig,
    SudokuPipelineConfig,
    SudokuSFTConfig,
    SudokuTrainConfig,
    TcmTrainConfig,
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_offline_model_fields_are_fields_of_the_config(config):
    names = {f.name for f in dataclasses.fields(config)}
    assert config.OFFLINE_MODEL_FIELDS and set(config.OFFLINE_MODEL_FIELDS) <= names


@pytest.mark.parametrize(
    "command",
    [
        ["debias", "train", "--hidden-size", "64"],
        ["math", "train", "--small-sft-steps", "5"],
        ["sudoku", "sft", "--num-layers", "2"],
        ["sudoku", "train", "--sft-steps", "5"],
        ["sudoku", "pipeline", "--num-heads", "2"],
        ["tcm", "train", "--reading-steps", "5"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_flag_of_the_offline_model_with_model_is_an_input_error(command, tmp_path, capsys):
    flag = command[2]
    with pytest.raises(SystemExit) as exit:
        main([*command, "--model", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    assert exit.value.code == 2
    assert f"{flag} sets the offline tiny model, which --model {tmp_path} replaces" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
