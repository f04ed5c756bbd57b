"""RNG state for checkpoints: python `random`, numpy's global generator, torch's CPU and CUDA generators
and the caller's named generators, captured as plain data and tensors that `torch.load(weights_only=True)`
accepts, and restored so that a resumed run continues exactly as an uninterrupted one.
Tests: `pytest tests/core/test_runs.py`.
"""

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

RandomSource = torch.Generator | np.random.Generator | random.Random


def capture_rng_state(generators: Mapping[str, RandomSource] | None = None) -> dict:
    """The state of python `random`, numpy's global generator, torch's CPU generator, every CUDA device's
    generator (when CUDA is available) and the caller's named generators (`torch.Generator`,
    `numpy.random.Generator` or `random.Random`), as tensors and plain python data that
    `torch.load(weights_only=True)` accepts."""
    state: dict[str, Any] = {
        "python": _python_random_state(random.getstate()),
        "numpy": _numpy_global_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: _generator_state(name, gen) for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, RandomSource] | None = None) -> None:
    """Put back what `capture_rng_state` took; `generators` must name the same generators as at capture."""
    generators = dict(generators or {})
    if set(generators) != set(state["generators"]):
        raise ValueError(
            f"the RNG state holds generators {sorted(state['generators'])} but "
            f"{sorted(generators)} were given to restore"
        )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    key = np.asarray(numpy["key"], dtype=np.uint32)
    np.random.set_state((numpy["bit_generator"], key, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state:
        _restore_cuda(state["torch_cuda"])
    for name, gen in generators.items():
        saved, kind = state["generators"][name], _kind(name, gen)
        if saved["kind"] != kind:
            raise ValueError(f"generator {name!r} was saved as a {saved['kind']} but a {kind} was given")
        if isinstance(gen, torch.Generator):
            gen.set_state(saved["state"])
        elif isinstance(gen, np.random.Generator):
            gen.bit_generator.state = saved["state"]
        else:
            version, internal, gauss_next = saved["state"]
            gen.setstate((version, tuple(internal), gauss_next))


def _restore_cuda(states: list[Tensor]) -> None:
    # A GPU run resumed elsewhere cannot continue bit for bit; say so rather than fail or keep quiet.
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(states):
        warnings.warn(
            f"the checkpoint holds RNG states for {len(states)} CUDA devices but {available} are available; "
            f"restoring {min(available, len(states))}, so random draws on the GPU will differ",
            stacklevel=3,
        )
    for device, device_state in enumerate(states[:available]):
        torch.cuda.set_rng_state(device_state, device)


_GENERATOR_KINDS = {
    torch.Generator: "torch.Generator",
    np.random.Generator: "numpy.random.Generator",
    random.Random: "random.Random",
}


def _kind(name: str, gen: object) -> str:
    for cls, kind in _GENERATOR_KINDS.items():
        if isinstance(gen, cls):
            return kind
    raise TypeError(
        f"generator {name!r} is a {type(gen).__name__}; supported: torch.Generator, numpy.random.Generator, "
        "random.Random"
    )


def _generator_state(name: str, gen: RandomSource) -> dict:
    kind = _kind(name, gen)
    if isinstance(gen, torch.Generator):
        return {"kind": kind, "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        # bit generator states are dicts of ints and, for some (MT19937, SFC64), uint arrays: arrays become
        # lists (weights_only refuses numpy arrays) and the state setters accept lists back.
        return {"kind": kind, "state": _numpy_to_python(gen.bit_generator.state)}
    return {"kind": kind, "state": _python_random_state(gen.getstate())}


def _python_random_state(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _numpy_global_state() -> dict:
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "bit_generator": name,
        "key": key.tolist(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _numpy_to_python(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _numpy_to_python(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return value
