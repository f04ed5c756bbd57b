"""One typed config dataclass per command, parsed from flags, a TOML/YAML file and named presets.

Precedence, lowest first: the dataclass defaults, `--preset NAME`, `--config FILE`, explicit flags.
Every field carries its help text in `field(metadata={"help": ...})`; a field `max_steps` is the flag
`--max-steps`. Validation lives in the dataclass's `__post_init__` (raise ValueError naming the field);
its message is shown as a command-line error.
"""

import argparse
import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.runs import latest_config

C = TypeVar("C")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_types(cls: type) -> dict[str, Any]:
    """{field: its type} of a dataclass; class attributes (`ClassVar`, as `OFFLINE_MODEL_FIELDS`) are not
    fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: hint for name, hint in typing.get_type_hints(cls).items() if name in names}


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

        def parse_items(text: str) -> tuple | None:
            if optional and text.strip().lower() == "none":
                return None
            try:
                values = tuple(item(part.strip()) for part in text.split(",") if part.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{name}: {text!r} is not a comma-separated list of {item.__name__} values (e.g. 0,1,2)"
                ) from None
            if item is float and not all(math.isfinite(v) for v in values):  # as a single float flag
                raise argparse.ArgumentTypeError(
                    f"{name}: {text!r} holds a value that is not a finite number"
                )
            return values

        return parse_items

    def parse_value(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = tp(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a valid {tp.__name__}") from err
        if tp is float and not math.isfinite(value):  # nan > 0 is False: --beta nan would turn KL off
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a finite number")
        return value

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
        default = _as_flag_value(default)
        if tp is bool:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {default})".replace("%", "%%"),  # argparse formats help with %
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
            # an empty default is no value: the command says what it needs when the flag is left out
            help=(help_text + ("" if default == "" else f" (default: {default})")).replace("%", "%%"),
        )


def _as_flag_value(value: Any) -> Any:
    """A default as the flag would be written: a tuple comma-separated (`0,1,2`), None as `none`."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else value


class _StrictYamlLoader(yaml.SafeLoader):
    """YAML as TOML reads it: a key given twice is an error (PyYAML keeps the last), and only true/false
    are booleans (YAML 1.1 also reads off/on/yes/no, so `autocast: off` became False)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(
                None, None, f"key(s) given twice: {', '.join(twice)}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


_StrictYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) mapping of field values; errors name the file."""
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory, not a file")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"config file {path}: expected a .toml, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if suffix == ".toml" else yaml.load(text, _StrictYamlLoader)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path}: {err}") from err
    if values is None:  # an empty YAML file (or comments only)
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: expected a mapping of field names to values")
    return values


def _checked_value(name: str, value: Any, annotation: Any, source: str) -> Any:
    """A value from a config file or preset, checked against its field's type as a flag would be: a
    Literal's choices, a real bool (not "false"), a whole int, an int or float (or a string that parses as
    one: YAML reads `1e-6` as a string) for a float, items of a tuple. Errors name the source and field."""
    tp, optional = _scalar_type(annotation)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None  # "none" as the flag reads it: TOML has no null

    def fail(expected: str):
        raise ValueError(f"{source}: {name}: expected {expected}, got {value!r}")

    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            fail("one of " + ", ".join(map(repr, typing.get_args(tp))))
        return value
    if typing.get_origin(tp) is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, str):  # comma-separated, as the flag takes it: seeds = "0,1,2"
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            fail(f"a list of {item.__name__}")
        return tuple(_checked_value(f"{name}[{i}]", v, item, source) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:
                fail(f"a number ({tp.__name__})")
        if isinstance(value, bool) or not isinstance(value, int if tp is int else int | float):
            fail(f"a number ({tp.__name__})")
        try:
            finite = math.isfinite(value)  # an int too large for a float overflows here
        except OverflowError:
            finite = False
        if not finite:
            fail("a finite number")
        return tp(value)
    if tp is str and not isinstance(value, str):
        fail("a string")
    return value


def config_file_values(cls: type, path: Path) -> dict[str, Any]:
    """The field values of a TOML/YAML file for the dataclass `cls`, each checked against its field's
    type; an unknown field or a value of the wrong type is an error naming the file and the field."""
    values = load_config_file(path)
    hints = _field_types(cls)
    unknown = sorted(map(str, set(values) - set(hints)))  # map(str): YAML keys may be numbers
    if unknown:
        message = f"config file {path}: unknown field(s) {', '.join(unknown)}"
        as_fields = [name.replace("-", "_") for name in unknown if name.replace("-", "_") in hints]
        if as_fields:
            message += f" (did you mean {', '.join(as_fields)}? a file names fields with _, flags use -)"
        raise ValueError(message)
    return {k: _checked_value(k, v, hints[k], f"config file {path}") for k, v in values.items()}


def build_config(cls: type[C], args: argparse.Namespace, presets: dict[str, dict] | None = None) -> C:
    """The dataclass from parsed arguments: defaults < preset < config file < flags. With `resume` of a
    run (a flag or a file value, as `run_dir`) the run's stored config comes right after the defaults, so
    the run continues with its own settings (preset and file included) and only what is given again
    changes. A `__post_init__` error "field: ..." about a value from a preset, a file or the resumed run
    says where the value came from. A class may define `check_given(values, given)`, called with the names
    given by a flag or a file (not a default, a preset or the resumed run), to refuse what depends on that,
    and `OFFLINE_MODEL_FIELDS` (`_refuse_unread_model_fields`)."""
    hints = _field_types(cls)
    layers: list[tuple[str | None, dict[str, Any]]] = []  # (source, values), lowest first; flags: no source
    preset = getattr(args, "preset", None)
    if preset:
        source, preset_values = f"preset {preset}", presets[preset]  # type: ignore[index]
        layers.append((source, {k: _checked_value(k, v, hints[k], source) for k, v in preset_values.items()}))
    if getattr(args, "config", None):
        layers.append((f"config file {args.config}", config_file_values(cls, args.config)))
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    layers.append((None, flags))
    chosen = {k: v for _, layer in layers for k, v in layer.items()}
    resumed = None  # "<run_dir>, a '<app>' '<algorithm>' run" when its stored config is a layer
    stored: dict[str, Any] = {}
    if chosen.get("resume") and chosen.get("run_dir") is not None:
        path = Path(chosen["run_dir"]) / "config.json"
        kind = _run_kind(path)
        # its kind named: a value another command's run stored may not fit this command's field
        source = f"{path} (the resumed run's config{f', {kind}' if kind else ''})"
        stored = _resumed_run_values(path, hints, source)
        layers.insert(0, (source, stored))
        if stored:
            resumed = f"{chosen['run_dir']}, {kind}"
    values = {k: v for _, layer in layers for k, v in layer.items()}
    source_of = {k: source for source, layer in layers for k in layer}
    # what the user gave: a flag or a file (not a default, a preset, or the resumed run's stored value)
    given = {k for k, source in source_of.items() if source is None or source.startswith("config file ")}
    _refuse_unread_model_fields(cls, values, given, source_of, stored)
    try:
        if "device" in values:
            _check_device(values["device"])
        if hasattr(cls, "check_given"):  # a rule on where values came from, which the dataclass cannot see
            cls.check_given(values, given)
        return cls(**values)
    except ValueError as err:
        named = re.match(r"(\w+)(?::| must )", str(err))  # "field: ..." or "field must be ...", one field
        field_name = named.group(1) if named else None
        if source_of.get(field_name):
            raise ValueError(f"{source_of[field_name]}: {err}") from err
        if resumed:  # the stored values may be another command's: say whose they are
            raise ValueError(
                f"{err} (with the settings of {resumed}: resume a run with the command that made it)"
            ) from err
        raise


def _refuse_unread_model_fields(
    cls: type, values: dict[str, Any], given: set[str], source_of: dict[str, str | None], stored: dict
) -> None:
    """A class's `OFFLINE_MODEL_FIELDS` shape only the app's offline model, built once at a run's start:
    one given with `model` (which replaces that model), or set by a preset, file or flag to another value
    than a resumed run's model was built with (`stored`: its config; the resume keeps that model), would
    be recorded and never read. A ValueError naming where it was set."""
    for name in sorted(getattr(cls, "OFFLINE_MODEL_FIELDS", ())):
        where = source_of.get(name)
        shown = f"{where}: {name}" if where else f"--{name.replace('_', '-')}"
        if name in given and values.get("model") is not None:
            raise ValueError(
                f"{shown} sets the offline tiny model, which --model {values['model']} replaces; leave it out"
            )
        built = values.get("model") is None  # a run of --model built no model of these fields
        if built and name in stored and stored[name] != values[name]:
            raise ValueError(
                f"{shown} {values[name]!r}: the resumed run's model was built with {stored[name]!r}, and a "
                "resume keeps its model; leave it out, or start a new run"
            )


def _run_kind(path: Path) -> str | None:
    """ "a '<app>' '<algorithm>' run" from a run's config.json, None when it is not one."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict):
        return None
    return f"a {stored.get('app')!r} {stored.get('algorithm')!r} run"


def _resumed_run_values(path: Path, hints: dict[str, Any], source: str) -> dict[str, Any]:
    """The field values the run whose config.json is `path` last ran with; {} when there is no run."""
    try:
        stored = latest_config(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no run there: --resume itself says so (core.launch.with_run_dir)
    try:
        return {k: _checked_value(k, v, hints[k], source) for k, v in stored.items() if k in hints}
    except ValueError as err:  # most likely another command's run (a sudoku run's size 4 resumed by math)
        raise ValueError(f"{err}; resume a run with the command that made it") from None


def _check_device(device: str) -> None:
    """A command's --device, checked before anything is built: cpu, or cuda[:N] with a CUDA build of torch."""
    import torch

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device: {device!r} is not cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device: {device!r}, but this torch sees no CUDA GPU (torch.cuda.is_available() is False)"
        )


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of the config (tuples become lists), for the run directory."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
