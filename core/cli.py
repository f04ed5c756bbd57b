"""The `grpo-suite` command: `grpo-suite <app> <verb> [flags]`.

Core imports no app. Each app declares an entry point in the group `grpo_suite.apps` (pyproject.toml)
pointing at a function `register(apps)` that adds its sub-parser with `add_app` and its verbs with
`add_command`; `grpo-suite --help` lists every app and its verbs.
"""

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from core.config import add_config_arguments, build_config
from core.data import InputError
from core.runs import release_unused_run_dirs
from core.trainer import leave_process_group

ENTRY_POINT_GROUP = "grpo_suite.apps"


def add_app(apps: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """Add an app `name` under `grpo-suite`; returns the action to add its verbs to."""
    parser = apps.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest="verb", metavar="VERB", required=True)


def add_command(
    verbs: argparse._SubParsersAction,
    name: str,
    config_cls: type,
    run: Callable[[Any], Any],
    help: str,
    presets: dict[str, dict] | None = None,
) -> None:
    """Add a verb whose flags are the fields of `config_cls`; `run(config)` does the work."""
    # no abbreviations: `--seed 5` must not become `--seeds 5`, as a misspelt key in a config file is refused
    parser = verbs.add_parser(name, help=help, description=help, allow_abbrev=False)
    add_config_arguments(parser, config_cls, presets)
    parser.set_defaults(_command=(parser, config_cls, run, presets))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-suite",
        description="GRPO applications on one shared core. `grpo-suite <app> <verb> --help` for the flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    apps = parser.add_subparsers(dest="app", metavar="APP", required=True)
    unavailable = []
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as err:  # an app whose optional dependency is missing must not break the others
            unavailable.append(f"  {entry.name:<16}unavailable: {err}")
            # chosen anyway, it says why it is missing (not argparse's "invalid choice")
            stub = apps.add_parser(entry.name, help=f"unavailable: {err}")
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(_unavailable=f"app {entry.name} is unavailable: {err}")
            continue
        register(apps)
    lines = []
    for app_name, app_parser in apps.choices.items():
        if app_parser.get_default("_unavailable"):
            continue
        verbs = next(a for a in app_parser._actions if isinstance(a, argparse._SubParsersAction))
        lines.append(f"  {app_name:<16}{' | '.join(verbs.choices)}")
    parser.epilog = "apps and their verbs:\n" + ("\n".join(lines + unavailable) or "  (no app installed)")
    return parser


def _names_an_input(err: ValueError) -> bool:
    """A bad-input error (an InputError, or one that starts with the file it is about: "data.jsonl:3: not
    valid JSON") is shown as a command-line error. Any other ValueError keeps its traceback."""
    if isinstance(err, InputError):
        return True
    head = str(err).split(":", 1)[0]
    try:
        return bool(head) and Path(head).exists()
    except OSError:  # not a path at all (a name too long for one)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_unavailable", None):
        parser.error(args._unavailable)
    command_parser, config_cls, run, presets = args._command
    if int(os.environ.get("RANK", "0")) > 0:  # under a multi-process launch only process 0 prints tables
        sys.stdout = open(os.devnull, "w")  # for the life of the process; stderr stays
    try:
        config = build_config(config_cls, args, presets)
    except (ValueError, TypeError) as err:
        command_parser.error(str(err))
    shown = warnings.formatwarning  # a warning as a line of its own, not the source line that raised it
    warnings.formatwarning = lambda message, *rest, **kwargs: f"{command_parser.prog}: warning: {message}\n"
    try:
        run(config)
    except KeyboardInterrupt:  # Ctrl-C: the run's status.json already says failed; no traceback
        if int(os.environ.get("RANK", "0")) > 0:  # under a launch every process gets it: process 0 says so
            command_parser.exit(130)
        command_parser.exit(
            130,
            f"{command_parser.prog}: interrupted; a run it was writing is marked failed (`--resume --run-dir "
            "DIR` continues it, where the command has that flag); stopped before its run began, the same "
            "command with the same --run-dir starts it again, reusing a base model it had built\n",
        )
    except (FileExistsError, FileNotFoundError) as err:  # a wrong path or run directory: say so, no traceback
        command_parser.exit(2, f"{command_parser.prog}: error: {err}\n")
    except ValueError as err:
        if not _names_an_input(err):
            raise
        command_parser.exit(2, f"{command_parser.prog}: error: {err}\n")
    finally:
        warnings.formatwarning = shown
        release_unused_run_dirs()  # a command stopped before writing its run leaves no empty directory
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
