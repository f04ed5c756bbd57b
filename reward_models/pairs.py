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
from collections.abc import Iterable
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
    """Rows of one split file; a malformed line, a missing, blank or wrong field or an id written twice is
    an error naming file and line."""
    return [row for _, row in _numbered_rows(Path(path))]


def _numbered_rows(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} does not exist (write the splits with `grpo-suite debias data`)"
        )
    rows = []
    ids: dict[str, int] = {}
    for number, row in read_jsonl(path):
        bad = [name for name in REQUIRED if not isinstance(row.get(name), str) or not row[name].strip()]
        if bad:
            raise InputError(f"{path}:{number}: missing, blank or non-string field(s) {', '.join(bad)}")
        if row["garbled_source"] not in ("neutral", "biased"):
            raise InputError(f"{path}:{number}: garbled_source must be 'neutral' or 'biased'")
        row.setdefault("id", f"{path.stem}-{number}")
        if not isinstance(row["id"], str) or not row["id"].strip():
            raise InputError(f"{path}:{number}: id must be a non-blank string, got {row['id']!r}")
        first = ids.setdefault(row["id"], number)
        if first != number:
            raise InputError(f"{path}:{number}: id {row['id']!r} is also the id of line {first}")
        rows.append((number, row))
    if not rows:
        raise InputError(f"data file {path} has no rows")
    return rows


def read_split(data_dir: str | Path, split: str) -> list[dict]:
    return read_rows(Path(data_dir) / f"{split}.jsonl")


def read_splits(data_dir: str | Path, names: Iterable[str]) -> dict[str, list[dict]]:
    """The named splits of a data directory (each as `read_rows`), refused where they leak into each other:
    a prompt written twice (in one split or in two), or in train or validation a row of a category the
    held-out split holds (that category is for evaluation on an unseen category only)."""
    if Path(data_dir).is_file():
        raise InputError(f"{data_dir} is a file; expected a directory of split files (train.jsonl, ...)")
    paths = {name: Path(data_dir) / f"{name}.jsonl" for name in names}
    numbered = {name: _numbered_rows(path) for name, path in paths.items()}
    seen: dict[str, str] = {}
    for name, rows in numbered.items():
        for number, row in rows:
            where = f"{paths[name]}:{number}"
            first = seen.setdefault(row["prompt"], where)
            if first != where:
                raise InputError(f"{where}: the prompt {row['prompt']!r} is also at {first}")
    heldout = {row["category"] for _, row in numbered.get("heldout", [])}
    for name in ("train", "validation"):
        for number, row in numbered.get(name, []):
            if row["category"] in heldout:
                raise InputError(
                    f"{paths[name]}:{number}: category {row['category']!r} is held out "
                    f"({paths['heldout']} holds it): its rows belong in the held-out split only"
                )
    return {name: [row for _, row in rows] for name, rows in numbered.items()}


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
