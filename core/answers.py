"""Math answer checking shared by apps: `answers_match(prediction, gold)` with math-verify, under a timeout.

Both arguments are *answers* (apps extract them from completions): a bare expression such as `0.5`,
`\\frac{1}{2}` or `x^2`, or text with delimited LaTeX (`$...$`, `\\(...\\)`, `\\[...\\]`, `\\boxed{...}`).
math-verify's LaTeX extraction only looks inside delimiters, and its plain-expression extraction reads a
bare `10^{100}` as `10` and `3, 5` as `5`, so a bare answer is wrapped in `$...$` before parsing. The
comparison is math-verify's `verify(gold, prediction)` (not symmetric: the gold goes first).

Timeouts. math-verify 0.9 bounds each `parse` and each comparison with `signal.alarm` (math_verify/utils.py):
whole seconds, main thread only (elsewhere it raises ValueError), and it cancels any alarm the caller had
set. So:
- in the main thread we use math-verify's own timeouts, `ceil(timeout_s)` seconds per step (two parses
  and at most four comparisons);
- in any other thread the check runs in a child Python process that is killed at `timeout_s` (total).
  A helper *thread* cannot do this: a bare `10^{10^{10}}` makes sympy compute a huge integer power in C,
  which holds the GIL, so the waiting thread could not even return (only `signal.alarm` in the main thread
  interrupts it, through CPython's signal checks in `long_pow`). Children are reused, one per concurrent
  caller; a call that finds none idle starts one (about a second, not counted in the timeout).
A timeout or a parse failure is "no match" (False), never an exception, and so is a bare prediction of
plain numbers and text with two numbers side by side (`1.5 2.5`, which math-verify would read as their
product; `\\frac 1 2` is a fraction). Numbers of more than 4300 digits never match (Python's int-to-string
limit makes math-verify's parse fail).
"""

import atexit
import json
import logging
import math
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

from math_verify import parse, verify

logger = logging.getLogger(__name__)

# Delimiters math-verify's LaTeX extraction recognises; text with none of them is a bare answer. A dollar
# counts only when it is not escaped: "\$18.90" (MATH writes money so) is a bare answer holding a dollar sign.
_LATEX_DELIMITERS = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")
# A number written in digit groups, with a thin or plain space (or ~) between them: "1\,000", "12 345",
# "0.000\,1" (groups of 3 before the point; after it, groups of 3 then a last one of 1-3); math-verify reads
# the space as a product (1*0). "100 200 300" is read as one number, not a list; "1.5 2.5" stays two.
_GROUP_SPACE = r"(?:\\[,;:! ]|~| )"
_FRACTION_GROUPS = rf"\.\d{{3}}(?:{_GROUP_SPACE}\d{{3}})*{_GROUP_SPACE}\d{{1,3}}(?!\d)"
_GROUPED_NUMBER = re.compile(
    rf"(?<![\d.])(?:\d{{1,3}}(?:{_GROUP_SPACE}\d{{3}})+(?!\d)(?:{_FRACTION_GROUPS}|\.\d+)?|\d*{_FRACTION_GROUPS})"
)
# Two numbers side by side in a bare answer of plain numbers and text, with only spaces (or LaTeX spacing)
# between them, after digit groups are joined: "1.5 2.5". It is not one answer: math-verify reads it as a
# product (3.75), a reading no solver means, so it never matches (as "12 5" does not: math-verify does not
# parse it). Not in an answer with any other LaTeX command, sub- or superscript, where numbers are arguments
# (`\frac 1 2`, `2 \frac 1 2`, `x^2 3`).
_LATEX_SPACING = re.compile(r"\\(?:[,;:! ]|q?quad\b)|~")
# each number one way only ("12" is not "1" then "2"), so a long run of digits is read in linear time
_PLAIN_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
_SIDE_BY_SIDE_NUMBERS = re.compile(rf"(?<![\w.]){_PLAIN_NUMBER}\s+{_PLAIN_NUMBER}(?![\w.])")
_WORKER_START_TIMEOUT_S = 120.0  # importing sympy in a fresh process, on a busy machine
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # the directory that holds `core/`


# math-verify's alarm takes a C int of seconds: from 2**31 on it overflows inside math-verify, which turns
# the error into "no match"; a day is far beyond any check, so longer is refused rather than silently wrong.
MAX_TIMEOUT_S = 86_400


def answers_match(prediction: str, gold: str, timeout_s: float = 5.0) -> bool:
    """True when the predicted answer equals the gold answer mathematically (math-verify). `timeout_s`
    bounds each math-verify step, rounded up to whole seconds, in the main thread, and the whole check in
    any other thread (see the module docstring).

    >>> answers_match("0.5", "\\\\frac{1}{2}"), answers_match("\\\\boxed{42}", "42")
    (True, True)
    >>> answers_match("41", "42"), answers_match("no idea", "42")
    (False, False)
    """
    if not isinstance(prediction, str) or not isinstance(gold, str):
        got = f"{type(prediction).__name__} and {type(gold).__name__}"
        raise TypeError(f"answers_match takes a str prediction and a str gold, got {got}")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be > 0 and at most {MAX_TIMEOUT_S} (a day), got {timeout_s}")
    if threading.current_thread() is threading.main_thread():
        return _match(prediction, gold, step_timeout_s=max(1, math.ceil(timeout_s)))
    return _match_in_child(prediction, gold, timeout_s)


def _as_latex(answer: str) -> str:
    # a line end is a space to LaTeX, but math-verify's inline $...$ does not span one
    answer = answer.replace("\r", " ").replace("\n", " ")
    answer = _GROUPED_NUMBER.sub(lambda number: re.sub(_GROUP_SPACE, "", number.group()), answer)
    return answer if _LATEX_DELIMITERS.search(answer) else f"${answer}$"


def _side_by_side_numbers(answer: str) -> bool:
    plain = _LATEX_SPACING.sub(" ", answer)
    return not re.search(r"[\\^_]", plain) and bool(_SIDE_BY_SIDE_NUMBERS.search(plain))


def _match(prediction: str, gold: str, step_timeout_s: int | None) -> bool:
    """math-verify parse + verify; `step_timeout_s=None` disables its signal-based timeouts (in a child)."""
    # parse and verify catch their own errors and timeouts (raise_on_error=False): a failed parse is [],
    # and verify of an empty list is False.
    bare = not _LATEX_DELIMITERS.search(prediction)
    prediction = _as_latex(prediction)
    if bare and _side_by_side_numbers(prediction):
        return False
    gold_parsed = parse(_as_latex(gold), parsing_timeout=step_timeout_s)
    predicted = parse(prediction, parsing_timeout=step_timeout_s)
    return verify(gold_parsed, predicted, timeout_seconds=step_timeout_s)


# ---------------------------------------------------------------------------------------------------
# Outside the main thread: child processes, killed on timeout
# ---------------------------------------------------------------------------------------------------


class _Child:
    """A child Python process answering one JSON line `[prediction, gold]` with one line `true`/`false`."""

    def __init__(self) -> None:
        # A plain subprocess, not multiprocessing: forking a process that runs threads (torch) can deadlock,
        # and multiprocessing's spawn would re-import the caller's __main__ (its training script).
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from core.answers import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            cwd=_PACKAGE_ROOT,
        )
        assert self.process.stdout is not None
        # poll, not select: select fails on descriptors past 1024, common in a long training process.
        self._poller = select.poll()
        self._poller.register(self.process.stdout, select.POLLIN)
        if self._read_line(_WORKER_START_TIMEOUT_S) != "ready":
            self.close()
            raise RuntimeError(
                f"the answer-checking child process ({sys.executable}) did not start; see its stderr above"
            )

    def check(self, prediction: str, gold: str, timeout_s: float) -> bool | None:
        """The child's verdict, or None when it ran out of time or died (it is then closed)."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([prediction, gold]) + "\n")
        self.process.stdin.flush()
        line = self._read_line(timeout_s)
        if line not in ("true", "false"):
            if line is not None:  # "" is EOF: the child died, e.g. killed for memory by a pathological input
                logger.warning("answer-checking child failed: reply %r, exit %s", line, self.process.poll())
            self.close()
            return None
        return line == "true"

    def _read_line(self, timeout_s: float) -> str | None:
        """The next line of the child's stdout without its newline ("" at EOF), or None after timeout_s."""
        # The protocol is one request, one line back: nothing is ever left in the pipe's buffer, so polling
        # the file descriptor is a true "has the answer arrived" test (or EOF, when the child died).
        assert self.process.stdout is not None
        ready = self._poller.poll(timeout_s * 1000)
        return self.process.stdout.readline().rstrip("\n") if ready else None

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


_idle_children: list[_Child] = []
_idle_lock = threading.Lock()


def _match_in_child(prediction: str, gold: str, timeout_s: float) -> bool:
    with _idle_lock:
        child = _idle_children.pop() if _idle_children else None
    if child is None:
        child = _Child()
    verdict = child.check(prediction, gold, timeout_s)
    if verdict is None:
        return False
    with _idle_lock:
        _idle_children.append(child)
    return verdict


@atexit.register
def _close_idle_children() -> None:
    with _idle_lock:
        while _idle_children:
            _idle_children.pop().close()


def _serve() -> None:
    """The child's loop (see `_Child`); it ends when the parent closes its stdin."""
    replies, sys.stdout = sys.stdout, sys.stderr  # a stray print must not corrupt the protocol
    # We pass no timeout on purpose (the parent kills us); math-verify warns once that it is disabled.
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        prediction, gold = json.loads(line)
        print(json.dumps(_match(prediction, gold, step_timeout_s=None)), file=replies, flush=True)
