"""`reward-model train` with a --data it cannot read, or settings it cannot train with: a command-line
error, and no run directory left."""

import pytest

from apps.debias.data import DataConfig, generate_splits, write_splits
from core.cli import main
from core.data import InputError
from reward_models.tokenizer import train_tokenizer
from reward_models.train import RMTrainConfig, _check_vocab_size


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "data/train.jsonl does not exist (write the splits with `grpo-suite debias data`)"),
        ("a file", "error: {data} is a file; expected a directory of split files (train.jsonl, ...)"),
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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm_input") / "data"
    write_splits(generate_splits(DataConfig(num_prompts=60)), path)
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [  # the first three ended in tracebacks after the run directory was made (a rerun was then refused)
        (
            ["--max-length", "4"],
            "max_length must be >= 5 ([CLS] prompt [SEP] response [SEP], a token of each), got 4",
        ),
        (["--num-heads", "3"], "hidden_size 16 must be divisible by num_heads=3"),
        (
            ["--vocab-size", "3"],
            "vocab_size must be >= 7 (5 special tokens, the word-start piece and a character), got 3",
        ),
        (["--max-train-rows", "-5"], "max_train_rows must be >= 0, got -5"),  # trained on all rows but 5
        (["--warmup-ratio", "1.5"], "warmup_ratio must be in [0, 1], got 1.5"),
        (["--learning-rate", "0"], "learning_rate must be > 0, got 0.0"),  # both were named together before
        (["--epochs", "-1"], "epochs must be > 0, got -1.0"),
        (["--warmup-ratio", "-0.1"], "warmup_ratio must be in [0, 1], got -0.1"),
        (  # what sentencepiece needs depends on the corpus: its characters (54 in these rows)
            ["--vocab-size", "50"],
            "vocab_size: 50 is too small for the training rows of --data {data}: their 54 distinct "
            "characters, the word-start piece and 5 special tokens need >= 60",
        ),
    ],
)
def test_unusable_settings_leave_no_run_directory(data, tmp_path, capsys, flags, message):
    run_dir = tmp_path / "rm"
    argv = ["reward-model", "train", "--preset", "smoke", "--data", str(data), "--run-dir", str(run_dir)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--hidden-size", "16", "--num-layers", "1", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.format(data=data) in err and not run_dir.exists()


def test_the_vocab_size_check_asks_for_what_sentencepiece_needs(tmp_path):
    """Full-width letters and the fi ligature fold, e + combining acute composes (NFKC), whitespace is the
    word-start piece, a control character is dropped: f u l w i d t h x é a b, 12 characters, + the
    word-start piece + 5 special tokens = 18, as sentencepiece counts."""
    corpus = ["\uff46\uff55\uff4c\uff4c\u3000width \ufb01 x", "\u00e9 e\u0301 a\tb\x01"]
    with pytest.raises(InputError, match="their 12 distinct characters, .* need >= 18"):
        _check_vocab_size(RMTrainConfig(vocab_size=17), corpus)
    _check_vocab_size(RMTrainConfig(vocab_size=18), corpus)
    with pytest.raises(RuntimeError, match="Vocabulary size is smaller than required_chars. 17 vs 18"):
        train_tokenizer(corpus, tmp_path / "small", vocab_size=17)
    train_tokenizer(corpus, tmp_path / "enough", vocab_size=18)


def test_a_warmup_over_every_step_is_accepted():
    """warmup_ratio is in [0, 1], both ends included."""
    assert RMTrainConfig(warmup_ratio=1.0).warmup_ratio == 1.0
    assert RMTrainConfig(warmup_ratio=0.0).warmup_ratio == 0.0
