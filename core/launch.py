"""What every app's train command does around the trainer: pick the run directory, build the app's
offline tiny model when no --model is given, load the policy, and print a summary table at the end."""

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list

from core.atomic import write_json_atomic
from core.config import config_to_dict
from core.policy import LoraSettings, load_policy
from core.runs import (
    RunDir,
    default_run_dir,
    refuse_a_file_in_the_way,
    refuse_another_kind_of_run,
    refuse_existing_run,
    run_to_resume,
)
from core.trainer import GRPOConfig, join_processes


def with_run_dir(config: GRPOConfig, app: str, algorithm: str = "grpo") -> GRPOConfig:
    """The config with `run_dir` resolved (default runs/<app>/<timestamp>), announced on the terminal.
    `--resume` needs the directory of an earlier `app` `algorithm` run: it is an error, not a fresh run,
    without one, and so is one of another kind; a fresh run into a directory that holds one is refused
    too, and a resume whose --max-steps is below its newest checkpoint's step. All on every process, before
    anything is built there, and so is a --run-dir that is a file."""
    if config.run_dir is not None:
        refuse_a_file_in_the_way(config.run_dir, "--run-dir")
    if config.resume:
        run_to_resume(config.run_dir)
        refuse_another_kind_of_run(config.run_dir, RunDir(config.run_dir).read_config(), app, algorithm)
        newest = RunDir(config.run_dir).newest_checkpoint_step()
        if newest is not None and newest > config.max_steps:  # else nothing trains, and the model is past it
            raise ValueError(
                f"{config.run_dir}: its newest checkpoint is at step {newest}, past --max-steps "
                f"{config.max_steps}; give --max-steps {newest} or more to continue it"
            )
    if not config.resume and config.run_dir is not None:
        refuse_existing_run(config.run_dir)
    state = join_processes(config.device)
    chosen = [config.run_dir or (str(default_run_dir(app)) if state.is_main_process else None)]
    if state.num_processes > 1:  # the default is a timestamp, claimed by rank 0: every process uses it
        broadcast_object_list(chosen)
    if state.is_main_process:
        print(f"run directory: {chosen[0]}")
    return replace(config, run_dir=chosen[0])


BUILT_WITH = "built_with.json"  # written into a built base model last: the settings it was built with


# GRPOConfig fields that set how long a run trains and what it keeps and logs; no app builds its base model
# from them, so a start stopped before its run began may be started again with other values of these
RUN_LENGTH_FIELDS = ("resume", "max_steps", "save_every", "keep_checkpoints", "rollouts_to_log", "report_to")


def build_settings(config: Any) -> dict[str, Any]:
    """What a default base model is built from: the command's config but `RUN_LENGTH_FIELDS` (JSON-able),
    and the size and modification time of each file a field names (a data file edited in place is other
    data)."""
    settings = {key: value for key, value in config_to_dict(config).items() if key not in RUN_LENGTH_FIELDS}
    files = {}
    for key, value in settings.items():
        if isinstance(value, str) and value and Path(value).is_file():
            stat = Path(value).stat()
            files[key] = [stat.st_size, stat.st_mtime_ns]
    return settings | {"files": files}


def build_in_run(
    path: Path, build: Callable[[Path], object], *, resume: bool, device: str, settings: Mapping[str, Any]
) -> None:
    """`build(path)` on the main process, the others waiting. A resumed run reuses what is there. A fresh
    run reuses a complete build with the same `settings` (`BUILT_WITH`, written after the build), left by a
    start stopped before its run existed (Ctrl-C during a base model's SFT, or the evaluation before
    training), and builds anew otherwise: a model left by a start with other settings is not this run's."""
    state = join_processes(device)
    with state.main_process_first():
        if state.is_main_process and not resume and _built_with(path) != settings:
            shutil.rmtree(path, ignore_errors=True)
        if not (path / "config.json").is_file():
            build(path)
            if state.is_main_process:
                write_json_atomic(path / BUILT_WITH, dict(settings))


def _built_with(path: Path) -> dict | None:
    try:
        return json.loads((path / BUILT_WITH).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or damaged: build anew
        return None


def policy_for(config: GRPOConfig, build_default: Callable[[Path], object]):
    """(model, tokenizer) from `--model`, or from the app's tiny model, built into <run_dir>/base_model by
    `build_default(path)` (`build_in_run`)."""
    path = Path(config.model) if config.model is not None else Path(config.run_dir) / "base_model"
    if config.model is None:
        settings = build_settings(config)
        build_in_run(path, build_default, resume=config.resume, device=config.device, settings=settings)
    lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha, seed=config.seed) if config.lora else None
    return load_policy(path, lora=lora, device=config.device)


def summary_table(history: list[dict[str, float]], rows: int = 10) -> str:
    """Step, reward, zero-spread fraction, entropy and step time at up to `rows` evenly spaced steps."""
    if not history:
        return "no steps run"
    shown = min(rows, len(history))
    picks = sorted(
        {round(i * (len(history) - 1) / max(shown - 1, 1)) for i in range(shown)}
    )  # first and last
    lines = [f"{'step':>6} {'reward':>8} {'zero-spread':>11} {'entropy':>8} {'step s':>7}"]
    for i in picks:
        m = history[i]
        lines.append(
            f"{m['step']:>6} {m['reward']:>8.3f} {m['zero_spread_frac']:>11.2f} "
            f"{m['entropy']:>8.3f} {m['step_time']:>7.2f}"
        )
    return "\n".join(lines)
