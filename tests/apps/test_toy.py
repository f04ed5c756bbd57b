"""The toy app through its command line: a smoke run, exact resume after SIGKILL, and 1 vs 2 processes
(data-parallel, with dynamic sampling, sharded with FSDP, FSDP with LoRA, DeepSpeed ZeRO-1 and ZeRO-2;
FSDP and ZeRO resume)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apps.toy import train as toy_train
from apps.toy.task import alphabet_fraction, letter_fraction, make_examples
from core.cli import main
from core.runs import RunDir

TOY = ["toy", "train", "--preset", "smoke"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def metrics_without_timing(run_dir: Path) -> list[dict]:
    timing = {"step_time", "generate_time", "tokens_per_s"}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def test_rewards_and_examples():
    assert letter_fraction("aab", {"letter": "a"}) == pytest.approx(2 / 3)
    assert alphabet_fraction("ab?", {"letter": "a"}) == pytest.approx(2 / 3)
    assert make_examples(5, seed=1) == make_examples(5, seed=1)
    assert make_examples(5, seed=1)[0]["prompt"] == f"Repeat {make_examples(5, seed=1)[0]['letter']}"


def test_an_empty_completion_earns_neither_reward():
    """Both rewards are shares of the completion's characters: an empty one has no share of anything."""
    assert letter_fraction("", {"letter": "a"}) == 0.0
    assert alphabet_fraction("", {"letter": "b"}) == 0.0
    assert letter_fraction("b", {"letter": "b"}) == 1.0 and alphabet_fraction("?", {"letter": "b"}) == 0.0


def test_different_seeds_give_different_examples():
    letters = {seed: [e["letter"] for e in make_examples(32, seed=seed)] for seed in (1, 2)}
    assert letters[1] != letters[2]
    assert set(letters[1]) == set(letters[2]) == {"a", "b"}
    assert [e["id"] for e in make_examples(3, seed=2)] == ["toy-0", "toy-1", "toy-2"]


@pytest.fixture
def built(tmp_path, monkeypatch) -> dict:
    """What `toy train` hands the trainer (trainer and model stubbed out): config, examples and rubric."""
    seen = {}

    class Trainer:
        def __init__(self, config, model, tokenizer, examples, rubric, app):
            seen.update(config=config, rubric=rubric, examples=examples)

        def until_finished(self):
            return contextlib.nullcontext()

        def train(self):
            return []

        def save_final(self):
            return tmp_path / "final"

    monkeypatch.setattr(toy_train, "policy_for", lambda config, build: (None, None))
    monkeypatch.setattr(toy_train, "GRPOTrainer", Trainer)
    return seen


def test_alphabet_weight_flag_weighs_the_shaping_reward(tmp_path, built):
    """The rubric `toy train` builds: total = letter + w * alphabet."""
    args = ["--alphabet-weight", "0.5", "--num-examples", "6", "--seed", "3"]
    assert main([*TOY, *args, "--run-dir", str(tmp_path / "run")]) == 0
    rubric = built["rubric"]
    assert rubric.weights == {"letter": 1.0, "alphabet": 0.5}
    assert built["examples"] == make_examples(6, seed=3)
    table = rubric.score(["aab?", "bb", "xyz"], [{"letter": "a"}, {"letter": "a"}, {"letter": "b"}])
    # letter 2/4, alphabet 3/4 -> 1/2 + 3/8; letter 0, alphabet 1 -> 1/2; nothing -> 0
    assert table.total.tolist() == pytest.approx([0.875, 0.5, 0.0])


def test_smoke_run_writes_a_complete_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([*TOY, "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out and "zero-spread" in out
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "checkpoints" / "step-2" / "complete").is_file()
    assert (run_dir / "final" / "config.json").is_file()
    with pytest.raises(SystemExit):  # the same run directory again, without --resume
        main([*TOY, "--run-dir", str(run_dir)])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "core.cli", *TOY, *args]


def test_data_file_is_trained_on_and_a_bad_line_is_named(tmp_path, capsys):
    data = tmp_path / "toy.jsonl"
    data.write_text('{"prompt": "Repeat b", "letter": "b"}\n{"prompt": "Repeat a", "letter": "a"}\n')
    run = tmp_path / "run"
    assert main([*TOY, "--data", str(data), "--run-dir", str(run)]) == 0
    prompts = {json.loads(line)["prompt"] for line in (run / "rollouts.jsonl").read_text().splitlines()}
    assert prompts <= {"Repeat b", "Repeat a"} and prompts
    data.write_text('{"prompt": "Repeat b", "letter": "b"}\n{"prompt": "Repeat a"}\n')
    with pytest.raises(SystemExit):
        main([*TOY, "--data", str(data), "--run-dir", str(tmp_path / "bad")])
    assert f"{data}:line 2: missing field(s) letter" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "base_model").exists()  # read before anything is built


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("toy.txt", "Repeat a", "expected .jsonl, .json, .csv or .parquet"),
        ("empty.csv", "prompt,letter\n", "has no rows"),
        ("a:b/toy.jsonl", '{"prompt": "Repeat a"}\n', "line 1: missing field(s) letter"),  # a ':' in the path
        (
            "list.jsonl",
            '{"prompt": ["Repeat a", "Repeat b"], "letter": "a"}\n',
            "line 1 (id 'list-0'): prompt must be text, got list",
        ),
        ("latin.csv", "prompt,letter\nRepeat \u00e9,a\n", "latin.csv: not UTF-8 text"),
    ],
)
def test_a_bad_data_file_is_a_command_line_error_without_a_traceback(tmp_path, capsys, name, text, message):
    data = tmp_path / name
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(text.encode("latin-1" if name == "latin.csv" else "utf-8"))
    with pytest.raises(SystemExit) as exit_info:
        main([*TOY, "--data", str(data), "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("row", "letter"),
    [("Repeat a, a", "' a'"), ("Repeat b,bb", "'bb'"), ("Repeat c,c", "'c'"), ("Repeat ab,ab", "'ab'")],
)
def test_a_data_row_whose_letter_no_completion_can_earn_is_named(tmp_path, capsys, row, letter):
    data = tmp_path / "toy.csv"
    data.write_text(f"prompt,letter\nRepeat a,a\n{row}\n")
    with pytest.raises(SystemExit):
        main([*TOY, "--data", str(data), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert f"{data}:line 3" in err and f"letter {letter} is not one of a, b" in err
    assert not (tmp_path / "run" / "base_model").exists()  # read before anything is built


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-examples", "0"], "num_examples must be >= 1, got 0"),
        (["--alphabet-weight", "-5"], "alphabet_weight must be >= 0, got -5.0"),
        (["--alphabet-weight", "-0.5"], "alphabet_weight must be >= 0, got -0.5"),
        # the core's: these had failed after the base model and config.json were written, with a traceback
        (["--top-k", "-3"], "top_k must be >= 0, got -3"),
        (["--weight-decay", "-1"], "weight_decay must be >= 0, got -1.0"),
        (["--rollouts-to-log", "-2"], "rollouts_to_log must be >= -1 (-1 = all), got -2"),
    ],
)
def test_clearly_wrong_values_are_refused_before_anything_is_built(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*TOY, *flags, "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_config_that_cannot_be_read_is_a_command_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*TOY, "--deepspeed", str(tmp_path / "none.json"), "--run-dir", str(tmp_path / "run")])
    assert (
        exit_info.value.code == 2 and f"DeepSpeed config {tmp_path / 'none.json'}:" in capsys.readouterr().err
    )


def test_num_examples_help_says_it_does_not_apply_with_data(capsys):
    with pytest.raises(SystemExit):
        main(["toy", "train", "--help"])
    assert "generated training prompts (not used with --data)" in " ".join(capsys.readouterr().out.split())


def test_a_new_run_into_the_directory_of_another_is_refused_before_anything_is_built(tmp_path, capsys):
    run_dir = tmp_path / "run"
    RunDir.create(run_dir, {"max_steps": 2}, app="toy", algorithm="grpo", exist_ok_for_resume=False)
    before = sorted(run_dir.rglob("*"))
    with pytest.raises(SystemExit):
        main([*TOY, "--run-dir", str(run_dir)])
    assert f"{run_dir} already holds a run" in capsys.readouterr().err
    assert sorted(run_dir.rglob("*")) == before  # no base_model/ built into the other run


def test_resume_without_an_earlier_run_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*TOY, "--run-dir", str(tmp_path / "none"), "--resume"])
    assert "holds no run to continue" in capsys.readouterr().err and not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):
        main([*TOY, "--resume"])
    assert "give its --run-dir" in capsys.readouterr().err


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    steps = ["--max-steps", "12", "--save-every", "3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cli(*steps, "--run-dir", str(whole)), check=True, capture_output=True)

    process = subprocess.Popen(
        _cli(*steps, "--run-dir", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-6" / "complete").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists()
    subprocess.run(_cli(*steps, "--run-dir", str(killed), "--resume"), check=True, capture_output=True)

    expected, got = final_weights(whole), final_weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert metrics_without_timing(killed) == metrics_without_timing(whole)


# An untrained model mostly scores 0: many zero-spread groups, so every step draws all 3 rounds and keeps
# groups from several rounds and processes. Slow: each case takes about a minute on a busy 2-core machine.
DYNAMIC = pytest.param(
    ["--dynamic-sampling", "--max-sampling-rounds", "3"], id="dynamic-sampling", marks=pytest.mark.slow
)
FSDP = pytest.param(["--fsdp"], id="fsdp")
# LoRA under FSDP (frozen and trained weights in one unit), the adapter-disabled reference, and
# generate_groups' decode loop, which must run until both processes are done
FSDP_LORA = pytest.param(
    ["--fsdp", "--lora", "--lora-r", "4", "--beta", "0.04", "--generation-groups", "2"], id="fsdp-lora-kl"
)


# DeepSpeed ZeRO through accelerate's own flags (accelerate launch --use_deepspeed --zero_stage N)
NO_DEEPSPEED = pytest.mark.skipif(
    find_spec("deepspeed") is None, reason="DeepSpeed is not installed: pip install -e '.[deepspeed]'"
)
# 4 micro-batches of 2 completions per process and mini-batch: the accumulation boundary matters
ZERO1 = pytest.param(["@zero1", "--micro-batch-size", "2"], id="zero1-accumulation", marks=NO_DEEPSPEED)
ZERO2_LORA = pytest.param(
    ["@zero2", "--lora", "--lora-r", "4", "--beta", "0.04", "--mu", "2"],
    id="zero2-lora-kl",
    marks=NO_DEEPSPEED,
)

# 2 mini-batches of 3-row micro-batches: each process's mini-batch must be its part of the global one
MINI_BATCHES = pytest.param(
    ["--mini-batches", "2", "--mu", "2", "--micro-batch-size", "3"], id="mini-batches"
)


def _launch(*args: str) -> list[str]:
    """The toy command in 2 CPU processes; an argument "@zeroN" launches it under DeepSpeed ZeRO stage N.
    (`accelerate launch --cpu --num_processes 2` would start a single process: accelerate launches several
    CPU processes only through mpirun.)"""
    mode = ["--multi_gpu"]
    for stage in (arg[len("@zero") :] for arg in args if arg.startswith("@zero")):
        mode = ["--use_deepspeed", "--zero_stage", stage]
    args = [arg for arg in args if not arg.startswith("@zero")]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, "-m", "core.cli", *TOY, *args]


def _two_processes(*args: str) -> str:
    result = subprocess.run(
        _launch(*args), capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _trained(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "final"
    return load_file(
        final
        / ("adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors")
    )


@pytest.mark.parametrize(
    "extra", [pytest.param([], id="plain"), MINI_BATCHES, DYNAMIC, FSDP, FSDP_LORA, ZERO1, ZERO2_LORA]
)
def test_two_processes_give_the_one_process_update(tmp_path, extra):
    """The same weights to 1e-6. At a fine-tuning learning rate: at the toy's own 3e-3, Adam turns the
    float rounding of summing gradients in another order into weight differences of up to 5e-5. Adam
    hides a wrong gradient scale, so the gradient norms (before clipping) are compared too."""
    flags = ["--max-steps", "3", "--prompts-per-step", "4", "--learning-rate", "1e-5", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    single = [flag for flag in flags if not flag.startswith("@zero")]
    subprocess.run(_cli(*single, "--run-dir", str(one)), check=True, capture_output=True)
    out = _two_processes(*flags, "--run-dir", str(two))
    assert out.count("model saved to") == 1  # only process 0 prints
    logs = [metrics_without_timing(run) for run in (one, two)]
    assert [m["processes"] for m in logs[1]] == [2.0, 2.0, 2.0]
    norms = [[m["grad_norm"] for m in log] for log in logs]
    # abs 1e-8: a step whose groups all have zero spread has only the KL term's gradient, ~1e-4 in norm
    assert norms[1] == pytest.approx(norms[0], rel=1e-5, abs=1e-8) and max(norms[0]) > 0
    for key in ("ratio/max", "ratio/min"):  # the extreme over both processes' micro-batches
        assert [m[key] for m in logs[1]] == pytest.approx([m[key] for m in logs[0]], rel=1e-5)
    expected, got = _trained(one), _trained(two)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    rollouts = [
        [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()] for run in (one, two)
    ]
    assert len(rollouts[1]) == 3 * 4 * 4  # both processes' shares, in global order
    keys = ("step", "group", "example_id", "completion", "reward")
    assert [[r[k] for k in keys] for r in rollouts[1]] == [[r[k] for k in keys] for r in rollouts[0]]
    if "--lora" in extra:  # lora_B starts at 0: a nonzero one was trained
        assert all(bool(t.abs().sum() > 0) for name, t in got.items() if "lora_B" in name)
    else:
        base = load_file(one / "base_model" / "model.safetensors")
        assert any(not torch.equal(expected[name], base[name]) for name in expected)
    if extra == DYNAMIC.values[0]:  # the processes agreed on the rounds and on the chosen groups
        keys = ("sampling_rounds", "zero_spread_frac", "reward", "reward_std", "advantage_abs_mean")
        picked = [[{k: m[k] for k in keys} for m in log] for log in logs]
        assert picked[0] == picked[1]
        assert any(m["sampling_rounds"] > 1 for m in picked[0])


def _two_process_run_and_its_resume_from_step_2(flags: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """A 3-step 2-process run ("whole") and a copy that lost step 3 and resumed from step 2 ("cut")."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _two_processes(*flags, "--run-dir", str(whole))
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-3")
    shutil.rmtree(cut / "final")
    _two_processes(*flags, "--run-dir", str(cut), "--resume")
    return whole, cut


@pytest.mark.parametrize(
    "mode", [pytest.param(["--fsdp"], id="fsdp"), pytest.param(["@zero2"], id="zero2", marks=NO_DEEPSPEED)]
)
def test_sharded_resume_is_bitwise_exact(tmp_path, mode):
    """Sharded checkpoints (FSDP's weights and optimizer state, ZeRO's optimizer partitions) are gathered
    into one checkpoint and scattered back on resume: a 2-process run that loses its last step and
    resumes from the one before ends with the same weights."""
    flags = [*mode, "--max-steps", "3", "--prompts-per-step", "4", "--save-every", "1", "--mu", "2"]
    flags += ["--beta", "0.04"]  # the reference copy is rebuilt from the base model, not checkpointed
    whole, cut = _two_process_run_and_its_resume_from_step_2(flags, tmp_path)
    expected, got = final_weights(whole), final_weights(cut)
    assert expected.keys() == got.keys() and "lm_head.weight" not in got  # tied to the embeddings
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert metrics_without_timing(cut) == metrics_without_timing(whole)


@pytest.mark.slow  # three 2-process runs: about a minute
def test_two_process_resume_restores_each_processs_random_stream(tmp_path):
    """With dropout the processes' torch generators drift apart (each draws as many numbers as its tensors
    hold): a checkpoint keeps every process's state, so the resumed run ends with the same weights."""
    subprocess.run(_cli("--max-steps", "1", "--run-dir", str(tmp_path / "base")), check=True)
    dropout = tmp_path / "dropout_model"
    shutil.copytree(tmp_path / "base" / "base_model", dropout)
    config = json.loads((dropout / "config.json").read_text())
    (dropout / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.3}))
    flags = ["--model", str(dropout), "--max-steps", "3", "--prompts-per-step", "4", "--save-every", "1"]
    whole, cut = _two_process_run_and_its_resume_from_step_2(flags, tmp_path)
    assert metrics_without_timing(cut) == metrics_without_timing(whole)
    expected, got = final_weights(whole), final_weights(cut)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@NO_DEEPSPEED
def test_zero_refuses_a_checkpoint_written_without_it(tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--prompts-per-step", "4", "--run-dir", str(run_dir)]
    subprocess.run(_cli("--max-steps", "1", *flags), check=True, capture_output=True)
    launch = _launch("@zero2", "--max-steps", "2", *flags, "--resume")
    result = subprocess.run(launch, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "written without DeepSpeed ZeRO" in result.stderr


@NO_DEEPSPEED
def test_fsdp_refuses_a_zero_checkpoint(tmp_path):
    flags = ["--prompts-per-step", "4", "--run-dir", str(tmp_path / "run")]
    _two_processes("@zero2", "--max-steps", "1", *flags)
    launch = _launch("--max-steps", "2", *flags, "--fsdp", "--resume")
    result = subprocess.run(launch, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert (
        "step-1: cannot resume from it with these settings: it was written under DeepSpeed ZeRO"
        in result.stderr
    )


def test_fsdp_refuses_a_checkpoint_written_without_it(tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--prompts-per-step", "4", "--run-dir", str(run_dir)]
    subprocess.run(_cli("--max-steps", "1", *flags), check=True, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["-m", "core.cli", *TOY, "--max-steps", "2", *flags, "--fsdp", "--resume"]
    result = subprocess.run(launch, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "written without FSDP" in result.stderr and "resume it without --fsdp" in result.stderr


def test_one_example_and_a_zero_shaping_weight_are_accepted(tmp_path, built):
    """The smallest valid values: one generated prompt; weight 0 turns the shaping reward off."""
    args = ["--num-examples", "1", "--alphabet-weight", "0", "--run-dir", str(tmp_path / "run")]
    assert main([*TOY, *args]) == 0
    assert len(built["examples"]) == 1 and built["rubric"].weights == {"letter": 1.0, "alphabet": 0.0}
