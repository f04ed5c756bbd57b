"""LoRA adapters merged into the weights for generation, leaving the trained model as it was.

`merged_state_dict` gives the merged weights as a new state dict (for an engine that loads weights, vLLM);
`lora_merged` merges float32 adapters in place for the duration of a decode and puts the exact base
weights back (for `HFGenerateBackend`). Only plain LoRA deltas (B @ A) are merged.
Tests: `pytest tests/core/test_rollout.py`.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from core.sharding import is_sharded


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under the plain HF names, with active LoRA adapters merged in; the model is not
    modified (PEFT's merge_adapter + unmerge_adapter would, and in bf16 W + d - d drifts from W).

    A plain model gives its state dict. For a PEFT model: base weights with `.base_layer` stripped, each
    active adapter's `get_delta_weight` added, `modules_to_save` copies of the active adapter in place of
    the originals. LoRA variants (DoRA, ...) and LoRA biases are refused: their merge is not a plain delta;
    so is an adapter on a weight tied to another module (embeddings), which a loader would tie again.
    """
    if not hasattr(model, "peft_config"):
        return dict(model.state_dict())
    from peft.tuners.lora import LoraLayer  # only PEFT models get here

    active = set(model.active_adapters)
    shared = _shared_parameters(model)
    merged = {}
    for key, tensor in model.get_base_model().state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            prefix, rest = key.split(".modules_to_save.", 1)
            adapter, param = rest.split(".", 1)
            if adapter not in active:
                continue
            key = f"{prefix}.{param}"
        merged[key.replace(".base_layer.", ".")] = tensor.detach()
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in _unmerged_adapters(module):
            if not _plain_lora(module, adapter):
                raise NotImplementedError(
                    f"merging adapter {adapter!r} of {name}: a LoRA variant (DoRA, ...) or a LoRA bias is not "
                    "a plain weight delta"
                )
            if id(module.get_base_layer().weight) in shared:
                raise NotImplementedError(
                    f"merging adapter {adapter!r} of {name}: its base weight is shared with another module "
                    "(tied embeddings), which the merged state dict would change too"
                )
            key = f"{name}.weight"
            merged[key] = merged[key] + module.get_delta_weight(adapter).to(merged[key].dtype)
    return merged


def _unmerged_adapters(layer: nn.Module) -> list[str]:
    """The active adapters of a PEFT LoRA layer that are not merged into its base weight yet."""
    return [a for a in layer.active_adapters if a not in layer.merged_adapters and a in layer.scaling]


@contextmanager
def lora_merged(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every plain LoRA adapter of `model` merged into its float32 base weight for the duration; then the
    exact base weights back. Generation then runs one matmul per adapted layer instead of three: a 64-token
    decode of the 4-layer benchmark model with r = 16 on every linear takes the time of the bare model.

    The merged weight is a new tensor W + sum(delta) that the layer's base weight points to while PEFT sees
    the adapters as merged (`merged_adapters`, so its forward calls only the base layer). W itself is kept
    and put back, so the frozen weights stay bitwise what they were (PEFT's merge + unmerge computes
    W + d - d). The cost is a second copy of each merged weight while generation runs.

    Left unmerged (they run their adapter as usual):
    - `enabled` False (the caller decodes under autocast);
    - models without PEFT, and FSDP-sharded models;
    - base weights that are not float32: rounding W + d to bf16 would drop the small early updates;
    - base weights shared with another module (tied embeddings): the merge would change both;
    - layers with their adapters disabled;
    - layers other than PEFT's plain `Linear` / `Embedding` (quantized ones among them);
    - adapters that are more than B @ A: a LoRA variant (DoRA, ...) or a LoRA bias.
    """
    if not enabled or not hasattr(model, "peft_config") or is_sharded(model):
        yield
        return
    from peft.tuners import lora  # only PEFT models get here

    shared = _shared_parameters(model)
    swapped = []  # (layer, its base weight parameter, the original tensor, its merged_adapters before)
    try:
        with torch.no_grad():
            for layer in model.modules():
                if type(layer) not in (lora.Linear, lora.Embedding) or layer.disable_adapters:
                    continue
                adapters = _unmerged_adapters(layer)
                weight = layer.get_base_layer().weight
                if (
                    not adapters
                    or weight.dtype != torch.float32
                    or id(weight) in shared
                    or not all(_plain_lora(layer, a) for a in adapters)
                ):
                    continue
                original = weight.data
                merged = original.clone()
                for adapter in adapters:
                    merged += layer.get_delta_weight(adapter)
                swapped.append((layer, weight, original, list(layer.merged_adapters)))
                weight.data = merged
                layer.merged_adapters.extend(adapters)
        yield
    finally:
        for layer, weight, original, merged_before in swapped:
            weight.data = original
            layer.merged_adapters[:] = merged_before


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters more than one module holds (tied input and output embeddings)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


def _plain_lora(layer: nn.Module, adapter: str) -> bool:
    """Whether `adapter`'s whole effect on `layer` is its weight delta: no variant (DoRA, ...), no LoRA bias."""
    variant = getattr(layer, "lora_variant", {}).get(adapter) or layer.use_dora.get(adapter, False)
    return not variant and not getattr(layer, "lora_bias", {}).get(adapter, False)
