"""Math data: loaders for the usual benchmark files, and the offline default, a generated set of arithmetic
word problems with step-by-step solutions and tiered hints.

Every loader returns examples `{"id", "question", "answer", "source", ...}` (the prompt is rendered later by
`templates.py`); a missing field is an error naming the file and the row.

    grpo-suite math data --out-dir runs/math/data      # writes train.jsonl, test.jsonl, sft.jsonl

Offline problems (`generate_problem`): a start amount and `steps` additions or subtractions told as a short
story, e.g. "Ann has 47 apples. Ann buys 38 more. Ann loses 19. How many apples now?" -> 66. Difficulty
knobs: digits of the numbers, steps, and a minimum number of carries/borrows. `LEVELS` fixes three
levels; level 3 (three digits, four steps, many carries) is the hard tail where a small model's groups all
fail. Each problem has hints in three tiers (PAPERS.md sec. 2, Scaf-GRPO), each a list of chunks:
knowledge (what the verbs mean, how to carry), planning (the operations in order), solution (each step
worked out). All of it is a pure function of the seed.
"""

import json
import random
import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core.atomic import write_atomic
from core.data import is_missing, read_located_examples
from core.runs import refuse_a_file_in_the_way

HINT_TIERS = ("knowledge", "planning", "solution")
NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve", "Finn", "Gus", "Ivy")
ITEMS = ("apples", "pens", "coins", "cards", "eggs", "books", "shells", "stamps")
ADD_VERBS = ("gets", "buys", "finds")
SUB_VERBS = ("loses", "sells", "gives away")


@dataclass(frozen=True)
class Difficulty:
    """One level of the generated set: numbers of `digits` digits, `steps` operations, and at least
    `min_carries` carries or borrows over the whole solution."""

    digits: int
    steps: int
    min_carries: int = 0

    def __post_init__(self):
        if self.digits < 1 or self.steps < 1 or self.min_carries < 0:
            raise ValueError(f"need digits >= 1, steps >= 1, min_carries >= 0; got {self}")
        if self.min_carries > self.digits * self.steps:
            raise ValueError(f"{self}: at most digits * steps = {self.digits * self.steps} carries exist")


# Level 1 and 2 are what the tiny base models are fine-tuned on; level 3 is the hard tail. A mix names one
# such triple: `default` is the app's offline set; `micro` is sized so that a ~1M-parameter model reaches
# a pass@1 where GRPO has a learning signal after minutes of SFT on one CPU thread (docs/math_reasoning.md,
# "Micro reproduction"): one-digit numbers, one or two steps, and a hard tail of two-digit numbers with
# carries that the base model does not solve.
MIXES: dict[str, dict[int, Difficulty]] = {
    "default": {1: Difficulty(2, 1), 2: Difficulty(2, 2, 1), 3: Difficulty(3, 4, 5)},
    "micro": {1: Difficulty(1, 1), 2: Difficulty(1, 2), 3: Difficulty(2, 2, 2)},
}
LEVELS = MIXES["default"]
HARD_LEVEL = 3


def mix_levels(mix: str) -> dict[int, Difficulty]:
    """The levels of a named difficulty mix; an unknown name is a ValueError listing the valid ones."""
    if mix not in MIXES:
        raise ValueError(f"data_mix: unknown difficulty mix {mix!r}; valid: {', '.join(MIXES)}")
    return MIXES[mix]


def carries(a: int, b: int, op: str) -> int:
    """Carries of a + b or borrows of a - b (a >= b >= 0), column by column.

    >>> carries(47, 38, "+"), carries(85, 19, "-"), carries(12, 3, "+")
    (1, 1, 0)
    """
    count, carry = 0, 0
    while a or b:
        da, db = a % 10, b % 10
        if op == "+":
            carry = 1 if da + db + carry > 9 else 0
        else:
            carry = 1 if da - db - carry < 0 else 0
        count += carry
        a, b = a // 10, b // 10
    return count


def generate_problem(rng: random.Random, difficulty: Difficulty, max_tries: int = 1000) -> dict:
    """One word problem of the given difficulty: question, answer, solution steps and hints."""
    low, high = 10 ** (difficulty.digits - 1), 10**difficulty.digits - 1
    for _ in range(max_tries):
        value = rng.randint(low, high)
        start, ops, total_carries = value, [], 0
        for _ in range(difficulty.steps):
            b = rng.randint(low, high)
            op = "-" if b <= value and rng.random() < 0.5 else "+"
            total_carries += carries(value, b, op)
            new = value + b if op == "+" else value - b
            ops.append((value, op, b, new))
            value = new
        if total_carries >= difficulty.min_carries:
            break
    else:
        raise ValueError(f"no problem with {difficulty} found in {max_tries} tries")
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    sentences = [f"{name} has {start} {items}."]
    verbs = []
    for _, op, b, _ in ops:
        verb = rng.choice(ADD_VERBS if op == "+" else SUB_VERBS)
        verbs.append(verb)
        sentences.append(f"{name} {verb} {b}{' more' if op == '+' else ''}.")
    sentences.append(f"How many {items} now?")
    steps = [f"{a}{op}{b}={c}" for a, op, b, c in ops]
    knowledge = [
        f"'{verb}' means {'add' if verb in ADD_VERBS else 'subtract'}." for verb in dict.fromkeys(verbs)
    ]
    if total_carries:
        knowledge.append("Work right to left and carry or borrow 1 between columns.")
    planning = [f"Start at {start}."] + [f"{'Add' if op == '+' else 'Subtract'} {b}." for _, op, b, _ in ops]
    return {
        "question": " ".join(sentences),
        "answer": str(value),
        "steps": steps,
        "hints": {"knowledge": knowledge, "planning": planning, "solution": [f"{s}." for s in steps]},
        "carries": total_carries,
    }


def generate_set(
    n_per_level: dict[int, int],
    seed: int,
    split: str,
    exclude: Iterable[str] = (),
    levels: dict[int, Difficulty] = LEVELS,
) -> list[dict]:
    """`n_per_level[level]` problems of each level of `levels`, drawn from `seed`; questions in `exclude`
    (another split's) and duplicates are skipped, so splits never share a question."""
    rng = random.Random(f"math-{split}-{seed}")
    seen = set(exclude)
    examples = []
    for level, n in sorted(n_per_level.items()):
        if level not in levels:
            raise ValueError(f"unknown level {level}; valid: {sorted(levels)}")
        made, tries = 0, 0
        while made < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"level {level}: could not draw {n} distinct problems (only {made})")
            problem = generate_problem(rng, levels[level])
            if problem["question"] in seen:
                continue
            seen.add(problem["question"])
            examples.append(
                {"id": f"{split}-L{level}-{made}", "level": level, "source": "offline", **problem}
            )
            made += 1
    return examples


@dataclass(frozen=True)
class OfflineSets:
    """The offline default: RL training prompts, a held-out test set, and SFT problems (disjoint)."""

    train: list[dict]
    test: list[dict]
    sft: list[dict]


def offline_sets(
    seed: int, n_train: int = 600, n_test: int = 300, n_sft: int = 2000, mix: str = "default"
) -> OfflineSets:
    """Train: levels 1/2/3 of `mix` in 2:2:1; test: the same mix; SFT: levels 1 and 2 only, so the hard
    tail is learnt (if at all) by RL. All disjoint by question."""
    levels = mix_levels(mix)

    def ratio(n: int) -> dict[int, int]:
        two_fifths = 2 * n // 5
        return {1: two_fifths, 2: two_fifths, 3: n - 2 * two_fifths}  # sums to n

    test = generate_set(ratio(n_test), seed, "test", levels=levels)
    train = generate_set(ratio(n_train), seed, "train", [e["question"] for e in test], levels)
    taken = [e["question"] for e in test + train]
    sft = generate_set({1: n_sft // 2, 2: n_sft - n_sft // 2}, seed, "sft", taken, levels)
    return OfflineSets(train, test, sft)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object a line, written whole or not at all."""
    refuse_a_file_in_the_way(path.parent, "output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())


# ---------------------------------------------------------------------------------------------------
# Benchmark files
# ---------------------------------------------------------------------------------------------------

FORMATS = ("auto", "offline", "gsm8k", "math", "minerva", "amc", "aime")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, or None. A space may come
    before the brace, and `\\boxed 5` (no braces, as TeX allows; the MATH reference extractor reads it)
    boxes the text up to the next space or `$`, without a final full stop. A last box left open or empty
    (generation cut off) leaves the one before it.

    >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{3}")
    '3'
    >>> last_boxed(r"\\boxed{\\frac{1}{2}}"), last_boxed("none"), last_boxed(r"\\boxed{open")
    ('\\\\frac{1}{2}', None, None)
    >>> last_boxed(r"\\boxed{3} then \\boxed 5."), last_boxed(r"\\boxed {5}"), last_boxed(r"\\boxed 3.5$")
    ('5', '5', '3.5')
    >>> last_boxed(r"\\boxed{a} \\boxed{"), last_boxed(r"\\boxed{5} and then \\boxed")
    ('a', '5')
    >>> last_boxed(r"\\boxed{a} \\boxed{ }"), last_boxed(r"\\boxed{}")
    ('a', None)
    """
    boxes = BoxedText(text)
    for box in reversed(list(_BOX.finditer(text))):
        content = boxes.content(box.end())
        if content is not None and content.strip():
            return content
    return None


class BoxedText:
    """Box contents of one text in time linear in its length, however many boxes it has: a completion
    of thousands of `\\boxed{` never closed made a scan to the end per box (a minute for 8,000 of them).
    Every brace's balancing brace and every stop (a space or `$`) are found once, in one pass each."""

    def __init__(self, text: str):
        self.text = text
        self.closing: dict[int, int] = {}  # index of a "{" -> index of its balancing "}"
        still_open = []
        for brace in re.finditer(r"[{}]", text):
            if brace.group() == "{":
                still_open.append(brace.start())
            elif still_open:
                self.closing[still_open.pop()] = brace.start()
        self.stops = [stop.start() for stop in re.finditer(r"[\s$]", text)]

    def content(self, i: int) -> str | None:
        """The content of a box whose command ends at `text[i]`: up to the balancing brace when a `{` opens
        there (None when it never closes), else the token up to the next space or `$` (a sentence's full
        stop not in it)."""
        if i < len(self.text) and self.text[i] == "{":
            close = self.closing.get(i)
            return None if close is None else self.text[i + 1 : close].strip()
        next_stop = bisect_left(self.stops, i)
        end = self.stops[next_stop] if next_stop < len(self.stops) else len(self.text)
        return self.text[i:end].rstrip(".,;") or None


_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")


def _detect(row: dict, path: Path) -> str:
    if "hints" in row:
        return "offline"
    if "question" in row and "answer" in row:
        return "gsm8k"
    if "problem" in row:
        return "math"
    raise ValueError(
        f"{path}: cannot tell the format from the fields {sorted(row)}; expected question/answer (GSM8K), "
        "problem/solution or problem/answer (MATH, Minerva, AMC, AIME); pass --data-format"
    )


def check_data_format(data_format: str, field: str = "data_format") -> None:
    """A ValueError naming the field when `data_format` is not one of FORMATS."""
    if data_format not in FORMATS:
        raise ValueError(f"{field}: unknown data format {data_format!r}; valid: {', '.join(FORMATS)}")


def load_examples(path: str | Path, data_format: str = "auto") -> list[dict]:
    """Examples `{"id", "question", "answer", "source", ...}` from a local JSONL/JSON/CSV/Parquet file.

    - gsm8k: `question`, `answer` whose final answer follows `####` (commas dropped);
    - math / minerva: `problem`, and `answer` or else `solution` with a `\\boxed{}` answer;
    - amc / aime: `problem`, `answer` (numbers are read as text);
    - offline: the generated set (`question`, `answer`, `hints`).
    """
    check_data_format(data_format)
    path = Path(path)
    rows = read_located_examples(path, required=[])
    fmt = _detect(rows[0][1], path) if data_format == "auto" else data_format
    examples = []
    for where, row in rows:
        examples.append({"id": str(row["id"]), "source": fmt, **_convert(row, fmt, where)})
    return examples


def _field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if is_missing(value):
        raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: field {name!r} must be text or a number, got {type(value).__name__}")
    return str(value)


def _convert(row: dict, fmt: str, where: str) -> dict:
    if fmt == "gsm8k":
        answer = _field(row, "answer", where)
        if answer.count("####") != 1:
            found = "more than one '####'" if "####" in answer else "no '#### <final answer>' line"
            raise ValueError(f"{where}: field 'answer' has {found} (GSM8K format)")
        final = answer.split("####")[1].strip()
        if not final or "\n" in final:
            raise ValueError(
                f"{where}: field 'answer' must end with one '#### <final answer>' line, got {final!r}"
            )
        question = _field(row, "question", where)
        return {"question": question, "answer": final.replace(",", ""), **_level(row, where)}
    if fmt == "offline":
        hints = row.get("hints")
        if not isinstance(hints, dict) or any(not isinstance(hints.get(t), list) for t in HINT_TIERS):
            raise ValueError(f"{where}: field 'hints' must map {', '.join(HINT_TIERS)} to lists of chunks")
        for tier in HINT_TIERS:
            if not all(isinstance(chunk, str) and chunk.strip() for chunk in hints[tier]):
                raise ValueError(f"{where}: field 'hints': each {tier} chunk must be non-empty text")
        extra = {key: row[key] for key in ("level", "steps", "carries") if key in row}
        return {"question": _field(row, "question", where), "answer": _field(row, "answer", where)} | {
            "hints": hints,
            **extra,
        }
    question = _field(row, "problem", where)
    extra = _level(row, where)
    if fmt in ("amc", "aime") or not is_missing(row.get("answer")):
        return {"question": question, "answer": _field(row, "answer", where), **extra}
    if is_missing(row.get("solution")):
        raise ValueError(
            f"{where}: missing field 'answer' (and no 'solution' to take a \\boxed{{}} answer from)"
        )
    boxed = last_boxed(_field(row, "solution", where))
    if boxed is None:
        raise ValueError(f"{where}: field 'solution' has no \\boxed{{...}} answer and there is no 'answer'")
    return {"question": question, "answer": boxed, **extra}


def _level(row: dict, where: str) -> dict:
    """{"level": ...} of a benchmark row that has one, for `math eval`'s per-level rows: its number where
    it has one (MATH's "Level 5" -> 5), else its text ("easy", "Level ?"); {} without one."""
    if is_missing(row.get("level")):
        return {}
    text = _field(row, "level", where).strip()
    number = level_number(text)
    return {"level": text if number is None else number}


def level_number(value) -> int | None:
    """A row's difficulty level as a number ("Level 5" or 5 -> 5), None when absent or not one ("Level ?"
    in MATH). `math eval` names its per-level results by it.

    >>> level_number("Level 5"), level_number(3), level_number("Level ?"), level_number(None)
    (5, 3, None, None)
    """
    match = re.fullmatch(r"(?:level\s*)?(\d+)", str(value).strip(), re.IGNORECASE)
    return int(match.group(1)) if match and not isinstance(value, bool) else None
