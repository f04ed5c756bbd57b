"""reward_models/pairs.py: the head labels, the checks on a split file's rows, the rows' digest and the
training-data record."""

import json
from pathlib import Path

import pytest

from reward_models.pairs import data_record, labels, read_rows, rows_digest

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
    with pytest.raises(ValueError, match=r"train.jsonl:2: missing or non-string field\(s\) neutral$"):
        read_rows(path)
    assert [r["id"] for r in read_rows(write_rows(tmp_path / "ok.jsonl", ROW, ROW))] == ["ok-1", "ok-2"]


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
