"""TCM data: the loader on fixture files (JSONL, CSV, Parquet; a malformed row, missing columns, bad
options), the knowledge table's consistency, the offline generator and the split by fact."""

import json
import random
from collections import Counter

import pytest

from apps.tcm.data import (
    TYPES,
    _multi,
    fact_groups,
    generate_examples,
    load_examples,
    parse_options,
    split_by_fact,
    textbook,
    textbook_entries,
)
from apps.tcm.knowledge import FORMULAS, HERBS, SYNDROMES, terms
from apps.tcm.prompts import TAGS, inline_completion, reference_completion
from apps.tcm.rewards import build_rubric
from core.data import InputError

ROWS = [
    {
        "question": "麻黄的药性是？",
        "options": {"A": "寒", "B": "温", "C": "平"},
        "answer": "B",
        "type": "单选题",
    },
    {
        "question": "麻黄归哪些经？",
        "options": ["肺", "肝", "膀胱", "心"],
        "answer": "A、C",
        "type": "multiple_choice",
    },
    {"question": "麻黄性____。", "options": None, "answer": "温", "type": "fill_in_the_blank"},
    {"question": "麻黄有哪些功效？", "answer": "发汗解表，宣肺平喘", "type": "问答题"},
    {"question": "桂枝味？", "options": "A. 辛、甘\nB. 苦\nC．咸", "answer": "ａ", "type": "single"},
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_fixture_loads_all_four_types(tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "ladder.jsonl", ROWS))
    assert [e["type"] for e in examples] == ["single", "multiple", "fill", "open", "single"]
    assert examples[0]["options"] == {"A": "寒", "B": "温", "C": "平"} and examples[0]["answer"] == "B"
    assert examples[1]["options"] == {"A": "肺", "B": "肝", "C": "膀胱", "D": "心"}
    assert examples[1]["answer"] == "AC"
    assert examples[2]["options"] == {} and examples[2]["answer"] == "温"
    assert examples[4]["options"] == {"A": "辛、甘", "B": "苦", "C": "咸"} and examples[4]["answer"] == "A"
    assert [e["id"] for e in examples] == [f"ladder-{i}" for i in range(5)]
    assert examples[2]["fact"] == "question:麻黄性____。"  # without a fact column: the question
    assert examples[0]["fact"] == "question:麻黄的药性是?|寒|平|温"  # with its option texts, NFKC


def test_repeated_questions_are_one_fact_in_one_split(tmp_path):
    rows = [
        {"question": f"问题{i}？", "options": {"A": "温", "B": "寒"}, "answer": "A", "type": "单选题"}
        for i in range(10)
    ]
    rows += [dict(rows[0], question="问题0 ?")] * 4  # the same question, spaced and half-width
    rows += [dict(rows[1], options={"A": "寒", "B": "温"}, answer="B")]  # options in another order
    rows += [dict(rows[2], options={"A": "温", "B": "凉"})]  # other options: another question
    rows += [dict(rows[3], fact="f3"), dict(rows[4], fact="f3")]  # a fact column wins
    examples = load_examples(write_jsonl(tmp_path / "dup.jsonl", rows))
    assert len({e["fact"] for e in examples}) == 12  # 10 questions, 问题2 with other options, f3
    for seed in range(5):
        splits = split_by_fact(examples, seed)
        where = {e["id"]: name for name, split in splits.items() for e in split}
        assert len({where[f"dup-{i}"] for i in (0, 10, 11, 12, 13)}) == 1
        assert where["dup-1"] == where["dup-14"] and where["dup-17"] == where["dup-16"]


def test_csv_and_parquet_fixtures(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        [
            {"question": "麻黄的药性是？", "options": json.dumps(["寒", "温"], ensure_ascii=False), "answer": "B",
             "type": "single"},
            {"question": "麻黄性____。", "options": "", "answer": "温", "type": "fill"},
        ]
    )  # fmt: skip
    frame.to_csv(tmp_path / "ladder.csv", index=False)
    frame.to_parquet(tmp_path / "ladder.parquet")
    for name in ("ladder.csv", "ladder.parquet"):
        examples = load_examples(tmp_path / name)
        assert [e["options"] for e in examples] == [{"A": "寒", "B": "温"}, {}]
        assert [e["answer"] for e in examples] == ["B", "温"]


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(ROWS[0], ensure_ascii=False), '{"question": "缺一个括号"', json.dumps(ROWS[2])]
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_examples(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "answer": "B"}, r"line 1: missing field\(s\) type"),
        ({"question": "q", "type": "fill"}, r"line 1: missing field\(s\) answer"),
        ({"question": "q", "answer": "B", "type": "essay"}, "unknown type 'essay'"),
        ({"question": "q", "answer": "B", "type": "single"}, "needs options"),
        ({"question": "q", "options": {"A": "x", "B": "y"}, "answer": "F", "type": "single"}, "not among"),
        ({"question": "q", "options": {"A": "x", "B": "y"}, "answer": "AB", "type": "single"}, "one letter"),
        (
            {"question": "q", "options": {"A": "x", "C": "y"}, "answer": "A", "type": "single"},
            "lettered A, B",
        ),
        # these loaded as the text "['a', 'b']" (or "{'a': 1}", "True") and were scored
        (
            {"question": ["a", "b"], "answer": "温", "type": "fill"},
            "field 'question' must be text or a number, got list",
        ),
        (
            {"question": {"a": 1}, "answer": "温", "type": "fill"},
            "field 'question' must be text or a number, got dict",
        ),
        (
            {"question": "q", "answer": {"a": 1}, "type": "open"},
            "field 'answer' must be text or a number, got dict",
        ),
        (
            {"question": "q", "answer": True, "type": "fill"},
            "field 'answer' must be text or a number, got bool",
        ),
        (
            {"question": "q", "answer": ["温", ["寒"]], "type": "fill"},
            "an item of field 'answer' must be text or a",
        ),
        (
            {"question": "q", "answer": [], "type": "fill"},
            "field 'answer' is a list with an empty item, or none",
        ),
        (
            {"question": "q", "answer": ["温", " "], "type": "fill"},
            "field 'answer' is a list with an empty item",
        ),
        # str() of these had been the option's, fact's or answer's text: "{'x': 1}", "['a', 'b']", "nan"
        (
            {"question": "q", "options": {"A": {"x": 1}, "B": "寒"}, "answer": "B", "type": "single"},
            "option A must be text or a number, got dict",
        ),
        (
            {"question": "q", "options": [["温"], "寒"], "answer": "B", "type": "single"},
            "option A must be text or a number, got list",
        ),
        ({"question": "q", "answer": "温", "type": "fill", "fact": ["a", "b"]}, "field 'fact' must be text"),
        ({"question": "q", "answer": float("nan"), "type": "fill"}, "line 1: missing field\\(s\\) answer"),
        (
            {"question": "q", "answer": float("inf"), "type": "fill"},
            "field 'answer' must be text or a finite",
        ),
    ],
)
def test_bad_rows_are_clear_errors(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ValueError, match=message) as error:
        load_examples(path)
    assert "bad.jsonl" in str(error.value)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples("/nonexistent/ladder.jsonl")


@pytest.mark.parametrize(
    "value",
    [
        "A、寒\nB：温",
        "Ａ．寒\nＢ．温",  # full-width letters and marks
        "A 寒\nB 温",  # a space after the letter
        "A.寒\n\nB.温\n",  # blank lines
        "A. 寒 B. 温",  # one line
        "A.寒  B、温",
        {"Ａ": "寒", "Ｂ": "温"},  # full-width keys
    ],
)
def test_parse_options_layouts(value):
    assert parse_options(value, "x") == {"A": "寒", "B": "温"}


def test_parse_options_forms():
    assert parse_options('{"A": "寒", "B": "温"}', "x") == {"A": "寒", "B": "温"}
    assert parse_options("A. 维生素B. 等\nB. 温", "x") == {"A": "维生素B. 等", "B": "温"}  # no space before B
    assert parse_options("A. 温 C. 寒\nB. 热", "x") == {
        "A": "温 C. 寒",
        "B": "热",
    }  # C is not the next letter
    with pytest.raises(ValueError, match=r"x: option line '寒' does not start with a letter A-E followed by"):
        parse_options("寒\n温", "x")
    with pytest.raises(ValueError, match=r"x: option line 'Above' does not start"):
        parse_options("A. 寒\nAbove", "x")
    with pytest.raises(ValueError, match=r"x: options must be lettered A, B, ... \(2 to 5\), got \['A'\]"):
        parse_options("A 温 B 寒", "x")  # a space alone does not split a line
    with pytest.raises(ValueError, match="x: option A is empty"):
        parse_options("A.\nB. 温", "x")
    assert parse_options(["寒", "温", None, ""], "x") == {"A": "寒", "B": "温"}  # unused last options


def test_parse_options_splits_one_line_up_to_the_last_letter():
    """Five options on one line: E is split off D as the others are (D's text is not "凉 E. 平")."""
    options = parse_options("A. 温 B. 寒 C. 热 D. 凉 E. 平", "x")
    assert options == {"A": "温", "B": "寒", "C": "热", "D": "凉", "E": "平"}
    assert parse_options({"A": "寒", "B": "温", "C": None}, "x") == {"A": "寒", "B": "温"}
    with pytest.raises(ValueError, match="x: option B is empty"):
        parse_options(["寒", None, "温"], "x")
    with pytest.raises(ValueError, match="x: option B is given twice"):
        parse_options("A. 麻黄\nB. 桂枝\nB. 甘草", "x")
    with pytest.raises(ValueError, match="x: option A is given twice"):
        parse_options({"A": "寒", "a": "温"}, "x")
    # a list written with its letters (a common export) loses them; a list without them is lettered in order
    assert parse_options(["A. 温", "B、寒", "Ｃ．热"], "x") == {"A": "温", "B": "寒", "C": "热"}
    assert parse_options(["A型", "B型"], "x") == {"A": "A型", "B": "B型"}


def test_list_options_keep_their_own_letters(tmp_path):
    """A list whose items carry their letters out of order keeps each text with its own letter (it was
    lettered by position, {"A": "B. 温", "B": "A. 寒"}, so the gold letter pointed at the other text)."""
    assert parse_options(["B. 温", "A. 寒"], "x") == {"A": "寒", "B": "温"}
    assert parse_options(["Ｃ．热", "a) 寒", "B、温"], "x") == {"A": "寒", "B": "温", "C": "热"}
    row = {"question": "麻黄的药性是？", "options": ["B. 温", "A. 寒"], "answer": "B", "type": "单选题"}
    [example] = load_examples(write_jsonl(tmp_path / "order.jsonl", [row]))
    assert example["options"] == {"A": "寒", "B": "温"}
    assert example["options"][example["answer"]] == "温"


@pytest.mark.parametrize(
    "texts",
    [
        ["寒", "温", "热", "A、B均是"],  # only some items start with a letter
        ["A、B均可", "B、C均可", "C、D均可", "以上都不是"],
        ["E. coli", "S. aureus", "B. subtilis", "C. albicans"],  # S is not an option letter
        ["E. coli", "B. subtilis", "C. albicans"],  # not the letters A, B, C
        ["A. 温", "A. 寒"],  # a letter twice
        ["B. 温", "寒"],
    ],
)
def test_list_options_are_plain_texts_unless_all_carry_the_first_letters(tmp_path, texts):
    """A list is lettered A, B, ... in order, its texts kept whole, unless every item carries a letter and
    the letters are the first ones, each once (such lists were refused as mixed, though they had loaded)."""
    expected = dict(zip("ABCDE", texts, strict=False))
    assert parse_options(texts, "x") == expected
    row = {"question": "q", "options": texts, "answer": "B", "type": "单选题"}
    [example] = load_examples(write_jsonl(tmp_path / "plain.jsonl", [row]))
    assert example["options"] == expected


def test_list_answers_and_a_fact_0(tmp_path):
    """A JSON or Parquet list answer is joined (it was read as the text "['A', 'C']"), and a `fact` of 0
    is a fact (it was taken as missing, so its questions could fall into different splits)."""
    rows = [
        {
            "question": "麻黄归哪些经？",
            "options": ["肺", "肝", "膀胱"],
            "answer": ["A", "C"],
            "type": "多选题",
        },
        {"question": "麻黄性味____。", "answer": ["辛", "温"], "type": "填空题", "fact": 0},
        {"question": "麻黄性____。", "answer": "温", "type": "填空题", "fact": 0},
    ]
    examples = load_examples(write_jsonl(tmp_path / "lists.jsonl", rows))
    assert [e["answer"] for e in examples] == ["AC", "辛、温", "温"]
    assert [e["fact"] for e in examples[1:]] == ["0", "0"]
    rows = [
        {"question": 12, "answer": 37, "type": "fill"},
        {"question": "q", "answer": [1, 2], "type": "fill"},
    ]
    examples = load_examples(write_jsonl(tmp_path / "numbers.jsonl", rows))  # numbers are taken as written
    assert [(e["question"], e["answer"]) for e in examples] == [("12", "37"), ("q", "1、2")]


def test_errors_give_the_jsonl_line(tmp_path):
    path = tmp_path / "gaps.jsonl"
    rows = [{"question": "q", "answer": "温", "type": "fill"}, {"question": "q", "answer": "B", "type": "x"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=r"gaps.jsonl:line 3 \(id 'gaps-1'\): unknown type 'x'"):
        load_examples(path)


# ---- the knowledge table and the generator -----------------------------------------------------------------


def test_knowledge_table_is_consistent():
    assert len(HERBS) >= 40 and len(FORMULAS) >= 15 and len(SYNDROMES) >= 15
    for table in (HERBS, FORMULAS, SYNDROMES):
        assert len({entry.name for entry in table}) == len(table)
    formulas = {f.name for f in FORMULAS}
    assert all(s.formula in formulas for s in SYNDROMES)
    assert len({s.formula for s in SYNDROMES}) == len(SYNDROMES)  # "which syndrome" questions are unambiguous
    assert len({"，".join(h.actions) for h in HERBS}) == len(HERBS)  # "which herb has these actions" too
    assert len({"，".join(f.actions) for f in FORMULAS}) == len(FORMULAS)
    assert all(h.gloss.isascii() and h.gloss for h in HERBS)


def test_no_option_is_true_of_the_entity_but_the_gold_ones():
    """二陈汤 offered 生姜 (a component some textbooks list) as a wrong option, and 微寒 herbs 凉 (one degree in
    many textbooks): `Formula.also` herbs and the other of 凉 / 微寒 are never distractors."""
    also = {f.name: set(f.also) for f in FORMULAS}
    assert also["二陈汤"] == {"生姜", "乌梅"} and also["逍遥散"] == {"薄荷", "生姜"}
    actions = {h.name: set(h.actions) for h in HERBS}
    for seed in range(6):  # seed 4 offered 连翘 beside 金银花 for 金银花's actions, which 连翘 has too
        for example in generate_examples(seed):
            if example["type"] not in ("single", "multiple"):
                continue
            wrong = {t for letter, t in example["options"].items() if letter not in example["answer"]}
            entity = example["fact"].split(":")[1]
            if example["fact"].endswith(":components"):
                assert not wrong & also[entity], example
            if example["fact"].endswith(":nature"):
                nature = next(h.nature for h in HERBS if h.name == entity)
                assert not (nature in {"凉", "微寒"} and {"凉", "微寒"} - {nature} <= wrong), example
            if example["fact"].startswith("herb:") and example["fact"].endswith(":actions"):
                # no wrong option is a herb with all of these actions, nor actions all of this herb's
                assert not any(actions[entity] <= actions.get(t, set()) for t in wrong), example
                assert not any(set(t.split("，")) <= actions[entity] for t in wrong), example


def test_generated_questions_are_well_formed():
    examples = generate_examples(seed=0)
    assert examples == generate_examples(seed=0)
    assert examples != generate_examples(seed=1)  # other distractors and orders
    assert set(Counter(e["type"] for e in examples)) == set(TYPES)
    assert len({e["id"] for e in examples}) == len(examples)
    rubric = build_rubric()
    for example in examples:
        options = example["options"]
        if example["type"] in ("single", "multiple"):
            assert list(options) == list("ABCDE") and len(set(options.values())) == 5, example
            assert set(example["answer"]) <= set(options) and len(example["answer"]) >= 1
            assert (len(example["answer"]) == 1) == (example["type"] == "single")
            for letter in example["answer"]:  # every correct option is stated in the fact's sentence
                assert options[letter] in example["think"] or options[letter] in example["question"], example
        else:
            assert options == {}
    table = rubric.score([reference_completion(e) for e in examples], examples)
    assert table.total.min().item() == pytest.approx(7.0)  # the reference answer earns every reward


def test_textbook_has_one_sentence_per_fact():
    examples = generate_examples(seed=0)
    assert len(textbook()) == len({e["fact"] for e in examples})
    assert "麻黄性温。" in textbook() and "四君子汤由人参、白术、茯苓、甘草组成。" in textbook()


def test_textbook_entries_hold_every_sentence_once_under_its_entity():
    entries = textbook_entries()
    assert len(entries) == len(HERBS) + len(FORMULAS) + len(SYNDROMES)
    mahuang = "麻黄性温。麻黄味辛、微苦。麻黄归肺、膀胱经。麻黄的功效：发汗解表，宣肺平喘，利水消肿。"
    assert entries["麻黄"] == mahuang
    assert entries["少阳证"] == "少阳证治宜和解少阳。少阳证的代表方是小柴胡汤。"
    assert "".join(entries.values()) == "".join(textbook())  # the same sentences, grouped by entity


def test_table_terms_are_single_tokens():
    from core.tiny import build_char_tokenizer

    words = terms()
    assert len(set(words)) == len(words) and all(len(word) >= 2 for word in words)
    assert {"麻黄", "麻黄汤", "发汗解表", "微苦", "膀胱", "少阳证", "和解少阳", "栀子"} <= set(words)
    tokenizer = build_char_tokenizer(textbook(), extra_tokens=(*TAGS, *words))
    ids = tokenizer("<think>\n麻黄汤由麻黄、桂枝组成。")["input_ids"]
    pieces = "|".join(tokenizer.decode([i]) for i in ids)
    assert pieces == "<think>|\n|麻黄汤|由|麻黄|、|桂枝|组|成|。"  # the longest term matches


def test_inline_completion_misses_the_format_only():
    example = {"type": "fill", "question": "麻黄性____。", "answer": "温", "think": "麻黄性温。"}
    scores = build_rubric().score([inline_completion(example)], [example])
    assert dict(zip(scores.names, scores.components[0].tolist(), strict=True)) == {
        "accuracy": 1.0,
        "strict_format": 0.0,
        "tag_count": 0.0,
    }


def test_split_by_fact_is_disjoint_seeded_and_80_10_10():
    examples = generate_examples(seed=0)
    splits = split_by_fact(examples, seed=3)
    group_of = fact_groups(examples)
    groups = {name: {group_of[e["fact"]] for e in split} for name, split in splits.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert [len(groups[name]) for name in ("train", "val", "test")] == [199, 25, 25]  # 249 groups
    assert sum(len(split) for split in splits.values()) == len(examples)
    assert splits == split_by_fact(examples, seed=3)
    assert splits["test"] != split_by_fact(examples, seed=4)["test"]
    with pytest.raises(ValueError, match="fractions"):
        split_by_fact(examples, seed=0, fractions=(0.8, 0.1, 0.2))


def test_identical_answers_of_two_facts_share_a_split():
    """A syndrome's principle worded as its formula's actions is one group, so no test open question
    has a training question's reference answer (15 of the 16 syndromes)."""
    examples = generate_examples(seed=2)
    group_of = fact_groups(examples)
    assert len(set(group_of)) == 264 and len(set(group_of.values())) == 249
    assert group_of["syndrome:脾胃虚寒证:principle"] == group_of["formula:理中丸:actions"]
    assert group_of["syndrome:风寒表实证:principle"] == "syndrome:风寒表实证:principle"  # its own words
    for seed in range(3):
        splits = split_by_fact(generate_examples(seed), seed)
        train_answers = {e["answer"] for e in splits["train"] if e["type"] == "open"}
        assert not [e for e in splits["test"] if e["type"] == "open" and e["answer"] in train_answers]


def test_csv_values_stay_as_written(tmp_path):
    """A CSV answer column of numbers keeps its text: `datasets` would read 4 as 4.0 and 0.50 as 0.5."""
    path = tmp_path / "numbers.csv"
    path.write_text(
        "id,question,answer,type\n007,一剂几钱____,4,fill\n008,比例____,0.50,fill\n", encoding="utf-8"
    )
    examples = load_examples(path)
    assert [(e["id"], e["answer"]) for e in examples] == [("007", "4"), ("008", "0.50")]
    path.write_text("question,answer,type\nq,4,fill,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"numbers.csv:2: more fields than the header"):
        load_examples(path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"question": "  ", "answer": "温", "type": "fill"}],
            r"blank.jsonl:line 1: missing field\(s\) question",
        ),
        (
            [{"question": "q", "answer": " \t", "type": "fill"}],
            r"blank.jsonl:line 1: missing field\(s\) answer",
        ),
        (
            [{"id": "a", "question": "q", "answer": "温", "type": "fill"}] * 2,
            r"blank.jsonl:line 2: id 'a' is also the id of line 1",
        ),
    ],
)
def test_blank_fields_and_duplicate_ids_are_errors(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_examples(write_jsonl(tmp_path / "blank.jsonl", rows))


def test_null_ids_get_the_row_id_and_rows_count_from_one(tmp_path):
    rows = [{"id": None, "question": "q", "answer": "温", "type": "fill"}] * 2
    assert [e["id"] for e in load_examples(write_jsonl(tmp_path / "nulls.jsonl", rows))] == [
        "nulls-0",
        "nulls-1",
    ]
    path = tmp_path / "gaps.json"
    path.write_text(json.dumps([{"id": "a", "question": "q", "answer": "温", "type": "fill"},
                                {"question": "q", "answer": "温", "type": "fill"},
                                {"question": "q", "type": "fill"}]))  # fmt: skip
    with pytest.raises(ValueError, match=r"gaps.json:row 3: missing field\(s\) answer"):
        load_examples(path)
    path.write_text(json.dumps([{"id": "a", "question": "q", "answer": "温", "type": "fill"},
                                {"question": "q", "answer": "温", "type": "fill"}]))  # fmt: skip
    assert [e["id"] for e in load_examples(path)] == ["a", "gaps-1"]


def test_split_fractions_other_than_80_10_10_are_cut_where_given():
    """20 one-question facts split 50/30/20 give 10/6/4 (val is the second fraction, not the third), and a
    seed gives the same split twice."""
    examples = [
        {"id": f"e{i}", "type": "fill", "question": f"q{i}", "answer": "温", "fact": f"f{i:02d}"}
        for i in range(20)
    ]
    splits = split_by_fact(examples, seed=0, fractions=(0.5, 0.3, 0.2))
    assert [len(splits[name]) for name in ("train", "val", "test")] == [10, 6, 4]
    assert splits == split_by_fact(examples, seed=0, fractions=(0.5, 0.3, 0.2))
    splits = split_by_fact(examples, seed=1, fractions=(0.0, 0.25, 0.75))
    assert [len(splits[name]) for name in ("train", "val", "test")] == [0, 5, 15]


def test_a_fact_group_is_named_by_its_first_sorted_fact():
    """Two facts whose open answers are the same words are one group named by the first fact (sorted);
    a fill-in answer shared by two facts joins nothing."""
    examples = [
        {"type": "open", "answer": "和解 少阳", "fact": "syndrome:b"},
        {"type": "open", "answer": "和解少阳", "fact": "formula:a"},
        {"type": "fill", "answer": "温", "fact": "herb:c"},
        {"type": "fill", "answer": "温", "fact": "herb:d"},
    ]
    assert fact_groups(examples) == {
        "formula:a": "formula:a",
        "syndrome:b": "formula:a",
        "herb:c": "herb:c",
        "herb:d": "herb:d",
    }


def test_type_labels_any_case_and_multiple_answers_in_letter_order(tmp_path):
    """Labels are matched in any case ("Single", " FILL "), 简答题 is an open question, and a multiple-choice
    answer written out of order or in lower case is stored as its letters in order ("C、A" -> "AC")."""
    rows = [
        {"question": "q1", "options": ["寒", "温"], "answer": "B", "type": "Single"},
        {"question": "q2", "answer": "温", "type": " FILL "},
        {"question": "q3", "answer": "发汗解表", "type": "简答题"},
        {"question": "q4", "options": ["肺", "肝", "膀胱"], "answer": "C、A", "type": "Multiple_Choice"},
        {"question": "q5", "options": ["肺", "肝", "膀胱", "心"], "answer": "d,b", "type": "多选"},
    ]
    examples = load_examples(write_jsonl(tmp_path / "labels.jsonl", rows))
    assert [e["type"] for e in examples] == ["single", "fill", "open", "multiple", "multiple"]
    assert [e["answer"] for e in examples] == ["B", "温", "发汗解表", "AC", "BD"]


def test_every_fill_in_question_with_its_answer_restates_the_fact():
    """The blank filled with the gold answer is the fact's sentence (the hidden item is the one blanked,
    the nature's answer the herb's own nature), for every fill-in question of two seeds."""
    for seed in (0, 1):
        fills = [e for e in generate_examples(seed) if e["type"] == "fill"]
        assert len(fills) == 264
        for example in fills:
            sentence = example["question"].replace("____", example["answer"])
            sentence = sentence.replace("的功效是", "的功效：").replace("的代表方为", "的代表方是")
            assert sentence == example["think"], example
    mahuang = {e["question"]: e["answer"] for e in generate_examples(0) if e["type"] == "fill"}
    assert mahuang["麻黄性____。"] == "温" and mahuang["麻黄味____。"] == "辛、微苦"


def test_multiple_choice_shows_up_to_four_correct_options():
    """A multiple-choice question shows min(4, its correct items) of them, each lettered in the answer:
    四君子汤's four components all, four of 小柴胡汤's seven, three of 黄芩's actions (the first three)."""
    true_items = {}
    for herb in HERBS:
        true_items[f"herb:{herb.name}:flavours"] = set(herb.flavours)
        true_items[f"herb:{herb.name}:meridians"] = set(herb.meridians)
        true_items[f"herb:{herb.name}:actions"] = set(herb.actions[:3])
    for formula in FORMULAS:
        true_items[f"formula:{formula.name}:components"] = set(formula.components)
    for seed in (0, 1):
        multiples = [e for e in generate_examples(seed) if e["type"] == "multiple"]
        for example in multiples:
            items = true_items[example["fact"]]
            options = example["options"]
            assert example["answer"] == "".join(sorted(k for k, v in options.items() if v in items)), example
            assert len(example["answer"]) == min(len(items), 4), example
    by_fact = {e["fact"]: e for e in generate_examples(0) if e["type"] == "multiple"}
    sijunzi = by_fact["formula:四君子汤:components"]
    assert {sijunzi["options"][letter] for letter in sijunzi["answer"]} == {"人参", "白术", "茯苓", "甘草"}
    assert len(by_fact["formula:小柴胡汤:components"]["answer"]) == 4
    assert len(by_fact["herb:黄芩:meridians"]["answer"]) == 4


def test_bitter_and_slightly_bitter_are_never_each_others_distractor():
    """苦 and 微苦 are too close to be fair: a herb with either is never offered the other as a wrong flavour."""
    seen = 0
    for seed in range(4):
        for example in generate_examples(seed):
            if not example["fact"].endswith(":flavours") or example["type"] not in ("single", "multiple"):
                continue
            herb = next(h for h in HERBS if h.name == example["fact"].split(":")[1])
            if {"苦", "微苦"} & set(herb.flavours):
                seen += 1
                wrong = {t for k, t in example["options"].items() if k not in example["answer"]}
                assert not wrong & {"苦", "微苦"}, example
    assert seen > 50


def test_user_message_labels_each_type():
    from apps.tcm.prompts import user_message

    assert user_message({"type": "fill", "question": "麻黄性____。", "options": {}}) == "填空题：麻黄性____。"
    assert user_message({"type": "open", "question": "麻黄有何功效？"}) == "问答题：麻黄有何功效？"
    multiple = {"type": "multiple", "question": "麻黄归哪些经？", "options": {"A": "肺", "B": "膀胱"}}
    assert user_message(multiple) == "多选题：麻黄归哪些经？\nA. 肺\nB. 膀胱"


class _RecordingTokenizer:
    """A chat template that writes each message as "role|content" on its own line."""

    chat_template = "role|content per line"
    name_or_path = "models/recording"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "\n".join(f"{m['role']}|{m['content']}" for m in messages) + "\nassistant|"


def test_build_prompt_uses_the_given_system_prompt():
    from apps.tcm.prompts import SHORT_SYSTEM_PROMPT, SYSTEM_PROMPT, build_prompt

    example = {"type": "fill", "question": "麻黄性____。", "options": {}}
    tokenizer = _RecordingTokenizer()
    assert build_prompt(example, tokenizer, SHORT_SYSTEM_PROMPT) == (
        f"system|{SHORT_SYSTEM_PROMPT}\nuser|填空题：麻黄性____。\nassistant|"
    )
    assert build_prompt(example, tokenizer).startswith(f"system|{SYSTEM_PROMPT}\nuser|")


def test_a_model_without_a_chat_template_is_named_before_any_prompt_is_built(tmp_path):
    """A base (not Instruct) model's tokenizer has no chat template: transformers' own error named neither
    the directory nor what to do."""
    from apps.tcm.prompts import build_prompt

    tokenizer = _RecordingTokenizer()
    tokenizer.chat_template, tokenizer.name_or_path = None, str(tmp_path / "qwen-base")
    with pytest.raises(InputError, match=r"qwen-base: its tokenizer has no chat template.*Instruct model"):
        build_prompt({"type": "fill", "question": "麻黄性____。"}, tokenizer)


def test_no_single_choice_distractor_is_another_true_item():
    """A herb's other flavours and meridians and a formula's other components are never wrong options."""
    true_items = {}
    for herb in HERBS:
        true_items[f"herb:{herb.name}:flavours"] = set(herb.flavours)
        true_items[f"herb:{herb.name}:meridians"] = set(herb.meridians)
    for formula in FORMULAS:
        true_items[f"formula:{formula.name}:components"] = set(formula.components)
    seen = 0
    for seed in (0, 1, 2):
        for example in generate_examples(seed):
            if example["type"] != "single" or example["fact"] not in true_items:
                continue
            seen += 1
            wrong = {t for k, t in example["options"].items() if k != example["answer"]}
            assert example["options"][example["answer"]] in true_items[example["fact"]], example
            assert not wrong & true_items[example["fact"]], example
    assert seen == 3 * (2 * len(HERBS) + len(FORMULAS))


def test_multi_never_offers_an_unshown_correct_item_as_wrong():
    """Five correct items, four shown: the fifth is not a distractor even when the pool holds it."""
    correct = ["肺", "脾", "胃", "心", "肾"]
    for seed in range(20):
        options, letters = _multi(random.Random(seed), correct, [*correct, "肝", "胆", "膀胱"])
        assert len(options) == 5 and len(letters) == 4
        assert {options[k] for k in letters} <= set(correct)
        wrong = {options[k] for k in set(options) - set(letters)}
        assert len(wrong) == 1 and not wrong & set(correct), (seed, options)


def test_formulas_without_extra_herbs_have_an_empty_also():
    assert all(name for formula in FORMULAS for name in formula.also)
    assert next(f for f in FORMULAS if f.name == "麻黄汤").also == ()


def test_the_seed_draws_every_entity_kinds_questions():
    """The seed draws the distractors and orders of herb, formula and syndrome questions alike."""
    first, second = generate_examples(0), generate_examples(1)
    for kind in ("herb", "formula", "syndrome"):
        a = [e for e in first if e["fact"].startswith(kind + ":")]
        b = [e for e in second if e["fact"].startswith(kind + ":")]
        assert [e["fact"] for e in a] == [e["fact"] for e in b]
        assert [e["options"] for e in a] != [e["options"] for e in b], kind


def test_single_choice_gold_is_drawn_among_the_true_items():
    """ "Which flavour / meridian" asks about any of the herb's items, not always its first."""
    golds = {"flavours": set(), "meridians": set()}
    for seed in range(3):
        for example in generate_examples(seed):
            kind = example["fact"].split(":")[-1]
            if example["type"] == "single" and example["fact"].startswith("herb:") and kind in golds:
                herb = next(h for h in HERBS if h.name == example["fact"].split(":")[1])
                items = getattr(herb, kind)
                golds[kind].add(items.index(example["options"][example["answer"]]))
    assert golds["flavours"] >= {0, 1, 2} and golds["meridians"] >= {0, 1, 2, 3}


def test_split_by_fact_refuses_negative_fractions_and_pins_its_groups():
    examples = generate_examples(seed=0)
    with pytest.raises(ValueError, match="fractions"):
        split_by_fact(examples, seed=0, fractions=(1.2, -0.1, -0.1))
    splits = split_by_fact(examples, seed=3)  # the same groups in every process (no set order)
    group_of = fact_groups(examples)
    test_groups = sorted({group_of[e["fact"]] for e in splits["test"]})
    assert test_groups[:4] == [
        "formula:四逆汤:actions",
        "formula:四逆汤:components",
        "formula:小柴胡汤:components",
        "formula:白虎汤:actions",
    ]
    assert sorted({group_of[e["fact"]] for e in splits["val"]})[:2] == [
        "formula:六味地黄丸:components",
        "formula:桂枝汤:components",
    ]


def test_a_loaded_questions_fact_ignores_case(tmp_path):
    """Without a fact column, a question repeated in another case is the same fact (one split)."""
    rows = [
        {"question": "Which herb is WARM?", "answer": "麻黄", "type": "fill"},
        {"question": "which herb is warm?", "answer": "麻黄", "type": "fill"},
    ]
    examples = load_examples(write_jsonl(tmp_path / "case.jsonl", rows))
    assert [e["fact"] for e in examples] == ["question:whichherbiswarm?"] * 2


def test_multiple_choice_answers_separated_by_semicolons(tmp_path):
    rows = [
        {"question": f"q{i}", "options": ["肺", "肝", "膀胱"], "answer": answer, "type": "多选题"}
        for i, answer in enumerate(["C；A", "A;C", "a ; c"])
    ]
    examples = load_examples(write_jsonl(tmp_path / "semi.jsonl", rows))
    assert [e["answer"] for e in examples] == ["AC", "AC", "AC"]


def test_parse_options_refuses_more_than_five_and_bad_json():
    """A sixth option was dropped without a word (lettered A-E by position); bad JSON is named as options."""
    with pytest.raises(ValueError, match=r"x: at most 5 options, got 6"):
        parse_options(["寒", "温", "热", "凉", "平", "微寒"], "x")
    with pytest.raises(ValueError, match=r"x: at most 5 options, got 6"):
        parse_options(["寒", "温", "热", "凉", "平", "微寒", None], "x")  # the empty last one aside
    with pytest.raises(ValueError, match=r"x: options are not valid JSON"):
        parse_options('{"A": "寒", "B": "温"', "x")
    with pytest.raises(ValueError, match=r"x: options are not valid JSON"):
        parse_options('["寒", "温",]', "x")


@pytest.mark.parametrize("fractions", [(0.9, 0.1), (0.5, 0.3, 0.1, 0.1), (1.0,)])
def test_split_by_fact_refuses_other_than_three_fractions(fractions):
    examples = [{"id": f"e{i}", "type": "fill", "answer": "温", "fact": f"f{i}"} for i in range(10)]
    with pytest.raises(ValueError, match=r"fractions must be three numbers >= 0 summing to 1"):
        split_by_fact(examples, seed=0, fractions=fractions)


def test_split_by_fact_cuts_at_the_cumulative_fractions():
    """Each fraction was rounded alone: a test fraction of 0 still got a group."""
    examples = [{"id": str(i), "type": "fill", "answer": "x", "fact": f"f{i}"} for i in range(5)]
    sizes = lambda fractions: [len(s) for s in split_by_fact(examples, 0, fractions).values()]  # noqa: E731
    assert sizes((0.9, 0.1, 0.0)) == [4, 1, 0]  # cuts at round(4.5) = 4 and 5
    assert sizes((0.5, 0.5, 0.0)) == [2, 3, 0]  # cuts at round(2.5) = 2 and 5
    assert sizes((0.8, 0.1, 0.1)) == [4, 0, 1]  # cuts at 4 and round(4.5) = 4
