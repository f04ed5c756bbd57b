"""A public-goods run's state at a step, as a core checkpoint (`RunDir.save_checkpoint`), so that
`public-goods run --resume` goes on exactly as the run would have: the lattice, the model's generator, the
update rule's own state (networks, Adam and the sampling generator; a Q table) and the trajectory so far.

    checkpoints/step-<t>/model.safetensors    lattice and snapshots/<t> (int8 lattices)
                        hooks.*               the update rule's `state_dict()`
                        trainer_state.json    cooperation so far, absorbed_at, seconds, the model's rng state
"""

from pathlib import Path

import numpy as np
import torch

from apps.public_goods.experiments import Trajectory, make_model
from apps.public_goods.model import GameConfig, PublicGoodsModel, mean_payoff
from core.runs import RunDir, load_checkpoint


def save_run(run: RunDir, model: PublicGoodsModel, so_far: Trajectory, keep_last: int) -> Path:
    """Checkpoint `model` at its step with the unpadded trajectory `so_far`; keep the newest `keep_last`."""
    lattices = {"lattice": torch.from_numpy(model.strategy.copy())}
    lattices |= {f"snapshots/{t}": torch.from_numpy(grid) for t, grid in so_far.snapshots.items()}
    state = {
        "cooperation": so_far.cooperation,
        "absorbed_at": so_far.absorbed_at,
        "seconds": so_far.seconds,
        "rng": model.rng.bit_generator.state,  # PCG64's 128-bit integers: JSON keeps them exact
    }
    return run.save_checkpoint(
        model.steps,
        model_state=lattices,
        optimizer_state=None,
        scheduler_state=None,
        trainer_state=state,
        rng_state=None,
        keep_last=keep_last,
        hooks_state=model.dynamics.state_dict(),
    )


def load_run(path: str | Path, config: GameConfig, seed: int) -> tuple[PublicGoodsModel, Trajectory]:
    """The (model, trajectory so far) that `save_run` wrote into checkpoint `path`, for `simulate(start=...)`.
    A checkpoint that does not fit `config` (another lattice size, or an update rule that keeps other
    state) is an error naming it; `run --resume` refuses a run of another method before this."""
    checkpoint = load_checkpoint(path)
    state, tensors = checkpoint.trainer_state, checkpoint.model_state
    model = make_model(config, seed)
    try:
        lattice = tensors["lattice"].numpy()
        if lattice.shape != model.strategy.shape:
            raise ValueError(f"a lattice of shape {lattice.shape}, not {model.strategy.shape}")
        if len(state["cooperation"]) != checkpoint.step + 1:
            raise ValueError(f"{len(state['cooperation'])} cooperation values for step {checkpoint.step}")
        model.dynamics.load_state_dict(checkpoint.hooks_state, model)
        model.rng.bit_generator.state = state["rng"]  # last: building the learner draws from it
    except (KeyError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{path}: not a checkpoint of this run's game ({config.method}, L = {config.size}): {err}"
        ) from err
    model.strategy = lattice.astype(np.int8)
    model.steps = checkpoint.step
    snapshots = {
        int(name.removeprefix("snapshots/")): grid.numpy().astype(np.int8)
        for name, grid in tensors.items()
        if name.startswith("snapshots/")
    }
    so_far = Trajectory(
        state["cooperation"], snapshots, state["absorbed_at"], state["seconds"], checkpoint.step
    )
    # mesa's DataCollector as the run had it: both its reporters follow from the cooperation rate
    model.datacollector.model_vars["cooperation"] = list(so_far.cooperation)
    model.datacollector.model_vars["mean_payoff"] = [
        mean_payoff(c, config.r, config.cost_per_group) for c in so_far.cooperation
    ]
    return model, so_far
