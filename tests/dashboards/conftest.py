"""A runs folder built in code with core.runs.RunDir (the writer of the contract the dashboards read): toy
runs (finished, running, failed; one multi-turn with HTML in its text) and one run of each app page."""

from pathlib import Path

import pytest

from core.runs import RunDir

BASE_CONFIG = {"seed": 0, "learning_rate": 0.001, "group_size": 4, "run_dir": "x", "beta": 0.0}
SCRIPT = "<script>alert('x')</script> **bold** [link](javascript:alert(1))"


def make_run(root: Path, name: str, app: str, algorithm: str = "grpo", **config) -> RunDir:
    return RunDir.create(
        root / name,
        {**BASE_CONFIG, **config, "run_dir": str(root / name)},
        app=app,
        algorithm=algorithm,
        exist_ok_for_resume=False,
    )


def toy_rollouts(step: int, multi_turn: bool = False) -> list[dict]:
    """2 groups of 4; completion k of group g has reward g + k / 4; group 1's last completion holds SCRIPT."""
    rows = []
    for group in range(2):
        for k in range(4):
            reward = group + k / 4
            row = {
                "step": step,
                "group": group,
                "example_id": f"ex-{group}",
                "prompt": f"prompt {group}",
                "completion": f"answer s{step} g{group} k{k}"
                + (f" {SCRIPT}" if (group, k) == (1, 3) else ""),
                "rewards": {"correct": float(group), "format": k / 4},
                "reward": reward,
                "advantage": k / 4 - 0.375,
                "finish_reason": "stop",
            }
            if multi_turn:
                row["turns"] = [
                    {"role": "model", "text": f"move {k}"},
                    {"role": "observation", "text": "board ok"},
                    {"role": "model", "text": f"final {k}"},
                ]
            rows.append(row)
    return rows


def metrics_row(step: int) -> dict:
    return {
        "reward": 0.1 * step,
        "reward/correct": 0.05 * step,
        "reward/format": 0.5,
        "reward/format/failures": 0,
        "zero_spread_frac": 1.0 / step,
        "kl": 0.01 * step,
        "entropy": 5.0 - step,
        "clip/frac": 0.0,
        "loss": 1.0,
    }


def sudoku_row() -> dict:
    # 4x4: solution 1234/3412/2143/4321; givens everywhere but (0,1), (0,3), (1,0), (3,3).
    return {
        "step": 1,
        "group": 0,
        "prompt": "solve",
        "completion": "r0c1=2 ...",
        "reward": 0.5,
        "advantage": 0.0,
        "rewards": {"cells": 0.5},
        "puzzle": "1.3.\n.412\n2143\n432.".replace("\n", ""),
        "solution": "1234341221434321",
        "emitted": [
            [0, 3, 4],
            [0, 1, 2],
            [1, 0, 1],
            [0, 3, 1],
            [2, 2, 9],
        ],  # (1,0) wrong; repeat, given ignored
        "solver_order": [[0, 1], [0, 3], [1, 0], [3, 3]],
    }


@pytest.fixture
def runs_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    a = make_run(root, "toy/a", "toy")
    for step in (1, 2, 3):
        a.log_metrics(step, metrics_row(step))
        a.log_rollouts(toy_rollouts(step))
    a.set_status("finished", step=3)
    a.write_eval({"accuracy": 0.75})
    b = make_run(root, "toy/b", "toy", learning_rate=0.01)
    b.log_metrics(1, metrics_row(1))
    b.log_rollouts(toy_rollouts(1, multi_turn=True))
    b.set_status("running", step=1)
    c = make_run(root, "toy/c", "toy")
    c.set_status("failed", step=0, error="CUDA out of memory <b>x</b>")

    s = make_run(root, "sudoku/s1", "sudoku")
    s.log_rollouts([sudoku_row()])
    s.set_status("finished", step=1)
    p = make_run(root, "public-goods/p1", "public-goods")
    p.write_eval(
        {
            "cooperation_vs_r": [
                {"r": 3.0, "cooperation": 0.1},
                {"r": 4.0, "cooperation": 0.6},
                {"r": 5.0, "cooperation": 0.9},
            ],
            "snapshots": [
                {"step": 0, "r": 4.0, "grid": [[1, 0], [0, 0]]},
                {"step": 10, "r": 4.0, "grid": [[1, 1], [0, 1]]},
            ],
        }
    )
    d = make_run(root, "debias/d1", "debias")
    d.write_eval(
        {
            "bias": {"gender": {"before": 0.4, "after": 0.1}, "age": {"before": 0.3, "after": 0.2}},
            "responses": [
                {
                    "category": "gender",
                    "stage": "after",
                    "prompt": "p1",
                    "response": "fair one",
                    "bias": 0.01,
                },
                {"category": "age", "stage": "after", "prompt": "p2", "response": SCRIPT, "bias": 0.9},
                {"category": "age", "stage": "before", "prompt": "p3", "response": "meh", "bias": 0.5},
            ],
        }
    )
    for name, algorithm, p1, p8 in (
        ("math/m1", "grpo", 0.2, 0.5),
        ("math/m2", "grpo", 0.4, 0.7),
        ("math/m3", "gtpo", 0.3, 0.8),
    ):
        m = make_run(root, name, "math", algorithm=algorithm)
        m.write_eval({"pass_at_k": {"gsm8k": {"1": p1, "8": p8}}})
    t = make_run(root, "tcm/t1", "tcm")
    t.write_eval(
        {"accuracy_by_type": {"single": 0.5, "multi": 0.25}, "count_by_type": {"single": 10, "multi": 4}}
    )
    monkeypatch.setenv("GRPO_SUITE_RUNS", str(root))
    return root
