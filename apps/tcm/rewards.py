"""TCM QA rewards (PAPERS.md sec. 9): accuracy, strict format and tag count, combined 5:1:1 in a Rubric.

Each reward is pure, `(completion, example) -> float`:
- `accuracy`: single choice: the first letter found (see `extract_letters`) equals the gold letter;
  multiple choice: the set of letters found equals the gold set; fill-in: normalized match
  (`normalized_match`); open QA: ROUGE-L F1 on jieba words (the paper is silent on a training reward for
  free text; we use the metric it evaluates with).
- `strict_format`: the whole completion is `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` (trailing
  whitespace allowed; no tag inside the two contents).
- `tag_count`: 0.25 for each of `<think>\\n`, `\\n</think>\\n`, `\\n<answer>\\n`, `\\n</answer>` found exactly
  once (open-r1's `tag_count_reward`, on which the paper's TRL code builds).

Answer extraction (`extract_letters`) reads the answer text (`answer_text`: the content of the first
`<answer>`, to the end if it is never closed, else the completion without its `<think>` block; leftover
tags removed), NFKC-normalised so full-width letters and punctuation (`Ｂ`, `：`, `（`) read as ASCII,
with letters directly after a negation (不是X, 不选X, 非X, "not X", "isn't X") removed, so "答案不是A，是B"
reads B, then tries in order: a cue stating the answer (答案是X, 答案为X, 答案：X, "answer is X"; letters in
either case); else the earliest of an option cue (选X, 选项X, X项, either case) and a run of standalone
capital letters A-E (not inside a Latin word), so an answer letter followed by "选项A不对" keeps its
letter (PAPERS.md sec. 9: the first standalone letter, cues as fallbacks); else a content that is
nothing but letters a-e in lower case. Letters in a run may be separated by 、/和与及 or spaces, and by
,，.;； only where the letters after them are not followed by text ("B，D", "A. C. D", "B，D项"), so
"BD，A不对" and "BD. A is wrong" read BD; the cost: "B，D正确" reads B.

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

_JOIN = r"[\s、和与及/]*"  # always between two letters of a run
_SEP = r"[\s、,，;；.和与及/]*"
# A clause break (,，.;；) continues a run only if the letters after it are not followed by text, so
# commentary after the answer ("BD，A不对", "B、D，A和C错误") is not read as part of it; 项 may follow.
_BREAK = r"\s*[,，;；.]" + _JOIN
_TAIL = rf"(?=[A-Ea-e](?:{_SEP}[A-Ea-e])*+\s*+(?!(?!项)\w))"
# letters, possibly separated: "ACD", "A、C、D", "a 和 c", "B，D"
_RUN = rf"[A-Ea-e](?:(?:{_JOIN}|{_BREAK}{_TAIL})[A-Ea-e])*"
# Cues that state the answer ("the answer is X") win over any letter; cues that may only name an option
# ("选项A不对", "A项") count as letters: the earliest of them and the standalone letters wins.
_ANSWER_CUES = [
    re.compile(rf"答案\s*(?:应?[是为选])?\s*:?\s*(?:选项?)?\s*\(?\s*({_RUN})(?![A-Za-z])"),
    re.compile(rf"answer\s*(?:is|:)\s*:?\s*\(?\s*({_RUN})(?![A-Za-z])", re.IGNORECASE),
]
_OPTION_CUES = [
    re.compile(rf"选项?\s*\(?\s*({_RUN})(?![A-Za-z])"),
    re.compile(rf"(?<![A-Za-z])({_RUN})\s*\)?\s*项"),
]
# A letter (or a run joined without a clause break) directly after a negation is not an answer:
# "答案不是A，是B", "不选A", "非A", "not A", "isn't A"; the letters are removed, the negation kept.
_NEGATED = re.compile(
    rf"((?:不是|不选|非|(?<![A-Za-z])(?:not|isn['’]t))\s*(?:选项?|option)?\s*\(?\s*)"
    rf"[A-Ea-e](?:{_JOIN}[A-Ea-e])*(?![A-Za-z])",
    re.IGNORECASE,
)
_STANDALONE = re.compile(rf"(?<![A-Za-z])([A-E](?:(?:{_JOIN}|{_BREAK}{_TAIL})[A-E])*)(?![A-Za-z])")
_LOWER_ONLY = re.compile(r"[\sa-e、,，;；/().。和与及]*")  # lower-case letters with _SEP's separators
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)  # unclosed: to the end (truncated)
_TAG = re.compile(r"</?(?:think|answer)>")
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)
_FREE = r"(?:(?!</?think>|</?answer>).)*"
_STRICT = re.compile(rf"<think>\n{_FREE}\n</think>\n<answer>\n{_FREE}\n</answer>\s*", re.DOTALL)
_PUNCT = re.compile(r"[\s\W_]+")  # \W: neither letter/digit (CJK included) nor underscore
# Not 和/及: they are inside words as often as between items (和解少阳, 调和营卫, 理气和中).
_ITEM_SPLIT = re.compile(r"[、,;/]")


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


def extract_letters(completion: str) -> str:
    """The answer letters of a completion, upper case, in order of appearance without repeats ("" if none).

    >>> extract_letters("<answer>\\nＢ\\n</answer>")
    'B'
    >>> extract_letters("A不对。答案是c")
    'C'
    >>> extract_letters("<answer>A、C、D</answer>")
    'ACD'
    >>> extract_letters("答案不是A，是B")
    'B'
    """
    text = _NEGATED.sub(r"\1", unicodedata.normalize("NFKC", answer_text(completion)))
    match = next((m for cue in _ANSWER_CUES if (m := cue.search(text))), None)
    if match is None:
        found = [m for pattern in (*_OPTION_CUES, _STANDALONE) if (m := pattern.search(text))]
        match = min(found, key=lambda m: m.start(1), default=None)
    if match is None:
        if not text.strip() or not _LOWER_ONLY.fullmatch(text):
            return ""
        run = text
    else:
        run = match.group(1)
    return "".join(dict.fromkeys(ch.upper() for ch in run if ch in "ABCDEabcde"))


def normalize_answer(text: str) -> frozenset[str]:
    """A fill-in answer as a set of items: NFKC, lower case, split at 、,;/, punctuation and spaces
    removed, so "肺、膀胱" matches "膀胱，肺" and "Ｗarm." matches "warm".

    >>> sorted(normalize_answer(" 膀胱，肺。"))
    ['肺', '膀胱']
    """
    text = unicodedata.normalize("NFKC", text).lower()
    items = (_PUNCT.sub("", item) for item in _ITEM_SPLIT.split(text))
    return frozenset(item for item in items if item)


def normalized_match(prediction: str, gold: str) -> bool:
    """Whether the two answers are the same set of items, or the same text once punctuation is removed.
    When the gold answer has several items, spaces separate the prediction's items too.

    >>> normalized_match("膀胱，肺。", "肺、膀胱")
    True
    >>> normalized_match("膀胱 肺", "肺、膀胱")
    True
    """
    normalized = (
        unicodedata.normalize("NFKC", prediction).lower(),
        unicodedata.normalize("NFKC", gold).lower(),
    )
    if _PUNCT.sub("", normalized[0]) == _PUNCT.sub("", normalized[1]) != "":
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
        return float(normalized_match(answer_text(completion), example["answer"]))
    if kind == "open":
        return rouge_l(answer_text(completion), example["answer"])
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
