"""apps/math_reasoning through `grpo-suite math ...`: every verb and every algorithm runs with `--model`
(a tiny saved model directory) and writes what it says; the offline default (build + SFT) is a slow test."""

import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch
from safetensors.torch import load_file
from streamlit.testing.v1 import AppTest

from core.cli import main
from core.runs import RunDir

FAST = ["--max-steps", "1", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8"]
EVAL = ["--eval-samples", "2", "--eval-examples", "3"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["grpo", "gtpo", "scaf", "codistill"])
def test_train_each_algorithm_with_a_model_dir(algo, small_dir, large_dir, tmp_path, capsys):
    run_dir = tmp_path / algo
    extra = {"codistill": ["--large-model", str(large_dir)], "scaf": ["--scaf-exemption-fraction", "0"]}
    args = ["math", "train", "--algo", algo, "--model", str(small_dir), "--run-dir", str(run_dir)]
    assert main([*args, *FAST, *EVAL, *extra.get(algo, [])]) == 0
    out = capsys.readouterr().out
    assert "pass@1" in out and "zero-spread" in out
    metrics = _metrics(run_dir)
    assert len(metrics) == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algorithm"] == algo
    evals = json.loads((run_dir / "eval.json").read_text())
    assert evals["eval"]["all"]["examples"] == 3 and evals["eval"]["samples"] == 2
    policy = evals["eval"]["all"]  # the dashboard's pass_at_k: the policy's, on the held-out set
    assert evals["pass_at_k"] == {"offline": {"1": policy["pass@1"], "2": policy["pass@2"]}}
    if algo == "gtpo":
        assert config["config"]["advantage_scale"] == "none"
        assert all("gtpo/conflict_token_frac" in m and "gtpo/entropy_dropped_frac" in m for m in metrics)
    if algo == "scaf":  # an untrained model fails everything: every group is searched for a hint
        assert all(m["scaf/all_fail_frac"] == 1.0 and m["scaf/exempt"] == 0.0 for m in metrics)
    if algo == "codistill":
        assert all(0 < m["codistill/ess"] <= 1 and m["codistill/large_time"] > 0 for m in metrics)
        assert all(m["reward/kd"] is not None for m in metrics)
        assert (run_dir / "final_large" / "model.safetensors").is_file() and "eval_large" in evals


def test_data_eval_and_compare(small_dir, large_dir, tmp_path, capsys, monkeypatch):
    assert main(["math", "data", "--out-dir", str(tmp_path / "data")]) == 0
    test_file = tmp_path / "data" / "test.jsonl"
    assert len(test_file.read_text().splitlines()) == 300
    run = tmp_path / "eval"
    args = ["math", "eval", "--model", str(small_dir), "--data", str(test_file), "--run-dir", str(run)]
    assert main([*args, "--samples", "2", "--max-examples", "4", "--max-new-tokens", "6"]) == 0
    results = json.loads((run / "eval.json").read_text())["eval_test"]  # eval_<benchmark>
    assert results["all"]["examples"] == 4 and "pass@2" in results["all"] and "maj@2" in results["all"]
    assert json.loads((run / "config.json").read_text())["algorithm"] == "eval"  # a run the dashboard lists
    assert json.loads((run / "status.json").read_text())["status"] == "finished"  # not "unknown" there
    out = tmp_path / "compare"
    args = ["math", "compare", "--algos", "grpo,codistill", "--seeds", "0,1", "--out-dir", str(out)]
    args += ["--model", str(small_dir), "--large-model", str(large_dir), "--max-steps", "1"]
    args += ["--eval-samples", "1", "--eval-examples", "2", "--train-config", str(_train_config(tmp_path))]
    assert main(args) == 0
    table = (out / "compare.md").read_text()
    for arm in ("| grpo |", "| codistill:S |", "| codistill:L |"):
        assert arm in table
    assert "over 2 seed(s)" in table and "±" in capsys.readouterr().out
    assert "gen_tokens |" in table and "note:" not in table  # every run of this code, no setting left out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "codistill-seed0", "codistill-seed1", "grpo-seed0", "grpo-seed1",
    ]  # fmt: skip
    # run again into the same directory: the finished runs are reused, the table is the same
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, its results reused") == 4
    assert (out / "compare.md").read_text() == table
    # reused runs that other code made are named under the table
    monkeypatch.setattr("apps.math_reasoning.compare.source_digest", lambda: "code changed since")
    assert main(args) == 0
    assert "note: 4 run(s) made in part by other code than this" in (out / "compare.md").read_text()
    monkeypatch.undo()
    assert main(args) == 0 and (out / "compare.md").read_text() == table
    capsys.readouterr()
    # a run stopped before its model was saved is continued, not trained into a second run, and its
    # table entries are of its whole history (a resumed train returns only the steps it ran)
    shutil.rmtree(out / "grpo-seed1" / "final")
    shutil.rmtree(out / "codistill-seed1" / "final")
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, its results reused") == 2
    for run in ("grpo-seed1", "codistill-seed1"):
        assert (out / run / "final").is_dir()
        assert len(json.loads((out / run / "config.json").read_text())["resumes"]) == 1
    assert (out / "compare.md").read_text() == table
    # with other settings the earlier runs are refused before anything trains
    with pytest.raises(SystemExit):
        main([*args[:-2], "--eval-examples", "3", *args[-2:]])
    assert "grpo-seed0: holds a run with other settings (eval_examples)" in capsys.readouterr().err


def page_app():
    from dashboards.views import math_page

    math_page.render()


def test_pass_at_k_per_benchmark_fills_the_math_page(small_dir, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run = runs / "math" / "g1"
    args = ["math", "train", "--algo", "grpo", "--model", str(small_dir), "--run-dir", str(run)]
    assert main([*args, *FAST, *EVAL]) == 0
    assert json.loads((run / "config.json").read_text())["algorithm"] == "grpo"
    # a second benchmark evaluated into the same run adds its entry (named by the file) and keeps the first
    bench = tmp_path / "mini.jsonl"  # GSM8K's format: the final answer after ####
    lines = [
        {"question": f"Ann has {i} pens and gets 1. How many now?", "answer": f"#### {i + 1}"}
        for i in range(3)
    ]
    bench.write_text("".join(json.dumps(line) + "\n" for line in lines))
    trained = json.loads((run / "eval.json").read_text())["eval"]
    args = ["math", "eval", "--model", str(run / "final"), "--data", str(bench), "--samples", "4"]
    assert main(args) == 0
    saved = json.loads((run / "eval.json").read_text())
    offline, mini = saved["pass_at_k"]["offline"], saved["pass_at_k"]["mini"]
    assert set(offline) == {"1", "2"} and set(mini) == {"1", "4"}
    assert mini == {"1": saved["eval_mini"]["all"]["pass@1"], "4": saved["eval_mini"]["all"]["pass@4"]}
    assert saved["eval"] == trained  # what train wrote stays
    # the run's base model is evaluated with the run's settings, under its own key: the policy's stay
    shutil.copytree(small_dir, run / "base_model")
    assert main(["math", "eval", "--model", str(run / "base_model"), "--max-examples", "2"]) == 0
    with_base = json.loads((run / "eval.json").read_text())
    assert with_base["eval_base_offline"]["max_new_tokens"] == 8  # the run's, not eval's default 80
    assert {k: v for k, v in with_base.items() if k != "eval_base_offline"} == saved
    # unset, the eval's settings are the run's (FAST's 8 new tokens), not the eval command's own defaults
    assert json.loads((run / "config.json").read_text())["config"]["max_new_tokens"] == 8
    assert saved["eval_mini"]["max_new_tokens"] == 8
    # evaluated into a run of its own, the model counts under the algorithm it was trained with
    assert main([*args, "--run-dir", str(runs / "math" / "e1")]) == 0
    assert json.loads((runs / "math" / "e1" / "config.json").read_text())["algorithm"] == "grpo"

    monkeypatch.setenv("GRPO_SUITE_RUNS", str(runs))
    at = AppTest.from_function(page_app, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert table.index.get_level_values("algorithm").unique().tolist() == ["grpo"]
    assert table.loc[("grpo", "offline"), "pass@2"] == pytest.approx(offline["2"])
    assert table.loc[("grpo", "mini"), "pass@4"] == pytest.approx(mini["4"])  # the same model twice
    assert table.loc[("grpo", "mini"), "runs"] == 2
    # the held-out set evaluated again replaces training's entry: the page shows the latest evaluation
    assert main(["math", "eval", "--model", str(run / "final"), "--samples", "1", "--max-examples", "2"]) == 0
    again = json.loads((run / "eval.json").read_text())
    assert again["pass_at_k"] == {"offline": {"1": again["eval_offline"]["all"]["pass@1"]}, "mini": mini}


def _train_config(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text("prompts_per_step = 2\ngroup_size = 2\nmax_new_tokens = 6\n")
    return path


@pytest.mark.parametrize("verb", ["train", "eval", "compare", "data"])
def test_help_of_every_verb(verb, capsys):
    """argparse %-formats help strings: a bare "%" in a field's help crashed `math train --help`."""
    with pytest.raises(SystemExit) as exit_info:
        main(["math", verb, "--help"])
    assert exit_info.value.code == 0 and f"usage: grpo-suite math {verb}" in capsys.readouterr().out


def test_compare_train_preset_sets_every_run(tmp_path):
    from apps.math_reasoning.compare import PRESETS, MathCompareConfig, _train_values

    values = _train_values(MathCompareConfig(**PRESETS["micro"], max_steps=3))
    assert values["data_mix"] == "micro" and values["max_steps"] == 3  # flags override the preset
    with pytest.raises(ValueError, match="unknown train preset 'nope'"):
        MathCompareConfig(train_preset="nope")
    # a flag wins over the compare preset: --preset smoke --train-preset micro is micro
    assert (
        _train_values(MathCompareConfig(**(PRESETS["smoke"] | {"train_preset": "micro"})))["data_mix"]
        == "micro"
    )
    with pytest.raises(ValueError, match="seeds names an entry twice: 0,0"):
        MathCompareConfig(seeds=(0, 0))


def test_compare_train_config_is_checked_field_by_field(tmp_path):
    from apps.math_reasoning.compare import MathCompareConfig, _train_values, arm_values

    path = tmp_path / "train.toml"
    path.write_text('scaf_tiers = ["knowledge", "solution"]\ncodistill_alpha = 1\n')
    values = _train_values(
        MathCompareConfig(train_config=str(path))
    )  # every arm: grpo, gtpo, scaf, codistill
    assert values["scaf_tiers"] == ("knowledge", "solution") and values["codistill_alpha"] == 1.0
    # each algorithm's own fields go to its arms only (`math train` refuses them with another --algo)
    assert arm_values(values, "codistill")["codistill_alpha"] == 1.0 and "scaf_tiers" in arm_values(
        values, "scaf"
    )
    assert arm_values(values, "grpo_large").keys() == arm_values(values, "gtpo").keys() == {"algo"}
    path.write_text('lora = "no"\n')  # a string would be truthy: LoRA on
    with pytest.raises(ValueError, match=r"train.toml: lora: expected true or false"):
        _train_values(MathCompareConfig(train_config=str(path)))
    path.write_text('model = "x"\n')  # compare sets it per run: silently dropped before
    with pytest.raises(ValueError, match=r"train.toml: model is set per run by compare"):
        _train_values(MathCompareConfig(train_config=str(path)))
    path.write_text("codistill_alfa = 1\n")
    with pytest.raises(ValueError, match=r"train.toml: unknown field\(s\) codistill_alfa"):
        _train_values(MathCompareConfig(train_config=str(path)))
    path.write_text("small_sft_steps = 5\nmax_steps = 3\n")  # read by no arm with --model: recorded only
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    message = rf"train.toml: small_sft_steps sets the offline tiny models, which --model {model} replaces"
    with pytest.raises(ValueError, match=message):
        _train_values(MathCompareConfig(train_config=str(path), model=str(model), algos=("grpo",)))
    assert _train_values(MathCompareConfig(train_config=str(path)))["small_sft_steps"] == 5  # built from it


def test_large_sft_lr_defaults_to_sft_lr():
    from apps.math_reasoning.train import PRESETS, MathTrainConfig

    assert MathTrainConfig(sft_lr=5e-3).tiny_spec("large").sft_lr == 5e-3
    micro = MathTrainConfig(**PRESETS["micro"])
    assert (micro.tiny_spec("small").sft_lr, micro.tiny_spec("large").sft_lr) == (3e-3, 1e-3)


def test_bad_flags_are_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["math", "train", "--algo", "ppo"])
    with pytest.raises(SystemExit):
        main(["math", "compare", "--algos", "grpo,nope"])
    assert "unknown arm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["math", "train", "--data-mix", "nope"])
    assert "unknown difficulty mix" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # before the tiny base model is built
        main(["math", "train", "--algo", "scaf", "--scaf-tiers", "solutoin"])
    assert "scaf_tiers must be a non-empty subset of knowledge, planning, solution" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["math", "train", "--data", "nope.jsonl"])
    assert "data: nope.jsonl is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["math", "data", "--out-dir", str(tmp_path / "data"), "--data-mix", "hard"])
    assert "unknown difficulty mix 'hard'; valid: default, micro" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    with pytest.raises(SystemExit):  # a traceback from the sampler before
        main(["math", "eval", "--model", str(tmp_path), "--temperature", "0"])
    assert "temperature must be > 0, got 0.0" in capsys.readouterr().err
    data = tmp_path / "gsm.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    for verb in (["train", "--data", str(data)], ["eval", "--model", str(tmp_path), "--data", str(data)]):
        with pytest.raises(SystemExit):  # a traceback after the model was built or loaded before
            main(["math", *verb, "--data-format", "foo"])
        assert "data_format: unknown data format 'foo'; valid: auto, " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('template = "r1-short"', "template: unknown template 'r1-short'"),
        ('data_mix = "hard"', "data_mix: unknown difficulty mix 'hard'"),
        ('algo = "gtpo"\nbeta = 0.04', "beta: used by --algo grpo/scaf/codistill only, not gtpo"),
    ],
)
def test_a_bad_value_in_a_config_file_names_the_file(tmp_path, capsys, text, message):
    config = tmp_path / "train.toml"
    config.write_text(text + "\n")
    with pytest.raises(SystemExit):
        main(["math", "train", "--config", str(config)])
    assert f"config file {config}: {message}" in capsys.readouterr().err


def test_a_missing_eval_data_file_is_refused_by_the_config():
    from apps.math_reasoning.train import MathTrainConfig

    with pytest.raises(ValueError, match="eval_data: nope.jsonl is not a file"):
        MathTrainConfig(eval_data="nope.jsonl")


BAD_FILES = [
    ('{"question": "q", "answer": "#### 1"}\n{"question": }\n', "bad.jsonl:2: not valid JSON"),
    ('{"foo": 1}\n', "bad.jsonl: cannot tell the format from the fields ['foo', 'id']"),
    ("\n", "bad.jsonl has no rows"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_data_file_is_refused_before_the_base_model_is_built(text, message, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(text)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(
            [
                "math",
                "train",
                "--preset",
                "smoke",
                "--data",
                str(tmp_path / "bad.jsonl"),
                "--run-dir",
                str(run_dir),
            ]
        )
    assert message in capsys.readouterr().err and not run_dir.exists()


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_eval_data_file_is_refused_before_training(text, message, small_dir, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(text)
    run_dir = tmp_path / "run"
    args = ["--model", str(small_dir), "--eval-data", str(tmp_path / "bad.jsonl"), "--run-dir", str(run_dir)]
    with pytest.raises(SystemExit):
        main(["math", "train", *FAST, *args])
    assert message in capsys.readouterr().err and not run_dir.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--algo", "codistill", "--codistill-alpha", "-2"], "codistill_alpha must be >= 0"),
        (["--algo", "codistill", "--codistill-is-cap", "0"], "codistill_is_cap must be > 0, got 0.0"),
        (["--algo", "grpo", "--large-model", "m"], "large_model: used by --algo codistill only, not grpo"),
        (["--algo", "gtpo", "--scaf-tiers", "solution"], "scaf_tiers: used by --algo scaf only, not gtpo"),
        (["--algo", "scaf", "--gtpo-gamma", "0.5"], "gtpo_gamma: used by --algo gtpo only, not scaf"),
        (["--algo", "grpo", "--no-codistill-train-large"], "codistill_train_large: used by --algo codistill"),
        (
            ["--algo", "codistill", "--size", "large"],
            "size: used by --algo grpo/gtpo/scaf only, not codistill",
        ),
        # a value equal to a preset's was taken as not given, and ignored
        (
            ["--algo", "grpo", "--scaf-exemption-fraction", "0.0"],
            "scaf_exemption_fraction: used by --algo scaf",
        ),
        (["--algo", "grpo", "--codistill-large-lr", "1e-6"], "codistill_large_lr: used by --algo codistill"),
        (["--algo", "gtpo", "--beta", "0"], "beta: used by --algo grpo/scaf/codistill only, not gtpo"),
    ],
)
def test_a_value_out_of_range_or_for_another_algorithm_is_refused(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["math", "train", "--preset", "smoke", *flags, "--run-dir", str(tmp_path / "run")])
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_every_preset_goes_with_every_algorithm(tmp_path):
    """A preset's value of another algorithm's field (smoke's scaf_exemption_fraction, micro's
    codistill_large_lr) is not taken as given."""
    from apps.math_reasoning.train import ALGORITHMS, PRESETS, MathTrainConfig

    (tmp_path / "config.json").write_text("{}")  # --large-model must look like a model directory
    for preset in PRESETS.values():
        for algo in ALGORITHMS:
            # a --model: the paper preset's 1,024 new tokens do not fit the tiny default
            assert MathTrainConfig(**preset, algo=algo, model="m", large_model=str(tmp_path)).algo == algo


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train-config", "nope.toml"], "config file nope.toml does not exist"),
        (["--train-config", "{tmp}/zero.toml"], "arm grpo: max_steps must be >= 1, got 0"),
        (["--algos", "grpo", "--model", "{tmp}/none"], "none is not a local model directory"),
        (["--model", "{small}"], "codistill and grpo_large with --model need --large-model"),
    ],
    ids=["missing-train-config", "bad-train-value", "missing-model", "no-large-model"],
)
def test_compare_checks_its_inputs_before_making_anything(flags, message, small_dir, tmp_path, capsys):
    (tmp_path / "zero.toml").write_text("max_steps = 0\n")
    out = tmp_path / "compare"
    flags = [flag.format(tmp=tmp_path, small=small_dir) for flag in flags]
    with pytest.raises(SystemExit):
        main(["math", "compare", "--preset", "smoke", "--out-dir", str(out), *flags])
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "none").exists()  # no tiny model built into --model


def test_compare_reuses_its_base_model_only_with_the_settings_it_was_built_with(tmp_path, capsys):
    out = tmp_path / "compare"
    args = ["math", "compare", "--preset", "smoke", "--algos", "grpo", "--out-dir", str(out)]
    args += ["--max-steps", "1", "--eval-examples", "2"]
    assert main(args) == 0
    built = json.loads((out / "bases.json").read_text())
    assert built == {
        "small": {
            "base_seed": 0, "data_seed": 1234, "data_mix": "default", "template": "r1_short",
            "sft_hint_fraction": 0.3, "hidden_size": 32, "num_layers": 1, "sft_steps": 2, "sft_lr": 2e-3,
        }
    }  # fmt: skip
    weights = (out / "base_small" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit):
        main([*args, "--base-seed", "1"])
    assert "base_small: a base model built with other settings (base_seed)" in capsys.readouterr().err
    assert (out / "base_small" / "model.safetensors").read_bytes() == weights


def test_resuming_a_run_of_another_algorithm_is_a_command_line_error(small_dir, tmp_path, capsys):
    RunDir.create(tmp_path / "r", {}, app="math", algorithm="grpo", exist_ok_for_resume=False)
    args = ["--algo", "gtpo", "--run-dir", str(tmp_path / "r"), "--resume", "--model", str(small_dir)]
    with pytest.raises(SystemExit):
        main(["math", "train", *args])
    assert "cannot resume it with algorithm 'gtpo': it is a 'grpo' run" in capsys.readouterr().err


@pytest.mark.slow
def test_offline_default_builds_and_sfts_the_tiny_models(tmp_path):
    """The default path: no --model; the tiny small and large models are built and fine-tuned first."""
    run_dir = tmp_path / "run"
    assert main(["math", "train", "--algo", "codistill", "--preset", "smoke", "--run-dir", str(run_dir)]) == 0
    for name in ("base_model", "base_model_large", "final", "final_large"):
        assert (run_dir / name / "config.json").is_file(), name


@pytest.mark.slow
def test_offline_default_under_two_fsdp_processes(tmp_path):
    """The whole command under `accelerate launch` with FSDP: process 0 builds and fine-tunes the base
    model (TRL's SFT in a child outside the process group) while process 1 waits, both train sharded and
    evaluate, process 0 writes eval.json."""
    run_dir = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "core.cli"]
    launch += ["math", "train", "--preset", "smoke", "--fsdp", "--run-dir", str(run_dir)]
    result = subprocess.run(launch, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["processes"] for m in _metrics(run_dir)] == [2.0] * len(_metrics(run_dir))
    assert (run_dir / "base_model" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("run/*.sft-job.json"))
    evals = json.loads((run_dir / "eval.json").read_text())
    assert evals["eval"]["all"]["examples"] > 0
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_scaf_refuses_fsdp(small_dir, tmp_path):
    """Scaf-GRPO searches hints only for failed groups: the processes would make different forward calls."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "core.cli"]
    launch += ["math", "train", "--algo", "scaf", "--model", str(small_dir), "--fsdp", *FAST]
    launch += ["--prompts-per-step", "4", "--run-dir", str(tmp_path / "run")]
    result = subprocess.run(launch, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "ScafHooks calls the policy a data-dependent number of times" in result.stderr


@pytest.mark.skipif(
    find_spec("deepspeed") is None, reason="DeepSpeed is not installed: pip install -e '.[deepspeed]'"
)
def test_scaf_under_zero2_gives_the_one_process_update(small_dir, tmp_path):
    """ZeRO keeps the weights whole on every process, so Scaf's data-dependent hint search (refused under
    FSDP) runs; with hints sought from the first step the 2-process weights are the 1-process ones."""
    flags = ["math", "train", "--algo", "scaf", "--model", str(small_dir), *FAST, "--max-steps", "2"]
    flags += ["--prompts-per-step", "4", "--scaf-exemption-fraction", "0", "--learning-rate", "1e-5"]
    flags += ["--eval-samples", "0"]
    assert main([*flags, "--run-dir", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2"]
    launch += [
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    launch += ["-m", "core.cli", *flags, "--run-dir", str(tmp_path / "two")]
    result = subprocess.run(launch, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["processes"] for m in two] == [2.0, 2.0]
    assert all(m["scaf/all_fail_frac"] > 0 for m in one)  # groups failed, so hints were sought
    for name in (n for n in one[0] if n.startswith("scaf/")):  # of the global batch, not process 0's share
        assert [m[name] for m in two] == pytest.approx([m[name] for m in one], nan_ok=True), name
    expected = load_file(tmp_path / "one" / "final" / "model.safetensors")
    got = load_file(tmp_path / "two" / "final" / "model.safetensors")
    base = load_file(small_dir / "model.safetensors")
    assert any(not torch.equal(expected[name], base[name]) for name in expected)  # a real update
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


def test_eval_takes_unset_settings_from_the_models_run_as_it_last_ran(tmp_path):
    from apps.math_reasoning.evaluate import MathEvalConfig
    from core.runs import RunDir

    trained = {"data_seed": 7, "data_mix": "micro", "template": "boxed", "max_new_tokens": 48}
    RunDir.create(tmp_path / "run", trained, app="math", algorithm="grpo", exist_ok_for_resume=False)
    model = str(tmp_path / "run" / "final")
    config = MathEvalConfig(model=model)
    assert (config.data_seed, config.data_mix, config.template, config.max_new_tokens) == (
        7,
        "micro",
        "boxed",
        48,
    )
    assert MathEvalConfig(model=model, template="r1_short").template == "r1_short"  # given: kept
    resumed = {**trained, "max_new_tokens": 96}  # a resume that changed it
    RunDir.create(tmp_path / "run", resumed, app="math", algorithm="grpo", exist_ok_for_resume=True)
    assert MathEvalConfig(model=model).max_new_tokens == 96


@pytest.mark.parametrize("name", ["compare.md", "compare.json"])
def test_a_failed_write_of_the_compare_table_leaves_the_previous_one(name, small_dir, tmp_path, monkeypatch):
    from apps.math_reasoning import compare as compare_module

    step_times = iter([1.0, 2.0])  # the second compare's table differs from the first's

    def fake_train(run_config):
        return {"history": [{"step_time": next(step_times)}], "eval": {}, "run_dir": run_config.run_dir}

    monkeypatch.setattr(compare_module, "_train_or_resume", fake_train)
    out = tmp_path / "compare"
    config = compare_module.MathCompareConfig(
        algos=("grpo",), seeds=(0,), out_dir=str(out), model=str(small_dir)
    )
    compare_module.compare(config)
    before = (out / name).read_text()
    replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(dst) == name:  # the write dies before the new file is in place
            raise OSError("killed")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="killed"):
        compare_module.compare(config)
    assert (out / name).read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md"]  # no temp file left


def test_scaf_on_a_data_file_without_hints_is_refused_before_the_base_model_is_built(tmp_path, capsys):
    (tmp_path / "gsm.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    run_dir = tmp_path / "run"
    args = [
        "--preset",
        "smoke",
        "--algo",
        "scaf",
        "--data",
        str(tmp_path / "gsm.jsonl"),
        "--run-dir",
        str(run_dir),
    ]
    with pytest.raises(SystemExit):
        main(["math", "train", *args])
    assert "gsm.jsonl: scaf needs hints per problem" in capsys.readouterr().err and not run_dir.exists()


def test_eval_refuses_a_run_dir_that_is_a_file_before_evaluating(small_dir, tmp_path, capsys, monkeypatch):
    import apps.math_reasoning.evaluate as math_evaluate

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the model was evaluated before its --run-dir was checked")

    monkeypatch.setattr(math_evaluate, "load_policy", no_evaluation)
    (tmp_path / "out").write_text("notes")
    with pytest.raises(SystemExit):
        main(["math", "eval", "--model", str(small_dir), "--run-dir", str(tmp_path / "out")])
    assert f"--run-dir {tmp_path / 'out'} is a file, not a directory" in capsys.readouterr().err


def test_eval_refuses_another_apps_run_before_evaluating(small_dir, tmp_path, capsys, monkeypatch):
    """Its results were merged into a Sudoku run's eval.json."""
    import apps.math_reasoning.evaluate as math_evaluate

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the model was evaluated before its --run-dir was checked")

    monkeypatch.setattr(math_evaluate, "load_policy", no_evaluation)
    other = RunDir.create(tmp_path / "sudoku", {}, app="sudoku", algorithm="grpo", exist_ok_for_resume=False)
    other.write_eval({"eval": {"solved": 0.5}})
    with pytest.raises(SystemExit) as exit_info:
        main(["math", "eval", "--model", str(small_dir), "--run-dir", str(other.path)])
    message = f"error: {other.path}: it holds a 'sudoku' run, whose eval.json this would change"
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert other.read_eval() == {"eval": {"solved": 0.5}}


def eval_rows(model_dir, tmp_path, rows: list[dict], name: str) -> dict:
    """`math eval` of `model_dir` (1 sample, 4 tokens) on `rows` written to <name>.jsonl: its eval_<name>."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = tmp_path / "eval"
    args = ["--model", str(model_dir), "--data", str(data), "--run-dir", str(run), "--samples", "1"]
    assert main(["math", "eval", *args, "--max-new-tokens", "4"]) == 0
    return json.loads((run / "eval.json").read_text())[f"eval_{name}"]


def test_eval_on_math_reports_its_levels_and_no_offline_hard_tail(small_dir, tmp_path):
    """MATH's `level` ("Level 3") gives per-level rows (it was dropped); only the offline set's level 3 is
    its hard tail, not MATH's."""
    rows = [
        {"problem": f"{a} + {a}?", "solution": rf"\boxed{{{2 * a}}}", "level": f"Level {level}"}
        for a, level in ((1, 3), (2, 5), (3, 3))
    ]
    results = eval_rows(small_dir, tmp_path, rows, "math500")
    assert results["level3"]["examples"] == 2 and results["level5"]["examples"] == 1
    assert "hard" not in results


def test_eval_keeps_text_levels_beside_numbered_ones_and_prints_each_column_once(small_dir, tmp_path, capsys):
    """A level "one" among numbered ones was a TypeError in the sort of the levels; "Level 3" counts as
    level 3. With one sample the table's header said "pass@1 pass@1 maj@1"."""
    from apps.math_reasoning.data import offline_sets

    rows = offline_sets(1234, 5, 5, 2).test[:4]
    for row, level in zip(rows, [3, "one", "Level 3", 1], strict=True):
        row["level"] = level
    results = eval_rows(small_dir, tmp_path, rows, "mixed")
    assert [name for name in results if name.startswith("level")] == ["level1", "level3", "level one"]
    assert [results[name]["examples"] for name in ("level1", "level3", "level one")] == [1, 2, 1]
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("subset"))
    assert header.split() == ["subset", "n", "pass@1", "maj@1", "format"]


def test_eval_samples_do_not_depend_on_how_many_rows_a_call_generates(small_dir, monkeypatch):
    """Each problem's k samples come from its own seed: 1 problem a call or 8 give the same completions
    (they came from one seed per call, so --batch-rows changed the results)."""
    from apps.math_reasoning.data import offline_sets
    from apps.math_reasoning.evaluate import evaluate_model
    from apps.math_reasoning.templates import get_template
    from core.policy import load_policy
    from core.rollout import HFGenerateBackend

    generated, generate_groups = [], HFGenerateBackend.generate_groups

    def recorded(self, *args, **kwargs):
        out = generate_groups(self, *args, **kwargs)
        generated[-1].extend(out.completions)
        return out

    monkeypatch.setattr(HFGenerateBackend, "generate_groups", recorded)
    model, tokenizer = load_policy(small_dir)
    examples = offline_sets(1234, 20, 10, 20).test[:8]
    for rows, seed in ((4, 3), (32, 3), (32, 4)):
        generated.append([])
        evaluate_model(
            model,
            tokenizer,
            examples,
            get_template("r1_short"),
            samples=4,
            temperature=1.0,
            max_new_tokens=12,
            seed=seed,
            batch_rows=rows,
        )
    assert len(generated[0]) == 32 and generated[0] == generated[1]
    assert generated[2] != generated[0]


def test_a_train_stopped_before_its_run_began_keeps_its_base_model_for_the_same_command(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C after the tiny base model's SFT but before the run existed: `--resume` has nothing to continue,
    and the same command started again reuses the base model instead of fine-tuning it again, also with
    another --max-steps (how long a run trains is not what its base model is built from)."""
    from apps.math_reasoning import train as math_train

    run_dir = tmp_path / "run"
    args = ["math", "train", "--preset", "smoke", "--run-dir", str(run_dir), "--max-steps", "1"]
    make_hooks = math_train.make_hooks

    def interrupted(*rest):
        raise KeyboardInterrupt

    monkeypatch.setattr(math_train, "make_hooks", interrupted)
    with pytest.raises(SystemExit):
        main(args)
    assert (
        "same command with the same --run-dir starts it again, reusing a base model"
        in capsys.readouterr().err
    )
    assert not (run_dir / "config.json").exists()
    weights = (run_dir / "base_model" / "model.safetensors").read_bytes()
    monkeypatch.setattr(math_train, "make_hooks", make_hooks)
    builds = []
    build_base = math_train.build_base
    monkeypatch.setattr(math_train, "build_base", lambda *a: builds.append(a) or build_base(*a))
    assert main([*args[:-1], "2"]) == 0
    assert builds == [] and (run_dir / "base_model" / "model.safetensors").read_bytes() == weights
    assert RunDir(run_dir).read_status()["status"] == "finished"


def test_the_paper_preset_on_the_tiny_default_is_refused_before_it_is_built(tmp_path, capsys):
    """1,024 new tokens do not fit the tiny model's context of 1,024: said before minutes of SFT, not as a
    traceback at the first step."""
    with pytest.raises(SystemExit):
        main(["math", "train", "--preset", "paper", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "preset paper: max_new_tokens must be below the tiny default model's context of 1024 tokens" in err
    assert "got 1024: give a --model with a longer context" in err
    assert not (tmp_path / "run").exists()


def test_a_prompt_too_long_for_the_tiny_context_is_refused_before_the_base_model_is_built(
    tmp_path, capsys, monkeypatch
):
    """1,000 new tokens are below the context of 1,024 but no prompt fits beside them: said before the base
    model's SFT, by the tokenizer the base model is built with."""
    from apps.math_reasoning import train as math_train

    monkeypatch.setattr(math_train, "build_base", lambda *a: pytest.fail("the base model was built"))
    run = ["math", "train", "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--max-new-tokens"]
    with pytest.raises(SystemExit):
        main([*run, "1000"])
    err = capsys.readouterr().err
    assert "+ max_new_tokens 1000 exceeds the model's context of 1024" in err
    assert not (tmp_path / "run").exists()


def test_the_tokenizer_checked_up_front_is_the_base_models(small_dir):
    from transformers import AutoTokenizer

    from apps.math_reasoning.data import offline_sets
    from apps.math_reasoning.models import tiny_tokenizer

    built = AutoTokenizer.from_pretrained(small_dir)
    alone = tiny_tokenizer(offline_sets(1234, 20, 10, 20))
    assert alone.get_vocab() == built.get_vocab() and "<think>" in alone.get_vocab()
    text = "<think>12 + 7 = 19</think><answer>19</answer>"
    assert alone(text)["input_ids"] == built(text)["input_ids"]


def test_training_on_a_data_file_without_eval_data_says_the_evaluation_is_offline(tmp_path, monkeypatch):
    """The final evaluation of a run on the user's --data is on the generated arithmetic set unless
    --eval-data is given: said, as the eval table's `offline` rows alone did not."""
    import warnings

    from apps.math_reasoning import train as math_train

    data = tmp_path / "gsm.jsonl"
    data.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    monkeypatch.setattr(math_train, "with_run_dir", stop)
    with pytest.warns(
        UserWarning, match=r"gsm.jsonl without --eval-data: the final evaluation is on the offline"
    ):
        with pytest.raises(Stop):
            math_train.train(math_train.MathTrainConfig(data=str(data)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for quiet in ({"eval_data": str(data)}, {"eval_samples": 0}):
            with pytest.raises(Stop):
                math_train.train(math_train.MathTrainConfig(data=str(data), **quiet))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--small-hidden-size", "50"],
            "small_hidden_size must be a positive multiple of 32 (head size 32), got 50",
        ),
        (
            ["--large-hidden-size", "0"],
            "large_hidden_size must be a positive multiple of 32 (head size 32), got 0",
        ),
        (["--small-num-layers", "0"], "small_num_layers must be >= 1, got 0"),
        (["--large-sft-steps", "-1"], "large_sft_steps must be >= 0, got -1"),
        (["--sft-lr", "0"], "sft_lr must be > 0 and finite, got 0.0"),
        (["--large-sft-lr=-1e-3"], "large_sft_lr must be > 0 and finite, got -0.001"),
    ],
)
def test_a_tiny_model_shape_or_sft_rate_it_cannot_have_is_a_command_line_error(
    tmp_path, capsys, flags, message
):
    """They were refused by the model builder with a traceback, after the data had been read."""
    with pytest.raises(SystemExit) as exit_info:
        main(["math", "train", "--preset", "smoke", *flags, "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_codistills_large_model_is_checked_before_the_small_base_is_built(tmp_path, capsys):
    """A missing --large-model, or one with another tokenizer, was found after the small model's SFT
    (minutes), the second with a traceback."""
    from core.tiny import create_tiny_model_dir

    run = tmp_path / "run"
    args = ["math", "train", "--preset", "smoke", "--algo", "codistill", "--run-dir", str(run)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--large-model", str(tmp_path / "nowhere")])
    message = (
        f"error: --large-model {tmp_path / 'nowhere'} does not exist; expected a local HF model directory"
    )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    a_run = RunDir.create(tmp_path / "a_run", {}, app="math", algorithm="grpo", exist_ok_for_resume=False)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--large-model", str(a_run.path)])
    message = f"error: --large-model {a_run.path} is a run directory, not a model: it holds no model yet"
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    other = create_tiny_model_dir(tmp_path / "other", ["only these letters"], hidden_size=32, num_layers=1)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--large-model", str(other)])
    message = (
        f"error: {other}: codistill's large model must share the small model's tokenizer (the offline tiny "
        "model's); their vocabularies differ"
    )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (run / "base_model").exists()


def test_the_eval_data_has_a_format_of_its_own(tmp_path, monkeypatch):
    """--data-format was applied to --eval-data too: a GSM8K training file could not be evaluated on a
    MATH-style file once its format was given."""
    from apps.math_reasoning import train as math_train

    gsm, math_file = tmp_path / "gsm.jsonl", tmp_path / "math.jsonl"
    gsm.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    math_file.write_text('{"problem": "2 + 2?", "solution": "\\\\boxed{4}", "level": "Level 2"}\n')
    loaded = {}

    def keep(examples, *args):
        loaded["eval"] = examples
        raise KeyboardInterrupt

    real = math_train.load_eval_examples
    monkeypatch.setattr(math_train, "load_eval_examples", lambda *a: keep(real(*a)))
    with pytest.raises(KeyboardInterrupt):
        math_train.train(
            math_train.MathTrainConfig(data=str(gsm), data_format="gsm8k", eval_data=str(math_file))
        )
    assert [(e["question"], e["answer"], e["level"]) for e in loaded["eval"]] == [("2 + 2?", "4", 2)]
    with pytest.raises(ValueError, match=r"math.jsonl:line 1 .*missing field 'answer'"):
        math_train.train(
            math_train.MathTrainConfig(data=str(gsm), eval_data=str(math_file), eval_data_format="gsm8k")
        )
    with pytest.raises(ValueError, match="eval_data_format: unknown data format 'csv'"):
        math_train.MathTrainConfig(eval_data_format="csv")


def test_data_and_compare_name_an_output_path_they_cannot_write(tmp_path, capsys):
    """A directory where a data file goes was an IsADirectoryError traceback; a file as --out-dir was
    "[Errno 17] File exists"."""
    (tmp_path / "data" / "train.jsonl").mkdir(parents=True)
    (tmp_path / "data" / "sft.jsonl").mkdir()  # the last one written: none is written before it
    with pytest.raises(SystemExit) as exit_info:
        main(["math", "data", "--out-dir", str(tmp_path / "data")])
    message = (
        f"error: {tmp_path / 'data' / 'train.jsonl'} is a directory; the data file cannot be written there"
    )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["sft.jsonl", "train.jsonl"]
    (tmp_path / "afile").write_text("notes")
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["math", "compare", "--preset", "smoke", "--algos", "grpo", "--out-dir", str(tmp_path / "afile")]
        )
    message = f"error: --out-dir {tmp_path / 'afile'} is a file, not a directory"
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_eval_takes_unset_settings_from_a_math_run_only(tmp_path):
    """A model of another app's run was evaluated with that run's max_new_tokens."""
    from apps.math_reasoning.evaluate import MathEvalConfig

    for app in ("toy", "math"):
        RunDir.create(
            tmp_path / app, {"max_new_tokens": 6}, app=app, algorithm="grpo", exist_ok_for_resume=False
        )
    assert MathEvalConfig(model=str(tmp_path / "toy" / "final")).max_new_tokens == 80  # the default
    assert MathEvalConfig(model=str(tmp_path / "math" / "final")).max_new_tokens == 6


def test_a_lora_adapter_without_a_tokenizer_may_be_codistills_large_model(
    small_dir, large_dir, tmp_path, monkeypatch
):
    """The pre-check compared tokenizers from the directories, and an adapter that holds none (it takes its
    base's) was refused, though the run loads it; a compare's large base, built after the arms' configs
    are made, is found when its arm trains."""
    from apps.math_reasoning import train as math_train
    from core.policy import TOKENIZER_FILES, LoraSettings, load_policy

    adapter = tmp_path / "adapter"
    load_policy(large_dir, lora=LoraSettings(r=2, alpha=4))[0].save_pretrained(adapter)
    assert not any((adapter / name).exists() for name in TOKENIZER_FILES)  # its base's is used

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    monkeypatch.setattr(math_train, "with_run_dir", stop)
    with pytest.raises(Stop):  # past the pre-check
        math_train.train(
            math_train.MathTrainConfig(algo="codistill", model=str(small_dir), large_model=str(adapter))
        )
    assert math_train.MathTrainConfig(algo="codistill", large_model=str(tmp_path / "built later")).large_model


def test_an_evaluation_prompt_too_long_for_the_model_is_refused_before_training(small_dir, tmp_path, capsys):
    """It failed the final evaluation with an IndexError, after training and saving (math eval: at once)."""
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"question": "Ann has 3 pens. " * 70 + "How many?", "answer": "#### 3"}) + "\n"
    )
    run = tmp_path / "run"
    args = ["math", "train", "--model", str(small_dir), "--run-dir", str(run), "--eval-data", str(long)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *FAST, *EVAL])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "evaluation set: example " in err and "exceeds the model's context of 1024" in err
    assert not (run / "config.json").exists()  # no run made: the same command with a fixed file runs
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["math", "eval", "--model", str(small_dir), "--data", str(long), "--run-dir", str(tmp_path / "e")]
        )
    assert exit_info.value.code == 2 and "evaluation set: example " in capsys.readouterr().err
