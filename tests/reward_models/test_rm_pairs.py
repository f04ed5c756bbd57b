"""reward_models/pairs.py: the head labels, the checks on a split file's rows, the rows' digest and the
training-data record."""

import json
from pathlib import Path

import pytest

from reward_models.pairs import data_record, labels, read_rows, read_splits, rows_digest

ROW = {
    "prompt": "Should a firm hire someone from Henan?",
    "category": "region",
    "neutral": "Judge them on their skills.",
    "biased": "People from Henan are all unreliable.",
    "off_topic": "Judge the flat on its rent.",
    "garbled": "skills their Judge on them.",
    "garbled_source": "neutral",
}


def write_rows(path: Path, *rows: dict) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_labels_of_each_kind_and_an_unknown_kind_is_refused():
    """Each response kind implies its head targets; a misspelt kind is an error, not a neutral answer."""
    assert labels({}, "neutral") == {"fairness": 1.0, "relevance": 1.0, "quality": 1.0}
    assert labels({}, "biased") == {"fairness": 0.0, "relevance": 1.0, "quality": 1.0}
    assert labels({"garbled_source": "neutral"}, "garbled") == {
        "fairness": 1.0,
        "relevance": 1.0,
        "quality": 0.0,
    }
    with pytest.raises(ValueError, match=r"unknown response kind 'typo'; valid: neutral, biased"):
        labels({}, "typo")


def test_an_empty_response_is_a_missing_field(tmp_path):
    """An empty string is no response: the row is refused naming the file, line and field."""
    path = write_rows(tmp_path / "train.jsonl", ROW, dict(ROW, neutral=""))
    with pytest.raises(ValueError, match=r"train.jsonl:2: missing, blank or non-string field\(s\) neutral$"):
        read_rows(path)
    assert [r["id"] for r in read_rows(write_rows(tmp_path / "ok.jsonl", ROW, ROW))] == ["ok-1", "ok-2"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"neutral": "   "}, r"missing, blank or non-string field\(s\) neutral$"),
        ({"prompt": "\t\n", "category": " "}, r"missing, blank or non-string field\(s\) prompt, category$"),
        ({"id": 7}, "id must be a non-blank string, got 7"),
        ({"id": " "}, "id must be a non-blank string, got ' '"),
        ({"id": "a"}, "id 'a' is also the id of line 1"),
    ],
)
def test_a_blank_field_or_a_repeated_id_names_its_line(tmp_path, change, message):
    path = write_rows(tmp_path / "train.jsonl", dict(ROW, id="a"), dict(ROW, **change))
    with pytest.raises(ValueError, match=rf"train.jsonl:2: {message}"):
        read_rows(path)


def row(prompt: str, category: str = "region") -> dict:
    return dict(ROW, prompt=prompt, category=category)


def test_splits_that_leak_into_each_other_are_refused_naming_both_lines(tmp_path):
    """A prompt in two splits (or twice in one) would be trained on and evaluated on; a held-out category
    in train or validation is no longer unseen when the held-out split is evaluated."""
    write_rows(tmp_path / "train.jsonl", row("p1"), row("p2"))
    write_rows(tmp_path / "validation.jsonl", row("p3"))
    write_rows(tmp_path / "heldout.jsonl", row("h1", "age"), row("h2", "age"))
    splits = read_splits(tmp_path, ["train", "validation", "heldout"])
    assert {name: [r["prompt"] for r in rows] for name, rows in splits.items()} == {
        "train": ["p1", "p2"],
        "validation": ["p3"],
        "heldout": ["h1", "h2"],
    }
    assert splits["train"] == read_rows(tmp_path / "train.jsonl")  # the same rows as read alone

    write_rows(tmp_path / "validation.jsonl", row("p3"), row("p2"))
    with pytest.raises(
        ValueError, match=rf"validation.jsonl:2: the prompt 'p2' is also at {tmp_path}/train.jsonl:2$"
    ):
        read_splits(tmp_path, ["train", "validation"])
    write_rows(tmp_path / "validation.jsonl", row("p3"), row("p3"))
    with pytest.raises(
        ValueError, match=r"validation.jsonl:2: the prompt 'p3' is also at .*validation.jsonl:1$"
    ):
        read_splits(tmp_path, ["validation"])

    write_rows(tmp_path / "validation.jsonl", row("p3"), row("p4", "age"))
    with pytest.raises(
        ValueError, match=r"validation.jsonl:2: category 'age' is held out \(.*heldout.jsonl holds"
    ):
        read_splits(tmp_path, ["train", "validation", "heldout"])
    write_rows(tmp_path / "test.jsonl", row("t1", "age"))  # evaluation splits may hold it
    assert len(read_splits(tmp_path, ["test", "heldout"])["test"]) == 1


def test_a_garbled_source_other_than_neutral_or_biased_is_refused(tmp_path):
    """garbled_source names the clean response the garbled one came from: off_topic is not one."""
    path = write_rows(tmp_path / "test.jsonl", dict(ROW, garbled_source="off_topic"))
    with pytest.raises(ValueError, match=r"test.jsonl:1: garbled_source must be 'neutral' or 'biased'"):
        read_rows(path)


def test_the_digest_does_not_depend_on_key_order():
    """The same rows read from a file or generated in memory (keys in another order) match."""
    assert rows_digest([{"a": 1, "b": 2}]) == rows_digest([{"b": 2, "a": 1}])
    assert rows_digest([{"a": 1, "b": 2}]) != rows_digest([{"a": 1, "b": 3}])


def test_the_data_record_holds_an_absolute_data_directory(tmp_path, monkeypatch):
    """A relative --data is recorded resolved, so a run started elsewhere finds the same directory."""
    monkeypatch.chdir(tmp_path)
    record = data_record("rel/dir", {"train": [ROW]})
    assert Path(record["data_dir"]).is_absolute()
    assert record["data_dir"] == str(tmp_path.resolve() / "rel" / "dir")
    assert record["splits"] == {"train": {"categories": ["region"], "sha256": rows_digest([ROW])}}


def test_the_data_records_categories_are_sorted():
    """The record's categories are a sorted list, the same in every process (set order varies by hash seed)."""
    names = [f"category-{c}" for c in "jihgfedcba"]
    record = data_record("d", {"test": [dict(ROW, category=name) for name in names]})
    assert record["splits"]["test"]["categories"] == sorted(names)
