"""core/answers.py: math-verify answer matching on a table of pairs, garbage and huge inputs, and the
timeout in the main thread (math-verify's signal.alarm) and in a worker thread (a child process)."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.answers import answers_match

# 10^(10^7): sympy evaluates this integer power in C when comparing it, about 10 s on a laptop core;
# well past every timeout below, yet a broken timeout fails the test instead of hanging it for hours.
HEAVY = r"10^{10^{7}}"

MATCHES = [
    ("0.5", r"\frac{1}{2}"),
    ("1/2", r"\frac{1}{2}"),
    (r"\boxed{42}", "42"),
    ("The answer is $42$.", "42"),
    (r"$\frac{1}{2}$", "0.5"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{\sqrt2}{2}"),  # bare LaTeX on both sides
    ("10^{100}", "10^{100}"),
    ("5, 3", "3, 5"),  # sets
    (r"\$18.90", r"\$18.90"),  # an escaped dollar is a dollar sign, not math mode (MATH's money answers)
    ("18.90", r"\$18.90"),
    (r"\boxed{\$32,\!348}", r"\$32,\!348"),
    ("x = 3", "3"),  # an assignment to the answer
    ("(1, 2)", "1 < x < 2"),  # an interval for an inequality: allowed when the *prediction* is the set
    ("答案是 42", "42"),  # unicode text around the answer
    ("−3", "-3"),  # U+2212 minus sign
    ("123456789012345678901234567890", "123456789012345678901234567890"),
    ("1000", r"1\,000"),  # thin-space and plain-space thousands separators
    ("12345", "12 345"),
    ("1000", "1~000"),  # a tie (~) between digit groups
    (r"1\;000\;000", "1000000"),
    ("0.0001", r"0.000\,1"),  # a shorter last group after the point
    ("3.14159265", r"3.141\,592\,65"),
    ("3.141592653", r"3.141\,592\,653"),  # a last group of three after the point
    ("0.000123", r"0.000\,123"),
    ("x^2\n+1", "x^2+1"),  # a line end inside a bare answer: math-verify's $...$ does not span one
    ("\\pi\n", "\\pi"),
    ("\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("The answer is $42$; 3 4 were wrong", "42"),  # numbers side by side outside the delimited answer
    ("0.5 \\pi", "\\pi/2"),  # a number and a symbol side by side are a product
    ("\\frac 1 2", "\\frac{1}{2}"),  # numbers side by side as a command's arguments
    ("\\dfrac 3 4", "0.75"),
    ("2 \\frac 1 2", "\\frac{5}{2}"),  # a mixed number
]

MISMATCHES = [
    ("41", "42"),
    (r"\boxed{\frac{1}{3}}", "0.5"),
    ("0.33", r"\frac{1}{3}"),
    ("10", "10^{100}"),  # read bare, the gold would parse as 10
    ("3, 5", "5"),  # read bare, the prediction would parse as 5
    ("答案是 41", "42"),
    ("1 < x < 2", "(1, 2)"),  # verify(gold, prediction) is not symmetric: the gold must go first
    # 30 digits, off by one in the last: a comparison through float64 would call these equal
    ("123456789012345678901234567891", "123456789012345678901234567890"),
    ("0", r"1\,000"),  # read as a product 1*0 before the separator was dropped
    ("0", "1 000"),
    ("2 30", "230"),  # a space before two digits is no thousands separator
    ("23000", "2 3000"),  # a group of four digits: no thousands separator either
    ("1234567", "1234 567"),  # four digits before the space: not one number written in groups
    ("0", r"0.000\,1"),  # read as 0.000 * 1
    ("0", "0.000 1"),
    ("0.51", "0.5 10"),  # a decimal, then another number: not one number
    # two numbers side by side are not one answer; math-verify read them as a product (3.75, 3, 15)
    ("1.5 2.5", "3.75"),
    ("x = 1.5\\ 2", "3"),
    ("[1 2.5 6]", "15"),
    ("1.5\\quad 2.5", "3.75"),
    ("1.5\\qquad 2.5", "3.75"),
    ("1.5 2.5", "1.5, 2.5"),
]

GARBAGE = [
    ("", "42"),
    ("42", ""),
    ("   ", "42"),
    ("}{\\frac{{", "1"),
    ("1", "}{\\frac{{"),
    ("\x00\x01", "0"),
    ("\ud800", "1"),  # a lone surrogate
    ("½", r"\frac{1}{2}"),  # not parsed by math-verify 0.9
    ("no idea", "42"),
    ("9" * 5000, "9" * 5000),  # over Python's 4300-digit int-string limit: documented as never matching
]


@pytest.mark.parametrize(("prediction", "gold"), MATCHES)
def test_equal_answers_match(prediction, gold):
    assert answers_match(prediction, gold) is True


@pytest.mark.parametrize(("prediction", "gold"), MISMATCHES)
def test_different_answers_do_not_match(prediction, gold):
    assert answers_match(prediction, gold) is False


@pytest.mark.parametrize(("prediction", "gold"), GARBAGE)
def test_garbage_is_no_match_not_an_error(prediction, gold):
    assert answers_match(prediction, gold) is False


def test_wrong_argument_types_and_timeouts_fail_loudly():
    with pytest.raises(TypeError, match="got NoneType and str"):
        answers_match(None, "42")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        answers_match("42", "42", timeout_s=0)
    # from 2**31 s math-verify's alarm overflows and it answers "no match"; infinity broke math.ceil
    for too_long in (2.0**31, float("inf"), float("nan"), 86_401):
        with pytest.raises(ValueError, match=r"at most 86400 \(a day\)"):
            answers_match("42", "42", timeout_s=too_long)
    assert answers_match("42", "42", timeout_s=86_400)


def test_timeout_in_the_main_thread():
    start = time.monotonic()
    assert answers_match(HEAVY, "1", timeout_s=0.5) is False  # math-verify's alarm: ceil -> 1 s
    assert time.monotonic() - start < 4.0
    assert answers_match("0.5", r"\frac{1}{2}") is True  # no alarm left behind


def test_the_main_thread_timeout_is_rounded_up_not_down():
    """signal.alarm takes whole seconds: 1.5 s must become 2 s per step, never 1 s (the caller's budget cut)."""
    start = time.monotonic()
    assert answers_match(HEAVY, "1", timeout_s=1.5) is False
    assert 1.5 <= time.monotonic() - start < 4.5


def test_worker_threads_match_and_time_out():
    pairs = MATCHES + MISMATCHES + GARBAGE  # the same table through the children (JSON-safe unicode)
    expected = [True] * len(MATCHES) + [False] * (len(MISMATCHES) + len(GARBAGE))
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(lambda pair: answers_match(*pair), pairs)) == expected
        start = time.monotonic()  # the children are started: the timeout alone is measured
        assert pool.submit(answers_match, HEAVY, "1", 0.3).result() is False
        assert time.monotonic() - start < 3.0
        # the timed-out child was killed; the next check starts a fresh one
        assert pool.submit(answers_match, "1/2", "0.5").result() is True


def test_a_long_run_of_digits_is_read_in_linear_time():
    """The side-by-side rule read "12" as "1" then "2" too, so a run of n digits took time n**2: 200,000
    digits (a completion of digits) took about ten minutes. An alarm turns such a hang into a failure."""
    import signal

    from core.answers import _side_by_side_numbers

    def hang(signum, frame):
        raise TimeoutError("the side-by-side rule backtracks over the digits")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        assert not _side_by_side_numbers("1" * 200_000 + "a")
        assert not _side_by_side_numbers("1" * 100_000 + "." + "1" * 100_000 + "x")
        assert _side_by_side_numbers("1" * 100_000 + " 2")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
