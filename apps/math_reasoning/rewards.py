"""Math rewards (PAPERS.md sec. 1): 1.0 for a correct answer (math-verify) plus 0.25 for each closing tag
of the template's format. Rewards are pure `(completion, example) -> float`; the example carries the gold
`answer`. `rubric_for(template)` combines them with these weights.

Answers that are plain integers (the offline set, GSM8K, AIME) are compared exactly as digit strings, with
no length limit; anything else goes to math-verify (`core.answers.answers_match`).
"""

import re
from functools import partial

from apps.math_reasoning.data import BoxedText
from apps.math_reasoning.templates import Template
from core.answers import answers_match
from core.rewards import Rubric

FORMAT_WEIGHT = 0.25
# Commas only as thousands separators: "1,3" is a list of two values, left to math-verify.
# A first group of 0 ("0,500", a decimal comma) is not a thousands separator.
_INTEGER = re.compile(r"[+-]?(?:[1-9]\d{0,2}(?:,\d{3})+|\d+)")


def _integer(text: str) -> str | None:
    """A plain integer as a canonical digit string (no sign for 0, no commas or leading zeros), else None.
    The minus may be U+2212, as typeset text writes it."""
    text = text.strip().rstrip(".").replace("\u2212", "-")
    if not _INTEGER.fullmatch(text):
        return None
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("+-").replace(",", "").lstrip("0") or "0"
    return ("" if digits == "0" else sign) + digits


def same_answer(prediction: str, gold: str) -> bool:
    """True when two answers are equal: exact for plain integers (any length), math-verify otherwise.

    >>> same_answer("1,000", "1000"), same_answer("0.5", "\\\\frac{1}{2}"), same_answer("7", "8")
    (True, True, False)
    >>> same_answer("1,3", "13"), same_answer("0,500", "500")  # two values; a decimal comma
    (False, False)
    """
    a, b = _integer(prediction), _integer(gold)
    if a is not None and b is not None:
        return a == b
    return answers_match(prediction, gold)


def correctness(completion: str, example: dict, template: Template) -> float:
    """1.0 when the answer where `template` puts it equals `example["answer"]`, else 0.0.

    >>> from apps.math_reasoning.templates import get_template
    >>> t = get_template("r1_short")
    >>> correctness("3+4=7</think><answer>7</answer>", {"answer": "7"}, t), correctness("7", {"answer": "7"}, t)
    (1.0, 0.0)
    """
    answer = template.extract(completion)
    return float(answer is not None and same_answer(answer, str(example["answer"])))


def closing_tag(completion: str, example: dict, tag: str) -> float:
    """1.0 when `tag` appears in the completion (weighted 0.25 in the rubric).

    >>> closing_tag("a</think>", {}, "</think>"), closing_tag("a", {}, "</think>")
    (1.0, 0.0)
    """
    return float(tag in completion)


def closed_box(completion: str, example: dict) -> float:
    """1.0 when the completion has a `\\boxed{...}` whose brace closes (weighted 0.25 in the rubric): an
    open `\\boxed{7` holds no answer.

    >>> closed_box(r"so \\boxed{\\frac{1}{2}}", {}), closed_box(r"so \\boxed{7", {}), closed_box(r"\\boxed 7", {})
    (1.0, 0.0, 0.0)
    """
    boxes = BoxedText(completion)
    opened = (m.end() - 1 for m in re.finditer(r"\\boxed\{", completion))
    return float(any(boxes.content(i) is not None for i in opened))


def format_rewards(template: Template) -> dict:
    """The format components of a template: `</think>` and `</answer>` for the tag templates; a closed
    `\\boxed{...}` for the boxed one (its only tag)."""
    if template.answer_style == "boxed":
        return {"format_boxed": closed_box}
    return {
        "format_think": partial(closing_tag, tag="</think>"),
        "format_answer": partial(closing_tag, tag="</answer>"),
    }


def rubric_for(template: Template, on_error: str = "raise") -> Rubric:
    """correctness (weight 1.0) + each format component (weight 0.25)."""
    funcs = {"correct": partial(correctness, template=template), **format_rewards(template)}
    weights = {name: 1.0 if name == "correct" else FORMAT_WEIGHT for name in funcs}
    return Rubric(funcs, weights=weights, on_error=on_error)
