"""DeepSpeed ZeRO for the trainer: stage 1 partitions the optimizer state over the processes, stage 2 also
the gradients; the weights stay whole on every process, so generation and the logprob passes are the
single-process ones.

Selected by `GRPOConfig.deepspeed` (a DeepSpeed JSON config file, as TRL's `--deepspeed`) or by
accelerate's DeepSpeed config (`accelerate launch --use_deepspeed --zero_stage 2 ...`, which sets
ACCELERATE_USE_DEEPSPEED; its fields are read through accelerate's `DeepSpeedPlugin`). The trainer owns the
batch sizes, the clipping norm, the dtype, the optimizer and its schedule: it fills the config's "auto"
fields and refuses values set by the user (in the config file, or by accelerate launch's flags) that
disagree, and refuses optimizer/scheduler sections.
ZeRO stage 3 shards the weights too; this trainer shards weights with FSDP2 instead (`--fsdp`,
core/sharding.py), so stage 3 is refused with a message saying so.

What DeepSpeed changes for the caller:
- backward and the optimizer step go through the engine (`engine.backward` per micro-batch, with the
  accumulation boundary set by the trainer since the model is not called through `engine(...)`, then one
  `engine.step` per mini-batch);
- DeepSpeed averages gradients over processes and the loss wants their sum: the loss is scaled by the
  number of processes before backward;
- the optimizer state lives in per-process partitions: `full_optimizer_state` gathers them into the
  checkpoint (process 0 writes it), `load_optimizer_state` gives each process its own partition back.
"""

import json
import logging
import math
import os
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import parse_flag_from_env, send_to_device

from core.data import InputError

PARTITIONS = "zero_partitions"  # key of the optimizer state of a ZeRO checkpoint
# the fields the trainer sets from its own config
TRAINER_FIELDS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)
# options that would change what the trainer computes, or that need DeepSpeed's own forward: refused
REFUSED = {
    "gradient_allreduce_op": "sum",  # gradients would come back summed; the trainer scales the mean
    "wall_clock_breakdown": True,  # its timers start in engine(...), which the trainer does not call
}


def deepspeed_config(path: str | None) -> dict | None:
    """The DeepSpeed config to run under: the JSON file at `path`, else accelerate's DeepSpeed config from
    the environment, else None (no DeepSpeed). Raises, naming the field, for what the trainer refuses:
    ZeRO stages 0 and 3, fp16/bf16 (the trainer keeps the model's dtype; `--autocast bfloat16` does bf16;
    accelerate's --mixed_precision is refused for every launch, by core.trainer.join_processes), optimizer
    and scheduler sections (the trainer brings its own), the options in REFUSED, compute_grad_norm false,
    the flops profiler."""
    if path:
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"DeepSpeed config {path}: {err}") from err
    elif parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        config = _accelerate_config()
    else:
        return None
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise InputError(
                f'DeepSpeed config section "{section}" is not supported: the trainer brings its own AdamW '
                "and schedule (--learning-rate, --weight-decay, --lr-schedule, --warmup-steps)"
            )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage == 0:
        raise InputError(
            "ZeRO stage 0 is plain data parallelism, which the trainer does without DeepSpeed: launch "
            "without it, or choose stage 1 or 2"
        )
    if stage not in (1, 2):
        raise InputError(
            f"ZeRO stage {stage}: this trainer partitions optimizer state and gradients with DeepSpeed "
            "(stages 1-2) and shards weights with FSDP2; for sharded weights use --fsdp (accelerate: "
            "distributed_type FSDP, fsdp_version 2)"
        )
    for name, value in REFUSED.items():
        if config.get(name) == value:
            raise InputError(f"DeepSpeed config field {name} = {value!r} is not supported by the trainer")
    if config.get("zero_optimization", {}).get("compute_grad_norm") is False:
        raise InputError("zero_optimization.compute_grad_norm = false: the trainer logs the gradient norm")
    if config.get("flops_profiler", {}).get("enabled"):
        raise InputError(
            "DeepSpeed's flops_profiler needs engine(...) forwards, which the trainer does not make"
        )
    for precision in ("fp16", "bf16"):
        if config.get(precision, {}).get("enabled") in (True, "true"):
            raise InputError(
                f"DeepSpeed {precision} is not supported: the trainer keeps the model's dtype "
                "(use --autocast bfloat16 for bf16 compute)"
            )
    return config


def _accelerate_config() -> dict:
    """accelerate's DeepSpeed config (`DeepSpeedPlugin`, from its DeepSpeed config file or launch flags), with
    the trainer's fields the user's: the file's value, else that of accelerate launch's
    --gradient_accumulation_steps / --gradient_clipping, else "auto". (Where the file has no
    gradient_accumulation_steps, accelerate puts in its default of 1 and drops the flag's value.)"""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    config = deepcopy(DeepSpeedPlugin().deepspeed_config)
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    given = {} if file == "none" else HfDeepSpeedConfig(file).config
    for name in TRAINER_FIELDS:
        config[name] = given.get(name, "auto")
    for name, variable, kind in (
        ("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", int),
        ("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING", float),
    ):
        if config[name] == "auto" and os.environ.get(variable, "auto") != "auto":
            config[name] = kind(os.environ[variable])
    return config


def _filled(config: dict, name: str, value) -> dict:
    """`config` with `name` set to the trainer's `value` where it is missing or "auto"; a different
    explicit value is an error naming the field."""
    given = config.get(name, "auto")
    if given != "auto" and given != value:
        raise InputError(
            f"DeepSpeed config field {name} = {given!r}, but the trainer's value is {value!r} (set in the "
            "--deepspeed file, accelerate's DeepSpeed config or accelerate launch's flags): make it \"auto\", "
            "leave it out or give the trainer's value"
        )
    return {**config, name: value}


def micro_batching(rows: int, micro_batch_size: int) -> tuple[int, int]:
    """DeepSpeed's micro-batch size and accumulation steps for a process's mini-batch of `rows` completions
    cut into micro-batches of at most `micro_batch_size`: a mini-batch smaller than that is one micro-batch of
    its own size, which a DeepSpeed file may give as `train_micro_batch_size_per_gpu`.

    >>> micro_batching(8, 2), micro_batching(4, 8), micro_batching(6, 4)
    ((2, 4), (4, 1), (4, 2))
    """
    return min(micro_batch_size, rows), math.ceil(rows / micro_batch_size)


def initialize(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    config: dict,
    *,
    micro_batch_size: int,
    accumulation_steps: int,
    max_grad_norm: float,
):
    """The DeepSpeed engine around `model` with the trainer's optimizer and scheduler (stepped by the
    engine at each accumulation boundary). `accumulation_steps` = micro-batches per mini-batch."""
    import deepspeed  # optional dependency (.[deepspeed]), imported only when selected

    deepspeed.utils.logger.setLevel(logging.WARNING)
    world = dist.get_world_size()
    config = _filled(config, "train_micro_batch_size_per_gpu", micro_batch_size)
    config = _filled(config, "gradient_accumulation_steps", accumulation_steps)
    config = _filled(config, "train_batch_size", micro_batch_size * accumulation_steps * world)
    config = _filled(config, "gradient_clipping", float(max_grad_norm))
    config.setdefault("steps_per_print", 2**31)  # DeepSpeed's own step log; the run directory has ours
    # its throughput timer would synchronise the device at every forward, decode steps included
    config.setdefault("timers", {"throughput": {"enabled": False}})
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
    )
    return engine


def _partition(engine) -> dict:
    """This process's share of the ZeRO optimizer: the base optimizer's state over its flat partitions
    and the float32 master copies of those partitions."""
    zero = engine.optimizer
    return {
        # on the CPU: gathered objects are unpickled on process 0, which may not see the others' GPUs
        "base": send_to_device(zero.optimizer.state_dict(), "cpu"),
        "fp32": [t.detach().cpu().clone() for t in zero.single_partition_of_fp32_groups],
    }


def full_optimizer_state(engine) -> dict:
    """Every process's partition, gathered on process 0 (collective; the others get an empty dict)."""
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(_partition(engine), parts, dst=0)
    if dist.get_rank() != 0:
        return {}
    return {PARTITIONS: parts, "zero_stage": engine.zero_optimization_stage()}


def load_optimizer_state(engine, state: dict) -> None:
    """Give each process its partition of a checkpoint written by `full_optimizer_state`."""
    if PARTITIONS not in state:
        raise InputError("this checkpoint was written without DeepSpeed ZeRO; resume it without DeepSpeed")
    parts, world = state[PARTITIONS], dist.get_world_size()
    if len(parts) != world or state["zero_stage"] != engine.zero_optimization_stage():
        raise InputError(
            f"this checkpoint was written by {len(parts)} processes under ZeRO stage {state['zero_stage']}; "
            f"resume it with the same (now: {world} processes, stage {engine.zero_optimization_stage()})"
        )
    own = parts[dist.get_rank()]
    zero = engine.optimizer
    zero.optimizer.load_state_dict(own["base"])
    with torch.no_grad():
        for master, saved in zip(zero.single_partition_of_fp32_groups, own["fp32"], strict=True):
            master.copy_(saved)
