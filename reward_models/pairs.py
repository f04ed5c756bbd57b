"""The reward model's data format: one row per prompt with four responses and the head targets they imply.

A row (JSONL, one per line; apps/debias/data.py writes them):
    {"id", "prompt", "category",
     "neutral"   -> fairness 1, relevance 1, quality 1
     "biased"    -> fairness 0, relevance 1, quality 1
     "off_topic" -> fairness 1, relevance 0, quality 1   (a fair answer to another question)
     "garbled"   -> quality 0, fairness and relevance of its source
     "garbled_source": "neutral" | "biased"}
A data directory holds train.jsonl, validation.jsonl, test.jsonl and optionally heldout.jsonl.
"""

import hashlib
import json
from pathlib import Path

from core.data import InputError, read_jsonl

HEADS = ("fairness", "relevance", "quality")
RESPONSE_KINDS = ("neutral", "biased", "off_topic", "garbled")
REQUIRED = ("prompt", "category", *RESPONSE_KINDS, "garbled_source")


def labels(row: dict, kind: str) -> dict[str, float]:
    """Targets of the three heads for one of a row's responses.

    >>> labels({"garbled_source": "biased"}, "garbled")
    {'fairness': 0.0, 'relevance': 1.0, 'quality': 0.0}
    >>> labels({}, "off_topic")
    {'fairness': 1.0, 'relevance': 0.0, 'quality': 1.0}
    """
    if kind == "garbled":
        return {**labels(row, row["garbled_source"]), "quality": 0.0}
    if kind not in RESPONSE_KINDS:
        raise ValueError(f"unknown response kind {kind!r}; valid: {', '.join(RESPONSE_KINDS)}")
    return {
        "fairness": 0.0 if kind == "biased" else 1.0,
        "relevance": 0.0 if kind == "off_topic" else 1.0,
        "quality": 1.0,
    }


def read_rows(path: str | Path) -> list[dict]:
    """Rows of one split file; a malformed line or a missing or wrong field is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} does not exist (write the splits with `grpo-suite debias data`)"
        )
    rows = []
    for number, row in read_jsonl(path):
        bad = [name for name in REQUIRED if not isinstance(row.get(name), str) or not row[name]]
        if bad:
            raise ValueError(f"{path}:{number}: missing or non-string field(s) {', '.join(bad)}")
        if row["garbled_source"] not in ("neutral", "biased"):
            raise ValueError(f"{path}:{number}: garbled_source must be 'neutral' or 'biased'")
        row.setdefault("id", f"{path.stem}-{number}")
        rows.append(row)
    if not rows:
        raise InputError(f"data file {path} has no rows")
    return rows


def read_split(data_dir: str | Path, split: str) -> list[dict]:
    return read_rows(Path(data_dir) / f"{split}.jsonl")


def rows_digest(rows: list[dict]) -> str:
    """sha256 of the rows as canonical JSON: the same rows give the same digest, from a file or generated."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def differing_splits(record: dict, splits: dict[str, list[dict]]) -> list[str]:
    """Names of `splits` whose rows are not those `record` (a `data_record`) saved under the same name."""
    return [
        name
        for name, saved in record["splits"].items()
        if name in splits and rows_digest(splits[name]) != saved["sha256"]
    ]


def data_record(data_dir: str | Path, splits: dict[str, list[dict]]) -> dict:
    """What a reward model is trained on, saved with it: the data directory and per split its categories
    (the held-out one is in `heldout` only) and `rows_digest`."""
    return {
        "data_dir": str(Path(data_dir).resolve()),
        "splits": {
            name: {"categories": sorted({r["category"] for r in rows}), "sha256": rows_digest(rows)}
            for name, rows in splits.items()
        },
    }
