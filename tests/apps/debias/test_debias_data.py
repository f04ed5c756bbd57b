"""apps/debias/data.py: determinism, disjoint splits, the held-out category, the shipped files, errors."""

import json
import random
from pathlib import Path

import pytest

from apps.debias import data
from apps.debias.data import (
    CATEGORIES,
    DataConfig,
    distinct_prompts,
    garble,
    generate_splits,
    load_splits,
    max_prompts,
    write_splits,
)
from core.data import InputError
from reward_models.pairs import read_split

REPO = Path(__file__).resolve().parents[3]


def test_generator_is_deterministic_and_seeded():
    config = DataConfig(num_prompts=300)
    assert generate_splits(config) == generate_splits(config)
    assert generate_splits(config)["train"] != generate_splits(DataConfig(num_prompts=300, seed=1))["train"]


@pytest.mark.parametrize("heldout", ["hukou", "occupation"])
def test_splits_are_disjoint_and_the_heldout_category_is_not_trained_on(heldout):
    splits = generate_splits(DataConfig(num_prompts=600, heldout_category=heldout))
    prompts = {name: {row["prompt"] for row in rows} for name, rows in splits.items()}
    assert sum(map(len, prompts.values())) == 600  # de-duplicated: no prompt twice, within or across splits
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    for name in ("train", "validation", "test"):
        assert heldout not in {row["category"] for row in splits[name]}
    assert {row["category"] for row in splits["heldout"]} == {heldout}
    assert {row["category"] for row in splits["train"]} == set(CATEGORIES) - {heldout}
    ids = [row["id"] for rows in splits.values() for row in rows]
    assert len(ids) == len(set(ids))


def test_rows_pair_a_neutral_and_a_biased_response():
    for row in generate_splits(DataConfig(num_prompts=120))["train"]:
        assert row["neutral"] != row["biased"] and row["off_topic"] != row["neutral"]
        assert row["garbled"] != row[row["garbled_source"]]
        assert any(mark in row["biased"] for mark in (" all ", " always ", "by nature", "Everyone knows"))
        assert row["group"].lower() in row["biased"].lower()


def test_shipped_files_are_the_generator_output():
    assert load_splits(REPO / "data" / "debias") == generate_splits(DataConfig())


def test_garble_always_changes_the_text():
    rng = random.Random(0)
    for _ in range(50):
        assert garble("judge them on skills, not on age.", rng) != "judge them on skills, not on age."


def test_bad_rows_name_the_file_and_line(tmp_path):
    splits = generate_splits(DataConfig(num_prompts=60))
    write_splits(splits, tmp_path)
    lines = (tmp_path / "test.jsonl").read_text().splitlines()
    broken = dict(json.loads(lines[1]), biased=None)
    (tmp_path / "test.jsonl").write_text("\n".join([lines[0], json.dumps(broken), "{not json"]) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: missing, blank or non-string field\(s\) biased"):
        read_split(tmp_path, "test")
    with pytest.raises(ValueError, match="heldout_category"):
        DataConfig(heldout_category="planet")


def test_an_empty_split_is_an_input_error(tmp_path):
    """`debias train --data-dir` with an empty train.jsonl ended in a ValueError traceback (exit 1)."""
    write_splits(generate_splits(DataConfig(num_prompts=60)), tmp_path)
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(InputError, match=f"data file {tmp_path / 'train.jsonl'} has no rows"):
        load_splits(tmp_path)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (  # it wrote an empty validation.jsonl and exited 0
            {"validation_fraction": 0.01},
            "validation_fraction 0.01 of the 50 non-held-out prompts leaves the validation split empty",
        ),
        (
            {"test_fraction": 0.001},
            "test_fraction 0.001 of the 50 non-held-out prompts leaves the test split",
        ),
        (
            {"validation_fraction": 0.495, "test_fraction": 0.495},
            "validation_fraction 0.495 and test_fraction 0.495 leave none of the 50 non-held-out prompts "
            "for the train split",
        ),
    ],
)
def test_sizes_that_leave_a_split_empty_are_refused(sizes, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(num_prompts=60, **sizes)


def test_fewer_than_ten_prompts_per_category_are_refused():
    """num_prompts needs ten prompts per category (60 for the six), not one per category."""
    assert len(CATEGORIES) == 6
    with pytest.raises(ValueError, match=r"num_prompts must be >= 60, got 59"):
        DataConfig(num_prompts=59)
    assert DataConfig(num_prompts=60).num_prompts == 60


def test_the_data_command_writes_nothing_for_an_empty_split(monkeypatch, tmp_path, capsys):
    from core import cli

    monkeypatch.setattr(
        cli, "entry_points", lambda group: [_EntryPoint()] if group == cli.ENTRY_POINT_GROUP else []
    )
    argv = ["debias", "data", "--out-dir", str(tmp_path / "d"), "--num-prompts", "60"]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--validation-fraction", "0.01"])
    assert "leaves the validation split empty" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


class _EntryPoint:
    name = "debias"

    def load(self):
        from apps.debias.cli import register

        return register


def test_train_help_says_data_is_not_read(monkeypatch, capsys):
    """The help of --data was the core's "training data file (JSONL/JSON/CSV/Parquet)", a flag train refuses."""
    from core import cli

    monkeypatch.setattr(
        cli, "entry_points", lambda group: [_EntryPoint()] if group == cli.ENTRY_POINT_GROUP else []
    )
    with pytest.raises(SystemExit):
        cli.main(["debias", "train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--data DATA not read: debias reads a directory of splits, pass --data-dir DIR" in help_text
    with pytest.raises(SystemExit):
        cli.main(["debias", "train", "--data", "x.jsonl"])
    assert "use --data-dir DIR, not --data" in capsys.readouterr().err


def test_data_command_writes_the_splits(monkeypatch, tmp_path):
    from core import cli

    monkeypatch.setattr(
        cli, "entry_points", lambda group: [_EntryPoint()] if group == cli.ENTRY_POINT_GROUP else []
    )
    assert cli.main(["debias", "data", "--out-dir", str(tmp_path), "--num-prompts", "90"]) == 0
    written = {name: read_split(tmp_path, name) for name in ("train", "validation", "test", "heldout")}
    assert written == generate_splits(DataConfig(num_prompts=90))


def test_a_rewrite_cut_off_after_one_split_leaves_the_previous_splits(monkeypatch, tmp_path):
    out = tmp_path / "data"
    old = generate_splits(DataConfig(num_prompts=240))
    write_splits(old, out)
    (out / "README.md").write_text("about these splits\n")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("kept\n")

    def dying_open(path, mode="r", *args, **kwargs):
        if Path(path).name == "validation.jsonl":  # train.jsonl is written by then
            raise OSError("killed")
        return open(path, mode, *args, **kwargs)

    new = generate_splits(DataConfig(num_prompts=600))
    with monkeypatch.context() as patch:
        patch.setattr(data, "open", dying_open, raising=False)
        with pytest.raises(OSError, match="killed"):
            write_splits(new, out)
    assert load_splits(out) == old  # not the new train split beside the old validation and test ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp directory left
    write_splits(new, out)
    assert load_splits(out) == new
    assert (out / "README.md").read_text() == "about these splits\n"  # the user's files are carried over
    assert (out / "notes" / "a.txt").read_text() == "kept\n"


def test_a_data_directory_without_heldout_loads_and_only_asking_for_it_fails(tmp_path):
    """heldout.jsonl is optional, as for the reward model: train and test load without it, and an
    evaluation that asks for heldout names the missing file."""
    from apps.debias.evaluate import DebiasEvalConfig, evaluate

    splits = generate_splits(DataConfig(num_prompts=60))
    write_splits({k: v for k, v in splits.items() if k != "heldout"}, tmp_path / "d")
    loaded = load_splits(tmp_path / "d")
    assert sorted(loaded) == ["test", "train", "validation"] and loaded["train"] == splits["train"]
    config = DebiasEvalConfig(
        model="unused", reward_model="unused", data_dir=str(tmp_path / "d"), splits=("test", "heldout")
    )
    with pytest.raises(FileNotFoundError, match=r"heldout.jsonl"):
        evaluate(config)


def test_rewriting_without_heldout_drops_the_old_heldout_file(tmp_path):
    """Old split files are not carried over: a stale heldout.jsonl beside new train rows would be loaded."""
    splits = generate_splits(DataConfig(num_prompts=60))
    write_splits(splits, tmp_path)
    (tmp_path / "notes.txt").write_text("kept\n")
    write_splits({k: v for k, v in splits.items() if k != "heldout"}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    assert sorted(load_splits(tmp_path)) == ["test", "train", "validation"]


def test_a_reward_model_trained_on_other_splits_is_refused_naming_both():
    from reward_models.pairs import data_record

    splits = generate_splits(DataConfig(num_prompts=60))
    record = data_record("/data/rm", splits)
    data.check_reward_model_data("rm", record, splits, None)  # the same rows: no error
    other = generate_splits(DataConfig(num_prompts=60, seed=1, heldout_category="age"))
    with pytest.raises(ValueError) as error:
        data.check_reward_model_data("rm", record, other, None)
    message = str(error.value)
    assert "rm: trained on /data/rm (held-out: hukou)" in message
    assert "uses splits generated in memory (seed 0) (held-out: age)" in message
    assert "whose train, validation, test, heldout rows differ; pass --data-dir /data/rm" in message


def test_check_without_a_record_only_notes_it(capsys):
    data.check_reward_model_data("rm", None, {}, None)
    assert "note: rm has no record of its training data" in capsys.readouterr().out


def test_split_sizes_round_each_fraction_of_the_rest():
    assert data.split_sizes(50, 0.1, 0.2) == {"train": 35, "validation": 5, "test": 10}
    splits = generate_splits(DataConfig(num_prompts=120, validation_fraction=0.1, test_fraction=0.2))
    assert [len(splits[name]) for name in data.SPLITS] == [70, 10, 20, 20]


def test_responses_fill_capitalised_slots():
    rows = generate_splits(DataConfig(num_prompts=120))["train"]
    assert all(row[key][:1].isupper() for row in rows for key in ("neutral", "biased", "off_topic", "prompt"))
    assert data._fill("{Plural} and {plural}", plural="women") == "Women and women"


def test_num_prompts_is_bounded_by_the_scarcest_category_drawn_in_turn():
    """Gender has the fewest distinct prompts (1,152); as the fourth category drawn in turn it runs out after
    row 3 + 6 x 1152 = 6915. A larger num_prompts is refused at once (it drew for minutes, then a traceback)."""
    assert distinct_prompts("gender") == 1152 and max_prompts() == (6915, "gender")
    with pytest.raises(
        ValueError, match="num_prompts must be <= 6915, got 6916: .* only 1152 distinct prompts of gender"
    ):
        DataConfig(num_prompts=6916)
    rows = [row for split in generate_splits(DataConfig(num_prompts=6915)).values() for row in split]
    gender = [row["prompt"] for row in rows if row["category"] == "gender"]
    assert len(rows) == 6915 and len(gender) == len(set(gender)) == 1152
