"""FSDP for the trainer: shard a policy's weights, gradients and optimizer state across processes with
torch's FSDP2 (`fully_shard`), and move its full state in and out of checkpoints.

Selected by `GRPOConfig.fsdp` or by accelerate's FSDP config (`accelerate launch --use_fsdp`, which sets
ACCELERATE_USE_FSDP); the trainer then shards the model itself, one FSDP unit per decoder layer (the
model's `_no_split_modules`, as accelerate's transformer-based wrap policy does) plus the root. Of the
plugin's options only the choice of FSDP is read. Accelerate refuses FSDP on CPU (`--cpu` and `--use_fsdp`
are exclusive), so on CPU pass `--device cpu --fsdp` to a command launched with `accelerate launch
--multi_gpu --num_processes N` or `torchrun --nproc_per_node N`; torch's FSDP2 runs there on gloo.

What sharding changes for the caller:
- every process must make the same forward calls, in the same order (each one all-gathers weights):
  the decode loop and HF `generate` run until every process is done (`synced_gpus`);
- gradients come back averaged over processes, not summed: the trainer scales them back to the sum;
- the full state dict is gathered by all processes together (`full_state`), and loaded by all.
"""

import os
from types import MethodType

import torch
import torch.distributed as dist
from accelerate.utils import parse_flag_from_env
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from core.policy import SHARDED_LOGPROBS_METHOD, _completion_logprobs


def fsdp_requested(flag: bool) -> bool:
    """Whether to shard: `flag` (GRPOConfig.fsdp) or accelerate's FSDP config (version 2 only)."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "2") != "2":
        raise ValueError("the GRPO trainer shards with FSDP2 (fully_shard); set fsdp_version: 2")
    return flag or parse_flag_from_env("ACCELERATE_USE_FSDP")


def shard(model: nn.Module, *, reshard_root: bool = False) -> nn.Module:
    """Shard `model` in place over the default process group, on the device its weights are on: each
    decoder layer its own unit, the rest (embeddings, final norm, LM head) in the root unit, the
    transformers model (inside a PEFT wrapper, whose `generate` calls the inner model directly). Registers
    the chunked logprob pass of `core.policy` as an FSDP forward method of the root, so the LM head it
    reads is unsharded while it runs. FSDP keeps the root's weights gathered between forward and backward;
    `reshard_root` frees them after each forward (a model that is never trained: the KL reference)."""
    root = _inner(model)
    device = next(root.parameters()).device
    # without a mesh fully_shard would pick the machine's accelerator even for a run on CPU
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layer_classes = set(getattr(root, "_no_split_modules", None) or ())
    layers = [m for m in root.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"{type(root).__name__} names no decoder-layer class in _no_split_modules; cannot choose FSDP units"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh, **({"reshard_after_forward": True} if reshard_root else {}))
    setattr(root, SHARDED_LOGPROBS_METHOD, MethodType(_completion_logprobs, root))
    register_fsdp_forward_method(root, SHARDED_LOGPROBS_METHOD)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(_inner(model), FSDPModule)


def all_done(done: torch.Tensor, synced: bool) -> bool:
    """`done` (a bool scalar) of this process, or with `synced` whether it holds on every process."""
    if not synced:
        return bool(done)
    flag = done.to(torch.int64).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """(full model state dict, full optimizer state dict or None) on CPU; collective: every process calls
    it, process 0 gets the tensors (the others get empty dicts). Trainable weights only under LoRA."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if len(trainable) < sum(1 for _ in model.parameters()):  # LoRA: keep the adapter's weights only
        model_state = {name: t for name, t in model_state.items() if name in trainable}
    optimizer_state = (
        None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)
    )
    return model_state, optimizer_state


def without_tied_copies(model: nn.Module, state: dict) -> dict:
    """`state` less the second names of tied weights (lm_head.weight of a model tying it to the input
    embeddings), which `save_pretrained` leaves out of a model it reads itself but not of a given dict."""
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in names}


def load_full_state(
    model: nn.Module, model_state: dict, optimizer: torch.optim.Optimizer, optimizer_state: dict
) -> None:
    """Load the full state dicts of `full_state` into a sharded model and its optimizer (collective)."""
    if any(isinstance(key, int) for key in optimizer_state.get("state", {})):
        raise ValueError(
            "this checkpoint was written without FSDP (its optimizer state is keyed by parameter index); "
            "resume it without --fsdp"
        )
    strict = all(p.requires_grad for p in model.parameters())  # LoRA checkpoints hold the adapter only
    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
