"""One typed config dataclass per command, parsed from flags, a TOML/YAML file and named presets.

Precedence, lowest first: the dataclass defaults, `--preset NAME`, `--config FILE`, explicit flags.
Every field carries its help text in `field(metadata={"help": ...})`; a field `max_steps` is the flag
`--max-steps`. Validation lives in the dataclass's `__post_init__` (raise ValueError naming the field);
its message is shown as a command-line error.
"""

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _scalar_type(annotation: Any) -> tuple[Any, bool]:
    """(the type to parse a flag value with, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"config fields may be `X | None` for one type X, got {annotation}")
        return inner[0], True
    return annotation, False


def _parser_for(tp: Any, optional: bool, name: str):
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)

        def parse_choice(text: str):
            if optional and text.lower() == "none":
                return None
            if text not in choices:
                valid = ", ".join(map(str, choices))
                raise argparse.ArgumentTypeError(f"{name}: {text!r} is not one of {valid}")
            return text

        return parse_choice
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return lambda text: tuple(item(part) for part in text.split(",") if part != "")

    def parse_value(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return tp(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a valid {tp.__name__}") from err

    return parse_value


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, presets: dict[str, dict] | None = None
) -> None:
    """Add `--config`, `--preset` (when presets exist) and one flag per field of the dataclass `cls`."""
    parser.add_argument("--config", type=Path, help="TOML or YAML file of field values (flags override it)")
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="named set of field values")
    for f in dataclasses.fields(cls):
        tp, optional = _scalar_type(_field_types(cls)[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if tp is bool:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {default})",
            )
            continue
        if typing.get_origin(tp) is typing.Literal:
            help_text += f" [{' | '.join(map(str, typing.get_args(tp)))}]"
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=_parser_for(tp, optional, f.name),
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=f"{help_text} (default: {default})",
        )


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) mapping of field values; errors name the file."""
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"config file {path}: expected a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"config file {path}: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: expected a mapping of field names to values")
    return values


def build_config(cls: type[C], args: argparse.Namespace, presets: dict[str, dict] | None = None) -> C:
    """The dataclass from parsed arguments: defaults < preset < config file < flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    preset = getattr(args, "preset", None)
    if preset:
        values.update(presets[preset])  # type: ignore[index]
    if getattr(args, "config", None):
        from_file = load_config_file(args.config)
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise ValueError(f"config file {args.config}: unknown field(s) {', '.join(unknown)}")
        values.update(from_file)
    values.update({name: getattr(args, name) for name in names if hasattr(args, name)})
    hints = _field_types(cls)
    for name, value in values.items():
        tp, _ = _scalar_type(hints[name])
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of the config (tuples become lists), for the run directory."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
