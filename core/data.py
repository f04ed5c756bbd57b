"""Examples for training: loading local data files and iterating over prompts in a seeded order.

An example is a dict with at least `id` and `prompt` (the full prompt text, already templated by the
app) plus whatever fields the app's reward functions read (`answer`, `solution`, ...).
"""

import csv
import io
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch


class InputError(ValueError):
    """A data file that cannot be read as examples, or a setting the data does not allow; the message names
    the file (and line, row or field) or the flag. The command line shows it as an error without a
    traceback (core.cli)."""


def read_text(path: Path) -> str:
    """The file as UTF-8 text, a byte order mark dropped; text in another encoding is an error naming the
    file and the byte."""
    try:
        return path.read_bytes().decode("utf-8-sig")  # line ends as written: a CSV field keeps its "\r\n"
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}: {err.object[err.start]:#04x})") from err


def read_jsonl(path: Path, cut_off_end: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file, in order; a line that is not a JSON
    object is an error naming the file and the line (raised when the reader gets there). With
    `cut_off_end`, a last line without its line end (a log whose writer was killed mid-line) is left out
    with a warning naming it."""
    # Split on "\n" only: str.splitlines also splits on U+2028, U+2029 and U+0085, which a JSON string may
    # hold raw (json.dumps(..., ensure_ascii=False) writes them so); a "\r" before it is whitespace to JSON.
    lines = read_text(path).split("\n")
    if cut_off_end and lines[-1]:
        message = f"{path}:{len(lines)}: the last line has no line end (cut off by a kill): left out"
        warnings.warn(message, stacklevel=2)
        lines[-1] = ""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each row of a CSV file with a header, every value a string as written:
    `datasets`' CSV reader infers column types, which turns a fill-in answer `0.50` into `0.5` and an id
    `007` into `7`. A row with more fields than the header is an error naming the line."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    repeated = sorted({name for name in reader.fieldnames or [] if reader.fieldnames.count(name) > 1})
    if repeated:  # DictReader would keep the last of them without a word
        raise InputError(f"{path}:1: column(s) {', '.join(repeated)} more than once in the header")
    for row in reader:
        # the line the row begins on: its last line less the line ends inside its quoted fields (blank
        # lines before it are skipped by the reader)
        start = reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str))
        if None in row:
            raise InputError(f"{path}:{start}: more fields than the header has columns")
        yield start, row


def read_json(path: Path) -> Iterator[tuple[str, dict]]:
    """("row N" from 1, object) for each row of a JSON file: a list of objects, or an object of columns
    (each a list, all of one length). A file of one object per line is read as JSONL ("line N"), one object
    alone as one row. A syntax
    error names the file, line and column; a row that is not an object names the file and the row."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a complete value, then more: one object per line
            yield from ((f"line {number}", row) for number, row in read_jsonl(path))
            return
        raise InputError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from err
    if isinstance(data, dict) and data and all(isinstance(column, list) for column in data.values()):
        lengths = {name: len(column) for name, column in data.items()}
        if len(set(lengths.values())) > 1:
            raise InputError(f"{path}: columns of different lengths {lengths}")
        data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if isinstance(data, dict):  # one object that is not columns: a file of one row (one object per line)
        data = [data]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of objects or an object of columns (lists)")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise InputError(f"{path}:row {number}: expected a JSON object, got {type(row).__name__}")
        yield f"row {number}", row


def is_missing(value) -> bool:
    """A field that is absent (None from `row.get`), null, NaN (a blank Parquet or CSV cell read by pandas,
    JSON's NaN), or only whitespace.

    >>> is_missing(None), is_missing(" "), is_missing(float("nan")), is_missing(0), is_missing("0")
    (True, True, True, False, False)
    """
    if isinstance(value, float):
        return math.isnan(value)
    return value is None or (isinstance(value, str) and not value.strip())


def read_examples(path: str | Path, required: Sequence[str]) -> list[dict]:
    """Rows of a local JSONL, JSON, CSV or Parquet file; a malformed row or a missing field is an error
    naming the file and the line (JSONL, CSV) or row. Rows without an `id` get `<file stem>-<row>`, and
    two rows with the same id are an error naming both."""
    return [row for _, row in read_located_examples(path, required)]


def read_located_examples(path: str | Path, required: Sequence[str]) -> list[tuple[str, dict]]:
    """`read_examples` with where each row came from, for an app's own error messages:
    ("<file>:line N (id 'x')" for JSONL and CSV, "<file>:row N (id 'x')" for JSON and Parquet, N from 1;
    row). A field that is absent, null or only whitespace counts as missing (`is_missing`)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory, expected a data file (.jsonl, .json, .csv or .parquet)")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = [(f"line {number}", row) for number, row in read_jsonl(path)]
    elif path.suffix == ".csv":
        rows = [(f"line {number}", row) for number, row in read_csv(path)]
    elif path.suffix == ".json":
        rows = list(read_json(path))
    elif path.suffix == ".parquet":
        from datasets import load_dataset  # heavy import, only for Parquet
        from datasets.exceptions import DatasetGenerationError

        try:
            dataset = load_dataset("parquet", data_files=str(path), split="train")
        except (ValueError, DatasetGenerationError) as err:  # pyarrow's ArrowInvalid is a ValueError
            reason = str(err).strip().splitlines()
            raise InputError(
                f"{path}: not a readable Parquet file ({reason[0] if reason else type(err).__name__})"
            ) from err
        rows = [(f"row {index}", dict(row)) for index, row in enumerate(dataset, start=1)]
    else:
        raise InputError(f"data file {path}: expected .jsonl, .json, .csv or .parquet")
    examples, first_seen = [], {}
    for index, (where, row) in enumerate(rows):
        missing = [name for name in required if is_missing(row.get(name))]
        if missing:
            raise InputError(f"{path}:{where}: missing field(s) {', '.join(missing)}")
        # `datasets` gives a row without the column a null id; JSON may write "id": null
        if is_missing(row.get("id")):
            row["id"] = f"{path.stem}-{index}"
        key = str(row["id"])
        if key in first_seen:
            raise InputError(f"{path}:{where}: id {key!r} is also the id of {first_seen[key]}")
        first_seen[key] = where
        examples.append((f"{path}:{where} (id {row['id']!r})", row))
    if not examples:
        raise InputError(f"data file {path} has no rows")
    return examples


def check_prompt_lengths(
    examples: Sequence[dict], tokenizer, max_new_tokens: int, max_context: int | None
) -> None:
    """InputError naming the first example whose `prompt` has no tokens, or whose tokens plus
    `max_new_tokens` exceed `max_context` (None: no limit)."""
    if not examples:
        return
    rows = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    for example, ids in zip(examples, rows, strict=True):
        if not ids:
            raise InputError(f"example {example['id']!r}: the prompt has no tokens")
        if max_context is not None and len(ids) + max_new_tokens > max_context:
            raise InputError(
                f"example {example['id']!r}: prompt of {len(ids)} tokens + max_new_tokens "
                f"{max_new_tokens} exceeds the model's context of {max_context} (give a "
                "smaller --max-new-tokens, a model with a longer context, or leave the example out)"
            )


class PromptSampler:
    """Endless epochs over the examples, each in a fresh order drawn from `seed` and the epoch number, so
    the order depends on nothing but (seed, position) and a resumed run continues where it stopped."""

    def __init__(self, examples: Sequence[dict], seed: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def take(self, n: int) -> list[dict]:
        batch = []
        for _ in range(n):
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order()
            batch.append(self.examples[self._order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        """The position of a saved sampler over as many examples (a checkpoint written before the count was
        saved is taken as it is): over another number the saved order means nothing."""
        saved = state.get("examples", len(self.examples))
        if saved != len(self.examples):
            raise ValueError(
                f"the checkpoint's prompt order is over {saved} examples, this run has {len(self.examples)}: "
                "resume with the data it was trained on"
            )
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order()
