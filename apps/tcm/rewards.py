"""TCM QA rewards (PAPERS.md sec. 9): accuracy, strict format and tag count, combined 5:1:1 in a Rubric.

Each reward is pure, `(completion, example) -> float`:
- `accuracy`: single choice: the first letter found (see `extract_letters`) equals the gold letter;
  multiple choice: the set of letters found equals the gold set; fill-in: normalized match
  (`normalized_match`; numbers keep their ". / % ~", spaces inside them removed: "1.5g" is not "15g",
  "1 . 5g" is "1.5g", "10 %" is "10%") of the answer, or of the filled blank when the answer restates the
  question (`fill_answer`); open QA: ROUGE-L F1 on jieba words (the paper is silent on a
  training reward for free text; we use the metric it evaluates with).
- `strict_format`: the whole completion is `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` (trailing
  whitespace allowed; no tag inside the two contents).
- `tag_count`: 0.25 for each of `<think>\\n`, `\\n</think>\\n`, `\\n<answer>\\n`, `\\n</answer>` found exactly
  once (open-r1's `tag_count_reward`, on which the paper's TRL code builds).

Answer extraction (`extract_letters`) reads the answer text (`answer_text`: the content of the first
`<answer>`, to the end if it is never closed, else the completion without its `<think>` block; leftover
tags removed), NFKC-normalised so full-width letters and punctuation (`Ｂ`, `：`, `（`) read as ASCII,
with the marks of a list of letters that opens the answer removed ("- A\\n- C", "1. A\\n2) C", "* C. 苦"; a list
after the answer is commentary and keeps them), quotes around a letter removed ("['A', 'C']"),
with letters directly after a negation (不是X, 不选X, 非X, "not X", "isn't X") removed, so "答案不是A，是B"
reads B, then reads the letters from the first of: a cue stating the answer (答案是X, 答案为X, 答案：X, 答：X,
"answer is X"; letters in either case); else the first option letter: capitals A-E not inside a Latin
word, alone or as X项, (X), and 选X, 选项X in either case, so an answer letter followed by "选项A不对" keeps
its letter (PAPERS.md sec. 9: the first standalone letter, cues as fallbacks); else, with none of those
anywhere, the first lower-case a-e that starts the answer or a line and has an option mark and text after
it on that line ("b. 寒", "b）寒", "(b) 寒"; not "vitamin c", "see (a) above", "e.g."); else a content that
is nothing but letters a-e in lower case ("a.c", "b。"). From there, letters joined by 、/和与及 or spaces
count, an option's text after a letter ("A. 辛", "A、辛", "A（辛）") is skipped, and in the first sentence
(to a 。 or a line end) letters after a clause break (,，.;；) or "and" count where they carry an option's
text or 项 or the letters after them are not followed by text on their line ("A, C and D" reads ACD,
"BD，A不对" and "BD. A is wrong" BD; the cost: "B，D正确" reads B). Each later sentence joins while it is
nothing but such letters and punctuation and none of its option texts is a judgement (错误, 不对, 正确, 对,
错, "wrong", ...): "A. 辛\\nC. 苦\\nD. 甘" and "A，C，D\\n解析：B错误" read ACD, "答案：BD。A项错误" and
"BD\\nA. 错误" BD. One pass over the text.

    rubric = build_rubric()   # weights accuracy 5, strict_format 1, tag_count 1
Tests: `pytest tests/apps/tcm/test_tcm_rewards.py`.
"""

import logging
import re
import unicodedata

import jieba
from rouge_score import rouge_scorer

from core.rewards import Rubric

jieba.setLogLevel(logging.WARNING)  # jieba announces building its dictionary on the first cut otherwise

WEIGHTS = {"accuracy": 5.0, "strict_format": 1.0, "tag_count": 1.0}

_H = r"[^\S\n]*"  # spaces within a line
# An option letter: 选/选项 before it, brackets around it and 项 after it are optional; the letters are not
# inside a Latin word and are all upper or all lower case ("ACD", "acd"), so "Answer" and "bad" hold none.
_ITEM = re.compile(
    rf"(?P<cue>选项?{_H})?(?P<open>\({_H})?(?<![A-Za-z])(?P<letters>[A-E]++|[a-e]++)(?![A-Za-z])"
    rf"(?P<close>{_H}\))?(?P<xiang>{_H}项)?"
)
# A lower-case letter's option mark with the option's text after it on its line: "b. 寒", "b）寒", "(b) 寒",
# "b. cold"; not "e.g.", "a.c" nor "c." at the end of a sentence.
_LOWER_MARK = re.compile(r"[^\S\n]*[.、:)](?:[^\S\n]*+(?=(?![A-Za-z])\w)|[^\S\n]++(?=\w))")
_JOIN = re.compile(r"(?:[^\S\n]|[、和与及/])*")  # between the letters of a segment: "A、C", "A 和 C", "ACD"
_BREAK = re.compile(rf"{_H}(?:[,，;；.。\n]\s*(?:and\b\s*)?|and\b\s*)")  # a clause break, a line end, "and"
_MARK = re.compile(rf"(?:{_H}[.、:)]|(?<=\))){_H}(?=[^\s,，;；。])")  # an option's mark before its text
_NOTE = re.compile(rf"{_H}\([^()\n]+\)")  # "A（辛）"
_OPTION_TEXT = re.compile(r"[^\n,，;；。]*")  # an option's text runs to the clause or line end
_TEXT_AFTER = re.compile(rf"{_H}\w")
_PUNCT_TO_LINE_END = re.compile(r"[^\w\n。]*(?:[\n。]|\Z)")  # nothing but punctuation to the line end or 。
# An option text that judges its option ("A. 错误", "C：对", "B. wrong"): commentary, not an answer.
_JUDGEMENT = re.compile(
    r"(?:是|is\s+)?(?:错误|不对|不正确|正确|有误|无误|[对错]的?(?!\w)|(?:in)?correct|wrong|right|true|false)"
    r"(?![A-Za-z])",
    re.IGNORECASE,
)
# Cues that state the answer ("the answer is X") win over any letter.
_ANSWER_CUE = re.compile(
    r"答(?:案\s*(?:应?[是为选])?\s*[:：]?|\s*[:：])\s*|answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE
)
# A letter (or a run joined without a clause break) directly after a negation is not an answer:
# "答案不是A，是B", "不选A", "非A", "not A", "isn't A"; the letters are removed, the negation kept.
_NEGATED = re.compile(
    r"((?:不是|不选|非|(?<![A-Za-z])(?:not|isn['’]t))\s*+(?:选项?|option)?\s*+\(?\s*+)"
    r"[A-Ea-e](?:[\s、和与及/]*[A-Ea-e])*(?![A-Za-z])",
    re.IGNORECASE,
)
# A list's mark before an option letter ("- A", "* C. 苦", "2) D", "• b. 寒"), removed from a list that opens
# the answer (`_unlist`), and quotes around a letter ("'A'"), so "['A', 'C']" reads as "[A, C]".
_BULLET = re.compile(r"[^\S\n]*(?:[-*•·]|\d{1,2}[.)、])[^\S\n]*(?=\(?(?:[A-E]+|[a-e])(?![A-Za-z]))")
_QUOTED = re.compile(r"(['\"‘’“”])([A-Ea-e])(['\"‘’“”])")
_LOWER_ONLY = re.compile(r"[\sa-e、,，;；/().。和与及]*")  # lower-case letters and separators
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)  # unclosed: to the end (truncated)
_TAG = re.compile(r"</?(?:think|answer)>")
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)
_FREE = r"(?:(?!</?think>|</?answer>).)*"
_STRICT = re.compile(rf"<think>\n{_FREE}\n</think>\n<answer>\n{_FREE}\n</answer>\s*", re.DOTALL)
_PUNCT = re.compile(r"[\s\W_]+")  # \W: neither letter/digit (CJK included) nor underscore
# Between digits a range mark is one "~" ("3～9", "3 - 9"), and ".", "/", "~" and a "%" after a digit are
# kept when punctuation is removed, so "1.5g" is not "15g" nor "3～9g" "39g".
_BLANK = re.compile(r"_{2,}|\(\s*\)")  # a fill-in question's blank, NFKC-normalised (＿＿, （ ） included)
_SENTENCE_END = re.compile(r"[\s.!?。！？]+$")
_RANGE = re.compile(r"(?<=\d)\s*[~\-–—〜]\s*(?=\d)")
# Spaces inside a number go, as they do around a range mark: "10 %" is "10%", "1 . 5g" "1.5g", "3 / 4" "3/4".
_NUMBER_SPACES = re.compile(r"(?<=\d)[^\S\n]+(?=%)|(?<=\d)[^\S\n]*([./])[^\S\n]*(?=\d)")
_PUNCT_OUTSIDE_NUMBERS = re.compile(r"(?<=\d)[./~](?=\d)|(?<=\d)%|([\s\W_])")
# Not 和/及: they are inside words as often as between items (和解少阳, 调和营卫, 理气和中); not "/" between
# digits ("3/4").
_ITEM_SPLIT = re.compile(r"[、,;]|(?<!\d)/|/(?!\d)")
# A meridian is named by its organ with or without 经 (归肺、膀胱经: 肺经 and 膀胱经); only after these organs
# is a final 经 dropped, as it ends other words (调经, 通经).
_MERIDIAN_ORGANS = frozenset("肺 大肠 胃 脾 心 小肠 膀胱 肾 心包 三焦 胆 肝".split())


def answer_text(completion: str) -> str:
    """The content of the first <answer> tag (to the end if it is never closed, as when generation stops
    at max_new_tokens), else the completion without its <think> block; any other tag is removed.

    >>> answer_text("<think>\\n想\\n</think>\\n<answer>\\nB\\n</answer>")
    '\\nB\\n'
    >>> answer_text("<think>\\n想\\n</think>\\n<answer>\\n温")
    '\\n温'
    >>> answer_text("<think>A</think> 答案是C")
    ' 答案是C'
    """
    match = _ANSWER.search(completion)
    return _TAG.sub("", match.group(1) if match else _THINK.sub("", completion))


def free_answer(completion: str) -> str:
    """A fill-in or open answer: `answer_text` without a cue that opens it (答案：温 is 温, as 答案：B is B for
    a choice).

    >>> free_answer("<think>\\n想\\n</think>\\n<answer>\\n答案：温\\n</answer>"), free_answer("答：肺、胃")
    ('温', '肺、胃')
    """
    text = answer_text(completion).strip()
    cue = _ANSWER_CUE.match(text)
    return text[cue.end() :] if cue else text


def extract_letters(completion: str) -> str:
    """The answer letters of a completion, upper case, in order of appearance without repeats ("" if none).

    >>> extract_letters("<answer>\\nＢ\\n</answer>")
    'B'
    >>> extract_letters("A不对。答案是c")
    'C'
    >>> extract_letters("<answer>A、C、D</answer>")
    'ACD'
    >>> extract_letters("<answer>\\nA. 辛\\nC. 苦\\n解析：B错误\\n</answer>")
    'AC'
    >>> extract_letters("答案不是A，是B")
    'B'
    """
    text = _QUOTED.sub(r"\2", unicodedata.normalize("NFKC", answer_text(completion)))
    text = _NEGATED.sub(r"\1", _unlist(text))
    for cue in _ANSWER_CUE.finditer(text):
        if letters := _run(text, cue.end(), any_case=True):
            break
    else:
        # a capital or 选X anywhere wins over a lower-case letter that has only its mark ("b. 寒")
        first = next((m for m in _ITEM.finditer(text) if m["cue"] or m["letters"].isupper()), None)
        if first is None:
            first = next((m for m in _ITEM.finditer(text) if _starts_option_line(m, text)), None)
        if first is not None:
            letters = _run(text, first.start(), any_case=bool(first["cue"]))
        elif text.strip() and _LOWER_ONLY.fullmatch(text):
            letters = text
        else:
            return ""
    return "".join(dict.fromkeys(ch.upper() for ch in letters if ch in "ABCDEabcde"))


def _unlist(text: str) -> str:
    """`text` with the marks removed from the list of letters it opens with (after blank lines, or a line
    ending in a colon such as 答案："), so "- A\n- C" reads as "A\nC"; a list after the answer is
    commentary and keeps its marks ("B\n1. A：属于寒证" stays B)."""
    lines = text.split("\n")
    start = 0
    while start < len(lines) and (not lines[start].strip() or lines[start].rstrip().endswith((":", "："))):
        start += 1
    end = start
    while end < len(lines) and (bullet := _BULLET.match(lines[end])):
        lines[end] = lines[end][bullet.end() :]
        end += 1
    return "\n".join(lines)


def _is_letter(item: re.Match, text: str, any_case: bool) -> bool:
    """Whether an `_ITEM` match is an option letter: upper case, or lower case after an answer cue
    (`any_case`), after 选/选项, or starting a line with its mark and text (`_starts_option_line`)."""
    return bool(any_case or item["letters"].isupper() or item["cue"] or _starts_option_line(item, text))


def _starts_option_line(item: re.Match, text: str) -> bool:
    """Whether an `_ITEM` match is one letter that starts the text or a line (spaces before it allowed) and
    is followed by an option mark and text on its line: "b. 寒", "(b) 寒"; not "vitamin c", "(a) above"
    within a sentence. The spaces before it are read once: the character before them is not a letter."""
    if len(item["letters"]) != 1 or not _LOWER_MARK.match(text, item.end("letters")):
        return False
    start = item.start()
    while start and text[start - 1] != "\n" and text[start - 1].isspace():
        start -= 1
    return start == 0 or text[start - 1] == "\n"


def _letter_at(text: str, pos: int, any_case: bool) -> re.Match | None:
    item = _ITEM.match(text, pos)
    return item if item and _is_letter(item, text, any_case) else None


def _segment(text: str, pos: int, any_case: bool) -> tuple[str, int, bool, bool]:
    """(letters, end, labelled, judged) of the letters from `pos` joined without a clause break ("A、C",
    "A和C", "A（辛）、C（苦）"); an option's text after a letter ("A. 辛", "A、辛", "(A) 辛") is skipped and makes
    the segment labelled, as 项 after its last letter does; `judged`: an option text is a judgement
    ("A. 错误")."""
    letters, end, labelled, judged = "", pos, False, False
    item = _letter_at(text, pos, any_case)
    while item:
        letters += item["letters"]
        end, labelled = item.end(), bool(item["xiang"])
        item = _letter_at(text, _JOIN.match(text, end).end(), any_case)
        if item is None and (option_text := _option_text(text, end, any_case)):
            (text_start, end), labelled = option_text, True
            judged = judged or bool(_JUDGEMENT.match(text, text_start))
            item = _letter_at(text, _JOIN.match(text, end).end(), any_case)
    return letters, end, labelled, judged


def _option_text(text: str, pos: int, any_case: bool) -> tuple[int, int] | None:
    """(start, end) of an option's text right after its letter (ending at `pos`), or None: "（辛）", ". 辛"
    to the clause or line end, unless a letter follows the mark ("A. C" is two letters)."""
    if note := _NOTE.match(text, pos):
        return note.end() - len(note[0].lstrip()) + 1, note.end()
    mark = _MARK.match(text, pos)
    if mark is None or _letter_at(text, mark.end(), any_case):
        return None
    return mark.end(), _OPTION_TEXT.match(text, mark.end()).end()


def _run(text: str, pos: int, any_case: bool) -> str:
    """The letters of the answer from `pos`. Its first sentence (to a 。 or a line end): a segment and the
    segments after clause breaks or "and", up to the last that is labelled if text follows them on their
    line ("B，D", "A, C and D", "B，D项正确"; not "BD，A不对"). Then each later sentence joins while it is
    nothing but segments and punctuation, none of its option texts a judgement ("A. 辛\\nC. 苦", "AC。D";
    not "BD。A项错误", "BD\\nA. 错误"). One pass over the text."""
    letters, start, first = "", pos, True
    while True:
        segments, brk = [], None
        segment = _segment(text, start, any_case)
        while segment[0]:
            segments.append(segment)
            brk = _BREAK.match(text, segment[1])
            if brk is None or _hard(brk):
                break
            segment = _segment(text, brk.end(), any_case)
        if not segments:
            return letters
        end = segments[-1][1]
        if first and _TEXT_AFTER.match(text, end):  # the segments after the last labelled one are commentary
            segments = segments[: max(i + 1 for i, segment in enumerate(segments) if i == 0 or segment[2])]
        elif not first and (
            any(segment[3] for segment in segments) or not _PUNCT_TO_LINE_END.match(text, end)
        ):
            return letters
        letters += "".join(segment[0] for segment in segments)
        if brk is None or not _hard(brk):
            return letters
        start, first = brk.end(), False


def _hard(brk: re.Match) -> bool:
    """Whether a clause break ends a sentence: a 。 or a line end."""
    return "\n" in brk[0] or "。" in brk[0]


def fill_answer(completion: str, question: str) -> str:
    """A fill-in answer (`free_answer`), or the filled part when the answer restates the question with its
    one blank (____, （ ）) filled, ignoring case, width and a final 。: to 麻黄归____经。 the answer
    麻黄归肺、膀胱经。 is 肺、膀胱, as a grader reads it.

    >>> fill_answer("<answer>\\n麻黄归肺、膀胱经。\\n</answer>", "麻黄归____经。")
    '肺、膀胱'
    >>> fill_answer("<answer>\\n肺、膀胱\\n</answer>", "麻黄归____经。"), fill_answer("麻黄性温", "细辛性____。")
    ('肺、膀胱', '麻黄性温')
    """
    answer = free_answer(completion)
    parts = _BLANK.split(_unify(question))
    if len(parts) != 2:
        return answer
    before, after = parts[0].lstrip(), _SENTENCE_END.sub("", parts[1])
    said = _SENTENCE_END.sub("", _unify(answer).strip())
    if len(said) > len(before) + len(after) and said.startswith(before) and said.endswith(after):
        return said[len(before) : len(said) - len(after)].strip()
    return answer


def normalize_answer(text: str) -> frozenset[str]:
    """A fill-in answer as a set of items: NFKC, lower case, split at 、,; and at / not between digits,
    punctuation and spaces removed but for numbers' (`_squash`), a meridian without its 经, so "肺、膀胱"
    matches "膀胱，肺" and "膀胱经、肺经", and "Ｗarm." matches "warm".

    >>> sorted(normalize_answer(" 膀胱经，肺。"))
    ['肺', '膀胱']
    >>> sorted(normalize_answer("3 ～ 9g、1.5g"))
    ['1.5g', '3~9g']
    """
    items = (_squash(item) for item in _ITEM_SPLIT.split(_unify(text)))
    return frozenset(_organ(item) for item in items if item)


def _organ(item: str) -> str:
    """A meridian's organ ("肺经" -> "肺"); any other item as it is ("调经")."""
    return item[:-1] if item.endswith("经") and item[:-1] in _MERIDIAN_ORGANS else item


def _unify(text: str) -> str:
    """NFKC, lower case, a range mark between digits as "~", no spaces inside a number ("1 . 5", "10 %")."""
    text = _RANGE.sub("~", unicodedata.normalize("NFKC", text).lower())
    return _NUMBER_SPACES.sub(lambda m: m[1] or "", text)


def _squash(text: str) -> str:
    """Punctuation and spaces removed, but for "." "/" "~" between digits and "%" after one."""
    return _PUNCT_OUTSIDE_NUMBERS.sub(lambda m: "" if m[1] else m[0], text)


def normalized_match(prediction: str, gold: str) -> bool:
    """Whether the two answers are the same set of items, or the same text once punctuation is removed
    (numbers keep theirs: "1.5g" is not "15g", "10%" not "10"). When the gold answer has several items,
    spaces separate the prediction's items too.

    >>> normalized_match("膀胱，肺。", "肺、膀胱")
    True
    >>> normalized_match("膀胱 肺", "肺、膀胱")
    True
    >>> normalized_match("15g", "1.5g")
    False
    """
    prediction, gold = _unify(prediction), _unify(gold)
    if _squash(prediction) == _squash(gold) != "":
        return True
    gold_items = normalize_answer(gold)
    if len(gold_items) > 1:
        prediction = re.sub(r"\s+", "、", prediction.strip())
    return bool(gold_items) and normalize_answer(prediction) == gold_items


def zh_tokens(text: str) -> list[str]:
    """Words of a (mostly Chinese) text by jieba, NFKC and lower case, punctuation and spaces dropped.

    >>> zh_tokens("发汗解表，宣肺平喘。")
    ['发汗', '解表', '宣肺', '平喘']
    """
    words = jieba.lcut(unicodedata.normalize("NFKC", text).lower())
    return [word for word in words if _PUNCT.sub("", word)]


class _JiebaTokenizer:
    """rouge-score's tokenizer interface (its default drops every non-ASCII character)."""

    def tokenize(self, text: str) -> list[str]:
        return zh_tokens(text)


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_JiebaTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score) on jieba words; 0 when either side has no words.

    >>> rouge_l("发汗解表，宣肺平喘", "发汗解表，宣肺平喘，利水消肿")
    0.8
    """
    if not zh_tokens(prediction) or not zh_tokens(reference):
        return 0.0
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def accuracy(completion: str, example: dict) -> float:
    """1.0 / 0.0 for choice and fill-in questions, ROUGE-L F1 in [0, 1] for open questions."""
    kind = example["type"]
    if kind == "single":
        letters = extract_letters(completion)
        return float(letters[:1] == example["answer"])
    if kind == "multiple":
        return float(set(extract_letters(completion)) == set(example["answer"]))
    if kind == "fill":
        return float(normalized_match(fill_answer(completion, example["question"]), example["answer"]))
    if kind == "open":
        return rouge_l(free_answer(completion), example["answer"])
    raise ValueError(f"unknown question type {kind!r}; valid: single, multiple, fill, open")


def strict_format(completion: str, example: dict) -> float:
    """1.0 if the completion is exactly one think block then one answer block.

    >>> strict_format("<think>\\n麻黄性温。\\n</think>\\n<answer>\\nA\\n</answer>", {})
    1.0
    >>> strict_format("好的。<think>\\n想\\n</think>\\n<answer>\\nA\\n</answer>", {})
    0.0
    """
    return float(_STRICT.fullmatch(completion) is not None)


def tag_count(completion: str, example: dict) -> float:
    """0.25 per tag (with its newlines) that appears exactly once.

    >>> tag_count("<think>\\nx\\n</think>\\nA", {})
    0.5
    """
    tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
    return 0.25 * sum(completion.count(tag) == 1 for tag in tags)


def build_rubric(
    accuracy_weight: float = 5.0, format_weight: float = 1.0, tag_weight: float = 1.0, on_error: str = "raise"
) -> Rubric:
    """The paper's three rewards with its 5:1:1 weights by default."""
    return Rubric(
        {"accuracy": accuracy, "strict_format": strict_format, "tag_count": tag_count},
        weights={"accuracy": accuracy_weight, "strict_format": format_weight, "tag_count": tag_weight},
        on_error=on_error,
    )
