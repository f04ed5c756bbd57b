"""core/sharding.py in one process: which launches select FSDP and which are refused, the done-flag
reduction (with a stand-in collective; for real over two gloo processes, marked slow) and the load options.
The sharded runs themselves need two processes: tests/apps/test_toy.py (1 vs 2 processes, resume) and the
math CLI tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from core import sharding
from core.sharding import fsdp_requested, load_full_state


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, True),  # accelerate's FSDP config
        (False, {"ACCELERATE_USE_FSDP": "true"}, True),  # no FSDP_VERSION: accelerate's default, 2
        (False, {"ACCELERATE_USE_FSDP": "false"}, False),
    ],
)
def test_fsdp_is_chosen_by_the_flag_or_accelerate(monkeypatch, flag, env, expected):
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert fsdp_requested(flag) is expected


def test_fsdp1_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        fsdp_requested(False)


ALL_DONE_WORKER = """
import sys
import torch
import torch.distributed as dist
from core.sharding import all_done

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
mine = torch.tensor(rank == 0)
print(all_done(mine, True), all_done(torch.tensor(True), True), all_done(mine, False))
dist.destroy_process_group()
"""


@pytest.mark.parametrize(
    ("mine", "other", "expected"), [(1, 0, False), (0, 1, False), (1, 1, True), (0, 0, False)]
)
def test_all_done_reduces_with_the_other_process(monkeypatch, mine, other, expected):
    """In one process, with a stand-in all_reduce that combines this process's flag with another's as the
    requested op does: done only when both are (the 2-process run below does it for real)."""
    ops = []

    def all_reduce(tensor, op):
        ops.append(op)
        combine = {str(dist.ReduceOp.MIN): min, str(dist.ReduceOp.MAX): max, str(dist.ReduceOp.SUM): sum}
        tensor.fill_(combine[str(op)]([int(tensor), other]))

    monkeypatch.setattr(sharding.dist, "all_reduce", all_reduce)
    assert sharding.all_done(torch.tensor(bool(mine)), True) is expected
    assert sharding.all_done(torch.tensor(bool(mine)), False) is bool(mine)  # unsynced: no collective
    assert len(ops) == 1


@pytest.mark.slow
def test_all_done_holds_only_when_every_process_is_done(tmp_path: Path):
    """Two gloo processes: process 0 done, process 1 not -> not done on either (synced); both done -> done;
    unsynced, each process answers for itself."""
    init = f"file://{tmp_path / 'store'}"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", ALL_DONE_WORKER, str(rank), init],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err for _, err in outputs]
    assert [out.split() for out, _ in outputs] == [["False", "True", "True"], ["False", "True", "False"]]


@pytest.mark.parametrize("lora", [False, True])
def test_load_full_state_is_strict_unless_only_an_adapter_trains(monkeypatch, lora):
    """A full model's checkpoint must hold every weight (strict); a LoRA checkpoint holds the adapter only."""
    calls = []
    monkeypatch.setattr(sharding, "set_model_state_dict", lambda model, state, options: calls.append(options))
    monkeypatch.setattr(
        sharding, "set_optimizer_state_dict", lambda model, opt, state, options: calls.append(options)
    )
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    if lora:
        model[0].requires_grad_(False)  # the frozen base
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    load_full_state(model, {}, optimizer, {"state": {"1.weight": {}}, "param_groups": []})
    assert len(calls) == 2
    for options in calls:
        assert options.full_state_dict is True
        assert options.strict is (not lora)
    with pytest.raises(ValueError, match="without FSDP"):
        load_full_state(model, {}, optimizer, {"state": {0: {}}, "param_groups": []})


class _TiedWithBuffers(nn.Module):
    """An LM's layout in small: the head's weight tied to the embeddings' (state_dict names it twice,
    named_parameters once), and a norm with buffers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 2)
        self.norm = nn.BatchNorm1d(2)
        self.head = nn.Linear(2, 4, bias=False)
        self.head.weight = self.embed.weight


def test_without_tied_copies_drops_only_the_second_name_of_a_tied_weight():
    model = _TiedWithBuffers()
    state = model.state_dict()
    assert {"head.weight", "embed.weight", "norm.running_mean"} <= set(state)
    kept = sharding.without_tied_copies(model, state)
    assert set(kept) == set(state) - {"head.weight"}  # buffers stay: the model needs them to load
    assert all(kept[name] is state[name] for name in kept)


@pytest.mark.parametrize("lora", [False, True])
def test_full_state_keeps_a_full_models_buffers_and_only_the_adapter_under_lora(monkeypatch, lora):
    """A full model's state is every entry FSDP gathers, buffers included; under LoRA (frozen weights) only
    the trainable ones. The optimizer state is gathered only when there is an optimizer."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    if lora:
        model[0].requires_grad_(False)  # the frozen base
    calls = []

    def model_state_dict(m, options):
        calls.append(options)
        return dict(m.state_dict())

    monkeypatch.setattr(sharding, "get_model_state_dict", model_state_dict)
    monkeypatch.setattr(sharding, "get_optimizer_state_dict", lambda m, opt, options: {"optimizer": opt})
    state, optimizer_state = sharding.full_state(model)
    expected = {"1.weight", "1.bias"} if lora else set(model.state_dict())
    assert set(state) == expected and "1.running_mean" in model.state_dict()
    assert optimizer_state is None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert sharding.full_state(model, optimizer)[1] == {"optimizer": optimizer}
    assert all(o.full_state_dict and o.cpu_offload for o in calls)
