"""TCM QA examples: a loader for TCM-Ladder-style files, the offline generator over the knowledge table, and
seeded 80/10/10 splits (by fact for the generated set, so no fact is asked about in two splits).

An example is a dict:
    id        unique string
    type      "single" | "multiple" | "fill" | "open"   (单选 / 多选 / 填空 / 问答)
    question  the question text (Chinese)
    options   {"A": text, ...} for the two choice types, {} otherwise
    answer    the letter(s) for choice types ("B", "ACD"), the reference text otherwise
    fact      the group a split keeps together (generated: "herb:麻黄:nature"; loaded: the `fact` column,
              else the normalised question and option texts, so a repeated question is one fact)
    think     generated only: the fact stated as a sentence (the SFT target's reasoning)

    examples = load_examples("ladder.jsonl")          # question, options, answer, type columns
    examples = generate_examples(seed=0)              # the offline default
    splits = split_by_fact(examples, seed=0)          # {"train": [...], "val": [...], "test": [...]}

Tests: `pytest tests/apps/tcm/test_tcm_data.py`.
"""

import json
import math
import random
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

from apps.tcm.knowledge import FLAVOURS, FORMULAS, HERBS, MERIDIANS, NATURES, SYNDROMES
from core.data import is_missing, read_located_examples

TYPES = ("single", "multiple", "fill", "open")
LETTERS = "ABCDE"
# Labels seen in TCM-Ladder-style files (English and Chinese) for our four types.
TYPE_ALIASES = {
    "single": "single", "single_choice": "single", "single-choice": "single", "单选": "single", "单选题": "single",
    "multiple": "multiple", "multiple_choice": "multiple", "multi_choice": "multiple", "multiple-choice": "multiple",
    "多选": "multiple", "多选题": "multiple",
    "fill": "fill", "fill_in_blank": "fill", "fill_in_the_blank": "fill", "fill-in-the-blank": "fill", "cloze": "fill",
    "填空": "fill", "填空题": "fill",
    "open": "open", "qa": "open", "open_qa": "open", "short_answer": "open", "问答": "open", "问答题": "open",
    "简答题": "open",
}  # fmt: skip
REQUIRED_COLUMNS = ("question", "answer", "type")
SPLITS = ("train", "val", "test")
# After NFKC (．：） read .:)): a letter, then a mark or a space: "A. 温", "B、寒", "C 热".
_OPTION_LINE = re.compile(r"([A-Ea-e])(?:\s*[.、:)]|\s)\s*(.*)")
_LETTERED = re.compile(r"([A-Ea-e])\s*[.、:)]\s*(.+)")  # an option with its letter and a mark
_SPACES = re.compile(r"\s+")


# ---- loading files -----------------------------------------------------------------------------------------


def load_examples(path: str | Path) -> list[dict]:
    """Examples from a local JSONL/JSON/CSV/Parquet file with columns question, options, answer, type.

    `options` (needed for choice questions) may be a mapping {"A": ...}, a list (lettered A, B, ... in
    order, or by the letters A, B, ... its items all start with: ["B. 温", "A. 寒"]; see `_list_pairs`), a
    JSON string of either, or lines "A. ..." / "A、..."; `type` takes the labels in `TYPE_ALIASES`. Errors
    name the file and the line (JSONL) or row (other formats) and the row's id."""
    path = Path(path)
    # raises on a missing file, bad JSON or a missing field
    rows = read_located_examples(path, REQUIRED_COLUMNS)
    examples = []
    for where, row in rows:
        label = str(row["type"]).strip().lower()
        if label not in TYPE_ALIASES:
            raise ValueError(
                f"{where}: unknown type {row['type']!r}; valid: {', '.join(sorted(TYPE_ALIASES))}"
            )
        kind = TYPE_ALIASES[label]
        question = _text(row["question"], "field 'question'", where)
        options = parse_options(row.get("options"), where) if kind in ("single", "multiple") else {}
        answer = _answer_text(row["answer"], kind, where)
        if kind in ("single", "multiple"):
            letters = "".join(
                sorted(set(re.sub(r"[\s,，、;；]", "", unicodedata.normalize("NFKC", answer)).upper()))
            )
            if not letters or any(letter not in options for letter in letters):
                raise ValueError(
                    f"{where}: answer {answer!r} is not among the option letters {''.join(options)}"
                )
            if kind == "single" and len(letters) != 1:
                raise ValueError(f"{where}: a single-choice answer must be one letter, got {answer!r}")
            answer = letters
        examples.append(
            {
                "id": str(row["id"]),
                "type": kind,
                "question": question,
                "options": options,
                "answer": answer,
                "fact": _question_key(question, options)
                if is_missing(row.get("fact"))
                else _text(row["fact"], "field 'fact'", where),  # a fact 0 is a fact
            }
        )
    return examples


def _text(value, what: str, where: str) -> str:
    """A text field's value, stripped; a number is taken as written (an answer 37), anything else (a list,
    an object, true) is a ValueError naming `where` and `what`: str() would give "['a', 'b']"."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: {what} must be text or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN, a blank Parquet cell
        raise ValueError(f"{where}: {what} must be text or a finite number, got {value}")
    return str(value).strip()


def _answer_text(answer, kind: str, where: str) -> str:
    """The answer as text: a list (a JSON or Parquet list column) of choice letters joined ("AC"), of
    fill-in or open answers joined with 、; str() of a list would give "['A', 'C']"."""
    if isinstance(answer, list | tuple):
        texts = [_text(a, "an item of field 'answer'", where) for a in answer]
        if not texts or not all(texts):
            raise ValueError(f"{where}: field 'answer' is a list with an empty item, or none")
        return ("" if kind in ("single", "multiple") else "、").join(texts)
    return _text(answer, "field 'answer'", where)


def _question_key(question, options: dict[str, str]) -> str:
    """A loaded row's fact: its question and option texts, NFKC, lower case, without spaces."""
    texts = [str(question), *sorted(options.values())]
    return "question:" + "|".join(_SPACES.sub("", unicodedata.normalize("NFKC", t)).lower() for t in texts)


def parse_options(value, where: str) -> dict[str, str]:
    """Choice options as {"A": text, ...} (2 to 5 of them, letters A-E in order) from a mapping, a list
    (`_list_pairs`), a JSON string or lettered lines (NFKC; blank lines skipped; "A. 温", "A、温", "A 温",
    or several on one line as "A. 温 B. 寒"); a ValueError naming `where` otherwise."""
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: options are not valid JSON ({err.msg})") from err
    if isinstance(value, dict):
        pairs = [
            (unicodedata.normalize("NFKC", str(k)).strip().upper(), v)
            for k, v in value.items()
            if not _empty(v)
        ]
    elif isinstance(value, list | tuple):
        value = list(value)
        while value and _empty(value[-1]):  # a fixed-width column: the unused last options are empty
            value.pop()
        if len(value) > len(LETTERS):
            raise ValueError(f"{where}: at most {len(LETTERS)} options, got {len(value)}")
        if any(_empty(v) for v in value):
            raise ValueError(
                f"{where}: option {LETTERS[next(i for i, v in enumerate(value) if _empty(v))]} is empty"
            )
        pairs = _list_pairs(value)
    elif isinstance(value, str) and value.strip():
        pairs = [pair for line in value.splitlines() if line.strip() for pair in _option_line(line, where)]
    else:
        raise ValueError(f"{where}: a choice question needs options, got {value!r}")
    options = {}
    for letter, text in pairs:
        if letter in options:
            raise ValueError(f"{where}: option {letter} is given twice")
        if _empty(text):
            raise ValueError(f"{where}: option {letter} is empty")
        options[letter] = _text(text, f"option {letter}", where)
    if not 2 <= len(options) <= len(LETTERS) or list(options) != list(LETTERS[: len(options)]):
        raise ValueError(f"{where}: options must be lettered A, B, ... (2 to 5), got {list(options)}")
    return options


def _list_pairs(texts: list) -> list[tuple[str, object]]:
    """The (letter, text) pairs of a list of options: by the letter each item is written with, without it,
    when every item carries one and the letters are A, B, ... (as many as the items, each once, in any
    order: ["B. 温", "A、寒"], a common export); else lettered A, B, ... in order with the texts kept whole
    (["寒", "温", "A、B均是"], ["E. coli", "S. aureus"]): a text that starts with a letter is not a label."""
    matches = [
        _LETTERED.fullmatch(unicodedata.normalize("NFKC", t).strip()) if isinstance(t, str) else None
        for t in texts
    ]
    if all(matches) and sorted(m.group(1).upper() for m in matches) == list(LETTERS[: len(texts)]):
        return sorted((m.group(1).upper(), m.group(2)) for m in matches)
    return list(zip(LETTERS, texts, strict=False))


def _option_line(line: str, where: str) -> list[tuple[str, str]]:
    """The (letter, text) pairs of one line of options: one, or several when the next letters follow in
    order after a space with a mark ("A. 温 B. 寒 C. 热"; "A 温 B 寒" stays one option)."""
    match = _OPTION_LINE.fullmatch(unicodedata.normalize("NFKC", line).strip())
    if match is None:
        raise ValueError(
            f"{where}: option line {line!r} does not start with a letter A-E followed by . 、 : ) or a space"
        )
    letter, text = match.group(1).upper(), match.group(2)
    pairs = []
    while letter < LETTERS[-1] and (cut := re.search(rf"\s{chr(ord(letter) + 1)}\s*[.、:)]\s*", text)):
        pairs.append((letter, text[: cut.start()]))
        letter, text = chr(ord(letter) + 1), text[cut.end() :]
    return [*pairs, (letter, text)]


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# ---- splitting ---------------------------------------------------------------------------------------------


def split_by_fact(
    examples: Sequence[dict], seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, list[dict]]:
    """Seeded train/val/test split of the fact groups (`fact_groups`; each goes to one split with all its
    questions): the groups are shuffled with a torch generator and cut at the cumulative fractions."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three numbers >= 0 summing to 1, got {fractions}")
    group_of = fact_groups(examples)
    groups = sorted(set(group_of.values()))
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    cut_train = round(fractions[0] * len(groups))
    cut_val = round((fractions[0] + fractions[1]) * len(groups))  # cumulative: a fraction 0 gets no group
    split_of = {}
    for rank, index in enumerate(order):
        split_of[groups[index]] = "train" if rank < cut_train else "val" if rank < cut_val else "test"
    return {name: [e for e in examples if split_of[group_of[e["fact"]]] == name] for name in SPLITS}


def fact_groups(examples: Sequence[dict]) -> dict[str, str]:
    """{fact: its group}, the first (sorted) fact of the group: facts whose open questions have the same
    reference answer (NFKC, spaces removed) are one group, as a syndrome's treatment principle and its
    formula's actions often are the same words. Fill-in answers do not join facts ("温" answers many)."""
    parent = {fact: fact for fact in sorted({e["fact"] for e in examples})}

    def root(fact: str) -> str:
        while parent[fact] != fact:
            fact = parent[fact]
        return fact

    owner: dict[str, str] = {}
    for example in examples:
        if example["type"] == "open":
            answer = _SPACES.sub("", unicodedata.normalize("NFKC", example["answer"]))
            first, second = sorted((root(owner.setdefault(answer, example["fact"])), root(example["fact"])))
            parent[second] = first
    return {fact: root(fact) for fact in parent}


# ---- the offline generator ---------------------------------------------------------------------------------


def _choice(
    rng: random.Random, correct: str, pool: Sequence[str], k: int = 5, also_true: frozenset[str] = frozenset()
) -> tuple[dict, str]:
    """Single choice: `correct` and k-1 distractors from `pool` (which must exclude it), shuffled. A draw
    holding one of `also_true` (texts true of the entity as well) is drawn again, so a question that
    draws none of them has the options it had before they were known."""
    while True:
        texts = [correct, *rng.sample(sorted(set(pool) - {correct}), k - 1)]
        if not also_true & set(texts[1:]):
            break
    rng.shuffle(texts)
    return dict(zip(LETTERS, texts, strict=False)), LETTERS[texts.index(correct)]


def _multi(rng: random.Random, correct: Sequence[str], pool: Sequence[str]) -> tuple[dict, str]:
    """Multiple choice: up to 4 of the (2 or more) correct items and distractors from `pool` up to five options."""
    chosen = rng.sample(list(correct), min(len(correct), 4))
    texts = chosen + rng.sample(sorted(set(pool) - set(correct)), 5 - len(chosen))
    rng.shuffle(texts)
    return dict(zip(LETTERS, texts, strict=False)), "".join(sorted(LETTERS[texts.index(t)] for t in chosen))


def _blank(rng: random.Random, items: Sequence[str], joiner: str) -> tuple[str, str]:
    """`items` joined with one of them replaced by ____ (and the hidden item)."""
    hidden = rng.randrange(len(items))
    return joiner.join("____" if i == hidden else item for i, item in enumerate(items)), items[hidden]


def _herb_questions(herb, rng: random.Random) -> list[dict]:
    h = herb.name
    others = [other for other in HERBS if other.name != h]
    # 苦 and 微苦 are too close to be a fair distractor for each other.
    near = {"苦", "微苦"} if {"苦", "微苦"} & set(herb.flavours) else set()
    flavour_pool = [f for f in FLAVOURS if f not in herb.flavours and f not in near]
    meridian_pool = [m for m in MERIDIANS if m not in herb.meridians]
    action = "，".join(herb.actions)
    action_pool = ["，".join(o.actions) for o in others]
    clause_pool = [clause for o in others for clause in o.actions if clause not in herb.actions]
    out = []

    fact = f"herb:{h}:nature"
    think = f"{h}性{herb.nature}。"
    # 凉 and 微寒 are one degree in many textbooks: neither is a distractor for the other
    nature_pool = [n for n in NATURES if not {n, herb.nature} == {"凉", "微寒"}]
    options, letter = _choice(rng, herb.nature, nature_pool)
    out.append(q(fact, "single", f"{h}的药性是？", options, letter, think))
    options, letter = _choice(rng, herb.nature, nature_pool)
    out.append(q(fact, "single", f"下列哪一项是{h}的药性？", options, letter, think))
    out.append(q(fact, "fill", f"{h}性____。", {}, herb.nature, think))
    out.append(q(fact, "open", f"{h}的药性如何？", {}, think, think))

    fact = f"herb:{h}:flavours"
    think = f"{h}味{'、'.join(herb.flavours)}。"
    options, letter = _choice(rng, rng.choice(herb.flavours), flavour_pool)
    out.append(q(fact, "single", f"下列哪一味是{h}所具有的？", options, letter, think))
    if len(herb.flavours) > 1:  # a multiple-choice question has two or more correct options
        options, letters = _multi(rng, herb.flavours, flavour_pool)
        out.append(q(fact, "multiple", f"{h}的味有哪些？", options, letters, think))
    out.append(q(fact, "fill", f"{h}味____。", {}, "、".join(herb.flavours), think))
    out.append(q(fact, "open", f"{h}有何味？", {}, think, think))

    fact = f"herb:{h}:meridians"
    think = f"{h}归{'、'.join(herb.meridians)}经。"
    options, letter = _choice(rng, rng.choice(herb.meridians), meridian_pool)
    out.append(q(fact, "single", f"{h}归下列哪一经？", options, letter, think))
    if len(herb.meridians) > 1:
        options, letters = _multi(rng, herb.meridians, meridian_pool)
        out.append(q(fact, "multiple", f"{h}归哪些经？", options, letters, think))
    out.append(q(fact, "fill", f"{h}归____经。", {}, "、".join(herb.meridians), think))
    out.append(q(fact, "open", f"{h}归何经？", {}, think, think))

    fact = f"herb:{h}:actions"
    think = f"{h}的功效：{action}。"
    # 黄连's actions are all 黄芩's (金银花's all 连翘's): neither may be a wrong option of the other
    within = frozenset("，".join(o.actions) for o in others if set(o.actions) <= set(herb.actions))
    options, letter = _choice(rng, action, action_pool, also_true=within)
    out.append(q(fact, "single", f"{h}的功效是？", options, letter, think))
    having = frozenset(o.name for o in others if set(herb.actions) <= set(o.actions))
    options, letter = _choice(rng, h, [o.name for o in others], also_true=having)
    out.append(q(fact, "single", f"具有“{action}”功效的药物是？", options, letter, think))
    options, letters = _multi(rng, herb.actions[:3], clause_pool)
    out.append(q(fact, "multiple", f"下列哪些是{h}的功效？", options, letters, think))
    text, hidden = _blank(rng, herb.actions, "，")
    out.append(q(fact, "fill", f"{h}的功效：{text}。", {}, hidden, think))
    out.append(q(fact, "open", f"{h}有哪些功效？", {}, action, think))
    return out


def _formula_questions(formula, rng: random.Random) -> list[dict]:
    f = formula.name
    others = [other for other in FORMULAS if other.name != f]
    components = "、".join(formula.components)
    action = "，".join(formula.actions)
    out = []

    fact = f"formula:{f}:components"
    think = f"{f}由{components}组成。"
    herb_pool = [herb.name for herb in HERBS if herb.name not in formula.components + formula.also]
    options, letter = _choice(rng, rng.choice(formula.components), herb_pool)
    out.append(q(fact, "single", f"下列哪味药是{f}的组成药物？", options, letter, think))
    options, letters = _multi(rng, formula.components, herb_pool)
    out.append(q(fact, "multiple", f"{f}由下列哪些药物组成？", options, letters, think))
    text, hidden = _blank(rng, formula.components, "、")
    out.append(q(fact, "fill", f"{f}由{text}组成。", {}, hidden, think))
    out.append(q(fact, "open", f"{f}的组成是什么？", {}, components, think))

    fact = f"formula:{f}:actions"
    think = f"{f}的功效：{action}。"
    options, letter = _choice(rng, action, ["，".join(o.actions) for o in others])
    out.append(q(fact, "single", f"{f}的功效是？", options, letter, think))
    options, letter = _choice(rng, f, [o.name for o in others])
    out.append(q(fact, "single", f"功效为“{action}”的方剂是？", options, letter, think))
    out.append(q(fact, "fill", f"{f}的功效是____。", {}, action, think))
    out.append(q(fact, "open", f"{f}有何功效？", {}, action, think))
    return out


def _syndrome_questions(syndrome, rng: random.Random) -> list[dict]:
    s = syndrome.name
    others = [other for other in SYNDROMES if other.name != s]
    principle = "，".join(syndrome.principle)
    out = []

    fact = f"syndrome:{s}:principle"
    think = f"{s}治宜{principle}。"
    options, letter = _choice(rng, principle, ["，".join(o.principle) for o in others])
    out.append(q(fact, "single", f"{s}的治法是？", options, letter, think))
    out.append(q(fact, "fill", f"{s}治宜____。", {}, principle, think))
    out.append(q(fact, "open", f"{s}应如何治疗？", {}, principle, think))

    fact = f"syndrome:{s}:formula"
    think = f"{s}的代表方是{syndrome.formula}。"
    options, letter = _choice(rng, syndrome.formula, [o.formula for o in others])
    out.append(q(fact, "single", f"{s}的代表方是？", options, letter, think))
    options, letter = _choice(rng, s, [o.name for o in others])
    out.append(q(fact, "single", f"{syndrome.formula}主治下列哪一证？", options, letter, think))
    out.append(q(fact, "fill", f"{s}的代表方为____。", {}, syndrome.formula, think))
    out.append(q(fact, "open", f"治疗{s}的代表方是什么？", {}, syndrome.formula, think))
    return out


def q(fact: str, kind: str, question: str, options: dict, answer: str, think: str) -> dict:
    return {
        "type": kind,
        "question": question,
        "options": options,
        "answer": answer,
        "fact": fact,
        "think": think,
    }


def generate_examples(seed: int) -> list[dict]:
    """Every question the templates make from the knowledge table (about 1,100); `seed` draws the
    distractors, their order and the hidden item of fill-in questions. Ids are `tcm-<n>`."""
    rng = random.Random(seed)
    examples = []
    for herb in HERBS:
        examples += _herb_questions(herb, rng)
    for formula in FORMULAS:
        examples += _formula_questions(formula, rng)
    for syndrome in SYNDROMES:
        examples += _syndrome_questions(syndrome, rng)
    return [{"id": f"tcm-{i}", **example} for i, example in enumerate(examples)]


def textbook(seed: int = 0) -> list[str]:
    """One sentence per fact of the table (the `think` of its questions), in a fixed order."""
    return list(dict.fromkeys(example["think"] for example in generate_examples(seed)))


def textbook_entries(seed: int = 0) -> dict[str, str]:
    """One entry per entity of the table, {name: its fact sentences in table order}, like an encyclopedia
    article under its title: {"麻黄": "麻黄性温。麻黄味辛、微苦。麻黄归肺、膀胱经。麻黄的功效：...。", ...}.
    The entity is the middle field of the fact key ("herb:麻黄:nature")."""
    entries: dict[str, dict[str, str]] = {}
    for example in generate_examples(seed):
        entries.setdefault(example["fact"].split(":")[1], {})[example["fact"]] = example["think"]
    return {name: "".join(sentences.values()) for name, sentences in entries.items()}
