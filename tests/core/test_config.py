"""core/config.py and core/cli.py: flags, files, presets, precedence, errors, app registration."""

import argparse
import json
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest
import torch

from core import cli
from core.config import add_config_arguments, build_config, config_to_dict
from core.runs import RunDir
from core.trainer import GRPOConfig


@dataclass
class ExampleConfig:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "optimizer steps"})
    loss: Literal["grpo", "dr_grpo"] = field(default="grpo", metadata={"help": "loss"})
    eps_high: float | None = field(default=None, metadata={"help": "upper clip"})
    lora: bool = field(default=False, metadata={"help": "use LoRA"})
    stops: tuple[str, ...] = field(default=("</answer>",), metadata={"help": "stop strings"})
    splits: tuple[str, ...] | None = field(default=None, metadata={"help": "splits; none = all"})

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


PRESETS = {"tiny": {"steps": 2, "lr": 0.5}}


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleConfig, PRESETS)
    return build_config(ExampleConfig, parser.parse_args(argv), PRESETS)


def test_flags_parse_each_type():
    config = parse(["--lr", "0.1", "--loss", "dr_grpo", "--eps-high", "0.28", "--lora", "--stops", "a,b"])
    assert config == ExampleConfig(lr=0.1, loss="dr_grpo", eps_high=0.28, lora=True, stops=("a", "b"))
    assert parse(["--eps-high", "none"]).eps_high is None
    assert parse(["--splits", "test,heldout"]).splits == ("test", "heldout")
    assert parse(["--splits", "test", "--splits", "none"]).splits is None  # not the split ("none",)
    assert parse([]) == ExampleConfig()


def test_precedence_defaults_preset_file_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 5\nloss = "dr_grpo"\nstops = ["x"]\n')
    config = parse(["--preset", "tiny", "--config", str(toml), "--steps", "7"])
    # lr from the preset, loss and stops from the file, steps from the flag
    assert (config.lr, config.loss, config.stops, config.steps) == (0.5, "dr_grpo", ("x",), 7)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 0.25\n")
    assert parse(["--config", str(yaml_file)]).lr == 0.25


def test_bad_values_name_the_field(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--steps", "many"])
    assert "steps: 'many' is not a valid int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--loss", "ppo"])
    assert "loss: 'ppo' is not one of grpo, dr_grpo" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be >= 1"):
        parse(["--steps", "0"])
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown field\(s\) stepz"):
        parse(["--config", str(bad)])
    broken = tmp_path / "broken.toml"
    broken.write_text("steps = = 3\n")
    with pytest.raises(ValueError, match="broken.toml"):
        parse(["--config", str(broken)])
    with pytest.raises(ValueError, match="does not exist"):
        parse(["--config", str(tmp_path / "missing.toml")])
    zero = tmp_path / "zero.toml"
    zero.write_text("steps = 0\n")
    with pytest.raises(
        ValueError, match=f"^config file {zero}: steps must be >= 1, got 0"
    ):  # no source before
        parse(["--config", str(zero)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('loss = "ppo"', "loss: expected one of 'grpo', 'dr_grpo', got 'ppo'"),
        ('lora = "false"', "lora: expected true or false, got 'false'"),  # a string is truthy: refused
        ("steps = 2.5", r"steps: expected a number \(int\), got 2.5"),
        ("steps = true", r"steps: expected a number \(int\), got True"),  # bool is an int to Python
        ("lr = false", r"lr: expected a number \(float\), got False"),
        ('lr = "fast"', r"lr: expected a number \(float\), got 'fast'"),
        ("stops = [1]", r"stops\[0\]: expected a string, got 1"),
        ("stops = 3", "stops: expected a list of str"),
        ("lr = nan", r"lr: expected a finite number, got nan"),  # nan > 0 is False: it would turn a term off
        ("lr = inf", r"lr: expected a finite number, got inf"),
        ("lr = 1" + "0" * 400, r"lr: expected a finite number"),  # an OverflowError traceback before
        ('steps = "none"', r"steps: expected a number \(int\), got 'none'"),  # none: optional fields only
    ],
)
def test_file_values_are_checked_like_flags(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=r"config file .*c.toml: " + message):
        parse(["--config", str(path)])


def test_a_list_in_a_file_may_be_written_as_its_flag_is(tmp_path):
    """Comma-separated, as the flag takes it (the README says file values are checked as flags are)."""
    path = tmp_path / "c.toml"
    path.write_text('stops = "a, b"\n')
    assert parse(["--config", str(path)]).stops == ("a", "b")
    path.write_text('stops = "</answer>"\n')
    assert parse(["--config", str(path)]).stops == ("</answer>",)


def test_a_config_path_that_is_a_directory_or_has_a_capital_suffix(tmp_path):
    with pytest.raises(ValueError, match=f"config file {tmp_path} is a directory, not a file"):
        parse(["--config", str(tmp_path)])
    path = tmp_path / "C.TOML"
    path.write_text("steps = 3\n")
    assert parse(["--config", str(path)]).steps == 3


def test_yaml_numbers_written_as_strings_are_read_as_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-6\nsteps: 3\neps_high: null\n")  # YAML 1.1 reads 1e-6 as a string
    config = parse(["--config", str(path)])
    assert (config.lr, config.steps, config.eps_high) == (1e-6, 3, None) and isinstance(config.lr, float)


def test_none_in_a_file_unsets_an_optional_field_as_the_flag_does(tmp_path):
    toml = tmp_path / "c.toml"  # TOML has no null: "none" is the only way to write it
    toml.write_text('eps_high = "none"\n')
    assert parse(["--eps-high", "0.3", "--config", str(toml)]).eps_high == 0.3
    assert parse(["--preset", "tiny", "--config", str(toml)]).eps_high is None
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("eps_high: None\n")
    assert parse(["--config", str(yaml_file)]).eps_high is None


def test_yaml_reads_off_as_a_string_and_refuses_a_key_given_twice(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("loss: dr_grpo\nlora: true\nstops: [off, yes]\n")  # YAML 1.1 reads off/yes as booleans
    config = parse(["--config", str(path)])
    assert (config.loss, config.lora, config.stops) == ("dr_grpo", True, ("off", "yes"))
    path.write_text("steps: 3\nsteps: 1\n")
    with pytest.raises(ValueError, match=r"c.yaml: .*key\(s\) given twice: steps"):
        parse(["--config", str(path)])
    path.write_bytes(b"\xff\xfe steps: 3")
    with pytest.raises(ValueError, match=r"config file .*c.yaml: 'utf-8' codec can't decode"):
        parse(["--config", str(path)])
    for flag in ("nan", "inf", "-inf"):
        with pytest.raises(SystemExit):
            parse([f"--lr={flag}"])
        assert "is not a finite number" in capsys.readouterr().err
    assert parse(["--stops", "a, b ,"]).stops == ("a", "b")


@dataclass
class RunConfig:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "optimizer steps"})
    run_dir: str | None = field(default=None, metadata={"help": "run directory"})
    resume: bool = field(default=False, metadata={"help": "continue the run"})


def test_resume_continues_with_the_runs_own_settings(tmp_path):
    """A run made with a preset and resumed without it keeps the preset's values; a flag given again wins."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, RunConfig, {"fast": {"lr": 0.5, "steps": 2}})

    def build(argv):
        return build_config(RunConfig, parser.parse_args(argv), {"fast": {"lr": 0.5, "steps": 2}})

    first = build(["--preset", "fast", "--run-dir", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"app": "t", "config": config_to_dict(first)}))
    resumed = build(["--run-dir", str(tmp_path), "--resume", "--steps", "4"])
    assert (resumed.lr, resumed.steps, resumed.resume) == (0.5, 4, True)
    assert build(["--run-dir", str(tmp_path), "--steps", "4"]).lr == 1e-3  # not resumed: a new run
    # config.json keeps the first config and records each resume's changes: a second resume keeps them
    stored = {
        "app": "t",
        "config": config_to_dict(first),
        "resumes": [{"at": "t1", "changed": {"steps": [2, 4]}}, {"at": "t2", "changed": {"lr": [0.5, 0.25]}}],
    }
    (tmp_path / "config.json").write_text(json.dumps(stored))
    again = build(["--run-dir", str(tmp_path), "--resume"])
    assert (again.steps, again.lr) == (4, 0.25)  # every resume's change, in order
    assert config_to_dict(ExampleConfig())["stops"] == ["</answer>"]


def _run_config_builder():
    parser = argparse.ArgumentParser()
    presets = {"fast": {"lr": 0.5, "steps": 2}}
    add_config_arguments(parser, RunConfig, presets)
    return lambda argv: build_config(RunConfig, parser.parse_args(argv), presets)


def test_resume_and_run_dir_from_the_config_file_continue_with_the_runs_own_settings(tmp_path):
    build = _run_config_builder()
    first = build(["--preset", "fast", "--run-dir", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"app": "t", "config": config_to_dict(first)}))
    run_dir_file = tmp_path / "run_dir.toml"
    run_dir_file.write_text(f'run_dir = "{tmp_path}"\n')
    resumed = build(["--resume", "--config", str(run_dir_file)])
    assert (resumed.lr, resumed.steps, resumed.resume) == (0.5, 2, True)
    resume_file = tmp_path / "resume.yaml"
    resume_file.write_text(f"run_dir: {tmp_path}\nresume: true\nsteps: 3\n")
    resumed = build(["--config", str(resume_file)])
    assert (resumed.lr, resumed.steps, resumed.resume) == (0.5, 3, True)
    assert build(["--config", str(resume_file), "--no-resume"]).lr == 1e-3  # a new run: the defaults


@dataclass
class PickyRunConfig(RunConfig):
    def __post_init__(self):
        if self.steps > 5:
            raise ValueError(f"steps={self.steps}: this command takes at most 5")


def test_a_resume_refused_over_stored_settings_names_the_run_they_come_from(tmp_path):
    """Resuming another command's run gives an error about its stored values; it names whose they are."""
    stored = {"app": "toy", "algorithm": "grpo", "config": {"steps": 8, "run_dir": str(tmp_path)}}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PickyRunConfig, {})
    args = parser.parse_args(["--run-dir", str(tmp_path), "--resume"])
    with pytest.raises(
        ValueError,
        match=rf"at most 5 \(with the settings of {tmp_path}, a 'toy' 'grpo' run: resume a run with the command ",
    ):
        build_config(PickyRunConfig, args, {})
    with pytest.raises(ValueError, match=r"at most 5$"):  # no run resumed: nothing to name
        build_config(PickyRunConfig, parser.parse_args(["--steps", "8"]), {})


def test_a_resume_continues_with_the_settings_of_the_last_one(tmp_path):
    """Each resume records its changes against the settings it continued: a second resume that goes back
    to the first run's value is recorded, and a third without flags keeps it."""
    build = _run_config_builder()

    def start(argv, resume):
        config = build(["--run-dir", str(tmp_path), *argv])
        RunDir.create(tmp_path, config_to_dict(config), app="t", algorithm="grpo", exist_ok_for_resume=resume)
        return config

    start(["--preset", "fast"], resume=False)
    assert start(["--resume", "--steps", "10"], resume=True).steps == 10
    assert start(["--resume", "--steps", "2"], resume=True).steps == 2
    assert start(["--resume"], resume=True).steps == 2
    resumes = RunDir(tmp_path).read_config()["resumes"]
    assert [r["changed"] for r in resumes] == [
        {"resume": [False, True], "steps": [2, 10]},
        {"steps": [10, 2]},
        {},
    ]


@pytest.mark.parametrize("text", ["[]", "0", "false", "just a string"])
def test_a_yaml_file_that_is_not_a_mapping_is_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=r"config file .*c.yaml: expected a mapping of field names"):
        parse(["--config", str(path)])


def test_an_empty_yaml_file_sets_nothing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# nothing yet\n")
    assert parse(["--config", str(path)]) == ExampleConfig()


def test_a_field_spelled_as_its_flag_in_a_file_is_pointed_to_its_name(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("eps-high = 0.3\nstepz = 3\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) eps-high, stepz \(did you mean eps_high\?"):
        parse(["--config", str(path)])


def test_an_unknown_registry_name_names_the_field_and_the_file(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GRPOConfig)
    path = tmp_path / "c.toml"
    path.write_text('loss_aggregation = "token-sum"\n')
    unknown = "loss_aggregation: unknown loss aggregation 'token-sum'; valid: "
    with pytest.raises(ValueError, match=rf"^config file .*c.toml: {unknown}"):
        build_config(GRPOConfig, parser.parse_args(["--config", str(path)]))
    with pytest.raises(ValueError, match=rf"^{unknown}"):  # a flag's value: no file to name
        build_config(
            GRPOConfig, parser.parse_args(["--config", str(path), "--loss-aggregation", "token-sum"])
        )


def _register_example_app(apps):
    verbs = cli.add_app(apps, "example", "an example app")
    cli.add_command(verbs, "train", ExampleConfig, lambda config: ran.append(config), "train it", PRESETS)


ran: list = []


class _EntryPoint:
    name = "example"

    def load(self):
        return _register_example_app


def test_cli_discovers_apps_and_runs_commands(monkeypatch, capsys):
    fake_entry_points = lambda group: [_EntryPoint()] if group == cli.ENTRY_POINT_GROUP else []  # noqa: E731
    monkeypatch.setattr(cli, "entry_points", fake_entry_points)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "example         train" in capsys.readouterr().out
    ran.clear()
    assert cli.main(["example", "train", "--preset", "tiny", "--lr", "0.3"]) == 0
    assert ran == [ExampleConfig(steps=2, lr=0.3)]
    with pytest.raises(SystemExit):
        cli.main(["example", "train", "--steps", "0"])
    assert "steps must be >= 1" in capsys.readouterr().err


class _BrokenEntryPoint:
    name = "broken"

    def load(self):
        raise ImportError("No module named 'missing_dependency'")


def test_an_app_that_cannot_be_imported_says_why_when_chosen(monkeypatch, capsys):
    entries = lambda group: [_EntryPoint(), _BrokenEntryPoint()]  # noqa: E731
    monkeypatch.setattr(cli, "entry_points", entries)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "broken          unavailable: No module named 'missing_dependency'" in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["broken", "train", "--steps", "2"])
    assert exit_info.value.code == 2
    assert "app broken is unavailable: No module named 'missing_dependency'" in capsys.readouterr().err
    ran.clear()
    assert cli.main(["example", "train"]) == 0 and len(ran) == 1  # the other apps still work


def test_every_installed_command_prints_its_help(capsys):
    """A stray % in a help text made argparse raise instead of printing (debias train's "10%")."""
    parser = cli.build_parser()
    apps = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = []
    for app_name, app_parser in apps.choices.items():
        verbs = next(a for a in app_parser._actions if isinstance(a, argparse._SubParsersAction))
        commands += [[app_name, verb] for verb in verbs.choices]
    assert ["debias", "train"] in commands and len(commands) > 15
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "--help"])
        assert exit_info.value.code == 0, command
        assert "--config" in capsys.readouterr().out, command


def test_a_malformed_list_flag_says_what_it_expects(capsys):
    with pytest.raises(SystemExit):
        cli.main(["math", "compare", "--seeds", "0-2"])
    assert "seeds: '0-2' is not a comma-separated list of int values (e.g. 0,1,2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # as a single float flag refuses inf (a sweep had run at r = inf)
        cli.main(["public-goods", "sweep", "--r-values", "3.5,inf"])
    assert "r_values: '3.5,inf' holds a value that is not a finite number" in capsys.readouterr().err


def test_an_abbreviated_flag_is_refused(capsys):
    """argparse took `--seed 5` for `--seeds 5` and `--max-step` for `--max-steps`, silently; a misspelt key
    in a config file is refused."""
    with pytest.raises(SystemExit):
        cli.main(["toy", "train", "--max-step", "5"])
    assert "unrecognized arguments: --max-step 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["math", "compare", "--seed", "5"])
    assert "unrecognized arguments: --seed 5" in capsys.readouterr().err


def test_a_command_stopped_by_bad_input_leaves_no_empty_default_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["toy", "train", "--preset", "smoke", "--data", str(tmp_path / "none.jsonl")])
    assert "none.jsonl" in capsys.readouterr().err
    assert not (
        tmp_path / "runs"
    ).exists()  # the directory it claimed is given back, and runs/toy made for it
    assert cli.main(["toy", "train", "--preset", "smoke", "--max-steps", "1"]) == 0
    (run,) = (tmp_path / "runs" / "toy").iterdir()  # a run that wrote its files keeps them
    assert (run / "config.json").is_file()


def test_only_errors_that_name_an_existing_file_become_command_line_errors(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    assert cli._names_an_input(ValueError(f"{data}:1: missing field(s) prompt"))
    assert not cli._names_an_input(ValueError(f"{tmp_path / 'gone.jsonl'}:1: x"))
    assert not cli._names_an_input(ValueError("shapes (2, 3) and (4,) do not match"))  # a bug: its traceback
    assert not cli._names_an_input(ValueError("x" * 300 + ": too long for a path"))  # an OSError before
    # no head at all: "" is not the current directory
    assert not cli._names_an_input(ValueError(": an error without a path"))
    assert not cli._names_an_input(ValueError(""))


def test_a_device_that_cannot_be_used_is_a_command_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["toy", "train", "--device", "gpu", "--run-dir", str(tmp_path / "r")])
    assert "device: 'gpu' is not cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.main(["toy", "train", "--device", "cuda", "--run-dir", str(tmp_path / "r")])
        assert "this torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was built


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_outside_numpys_range_is_refused(seed):
    """A seed of 20240101123456 failed after the base model was built (torch's int64 overflowed)."""
    with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*32\), got {seed}"):
        GRPOConfig(seed=seed)


@dataclass
class TwoFieldCheckConfig:
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    steps: int = field(default=1, metadata={"help": "steps"})

    def __post_init__(self):
        if self.lr < 0 or self.steps < 0:
            raise ValueError("lr and steps must be >= 0")


def test_an_error_naming_several_fields_names_no_source(tmp_path):
    """Only "field: ..." and "field must ..." name one field: a file that set lr well is not blamed for a
    flag's steps."""
    good = tmp_path / "good.toml"
    good.write_text("lr = 0.5\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TwoFieldCheckConfig)
    with pytest.raises(ValueError, match="^lr and steps must be >= 0$"):
        build_config(TwoFieldCheckConfig, parser.parse_args(["--config", str(good), "--steps", "-1"]))


def test_a_stored_value_of_another_commands_run_names_that_runs_kind(tmp_path):
    """Resuming a math run with another command: its stored value does not fit this command's field; the
    error says whose run it is (it named only the file)."""
    stored = {"app": "math", "algorithm": "grpo", "config": {"steps": "many", "run_dir": str(tmp_path)}}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, RunConfig)
    with pytest.raises(
        ValueError,
        match=r"config.json \(the resumed run's config, a 'math' 'grpo' run\): steps.*; resume a run with "
        "the command that made it$",
    ):
        build_config(RunConfig, parser.parse_args(["--run-dir", str(tmp_path), "--resume"]))


def test_help_shows_defaults_as_the_flags_are_written():
    """A tuple default was shown as Python's ('test', 'heldout'); the flag takes test,heldout."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleConfig)
    text = " ".join(parser.format_help().split())
    assert "stop strings (default: </answer>)" in text and "upper clip (default: none)" in text
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, MultiStopConfig)
    assert "(default: a,b)" in " ".join(parser.format_help().split())
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, RequiredPathConfig)
    assert parser.format_help().rstrip().endswith("--model MODEL    model directory")  # not "(default: )"


@dataclass
class RequiredPathConfig:
    model: str = field(default="", metadata={"help": "model directory"})


@dataclass
class MultiStopConfig:
    stops: tuple[str, ...] = field(default=("a", "b"), metadata={"help": "stop strings"})


def _app_running(run):
    """A fake entry point whose app `example` has one verb `train` that calls `run(config)`."""

    class Entry:
        name = "example"

        def load(self):
            def register(apps):
                verbs = cli.add_app(apps, "example", "an example app")
                cli.add_command(verbs, "train", ExampleConfig, run, "train it", PRESETS)

            return register

    return lambda group: [Entry()] if group == cli.ENTRY_POINT_GROUP else []


@pytest.mark.parametrize(("rank", "printed"), [(None, True), ("0", True), ("1", False)])
def test_only_process_0_prints_to_stdout(monkeypatch, capsys, rank, printed):
    monkeypatch.setattr(cli, "entry_points", _app_running(lambda config: print("the summary table")))
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert cli.main(["example", "train"]) == 0
    assert ("the summary table" in capsys.readouterr().out) is printed


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ctrl_c_exits_130_and_only_process_0_says_so(monkeypatch, capsys, rank):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "entry_points", _app_running(interrupted))
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["example", "train"])
    assert exit_info.value.code == 130
    assert (
        "example train: interrupted; a run it was writing is marked failed" in capsys.readouterr().err
    ) is (rank == "0")


def test_a_commands_warnings_are_one_line_while_it_runs_and_pythons_after(monkeypatch):
    import warnings

    formatted = []
    shown = warnings.formatwarning
    run = lambda config: formatted.append(warnings.formatwarning("few rows", UserWarning, "f.py", 3))  # noqa: E731
    monkeypatch.setattr(cli, "entry_points", _app_running(run))
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["example", "train"]) == 0
    assert formatted == ["grpo-suite example train: warning: few rows\n"]
    assert warnings.formatwarning is shown


@dataclass
class GivenRecordingConfig(RunConfig):
    seen: dict = field(default_factory=dict, metadata={"help": "what check_given was told"})

    @classmethod
    def check_given(cls, values, given):
        values["seen"] = {"given": sorted(given)}


def test_check_given_is_told_the_names_from_flags_and_files_not_presets_or_the_resumed_run(tmp_path):
    presets = {"fast": {"lr": 0.5}}
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, RunConfig, presets)
    (tmp_path / "config.json").write_text(json.dumps({"app": "t", "config": {"steps": 3, "run_dir": "x"}}))
    file = tmp_path / "c.toml"
    file.write_text("steps = 4\n")
    args = parser.parse_args(
        ["--preset", "fast", "--config", str(file), "--run-dir", str(tmp_path), "--resume"]
    )
    config = build_config(GivenRecordingConfig, args, presets)
    assert config.seen == {"given": ["resume", "run_dir", "steps"]}
    assert (config.lr, config.steps) == (0.5, 4)


@pytest.mark.parametrize("device", ["cpux", "cpu0", "cuda:0x", "cudax", "cuda:"])
def test_a_device_is_matched_whole(device):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GRPOConfig)
    with pytest.raises(ValueError, match=rf"device: '{device}' is not cpu, cuda or cuda:N"):
        build_config(GRPOConfig, parser.parse_args(["--device", device]))


@dataclass
class OfflineModelConfig(RunConfig):
    OFFLINE_MODEL_FIELDS: ClassVar = ("width",)  # annotated as the apps' are: a class attribute, not a field

    model: str | None = field(default=None, metadata={"help": "model directory"})
    width: int = field(default=8, metadata={"help": "offline model: width"})


def _offline_model_builder():
    presets = {"wide": {"width": 32}, "narrow": {"width": 4}}
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, OfflineModelConfig, presets)
    return lambda argv: build_config(OfflineModelConfig, parser.parse_args(argv), presets)


def test_an_offline_model_field_given_with_model_is_refused_where_it_was_given(tmp_path):
    build = _offline_model_builder()
    with pytest.raises(ValueError, match=r"^--width sets the offline tiny model, which --model m replaces"):
        build(["--model", "m", "--width", "16"])
    file = tmp_path / "c.toml"
    file.write_text("width = 16\n")
    with pytest.raises(ValueError, match=rf"^config file {file}: width sets the offline tiny model"):
        build(["--model", "m", "--config", str(file)])
    assert build(["--model", "m", "--preset", "wide"]).width == 32  # a preset's value is not the user's
    assert build(["--width", "16"]).width == 16  # without --model it builds the model


def test_a_resume_may_not_change_an_offline_model_field_its_model_was_built_with(tmp_path):
    build = _offline_model_builder()
    first = build(["--preset", "wide", "--run-dir", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"app": "t", "config": config_to_dict(first)}))
    resume = ["--run-dir", str(tmp_path), "--resume"]
    with pytest.raises(
        ValueError, match=r"^--width 16: the resumed run's model was built with 32, and a resume"
    ):
        build([*resume, "--width", "16"])
    with pytest.raises(
        ValueError, match=r"^preset narrow: width 4: the resumed run's model was built with 32"
    ):
        build([*resume, "--preset", "narrow"])
    assert build([*resume, "--width", "32", "--steps", "20"]).steps == 20  # the same value, or none, resumes
    assert build([*resume, "--preset", "wide"]).width == 32
    given = build(["--model", "m", "--run-dir", str(tmp_path)])  # a run of --model built no offline model
    (tmp_path / "config.json").write_text(json.dumps({"app": "t", "config": config_to_dict(given)}))
    assert build([*resume, "--preset", "narrow"]).width == 4  # a preset's value, read by nothing: accepted


def test_a_config_file_key_naming_a_class_attribute_is_an_unknown_field(tmp_path):
    """OFFLINE_MODEL_FIELDS is annotated (ClassVar) but no field: a file setting it got past the unknown-key
    check and failed in the dataclass's __init__."""
    file = tmp_path / "c.toml"
    file.write_text('OFFLINE_MODEL_FIELDS = ["steps"]\n')
    with pytest.raises(ValueError, match=rf"{file}: unknown field.*OFFLINE_MODEL_FIELDS"):
        _offline_model_builder()(["--config", str(file)])


def test_a_file_value_wins_over_the_presets_and_a_flag_over_both(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("lr = 0.25\n")
    assert parse(["--preset", "tiny", "--config", str(path)]).lr == 0.25  # the preset's lr is 0.5
    assert parse(["--preset", "tiny", "--config", str(path), "--lr", "0.125"]).lr == 0.125


def test_an_error_names_the_source_of_the_value_that_was_used(tmp_path):
    """A preset's steps overridden by a file's or a flag's: the error names the file, or nothing (a flag)."""
    zero = tmp_path / "zero.toml"
    zero.write_text("steps = 0\n")
    with pytest.raises(ValueError, match=f"^config file {zero}: steps must be >= 1, got 0$"):
        parse(["--preset", "tiny", "--config", str(zero)])
    with pytest.raises(ValueError, match="^steps must be >= 1, got 0$"):
        parse(["--preset", "tiny", "--steps", "0"])


def test_preset_values_are_checked_and_converted_as_file_values_are():
    presets = {
        "listed": {"stops": ["a", "b"], "lr": 1},
        "tupled": {"stops": ("c",)},
        "bad": {"steps": "many"},
    }
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleConfig, presets)

    def build(argv):
        return build_config(ExampleConfig, parser.parse_args(argv), presets)

    config = build(["--preset", "listed"])
    assert config.stops == ("a", "b") and config.lr == 1.0 and type(config.lr) is float
    assert build(["--preset", "tupled"]).stops == ("c",)
    with pytest.raises(ValueError, match=r"^preset bad: steps: expected a number \(int\), got 'many'$"):
        build(["--preset", "bad"])


def test_file_numbers_are_converted_to_their_fields_type(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('steps = "3"\nlr = 1\nstops = "a, b ,"\n')  # a string as the flag takes it
    config = parse(["--config", str(path)])
    assert (config.steps, config.lr, config.stops) == (3, 1.0, ("a", "b"))
    assert type(config.steps) is int and type(config.lr) is float


def test_a_resume_without_a_run_to_read_takes_no_stored_settings(tmp_path):
    """No --run-dir (with_run_dir says so), a directory holding no run, or a model's config.json: the
    defaults, and an error names no resumed run."""
    build = _run_config_builder()
    assert build(["--resume"]) == RunConfig(resume=True)
    assert build(["--run-dir", str(tmp_path), "--resume"]) == RunConfig(run_dir=str(tmp_path), resume=True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 7}')
    assert build(["--run-dir", str(model), "--resume"]) == RunConfig(run_dir=str(model), resume=True)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PickyRunConfig, {})
    args = parser.parse_args(["--run-dir", str(tmp_path), "--resume", "--steps", "8"])
    with pytest.raises(ValueError, match=r"^steps=8: this command takes at most 5$"):
        build_config(PickyRunConfig, args, {})


def test_a_resumed_runs_settings_this_command_has_no_field_for_are_left_out(tmp_path):
    stored = {"app": "t", "algorithm": "grpo", "config": {"lr": 0.5, "run_dir": str(tmp_path), "width": 3}}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    resumed = _run_config_builder()(["--run-dir", str(tmp_path), "--resume"])
    assert resumed == RunConfig(lr=0.5, run_dir=str(tmp_path), resume=True)


@pytest.mark.parametrize("flag", ["--model", "--data"])
def test_an_empty_model_or_data_path_is_refused(flag):
    """--model "" neither loaded a model nor built the offline one: "<run>/base_model does not exist"."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GRPOConfig)
    name = flag[2:]
    with pytest.raises(ValueError, match=rf"^{name}: an empty path; leave {flag} out for the app's own$"):
        build_config(GRPOConfig, parser.parse_args([flag, ""]))
