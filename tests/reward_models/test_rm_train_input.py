"""`reward-model train` with a --data it cannot read: a command-line error, and no run directory left."""

import pytest

from core.cli import main


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "data/train.jsonl does not exist (write the splits with `grpo-suite debias data`)"),
        ("a file", "data/train.jsonl does not exist"),
        ("bad JSON", "data/train.jsonl:1: not valid JSON"),
        ("empty", "error: data file {data}/train.jsonl has no rows"),
    ],
)
def test_unreadable_data_leaves_no_run_directory(tmp_path, capsys, kind, message):
    data = tmp_path / "data"
    if kind == "a file":
        data.write_text("{}\n")
    elif kind == "bad JSON":
        data.mkdir()
        (data / "train.jsonl").write_text('{"prompt": }\n')
    elif kind == "empty":  # it was a ValueError traceback, exit 1
        data.mkdir()
        (data / "train.jsonl").write_text("\n")
    run_dir = tmp_path / "rm"
    with pytest.raises(SystemExit) as exit_info:
        main(["reward-model", "train", "--preset", "smoke", "--data", str(data), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.format(data=data) in err and not run_dir.exists()
