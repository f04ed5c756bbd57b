"""The benchmarks in their 1-step smoke mode, so that they keep working (they are not tests of speed)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_logprob_memory_smoke():
    out = subprocess.run(
        [sys.executable, str(BENCH / "logprob_memory.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "peak ratio chunked/unchunked" in out.stdout and "max difference" in out.stdout


def test_pgg_fermi_speed_smoke():
    args = ["--size", "10", "--agent-mcs", "1", "--fast-mcs", "2", "--relax-mcs", "3"]
    out = subprocess.run(
        [sys.executable, str(BENCH / "pgg_fermi_speed.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "after 3 untimed MCS" in out.stdout and "numba kernel alone" in out.stdout
    zero = subprocess.run(  # a ZeroDivisionError traceback before
        [sys.executable, str(BENCH / "pgg_fermi_speed.py"), "--agent-mcs", "0"],
        capture_output=True,
        text=True,
    )
    assert zero.returncode == 2 and "--agent-mcs must be >= 1, got 0" in zero.stderr


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_logprob_check_fails_on_a_nan_anywhere():
    within = load_benchmark("logprob_memory").within_tolerance
    assert within({"logp": 1e-7, "entropy": 2e-6})
    assert not within({"logp": 1e-7, "entropy": float("nan")})  # max() skipped a NaN after the first
    assert not within({"logp": 1e-7, "grads": 2e-5})


def test_mfu_counts_the_passes_our_training_phase_runs():
    """3 mu passes (forward + backward) plus the reference, no old-logprob pass; each prompt once a group."""
    spec = importlib.util.spec_from_file_location("step_vs_trl", BENCH / "step_vs_trl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sizes = dict(
        hidden=8, layers=1, intermediate=16, vocab=10, heads=2, kv_heads=1, prompts=2, group=4, tokens=3
    )
    # decoder 8*8*2 + 2*8*4 + 3*8*16 = 576 weights; attention 2*1*(5+3)*8 = 128; head 8*10 = 80
    # 2 * (5 + 4*3) = 34 positions (each prompt once), 2*4*3 = 24 of them completions (the head's)
    forward = 2 * (576 + 128) * 34 + 2 * 80 * 24  # 51,712
    trained = 2 * (3 * 576 + 3 * 128) * 34 + 2 * 3 * 80 * 24  # 155,136: 3 x a forward
    assert bench.training_flops(sizes, mu=2, beta=0.04, prompt_tokens=5) == 2 * trained + forward == 361_984
    assert bench.training_flops(sizes, mu=1, beta=0.0, prompt_tokens=5) == trained
    # LoRA: the frozen weights take no weight gradient (2 x their forward), attention's backward is still 2 x
    lora_trained = 2 * (2 * 576 + 3 * 128) * 34 + 2 * 2 * 80 * 24  # 112,128
    assert (
        bench.training_flops(sizes, mu=2, beta=0.04, prompt_tokens=5, lora=True) == 2 * lora_trained + forward
    )


@pytest.mark.slow  # two worker processes that import TRL: about a minute on 2 busy cores
def test_step_vs_trl_smoke(tmp_path):
    result = tmp_path / "result.json"
    cmd = [sys.executable, str(BENCH / "step_vs_trl.py"), "--smoke", "--json", str(result)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "ours/TRL step time" in out.stdout
    import json

    setting = json.loads(result.read_text())["beta0.04-mu2-lora0"]
    # Same generation (N = 2 prompts x G = 4 rows, T = 8 tokens, P = padded prompt length); TRL trains on
    # N (P + T) positions per pass (mu = 2 passes), we run each of the 2 prompts once: 2 P + N T positions.
    # Without autograd: the prefill (TRL: N P; ours: each prompt once, 2 P), then TRL's old-logprob and both
    # sides' reference forwards (our old log-probs are the first epoch's trained forward's, core/trainer.py).
    ours, trl = setting["ours"]["passes"], setting["trl"]["passes"]
    n, t = 8, 8
    p = trl["grad_positions"] // (2 * n) - t
    assert trl["grad_positions"] == 2 * n * (p + t) and trl["nograd_positions"] == n * p + 2 * n * (p + t)
    assert ours["grad_positions"] == 2 * (2 * p + n * t)
    assert ours["nograd_positions"] == 2 * p + (2 * p + n * t)
    assert ours["decode"] == trl["decode"]
