"""core/data.py: the data-file readers (errors name the file and the line or row, nothing is read silently
wrong) and the seeded prompt order."""

import re

import pytest

from core.data import (
    InputError,
    PromptSampler,
    check_prompt_lengths,
    read_examples,
    read_jsonl,
    read_located_examples,
)


def test_malformed_data_rows_name_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"train.jsonl:3: not valid JSON"):
        read_examples(path, ["prompt"])
    path.write_text('{"prompt": "a", "answer": "1"}\n{"question": "b"}\n')  # every missing field named
    with pytest.raises(InputError, match=r"train.jsonl:line 2: missing field\(s\) prompt, answer$"):
        read_examples(path, ["prompt", "answer"])
    csv = tmp_path / "train.csv"
    csv.write_text("prompt,answer\nhello,1\n,2\n")
    with pytest.raises(ValueError, match=r"train.csv:line 3: missing field\(s\) prompt"):
        read_examples(csv, ["prompt"])
    path.write_text('{"prompt": "a\u2028b\u0085c"}\r\n\n{"prompt": "d\u2029"}\n', encoding="utf-8")
    assert [e["prompt"] for e in read_examples(path, ["prompt"])] == ["a\u2028b\u0085c", "d\u2029"]
    path.write_text('{"prompt": "a\u2028"}\n{"prompt": "b"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train.jsonl:2: not valid JSON"):
        read_examples(path, ["prompt"])
    path.write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b"}\n')
    assert [e["id"] for e in read_examples(path, ["prompt"])] == ["x", "train-1"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_examples(tmp_path / "missing.jsonl", ["prompt"])
    with pytest.raises(
        InputError, match=r"is a directory, expected a data file \(.jsonl, .json, .csv or .parquet\)"
    ):
        read_examples(tmp_path, ["prompt"])


def test_encodings_a_bom_and_non_utf8_text(tmp_path):
    """A byte order mark is dropped in every text format (JSONL refused it before); text in another
    encoding is an error naming the file (a bare UnicodeDecodeError before)."""
    for name, text in (
        ("bom.jsonl", '{"prompt": "a"}\n'),
        ("bom.csv", "prompt\na\n"),
        ("bom.json", '{"prompt": "a"}\n{"prompt": "b"}\n'),
    ):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        assert read_examples(tmp_path / name, ["prompt"])[0]["prompt"] == "a"
    for name in ("latin.jsonl", "latin.csv", "latin.json"):
        (tmp_path / name).write_bytes("prompt\ncaf\u00e9\n".encode("latin-1"))
        with pytest.raises(InputError, match=rf"{name}: not UTF-8 text \(byte 10: 0xe9\)"):
            read_examples(tmp_path / name, ["prompt"])


def test_csv_rows_are_located_where_they_begin_and_a_repeated_column_is_refused(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('prompt,answer\n"one\ntwo\nthree",1\n,2\n')  # row 1 spans lines 2-4; row 2 on line 5
    with pytest.raises(InputError, match=r"multi.csv:line 5: missing field\(s\) prompt"):
        read_examples(path, ["prompt"])
    path.write_text("prompt,answer\na,1,extra\n")
    with pytest.raises(InputError, match=r"multi.csv:2: more fields than the header has columns"):
        read_examples(path, ["prompt"])
    path.write_text("prompt,answer\na,1\n\n\n,3\n")  # blank lines before the row on line 5
    with pytest.raises(InputError, match=r"multi.csv:line 5: missing field\(s\) prompt"):
        read_examples(path, ["prompt"])
    path.write_bytes(b'prompt,answer\r\n"x\r\ny",1\r\n')  # a quoted field keeps its line end as written
    assert read_examples(path, ["prompt"])[0]["prompt"] == "x\r\ny"
    path.write_text("prompt,prompt\na,b\n")  # csv.DictReader would keep "b" alone
    with pytest.raises(InputError, match=r"multi.csv:1: column\(s\) prompt more than once in the header"):
        read_examples(path, ["prompt"])


def test_a_csv_row_with_a_multi_line_field_is_located_at_its_first_line(tmp_path):
    path = tmp_path / "multi.csv"
    # row 1 spans lines 2-3; row 2 begins on line 4, spans lines 4-6 and lacks its answer
    path.write_text('prompt,answer\n"one\ntwo",1\n"three\nfour\nfive",\n')
    with pytest.raises(InputError, match=r"multi.csv:line 4: missing field\(s\) answer$"):
        read_examples(path, ["prompt", "answer"])
    path.write_text('prompt,answer\n"one\ntwo",1\n"three\nfour",2\n')
    where = [where for where, _ in read_located_examples(path, ["prompt", "answer"])]
    assert where == [f"{path}:line 2 (id 'multi-0')", f"{path}:line 4 (id 'multi-1')"]


@pytest.mark.parametrize("name", ["blank.jsonl", "blank.csv"])
def test_a_field_of_only_whitespace_is_missing(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"prompt": "   \\t\\n"}\n' if name.endswith(".jsonl") else 'prompt,answer\n"  ",1\n')
    with pytest.raises(InputError, match=rf"{name}:line \d: missing field\(s\) prompt$"):
        read_examples(path, ["prompt"])
    path.write_text('{"prompt": "a", "id": "  "}\n' if name.endswith(".jsonl") else "prompt,id\na,  \n")
    assert read_examples(path, ["prompt"])[0]["id"] == "blank-0"  # a blank id is given one


def test_a_json_file_of_one_object_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{"prompt": "a", "options": ["x", "y"]}')
    assert read_examples(path, ["prompt"]) == [{"prompt": "a", "options": ["x", "y"], "id": "one-0"}]
    path.write_text('{"prompt": ["a", "b"], "answer": ["1", "2"]}')  # columns
    assert [row["prompt"] for row in read_examples(path, ["prompt"])] == ["a", "b"]


def test_the_prompt_order_resumes_only_over_as_many_examples():
    examples = [{"id": str(i), "prompt": str(i)} for i in range(8)]
    sampler = PromptSampler(examples, seed=3)
    sampler.take(26)
    state = sampler.state_dict()
    assert state == {"epoch": 3, "index": 2, "examples": 8}
    resumed = PromptSampler(examples, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(10) == sampler.take(10)
    with pytest.raises(ValueError, match="prompt order is over 8 examples, this run has 1"):
        PromptSampler(examples[:1], seed=3).load_state_dict(state)  # an IndexError before


READER_ERRORS = [
    (
        "dup.jsonl",
        '{"id": "x", "prompt": "a"}\n{"id": "y", "prompt": "b"}\n{"id": "x", "prompt": "c"}\n',
        r"dup.jsonl:line 3: id 'x' is also the id of line 1",
    ),
    (
        "cols.json",
        '{"prompt": ["a", "b"], "answer": ["1"]}',
        r"cols.json: columns of different lengths \{'prompt': 2, 'answer': 1\}",
    ),
    ("list.jsonl", '{"prompt": "a"}\n\n[1, 2]\n', r"list.jsonl:3: expected a JSON object, got list"),
    ("rows.json", '[{"prompt": "a"}, 7]', r"rows.json:row 2: expected a JSON object, got int"),
    ("text.json", '"just text"', r"text.json: expected a list of objects or an object of columns"),
    ("bad.json", '[{"prompt": "a"},\n {"prompt": }]', r"bad.json:2:13: not valid JSON"),
    ("empty.jsonl", "\n\n", r"data file \S*empty.jsonl has no rows"),
    ("empty.csv", "prompt\n", r"data file \S*empty.csv has no rows"),
    ("empty.json", "[]", r"data file \S*empty.json has no rows"),
    ("data.txt", "a\n", r"data file \S*data.txt: expected .jsonl, .json, .csv or .parquet"),
]


@pytest.mark.parametrize(("name", "text", "message"), READER_ERRORS, ids=[row[0] for row in READER_ERRORS])
def test_every_reader_error_names_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=message):
        read_examples(tmp_path / name, ["prompt"])


def test_a_cut_off_last_line_is_left_out_with_a_warning_naming_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    with pytest.warns(UserWarning, match=r"log.jsonl:3: the last line has no line end"):
        rows = list(read_jsonl(path, cut_off_end=True))
    assert rows == [(1, {"step": 1}), (2, {"step": 2})]
    with pytest.raises(InputError, match=r"log.jsonl:3: not valid JSON"):
        list(read_jsonl(path))


def test_each_epoch_is_a_fresh_seeded_permutation():
    examples = [{"id": str(i), "prompt": str(i)} for i in range(10)]
    sampler = PromptSampler(examples, seed=5)
    epoch0, epoch1 = sampler.take(10), sampler.take(10)
    assert sampler.state_dict() == {"epoch": 1, "index": 10, "examples": 10}
    for epoch in (epoch0, epoch1):
        assert sorted(e["id"] for e in epoch) == sorted(e["id"] for e in examples)
    assert epoch0 != epoch1
    again = PromptSampler(examples, seed=5)
    assert again.take(20) == epoch0 + epoch1
    assert PromptSampler(examples, seed=6).take(10) != epoch0
    with pytest.raises(ValueError, match="no training examples"):
        PromptSampler([], seed=5)


def test_ids_that_differ_only_in_type_are_the_same_id(tmp_path):
    """Ids are compared as strings: 1 and "1" name the same example (and an unhashable id is no crash)."""
    path = tmp_path / "ids.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n')
    with pytest.raises(InputError, match=r"ids.jsonl:line 2: id '1' is also the id of line 1"):
        read_examples(path, ["prompt"])
    path.write_text('{"id": [1, 2], "prompt": "a"}\n{"id": [3], "prompt": "b"}\n')
    assert [row["id"] for row in read_examples(path, ["prompt"])] == [[1, 2], [3]]


def test_a_json_file_of_one_object_per_line_is_located_by_line(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    where = [where for where, _ in read_located_examples(path, ["prompt"])]
    assert where == [f"{path}:line 1 (id 'lines-0')", f"{path}:line 3 (id 'lines-1')"]


def test_parquet_rows_are_numbered_from_one(tmp_path):
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    pyarrow = pytest.importorskip("pyarrow")
    path = tmp_path / "train.parquet"
    pyarrow_parquet.write_table(pyarrow.table({"prompt": ["a", None], "answer": ["1", "2"]}), path)
    with pytest.raises(InputError, match=r"train.parquet:row 2: missing field\(s\) prompt$"):
        read_examples(path, ["prompt"])
    pyarrow_parquet.write_table(pyarrow.table({"prompt": ["a", "b"]}), path)
    where = [where for where, _ in read_located_examples(path, ["prompt"])]
    assert where == [f"{path}:row 1 (id 'train-0')", f"{path}:row 2 (id 'train-1')"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "Parquet file size is 0 bytes"),
        (b"not parquet, but long enough", "Parquet magic bytes not found"),
    ],
)
def test_a_parquet_file_that_is_not_one_is_named(tmp_path, content, reason):
    path = tmp_path / "train.parquet"
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: not a readable Parquet file \({reason}"):
        read_examples(path, ["prompt"])


def test_a_complete_last_line_is_read_without_a_warning(tmp_path, recwarn):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    assert list(read_jsonl(path, cut_off_end=True)) == [(1, {"step": 1}), (2, {"step": 2})]
    assert not [w for w in recwarn if "no line end" in str(w.message)]


def test_a_json_file_of_one_empty_object_is_one_row(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text("{}")
    assert read_examples(path, []) == [{"id": "obj-0"}]
    with pytest.raises(InputError, match=r"obj.json:row 1: missing field\(s\) prompt"):
        read_examples(path, ["prompt"])


class CharTokenizer:
    """One token per character, as `tokenizer(texts, add_special_tokens=False)["input_ids"]` is read."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def test_prompt_lengths_may_fill_the_context_exactly_but_not_pass_it():
    examples = [{"id": "a", "prompt": "abc"}, {"id": "b", "prompt": "abcd"}]
    check_prompt_lengths(examples[:1], CharTokenizer(), max_new_tokens=5, max_context=8)
    check_prompt_lengths(examples, CharTokenizer(), max_new_tokens=5, max_context=None)
    with pytest.raises(InputError, match=r"example 'b': prompt of 4 tokens \+ max_new_tokens 5 exceeds .* 8"):
        check_prompt_lengths(examples, CharTokenizer(), max_new_tokens=5, max_context=8)


def test_a_prompt_of_no_tokens_is_refused():
    examples = [{"id": "a", "prompt": "abc"}, {"id": "b", "prompt": ""}]
    with pytest.raises(InputError, match="example 'b': the prompt has no tokens"):
        check_prompt_lengths(examples, CharTokenizer(), max_new_tokens=1, max_context=None)


def test_neighbouring_seeds_do_not_share_epoch_orders():
    """Seed 1's first epoch is not seed 0's second epoch: runs of consecutive seeds draw unrelated orders."""
    examples = [{"id": str(i), "prompt": str(i)} for i in range(20)]
    seed0 = PromptSampler(examples, seed=0)
    seed0.take(20)
    assert seed0.take(20) != PromptSampler(examples, seed=1).take(20)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "missing.txt"])
def test_a_missing_data_file_is_named_as_missing_whatever_its_kind(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=rf"data file \S*{name} does not exist"):
        read_examples(tmp_path / name, ["prompt"])
