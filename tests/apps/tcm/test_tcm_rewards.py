"""TCM rewards on hand-written completions: answer extraction (full-width, lower case, several letters,
missing tags, text outside the tags, Chinese and English cues), strict format, tag count, fill-in and
open-QA scoring, and the 5:1:1 rubric."""

import time

import pytest

from apps.tcm.rewards import (
    accuracy,
    answer_text,
    build_rubric,
    extract_letters,
    fill_answer,
    free_answer,
    normalized_match,
    rouge_l,
    strict_format,
    tag_count,
    zh_tokens,
)


def wrap(answer: str, think: str = "麻黄性温。") -> str:
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


SINGLE = {"id": "s", "type": "single", "answer": "B"}
MULTIPLE = {"id": "m", "type": "multiple", "answer": "ACD"}


@pytest.mark.parametrize(
    ("completion", "letters"),
    [
        (wrap("B"), "B"),
        (wrap("Ｂ"), "B"),  # full-width letter
        (wrap("（Ｂ）"), "B"),  # full-width brackets
        (wrap("答案：Ｂ"), "B"),  # full-width colon
        (wrap("b"), "B"),  # lower case, alone
        (wrap("b."), "B"),  # lower case, a full stop after it
        (wrap("b。"), "B"),
        (wrap("a.c"), "AC"),  # lower case with the separators upper case takes
        (wrap("b 和 d"), "BD"),
        (wrap("a与c及e"), "ACE"),
        (wrap("答案是b"), "B"),  # lower case after a cue
        (wrap("选B项"), "B"),
        (wrap("B项正确"), "B"),
        (wrap("选项B"), "B"),
        (wrap("答案为 B。"), "B"),
        (wrap("The answer is b."), "B"),  # English cue, lower case
        (wrap("Answer: B"), "B"),  # the A of "Answer" is not a letter answer
        (wrap("A is wrong; the answer is B"), "B"),  # a cue wins over an earlier standalone letter
        (wrap("B、C"), "BC"),  # several letters: all of them, in order
        (wrap("ACD"), "ACD"),
        (wrap("A，C，D"), "ACD"),
        (wrap("a、c、d"), "ACD"),
        (wrap("A和C和D"), "ACD"),
        (wrap("D C A"), "DCA"),
        (wrap("A.C.D"), "ACD"),  # dots between letters
        (wrap("A. C. D"), "ACD"),
        (wrap("B. 麻黄"), "B"),  # a dot after the letter and its option's text
        (wrap("C，因为选项A和B都不对"), "C"),  # the answer first, options named after it
        (wrap("C。选项A错误"), "C"),
        (wrap("选项A错误，答案是C"), "C"),  # a stated answer wins over an option named earlier
        (wrap("选b"), "B"),  # an option cue reads lower case
        (wrap("b. 寒"), "B"),  # lower case with an option mark, in brackets or after 答：
        (wrap("ｂ．寒"), "B"),
        (wrap("b）寒"), "B"),
        (wrap("(b) 寒"), "B"),
        (wrap("答：b"), "B"),
        (wrap("It is a herb"), ""),  # an English word's letters are not answers
        (wrap("e.g. 麻黄"), ""),
        (wrap("(a herb) 麻黄"), ""),
        (wrap("It contains vitamin c."), ""),  # a lower-case letter in prose is not an option letter
        (wrap("This is type a."), ""),
        (wrap("维生素c、维生素e含量高，选D"), "D"),
        (wrap("富含维生素e、故选B"), "B"),
        (wrap("see (a) above. Therefore C"), "C"),
        (wrap("b. 寒\nD"), "D"),  # a capital wins over a lower-case letter with only a mark
        (wrap("a. 辛\nc. 苦\nd. 甘"), "ACD"),  # lower-case options, one a line
        (wrap("See the note.\n(b) 寒"), "B"),
        ("答案是C", "C"),  # missing tags: the whole completion
        ("<think>\n想一想A和B\n</think>\n答案是C", "C"),  # missing answer tags: the think block is ignored
        ("我觉得是A\n<answer>\nB\n</answer>\n其实是C", "B"),  # text outside the tags is ignored
        ("<think>\nA\n</think>\n<answer>\n答案是B", "B"),  # an unclosed answer: to the end
        ("<think>\n想\n<answer>\nB", "B"),
        (wrap("B，D"), "BD"),  # a comma between letters that end the answer
        (wrap("B,D"), "BD"),
        (wrap("B，D项正确"), "BD"),
        (wrap("答案是B、D，A和C错误"), "BD"),  # letters named after a comma in commentary are not answers
        (wrap("BD，A不对"), "BD"),
        (wrap("答案是BD. A is wrong"), "BD"),
        (wrap("B、D，A、C错误"), "BD"),
        (wrap("B，D正确"), "B"),  # the cost: D followed by text reads as commentary
        (wrap("A，C，D均正确"), "A"),
        (wrap("A. 辛\nC. 苦\nD. 甘"), "ACD"),  # options with their texts, one a line
        (wrap("A、辛；C、苦；D、甘"), "ACD"),
        (wrap("A（辛）、C（苦）、D（甘）"), "ACD"),
        (wrap("B. 温性，C. 苦味"), "BC"),
        (wrap("A，C，D\n解析：B错误"), "ACD"),  # an explanation line ends the answer
        (wrap("A, C, D\nExplanation: B is wrong"), "ACD"),
        (wrap("ACD\nB不对"), "ACD"),
        (wrap("选项A、选项C、选项D"), "ACD"),
        (wrap("A项、C项、D项"), "ACD"),
        (wrap("A, C and D"), "ACD"),
        (wrap("BD, A and C are wrong"), "BD"),
        (wrap("答案：BD。A项错误"), "BD"),  # after 。 or a line end, a letter followed by text is commentary
        (wrap("AC。B项是寒性"), "AC"),
        (wrap("BD\nA. 错误\nC. 错误"), "BD"),  # an option text that is a judgement is commentary
        (wrap("BD\nA：不对"), "BD"),
        (wrap("A. 辛。C. 苦。D. 甘"), "ACD"),
        (wrap("A\nC\nD"), "ACD"),
        (wrap("- A\n- C\n- D"), "ACD"),  # a list: its marks before the letters are not text
        (wrap("* A. 辛\n* C. 苦"), "AC"),
        (wrap("1. A\n2) C\n3、D"), "ACD"),
        (wrap("-A\n-C\n解析：B错误"), "AC"),
        (wrap("• b. 寒\n• d. 苦"), "BD"),
        (wrap("1. 辛温\n2. 选C"), "C"),  # a numbered line that is not a letter keeps its number out
        (wrap("['A', 'C']"), "AC"),  # quoted letters
        (wrap("“B”"), "B"),
        (wrap("The answer isn't 'A'"), ""),
        (wrap("答案：\n- A\n- C"), "AC"),  # a list after an intro line ending in a colon
        (wrap("B\n\n1. A：属于寒证\n2. C：属于热证"), "B"),  # a list after the answer is commentary
        (wrap("ACD\n- B：不属于解表药"), "ACD"),
        (wrap("C\n- A（辛温）"), "C"),
        (wrap("The answer is b and a herb"), "B"),
        (wrap("答案不是A，是B"), "B"),  # a negated letter is not the answer
        (wrap("答案不是Ａ，是Ｂ"), "B"),
        (wrap("答案不是A而是B"), "B"),
        (wrap("不选A，选B"), "B"),
        (wrap("非A，选B"), "B"),
        (wrap("答案不是选项A，而是选项B"), "B"),
        (wrap("不是A和C，是B"), "B"),  # a run of negated letters
        (wrap("答案不是A，是B和D"), "BD"),
        (wrap("not A, it is B"), "B"),
        (wrap("Not A. B"), "B"),
        (wrap("The answer isn't A, it's B"), "B"),
        (wrap("ｎｏｔ Ａ，ｂｕｔ Ｂ"), "B"),
        (wrap("麻黄性温"), ""),  # no letter
        (wrap("Ephedra"), ""),  # letters inside a Latin word are not answers
        ("", ""),
    ],
)
def test_extract_letters(completion, letters):
    assert extract_letters(completion) == letters


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        (wrap("B"), 1.0),
        (wrap("Ｂ"), 1.0),
        (wrap("b"), 1.0),
        (wrap("C"), 0.0),
        (wrap("B、C"), 1.0),  # single choice: the first letter found, as the paper reads it
        (wrap("C、B"), 0.0),
        ("答案是B", 1.0),
        ("选B", 1.0),
        ("the answer is B", 1.0),
        ("答案不是A，是B", 1.0),  # the negated letter is not read
        ("The answer is not A but B", 1.0),
        ("富含维生素e、故选B", 1.0),  # the e of 维生素e is not an option letter
        ("维生素c含量高，选B", 1.0),
        ("It contains vitamin b.", 0.0),  # no answer
        ("This is type b.", 0.0),
        (wrap(""), 0.0),
    ],
)
def test_single_choice_accuracy(completion, reward):
    assert accuracy(completion, SINGLE) == reward


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        (wrap("ACD"), 1.0),
        (wrap("D、A、C"), 1.0),  # order does not matter
        (wrap("ａｃｄ"), 1.0),  # full-width lower case
        (wrap("A,C,D,A"), 1.0),  # repeats are one letter
        (wrap("AC"), 0.0),  # a subset is wrong
        (wrap("ABCD"), 0.0),  # a superset is wrong
        ("答案是A、C、D", 1.0),  # missing tags
        (wrap("A、C、D，B和E错误"), 1.0),  # commentary after the answer
        (wrap("ACD，B不对"), 1.0),
        (wrap("答案不是B，是A、C和D"), 1.0),  # a negated letter is not in the set
        (wrap("选A、C、D，不选B"), 1.0),
        (wrap("A. 辛\nC. 苦\nD. 甘"), 1.0),  # common layouts, each letter read
        (wrap("A（辛）、C（苦）、D（甘）"), 1.0),
        (wrap("A，C，D\n解析：B错误"), 1.0),
        (wrap("选项A、选项C、选项D"), 1.0),
        (wrap("A项、C项、D项"), 1.0),
        (wrap("A, C and D"), 1.0),
        (wrap("答案：ACD。B项错误"), 1.0),  # commentary after 。 or a line end is not read
        (wrap("ACD\nB. 错误\nE. 错误"), 1.0),
        (wrap("AC\nD. 甘"), 1.0),  # a further option with its text, alone on its line
    ],
)
def test_multiple_choice_accuracy(completion, reward):
    assert accuracy(completion, MULTIPLE) == reward


@pytest.mark.parametrize(
    ("prediction", "gold", "match"),
    [
        ("温", "温", True),
        (" 温。", "温", True),
        ("微温", "温", False),
        ("膀胱、肺", "肺、膀胱", True),  # item order does not matter
        ("肺，膀胱", "肺、膀胱", True),  # full-width comma as the separator
        ("肺", "肺、膀胱", False),
        ("Warm.", "warm", True),
        ("ＷＡＲＭ", "warm", True),
        ("", "温", False),
        ("解少阳", "和解少阳", False),  # 和 inside a word is not a separator
        ("营卫、调", "调和营卫", False),
        ("和解少阳。", "和解少阳", True),
        ("膀胱 肺", "肺、膀胱", True),  # spaces separate items when the gold has several
        ("膀胱　肺", "肺、膀胱", True),
        ("膀胱 肺", "肺", False),
        ("和解 少阳", "和解少阳", True),  # one gold item: spaces are removed, not split at
        ("15g", "1.5g", False),  # numbers keep their punctuation
        ("1.5", "15", False),
        ("39g", "3～9g", False),
        ("3-9", "39", False),
        ("10", "10%", False),
        ("4/3", "3/4", False),  # not split at a "/" between digits
        ("１．５ｇ。", "1.5g", True),  # full-width, punctuation around the number
        ("1.5 g", "1.5g", True),
        ("3 - 9g", "3～9g", True),  # any range mark
        ("10%。", "10%", True),
        ("3/4", "３／４", True),
        ("1.5g 肺", "肺、1.5g", True),
        ("温/热", "热、温", True),  # a "/" not between digits separates items
        ("10 %", "10%", True),  # spaces inside a number do not count
        ("10 %", "10", False),
        ("3 / 4", "34", False),
        ("3 / 4", "3/4", True),
        ("1 . 5g", "15g", False),
        ("1 . 5g", "1.5g", True),
        ("3-9g", "3～9 g", True),
        ("１.５g", "1.5g", True),
        ("肺经", "肺", True),  # a meridian with or without 经
        ("膀胱经、肺经", "肺、膀胱", True),
        ("肺经 膀胱经", "肺、膀胱", True),
        ("肺", "肺经", True),
        ("心包经", "心包", True),
        ("调", "调经", False),  # 经 ends other words: only an organ's is dropped
        ("通经", "通", False),
        ("肺经经", "肺", False),
        ("膀胱、肺、", "肺、膀胱", True),  # a separator after the last item
        ("膀胱；肺", "肺、膀胱", True),  # full-width semicolon as the separator
        ("膀胱;肺", "肺、膀胱", True),
        ("", "——", False),  # no words match nothing, not even a gold of punctuation alone
        ("。", "？", False),
    ],
)
def test_normalized_match(prediction, gold, match):
    assert normalized_match(prediction, gold) is match


@pytest.mark.parametrize(
    ("answer", "letters"),
    [
        ("A, B, C, D, E, " * 270, "ABCDE"),
        ("A，B，C，D，" * 500, "ABCD"),
        ("A," * 2000, "A"),
        ("答案是" + "A," * 2000 + "x", "A"),
        ("A " * 2000 + "x", "A"),
        ("a " * 2000 + "z", ""),
        ("not" + " " * 4000 + "麻黄, B", "B"),  # the spaces after a negation
        ("不是" + " " * 4000 + "麻黄，B", "B"),
    ],
)
def test_long_answers_are_read_in_linear_time(answer, letters):
    """4,000 characters of letters and separators took seconds to minutes (regex backtracking, cubic in the
    length: "A,"*1000 7.5 s); one pass takes milliseconds, so 0.5 s only fails on the old complexity."""
    start = time.perf_counter()
    assert extract_letters(wrap(answer)) == letters
    assert time.perf_counter() - start < 0.5


def test_fill_and_open_accuracy():
    fill = {"type": "fill", "question": "麻黄归____经。", "answer": "肺、膀胱"}
    assert accuracy(wrap("膀胱，肺"), fill) == 1.0
    assert accuracy(wrap("肺"), fill) == 0.0
    assert accuracy("<think>\n想\n</think>\n膀胱、肺", fill) == 1.0  # missing answer tags
    open_qa = {"type": "open", "answer": "发汗解表，宣肺平喘，利水消肿"}
    assert accuracy(wrap("发汗解表，宣肺平喘，利水消肿"), open_qa) == pytest.approx(1.0)
    # jieba: 发汗/解表/宣肺/平喘 against 6 reference words; LCS 4 -> P 1, R 2/3, F 0.8
    assert accuracy(wrap("发汗解表，宣肺平喘"), open_qa) == pytest.approx(0.8)
    assert accuracy(wrap(""), open_qa) == 0.0


@pytest.mark.parametrize(
    ("question", "answer", "gold", "score"),
    [
        ("麻黄归____经。", "麻黄归肺、膀胱经。", "肺、膀胱", 1.0),  # the question restated, blank filled
        ("麻黄归____经。", "麻黄归膀胱经、肺经", "肺、膀胱", 1.0),  # no final 。, meridians with 经
        ("麻黄归____经。", "麻黄归肺经。", "肺、膀胱", 0.0),  # filled wrongly
        ("麻黄归____经。", "麻黄归经。", "肺、膀胱", 0.0),  # nothing filled in
        ("麻黄归＿＿＿经。", "麻黄归肺、膀胱经．", "肺、膀胱", 1.0),  # full-width blank and stop
        ("麻黄性（  ）。", "麻黄性温。", "温", 1.0),  # a bracket blank
        ("牡丹皮的功效：清热凉血，____。", "牡丹皮的功效：清热凉血，活血化瘀。", "活血化瘀", 1.0),
        ("The herb is ____ in nature.", "the herb is warm in nature.", "Warm", 1.0),
        ("细辛性____。", "麻黄性温。", "温", 0.0),  # another herb's sentence
        ("麻黄归____经。", "麻黄归肺、膀胱经。因其辛温", "肺、膀胱", 0.0),  # text after the sentence
        ("____和____同用。", "麻黄和桂枝同用。", "麻黄、桂枝", 0.0),  # two blanks: read as it is
    ],
)
def test_a_fill_answer_restating_the_question_is_read_as_its_filled_blank(question, answer, gold, score):
    """After GRPO the tiny model answered 麻黄归____经。 with 麻黄归肺、膀胱经。: a right answer, scored 0."""
    assert accuracy(wrap(answer), {"type": "fill", "question": question, "answer": gold}) == score


def test_a_fill_or_open_answer_opened_by_an_answer_cue_is_read_without_it():
    """答案：温 scored 0 against 温, though 答案：B reads B for a choice question."""
    fill = {"type": "fill", "question": "麻黄性____。", "answer": "温"}
    for answer in ("答案：温", "答案是温", "答：温", "Answer: 温", "答案 : 温"):
        assert accuracy(wrap(answer), fill) == 1.0, answer
    assert accuracy(wrap("答案：寒"), fill) == 0.0
    open_qa = {"type": "open", "answer": "发汗解表，宣肺平喘"}
    assert accuracy(wrap("答：发汗解表，宣肺平喘"), open_qa) == pytest.approx(1.0)


def test_truncated_answer_is_scored_without_its_tag():
    """Generation cut at max_new_tokens leaves <answer> unclosed: its text is the answer, the format fails."""
    fill = "<think>\n麻黄性温。\n</think>\n<answer>\n温"
    assert accuracy(fill, {"type": "fill", "question": "麻黄性____。", "answer": "温"}) == 1.0
    assert strict_format(fill, {}) == 0.0
    open_qa = "<think>\n想\n</think>\n<answer>\n发汗解表，宣肺平喘"
    assert answer_text(open_qa) == "\n发汗解表，宣肺平喘"
    assert accuracy(open_qa, {"type": "open", "answer": "发汗解表，宣肺平喘"}) == pytest.approx(1.0)
    assert answer_text("<think>A</think> 答案是C</answer>") == " 答案是C"  # a stray tag is removed
    assert answer_text("<think>\n想\n<answer>\n温") == "\n温"  # the think block is not closed either


def test_rouge_l_uses_chinese_words():
    assert zh_tokens("发汗解表，宣肺平喘。") == ["发汗", "解表", "宣肺", "平喘"]
    assert rouge_l("宣肺平喘，发汗解表", "发汗解表，宣肺平喘") == pytest.approx(0.5)  # LCS 2 of 4 words
    assert rouge_l("", "发汗解表") == 0.0


@pytest.mark.parametrize(
    ("completion", "strict", "tags"),
    [
        (wrap("B"), 1.0, 1.0),
        (wrap("B") + "\n", 1.0, 1.0),  # trailing whitespace is fine
        ("前言" + wrap("B"), 0.0, 1.0),  # text before the think block
        (wrap("B") + "后记", 0.0, 1.0),  # text after the answer block
        ("<think>麻黄性温。</think><answer>B</answer>", 0.0, 0.0),  # tags without their newlines
        ("<think>\n麻黄性温。\n</think>\nB", 0.0, 0.5),  # missing answer tags
        ("<think>\n想\n</think>\n<answer>\nA\n</answer>\n<answer>\nB\n</answer>", 0.0, 0.5),  # answered twice
        ("B", 0.0, 0.0),
        # a tag inside the think block: not the format, though every tag the format needs is there
        ("<think>\n想\n<answer>\nA\n</think>\n<answer>\nB\n</answer>", 0.0, 0.75),
        ("<think>\n想\n</think>\n再想\n</think>\n<answer>\nB\n</answer>", 0.0, 0.75),
        (
            "<answer>\nB\n</answer>",
            0.0,
            0.25,
        ),  # "\n<answer>\n" needs a newline before it; "\n</answer>" is there
    ],
)
def test_format_rewards(completion, strict, tags):
    assert strict_format(completion, {}) == strict
    assert tag_count(completion, {}) == tags


def test_rubric_weights_five_one_one():
    rubric = build_rubric()
    assert rubric.weights == {"accuracy": 5.0, "strict_format": 1.0, "tag_count": 1.0}
    table = rubric.score([wrap("B"), wrap("C"), "答案是B"], [SINGLE] * 3)
    assert table.total.tolist() == [7.0, 2.0, 5.0]


def test_rubric_weights_go_to_their_own_rewards():
    """Non-default weights 4:2:3: the format weight scales strict_format and the tag weight tag_count."""
    rubric = build_rubric(4.0, 2.0, 3.0)
    assert rubric.weights == {"accuracy": 4.0, "strict_format": 2.0, "tag_count": 3.0}
    # B right without answer tags: accuracy 1, strict 0, tags 0.5; C wrong in format: 0, 1, 1
    table = rubric.score(["<think>\n想\n</think>\nB", wrap("C")], [SINGLE] * 2)
    assert table.total.tolist() == [4.0 + 3.0 * 0.5, 2.0 + 3.0]


@pytest.mark.parametrize(
    "answer",
    ["A不对，答案为C", "A是错的。答案为C", "A项不符，答案应为C", "答案为：C，A错", "B. 寒有误，答案为c"],
)
def test_answer_is_cue_wins_over_an_earlier_letter(answer):
    """答案为X states the answer as 答案是X does: a letter named before it is commentary."""
    assert extract_letters(wrap(answer)) == "C"
    assert accuracy(wrap(answer), {"type": "single", "answer": "C"}) == 1.0


def test_the_first_answer_block_is_the_answer():
    """Answered twice: the first <answer> is read (and the format fails), not the later one."""
    twice = "<think>\n想\n</think>\n<answer>\nB\n</answer>\n<answer>\nC\n</answer>"
    assert answer_text(twice) == "\nB\n"
    assert accuracy(twice, SINGLE) == 1.0 and accuracy(twice, {"type": "single", "answer": "C"}) == 0.0
    fill = "<think>\n想\n</think>\n<answer>\n温\n</answer>\n<answer>\n寒\n</answer>"
    assert accuracy(fill, {"type": "fill", "question": "麻黄性____。", "answer": "温"}) == 1.0


def test_an_answer_cue_is_removed_only_where_it_opens_the_answer():
    """答：X opens the answer X; a cue later in the text is part of it (the text before it is not dropped)."""
    assert free_answer(wrap("答：发汗解表")) == "发汗解表"
    assert free_answer(wrap("宣肺平喘，答：发汗解表")) == "宣肺平喘，答：发汗解表"
    assert free_answer(wrap("麻黄性温。答案是温")) == "麻黄性温。答案是温"


@pytest.mark.parametrize(
    ("answer", "question", "read"),
    [
        ("麻黄归经。", "麻黄归____经。", "麻黄归经。"),  # the question restated with nothing filled: as it is
        ("麻黄性。", "麻黄性____。", "麻黄性。"),
        # two blanks: never cut as if the first were the only one
        ("麻黄性温，味", "麻黄性____，味____。", "麻黄性温，味"),
        ("麻黄归肺经。", "麻黄归____经。", "肺"),  # one blank, filled: the filled part
    ],
)
def test_fill_answer_reads_only_a_filled_single_blank(answer, question, read):
    assert fill_answer(wrap(answer), question) == read
