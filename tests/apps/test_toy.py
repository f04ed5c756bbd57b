"""The toy app through its command line: a smoke run, exact resume after SIGKILL, and 1 vs 2 processes
(with and without dynamic sampling)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apps.toy.task import alphabet_fraction, letter_fraction, make_examples
from core.cli import main

TOY = ["toy", "train", "--preset", "smoke"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def metrics_without_timing(run_dir: Path) -> list[dict]:
    timing = {"step_time", "generate_time", "tokens_per_s"}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def test_rewards_and_examples():
    assert letter_fraction("aab", {"letter": "a"}) == pytest.approx(2 / 3)
    assert alphabet_fraction("ab?", {"letter": "a"}) == pytest.approx(2 / 3)
    assert make_examples(5, seed=1) == make_examples(5, seed=1)
    assert make_examples(5, seed=1)[0]["prompt"] == f"Repeat {make_examples(5, seed=1)[0]['letter']}"


def test_smoke_run_writes_a_complete_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([*TOY, "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out and "zero-spread" in out
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "checkpoints" / "step-2" / "complete").is_file()
    assert (run_dir / "final" / "config.json").is_file()
    with pytest.raises(SystemExit):  # the same run directory again, without --resume
        main([*TOY, "--run-dir", str(run_dir)])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "core.cli", *TOY, *args]


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    steps = ["--max-steps", "12", "--save-every", "3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cli(*steps, "--run-dir", str(whole)), check=True, capture_output=True)

    process = subprocess.Popen(
        _cli(*steps, "--run-dir", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-6" / "complete").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists()
    subprocess.run(_cli(*steps, "--run-dir", str(killed), "--resume"), check=True, capture_output=True)

    expected, got = final_weights(whole), final_weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert metrics_without_timing(killed) == metrics_without_timing(whole)


# An untrained model mostly scores 0: many zero-spread groups, so every step draws all 3 rounds and keeps
# groups from several rounds and processes. Slow: each case takes about a minute on a busy 2-core machine.
DYNAMIC = pytest.param(
    ["--dynamic-sampling", "--max-sampling-rounds", "3"], id="dynamic-sampling", marks=pytest.mark.slow
)


@pytest.mark.parametrize("extra", [pytest.param([], id="plain"), DYNAMIC])
def test_two_processes_give_the_one_process_update(tmp_path, extra):
    flags = ["--max-steps", "3", "--prompts-per-step", "4", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(*flags, "--run-dir", str(one)), check=True, capture_output=True)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
    ]
    launch += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "core.cli",
        *TOY,
        *flags,
        "--run-dir",
        str(two),
    ]
    result = subprocess.run(launch, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = final_weights(one), final_weights(two)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    changed = sum(
        not torch.equal(a, b)
        for a, b in zip(
            expected.values(), load_file(one / "base_model" / "model.safetensors").values(), strict=True
        )
    )
    assert changed > 0  # the runs did update the weights
    if extra:  # the processes agreed on the rounds and on the chosen groups
        keys = ("sampling_rounds", "zero_spread_frac", "reward", "reward_std", "advantage_abs_mean")
        picked = [[{k: m[k] for k in keys} for m in metrics_without_timing(run)] for run in (one, two)]
        assert picked[0] == picked[1]
        assert any(m["sampling_rounds"] > 1 for m in picked[0])
