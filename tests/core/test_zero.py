"""core/zero.py in one process: which launches select DeepSpeed ZeRO, which configs are refused, and how
the trainer's values fill a config. The 2-process runs (1 vs 2 processes, resume) are in
tests/apps/test_toy.py."""

import json
import logging
import sys
import types

import pytest
import torch

from core import zero
from core.data import InputError
from core.trainer import join_processes
from core.zero import TRAINER_FIELDS, _filled, deepspeed_config

ENV = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "ACCELERATE_GRADIENT_CLIPPING",
    "ACCELERATE_MIXED_PRECISION",
)


@pytest.fixture(autouse=True)
def no_launch_env(monkeypatch):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)


def _write(tmp_path, config) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_no_deepspeed_without_a_file_or_accelerate():
    assert deepspeed_config(None) is None


def test_accelerate_launch_flags_select_zero(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    config = deepspeed_config(None)
    assert config["zero_optimization"]["stage"] == 1
    assert {name: config[name] for name in TRAINER_FIELDS} == dict.fromkeys(TRAINER_FIELDS, "auto")


def test_accelerate_launch_values_are_the_users(monkeypatch):
    """--gradient_accumulation_steps / --gradient_clipping of accelerate launch are kept, so that the
    trainer refuses them where they differ from its own, as in a --deepspeed file."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    config = deepspeed_config(None)
    assert (config["gradient_accumulation_steps"], config["gradient_clipping"]) == (4, 0.5)
    assert _filled(config, "gradient_accumulation_steps", 4)["gradient_accumulation_steps"] == 4
    with pytest.raises(ValueError, match="gradient_clipping = 0.5, but the trainer's value is 1.0"):
        _filled(config, "gradient_clipping", 1.0)


def test_accelerate_config_file_values_are_the_users(tmp_path, monkeypatch):
    """The values of accelerate's DeepSpeed config file are kept; the accumulation steps it lacks are the
    trainer's, not accelerate's default of 1 (nor does accelerate let the launch flag through)."""
    path = _write(
        tmp_path, {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5, "train_batch_size": "auto"}
    )
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", path)
    config = deepspeed_config(None)
    assert {name: config[name] for name in TRAINER_FIELDS} == {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": 0.5,
    }
    with pytest.raises(ValueError, match="gradient_clipping = 0.5, but the trainer's value is 1.0"):
        _filled(config, "gradient_clipping", 1.0)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    assert deepspeed_config(None)["gradient_accumulation_steps"] == 2


def test_accelerate_mixed_precision_is_refused(monkeypatch):
    """accelerate launch --mixed_precision bf16 (any launch: plain, FSDP, DeepSpeed) would otherwise train in
    the model's dtype without a word."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(InputError, match="--mixed_precision bf16 is not applied.*--autocast bfloat16"):
        join_processes("cpu")  # an InputError: a command-line error, not a traceback


def test_a_config_file_selects_zero(tmp_path):
    config = deepspeed_config(_write(tmp_path, {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    assert config == {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"zero_optimization": {"stage": 3}}, "use --fsdp"),
        ({"zero_optimization": {"stage": 0}}, "plain data parallelism"),
        ({}, "plain data parallelism"),
        ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "bf16 is not supported"),
        ({"zero_optimization": {"stage": 1}, "fp16": {"enabled": "true"}}, "fp16 is not supported"),
        ({"zero_optimization": {"stage": 2}, "gradient_allreduce_op": "sum"}, "gradient_allreduce_op"),
        ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "logs the gradient norm"),
        ({"zero_optimization": {"stage": 1}, "wall_clock_breakdown": True}, "wall_clock_breakdown"),
        ({"zero_optimization": {"stage": 1}, "flops_profiler": {"enabled": True}}, "flops_profiler"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "SGD"}}, "optimizer.*--learning-rate"),
        ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "scheduler.*--lr-schedule"),
    ],
)
def test_refused_configs_say_why(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        deepspeed_config(_write(tmp_path, config))


def test_an_unreadable_config_names_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{stage: 2")
    with pytest.raises(ValueError, match="ds.json"):
        deepspeed_config(str(path))
    with pytest.raises(ValueError, match="missing.json"):
        deepspeed_config(str(tmp_path / "missing.json"))


def test_the_trainer_fills_auto_fields_and_refuses_conflicts():
    assert _filled({"gradient_clipping": "auto"}, "gradient_clipping", 1.0) == {"gradient_clipping": 1.0}
    assert _filled({}, "train_micro_batch_size_per_gpu", 8) == {"train_micro_batch_size_per_gpu": 8}
    assert _filled({"gradient_clipping": 1.0}, "gradient_clipping", 1.0) == {"gradient_clipping": 1.0}
    with pytest.raises(ValueError, match="gradient_clipping = 0.5, but the trainer's value is 1.0"):
        _filled({"gradient_clipping": 0.5}, "gradient_clipping", 1.0)


def test_the_config_files_values_win_over_accelerate_launch_flags(tmp_path, monkeypatch):
    """accelerate's DeepSpeed config file sets gradient_clipping 0.5: a --gradient_clipping 1.0 flag does
    not replace it (the flag fills only what the file leaves "auto" or out)."""
    path = _write(tmp_path, {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5})
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", path)
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    assert deepspeed_config(None)["gradient_clipping"] == 0.5


def test_initialize_passes_the_global_batch_size_over_every_process(monkeypatch):
    """The config handed to deepspeed.initialize (a stand-in module here) carries the trainer's values, with
    train_batch_size = micro-batch x accumulation steps x processes (2 here)."""
    passed = {}

    def initialize(*, model, optimizer, lr_scheduler, config, dist_init_required):
        passed.update(config=config, model=model, optimizer=optimizer, scheduler=lr_scheduler)
        return "engine", optimizer, None, lr_scheduler

    fake = types.SimpleNamespace(
        utils=types.SimpleNamespace(logger=logging.getLogger("fake-deepspeed")), initialize=initialize
    )
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr(zero.dist, "get_world_size", lambda: 2)
    config = {"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}
    engine = zero.initialize(
        "model", "optimizer", "scheduler", config, micro_batch_size=3, accumulation_steps=4, max_grad_norm=1
    )
    assert engine == "engine"
    assert (passed["model"], passed["optimizer"], passed["scheduler"]) == ("model", "optimizer", "scheduler")
    got = passed["config"]
    assert {name: got[name] for name in TRAINER_FIELDS} == {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 4,
        "train_batch_size": 3 * 4 * 2,
        "gradient_clipping": 1.0,
    }
    assert got["zero_optimization"] == {"stage": 2}
    assert config == {"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}  # the caller's untouched
    with pytest.raises(ValueError, match="train_batch_size = 12, but the trainer's value is 24"):
        zero.initialize(
            "model",
            "optimizer",
            "scheduler",
            {"zero_optimization": {"stage": 2}, "train_batch_size": 12},
            micro_batch_size=3,
            accumulation_steps=4,
            max_grad_norm=1.0,
        )


class _FakeZeroEngine:
    """What load_optimizer_state reads of a DeepSpeed engine: its stage and its ZeRO optimizer (the base
    optimizer and the float32 master partitions)."""

    def __init__(self, stage: int):
        self.stage = stage
        self.loaded = None
        self.optimizer = types.SimpleNamespace(
            optimizer=types.SimpleNamespace(load_state_dict=lambda state: setattr(self, "loaded", state)),
            single_partition_of_fp32_groups=[torch.zeros(3)],
        )

    def zero_optimization_stage(self) -> int:
        return self.stage


def test_a_checkpoint_of_another_zero_stage_or_process_count_is_refused(monkeypatch):
    monkeypatch.setattr(zero.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(zero.dist, "get_rank", lambda: 0)
    part = {"base": {"state": "saved"}, "fp32": [torch.tensor([1.0, 2.0, 3.0])]}
    with pytest.raises(InputError, match="under ZeRO stage 1.*now: 1 processes, stage 2"):
        zero.load_optimizer_state(_FakeZeroEngine(2), {zero.PARTITIONS: [part], "zero_stage": 1})
    with pytest.raises(InputError, match="written by 2 processes"):
        zero.load_optimizer_state(_FakeZeroEngine(2), {zero.PARTITIONS: [part, part], "zero_stage": 2})
    with pytest.raises(InputError, match="without DeepSpeed ZeRO"):
        zero.load_optimizer_state(_FakeZeroEngine(2), {"state": {}})
    engine = _FakeZeroEngine(2)
    zero.load_optimizer_state(engine, {zero.PARTITIONS: [part], "zero_stage": 2})
    assert engine.loaded == {"state": "saved"}
    assert engine.optimizer.single_partition_of_fp32_groups[0].tolist() == [1.0, 2.0, 3.0]


def _engine_with_state(stage: int, base: dict, fp32: list[float]) -> _FakeZeroEngine:
    engine = _FakeZeroEngine(stage)
    engine.optimizer.optimizer.state_dict = lambda: base
    engine.optimizer.single_partition_of_fp32_groups = [torch.tensor(fp32)]
    return engine


@pytest.mark.parametrize("rank", [0, 1])
def test_the_optimizer_state_is_gathered_on_process_0_in_rank_order(monkeypatch, rank):
    """Process 0 of 2 gets both partitions, its own first, and the stage; process 1 gets an empty dict. The
    float32 masters are copies: a later step does not change what was gathered."""
    gathered = []

    def gather_object(obj, parts, dst):
        gathered.append((obj, parts, dst))
        if parts is not None:
            parts[:] = [obj, {"base": {"state": "of process 1"}, "fp32": []}]

    monkeypatch.setattr(zero.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(zero.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(zero.dist, "gather_object", gather_object)
    engine = _engine_with_state(2, {"state": "mine"}, [1.0, 2.0])
    state = zero.full_optimizer_state(engine)
    ((sent, parts, dst),) = gathered
    assert dst == 0 and (parts is None) is (rank != 0)
    assert sent["base"] == {"state": "mine"} and sent["fp32"][0].tolist() == [1.0, 2.0]
    engine.optimizer.single_partition_of_fp32_groups[0].add_(5.0)  # the next step
    assert sent["fp32"][0].tolist() == [1.0, 2.0]
    if rank == 0:
        assert state == {
            zero.PARTITIONS: [sent, {"base": {"state": "of process 1"}, "fp32": []}],
            "zero_stage": 2,
        }
    else:
        assert state == {}


def test_each_process_loads_its_own_partition(monkeypatch):
    """Process 1 of 2 takes the second partition, not process 0's; a checkpoint of fewer processes than run
    now is refused."""
    monkeypatch.setattr(zero.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(zero.dist, "get_rank", lambda: 1)
    parts = [
        {"base": {"state": "of process 0"}, "fp32": [torch.tensor([1.0, 1.0, 1.0])]},
        {"base": {"state": "of process 1"}, "fp32": [torch.tensor([2.0, 3.0, 4.0])]},
    ]
    engine = _FakeZeroEngine(1)
    zero.load_optimizer_state(engine, {zero.PARTITIONS: parts, "zero_stage": 1})
    assert engine.loaded == {"state": "of process 1"}
    assert engine.optimizer.single_partition_of_fp32_groups[0].tolist() == [2.0, 3.0, 4.0]
    with pytest.raises(InputError, match="written by 1 processes under ZeRO stage 1.*now: 2 processes"):
        zero.load_optimizer_state(_FakeZeroEngine(1), {zero.PARTITIONS: parts[:1], "zero_stage": 1})


def test_initialize_quiets_deepspeeds_step_log_unless_the_config_sets_it(monkeypatch):
    passed = []

    def initialize(*, model, optimizer, lr_scheduler, config, dist_init_required):
        passed.append(config)
        return "engine", optimizer, None, lr_scheduler

    fake = types.SimpleNamespace(
        utils=types.SimpleNamespace(logger=logging.getLogger("fake-deepspeed")), initialize=initialize
    )
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr(zero.dist, "get_world_size", lambda: 1)
    for given in ({}, {"steps_per_print": 10}):
        zero.initialize(
            "model",
            "optimizer",
            "scheduler",
            {"zero_optimization": {"stage": 1}, **given},
            micro_batch_size=2,
            accumulation_steps=1,
            max_grad_norm=1.0,
        )
    assert [config["steps_per_print"] for config in passed] == [2**31, 10]
