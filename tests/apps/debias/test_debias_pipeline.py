"""apps/debias/pipeline.py with its stages faked: --quick keeps explicit sizes, duplicate seeds are refused
up front, a failed stage marks the run failed, and --resume keeps the stages that finished and refuses
other settings; one real --quick pipeline resumed after its reward model (slow)."""

import argparse
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from apps.debias import pipeline as pipeline_module
from apps.debias.evaluate import DebiasEvalConfig, evaluation_settings
from apps.debias.pipeline import PipelineConfig, pipeline
from apps.debias.train import DebiasTrainConfig
from core.config import add_config_arguments, build_config
from core.runs import RunDir


@pytest.fixture
def stages(monkeypatch):
    """Fake reward model, SFT, GRPO and eval stages that write what the real ones mark their end with;
    returns the configs each was called with, in call order."""
    calls = {}

    def train_reward_model(config):
        calls.setdefault("rm", []).append(config)
        (Path(config.run_dir) / "model").mkdir(parents=True, exist_ok=True)
        results = {s: {"pair_acc/fairness": 1.0, "n": 5} for s in ("test", "heldout")}
        (Path(config.run_dir) / "eval.json").write_text(json.dumps(results))
        return results

    def build_sft_policy(path, rows, config):
        calls.setdefault("sft", []).append(config)
        path.mkdir()
        return path

    def train(config):
        calls.setdefault("train", []).append(config)
        Path(config.run_dir).mkdir(exist_ok=True)
        (Path(config.run_dir) / "config.json").write_text("{}")
        (Path(config.run_dir) / "final").mkdir()

    def evaluate(config):
        calls.setdefault("eval", []).append(config)
        results = {
            "settings": evaluation_settings(config),  # as the real one: a resume reuses its own only
            "metrics": {"test/fairness/after": 0.9 - config.seed / 10},
            "bias": {"hukou": {"before": 0.5, "after": 0.1}},
        }
        (Path(config.model).parent / "eval.json").write_text(json.dumps(results))
        return results

    for name, fake in [
        ("train_reward_model", train_reward_model),
        ("build_sft_policy", build_sft_policy),
        ("train", train),
        ("evaluate", evaluate),
    ]:
        monkeypatch.setattr(pipeline_module, name, fake)
    return calls


def parse(argv: list[str]) -> PipelineConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PipelineConfig)
    return build_config(PipelineConfig, parser.parse_args(argv))


def test_quick_keeps_explicit_sizes(stages, tmp_path):
    sizes = ["--rm-epochs", "5", "--sft-epochs", "3", "--grpo-steps", "7", "--eval-prompts", "16"]
    pipeline(parse(["--quick", *sizes, "--run-dir", str(tmp_path / "run")]))
    assert stages["rm"][0].epochs == 5 and stages["rm"][0].hidden_size == 32  # quick's size, our epochs
    assert (stages["sft"][0].sft_epochs, stages["sft"][0].max_steps) == (3, 7)
    assert stages["eval"][0].max_prompts == 16
    quick, full = parse(["--quick"]), parse([])
    assert (quick.rm_epochs, quick.sft_epochs, quick.grpo_steps, quick.eval_prompts) == (0.1, 0.05, 2, 8)
    assert (full.rm_epochs, full.sft_epochs, full.grpo_steps, full.eval_prompts) == (2.0, 2.0, 40, 64)


def test_duplicate_seeds_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="seeds: 0 given more than once"):
        PipelineConfig(seeds=(0, 1, 0), run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_out_of_range_is_refused_before_any_work(tmp_path, seed):
    """It passed the up-front checks, then failed the GRPO stage with a traceback after data, RM and SFT."""
    with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*32\), got {seed}"):
        PipelineConfig(seeds=(0, seed), run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_seeds_eval_json_is_reused_only_if_the_pipelines_own_evaluation_wrote_it(tmp_path, capsys):
    """A `debias eval` of the seed's final/ with other settings (no baseline) replaced it: the resume had
    crashed on the missing 'before' metrics, or taken another model's numbers as the seed's."""
    grpo_dir = tmp_path / "grpo-seed1"
    own = DebiasEvalConfig(model=str(grpo_dir / "final"), reward_model="rm", baseline_model="sft", seed=1)
    assert pipeline_module._own_evaluation(grpo_dir, own) is None  # not evaluated yet
    run = RunDir.create(grpo_dir, {}, app="debias", algorithm="grpo", exist_ok_for_resume=False)
    run.write_eval({"settings": evaluation_settings(own), "metrics": {"m": 1.0}})
    assert pipeline_module._own_evaluation(grpo_dir, own)["metrics"] == {"m": 1.0}
    run.write_eval({"settings": evaluation_settings(replace(own, baseline_model=None)), "metrics": {}})
    assert pipeline_module._own_evaluation(grpo_dir, own) is None
    said = "grpo-seed1/eval.json: not known to be this pipeline's evaluation (other settings)"
    assert said in capsys.readouterr().out
    run.write_eval({"metrics": {}})  # written before evaluations kept their settings
    assert pipeline_module._own_evaluation(grpo_dir, own) is None
    assert "(written before evaluations kept their settings): evaluated again" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rm_epochs", -1.0, "rm_epochs must be > 0, got -1.0"),  # had failed after the data stage
        ("grpo_steps", 0, "grpo_steps must be >= 1, got 0"),
        ("grpo_save_every", -1, "grpo_save_every must be >= 0, got -1"),
    ],
)
def test_out_of_range_sizes_are_refused_before_any_work(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(quick=True, run_dir=str(tmp_path / "run"), **{field: value})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--multi-reward", "sum_then_normalise"],
            "multi_reward: unknown multi-reward aggregation .sum_then_normalise.",
        ),  # had failed after data + reward model
        (["--beta", "-1"], "beta must be >= 0, got -1"),
    ],
)
def test_bad_grpo_settings_are_refused_before_any_work(stages, flags, message, tmp_path):
    """The GRPO stage's settings were checked only once the data and reward model stages had run, and a
    --resume with the corrected value was then refused as a changed setting."""
    with pytest.raises(ValueError, match=message):
        parse(["--quick", *flags, "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists() and "rm" not in stages


def test_a_run_dir_that_is_a_file_is_named_before_any_work(stages, tmp_path):
    """It had been NotADirectoryError's traceback from listing the directory."""
    (tmp_path / "afile").write_text("")
    for resume in (False, True):
        with pytest.raises(FileExistsError, match="--run-dir .*afile is a file, not a directory"):
            pipeline(PipelineConfig(quick=True, run_dir=str(tmp_path / "afile"), resume=resume))
    assert not stages


def test_a_failed_stage_marks_the_run_failed(stages, monkeypatch, tmp_path):
    def broken(config):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipeline_module, "train", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipeline(PipelineConfig(quick=True, run_dir=str(tmp_path / "run")))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert (status["status"], status["error"]) == ("failed", "RuntimeError: out of memory")
    assert status["step"] == 3  # the stages it finished: data, reward model, SFT


def fail_once(monkeypatch, name: str, when=lambda config: True):
    """The faked stage `name` raises the first time `when(config)` holds (after doing its work when the
    stage is `train`: a GRPO run that has begun), then runs normally."""
    stage, failed = getattr(pipeline_module, name), []

    def flaky(*args):
        if not failed and when(args[-1] if name != "build_sft_policy" else args[2]):
            failed.append(True)
            if name == "train":
                Path(args[0].run_dir).mkdir()
                (Path(args[0].run_dir) / "config.json").write_text("{}")
            raise RuntimeError("killed")
        return stage(*args)

    monkeypatch.setattr(pipeline_module, name, flaky)


def test_a_resumed_pipeline_keeps_the_stages_that_finished(stages, monkeypatch, tmp_path):
    run = tmp_path / "run"
    args = ["--quick", "--seeds", "0,1", "--run-dir", str(run)]
    fail_once(monkeypatch, "train", lambda config: config.seed == 1)  # stopped during seed 1's GRPO
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(parse(args))
    data_written = (run / "data" / "train.jsonl").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="pass --resume to continue it"):
        pipeline(parse(args))

    results = pipeline(parse([*args, "--resume"]))
    assert len(stages["rm"]) == len(stages["sft"]) == 1  # not run again
    assert (run / "data" / "train.jsonl").stat().st_mtime_ns == data_written
    assert [(c.seed, c.resume) for c in stages["train"]] == [(0, False), (1, True)]  # seed 1 continued
    assert [c.save_every for c in stages["train"]] == [10, 10]  # checkpoints to continue from
    assert [c.seed for c in stages["eval"]] == [0, 1]  # seed 0's evaluation kept
    assert results["reward_model"] == {s: {"pair_acc/fairness": 1.0} for s in ("test", "heldout")}
    assert results["per_seed"] == {"0": {"test/fairness/after": 0.9}, "1": {"test/fairness/after": 0.8}}
    status = json.loads((run / "status.json").read_text())
    assert (status["status"], status["step"]) == ("finished", 4)  # its four stages
    assert json.loads((run / "eval.json").read_text())["per_seed"] == results["per_seed"]


def test_a_resumed_pipeline_reports_the_time_of_every_attempt(stages, monkeypatch, tmp_path):
    """`timings_s` sum each stage's seconds over the attempts (they had counted the resumed one only)."""
    ticks = iter(range(0, 1000, 10))  # each reading of the clock 10 s after the one before
    monkeypatch.setattr(pipeline_module, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    run = tmp_path / "run"
    fail_once(monkeypatch, "train")  # the first attempt stops in GRPO, after 10 s of each stage
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(parse(["--quick", "--run-dir", str(run)]))
    assert json.loads((run / "timings.json").read_text())["grpo_and_eval"] == 10
    results = pipeline(parse(["--quick", "--run-dir", str(run), "--resume"]))
    stages_s = {"data": 20, "reward_model": 20, "sft": 20, "grpo_and_eval": 20}
    assert results["timings_s"] == {**stages_s, "total": 80}


def test_a_resumed_pipeline_continues_a_cut_off_reward_model_and_evaluates_a_finished_grpo_run(
    stages, monkeypatch, tmp_path
):
    run = tmp_path / "run"
    fail_once(monkeypatch, "train_reward_model")
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(parse(["--quick", "--run-dir", str(run)]))
    pipeline(parse(["--quick", "--run-dir", str(run), "--resume"]))
    assert [c.resume for c in stages["rm"]] == [True]  # from its newest checkpoint (reward_models/train.py)

    run = tmp_path / "run2"
    fail_once(monkeypatch, "evaluate")  # the GRPO run finished, its evaluation did not
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(parse(["--quick", "--run-dir", str(run)]))
    stages["train"].clear()
    pipeline(parse(["--quick", "--run-dir", str(run), "--resume"]))
    assert stages["train"] == [] and stages["eval"][-1].model == str(run / "grpo-seed0" / "final")


def test_a_resumed_pipeline_refuses_other_settings_naming_them(stages, tmp_path):
    run = tmp_path / "run"
    pipeline(parse(["--quick", "--run-dir", str(run)]))
    with pytest.raises(ValueError, match=r"other settings \(grpo_steps 2 -> 3; seeds \[0\] -> \[0, 1\]\)"):
        pipeline(parse(["--quick", "--run-dir", str(run), "--resume", "--grpo-steps", "3", "--seeds", "0,1"]))
    assert "resumes" not in json.loads((run / "config.json").read_text())  # refused before reopening it
    # the device and the checkpoint interval may change (the device set here, not parsed: the flag is
    # refused without a GPU)
    args = ["--quick", "--run-dir", str(run), "--resume", "--grpo-save-every", "5"]
    pipeline(replace(parse(args), device="cuda"))
    resumes = json.loads((run / "config.json").read_text())["resumes"]
    changed = {"device": ["cpu", "cuda"], "grpo_save_every": [10, 5], "resume": [False, True]}
    assert resumes[0]["changed"] == changed
    assert len(stages["rm"]) == len(stages["train"]) == 1  # everything had finished


def test_a_resume_compares_beta_as_it_ran_like_the_sizes(stages, tmp_path):
    """An unset beta was stored unset while the sizes were stored resolved: a resume giving the beta the run
    had used was refused, and one giving its eval-prompts accepted."""
    run = tmp_path / "run"
    pipeline(parse(["--quick", "--run-dir", str(run)]))
    assert stages["train"][0].beta == DebiasTrainConfig.beta == 0.2
    assert json.loads((run / "config.json").read_text())["config"]["beta"] == 0.2
    pipeline(parse(["--quick", "--run-dir", str(run), "--resume", "--beta", "0.2", "--eval-prompts", "8"]))
    with pytest.raises(ValueError, match=r"other settings \(beta 0.2 -> 0.1\)"):
        pipeline(parse(["--quick", "--run-dir", str(run), "--resume", "--beta", "0.1"]))
    stored = json.loads((run / "config.json").read_text())  # a pipeline from before beta was resolved
    stored["config"]["beta"] = None
    (run / "config.json").write_text(json.dumps(stored))
    pipeline(parse(["--quick", "--run-dir", str(run), "--resume", "--beta", "0.2"]))
    pipeline(parse(["--run-dir", str(run), "--resume"]))
    with pytest.raises(ValueError, match=r"other settings \(beta 0.2 -> 0.1\)"):
        pipeline(parse(["--quick", "--run-dir", str(run), "--resume", "--beta", "0.1"]))


def test_a_resumed_pipeline_needs_an_earlier_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume continues an earlier pipeline: give its --run-dir"):
        pipeline(parse(["--quick", "--resume"]))
    with pytest.raises(FileNotFoundError, match="holds no pipeline to continue"):
        pipeline(parse(["--quick", "--resume", "--run-dir", str(tmp_path / "typo")]))
    assert not (tmp_path / "typo").exists()
    grpo = tmp_path / "grpo"
    RunDir.create(grpo, {}, app="debias", algorithm="grpo", exist_ok_for_resume=False)
    with pytest.raises(ValueError, match="cannot resume it with algorithm 'pipeline': it is a 'grpo' run"):
        pipeline(parse(["--quick", "--resume", "--run-dir", str(grpo)]))


@pytest.mark.slow
def test_a_real_quick_pipeline_resumed_after_its_reward_model(monkeypatch, tmp_path):
    run = tmp_path / "run"
    trained = []
    train_reward_model = pipeline_module.train_reward_model
    monkeypatch.setattr(
        pipeline_module, "train_reward_model", lambda c: trained.append(c) or train_reward_model(c)
    )
    build_sft_policy = pipeline_module.build_sft_policy

    def killed(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(pipeline_module, "build_sft_policy", killed)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(parse(["--quick", "--run-dir", str(run)]))
    reward_model = (run / "reward_model" / "model" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(pipeline_module, "build_sft_policy", build_sft_policy)
    results = pipeline(parse(["--quick", "--run-dir", str(run), "--resume"]))
    assert len(trained) == 1
    assert (run / "reward_model" / "model" / "model.safetensors").stat().st_mtime_ns == reward_model
    rm_eval = json.loads((run / "reward_model" / "eval.json").read_text())
    assert results["reward_model"]["test"]["pair_acc/fairness"] == rm_eval["test"]["pair_acc/fairness"]
    assert json.loads((run / "grpo-seed0" / "status.json").read_text())["status"] == "finished"
    assert set(results["per_seed"]) == {"0"}
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_a_resume_gives_the_stages_the_same_paths_however_the_run_dir_is_spelled(
    stages, monkeypatch, tmp_path
):
    """A reward model or GRPO run compares its paths on resume: a pipeline started with a relative --run-dir
    and resumed with an absolute one (or back) gives them the same strings."""
    monkeypatch.chdir(tmp_path)
    cut_off = []
    fail_once(monkeypatch, "train_reward_model", lambda config: cut_off.append(config) or True)
    fail_once(monkeypatch, "train", lambda config: cut_off.append(config) or True)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(parse(["--quick", "--run-dir", "run"]))
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(parse(["--quick", "--run-dir", str(tmp_path / "run"), "--resume"]))
    pipeline(parse(["--quick", "--run-dir", "run", "--resume"]))
    rm, grpo = cut_off
    assert (rm.data, rm.run_dir) == (stages["rm"][0].data, stages["rm"][0].run_dir)
    assert rm.data == str(tmp_path / "run" / "data")
    resumed = stages["train"][0]
    assert (grpo.data_dir, grpo.reward_model, grpo.model, grpo.run_dir) == (
        resumed.data_dir,
        resumed.reward_model,
        resumed.model,
        resumed.run_dir,
    )
    assert resumed.run_dir == str(tmp_path / "run" / "grpo-seed0") and resumed.resume


def test_a_damaged_timings_file_is_named_on_resume(stages, monkeypatch, tmp_path):
    run = tmp_path / "run"
    fail_once(monkeypatch, "train")
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(parse(["--quick", "--run-dir", str(run)]))
    (run / "timings.json").write_text("{cut off")
    with pytest.raises(ValueError, match=r"timings.json: malformed JSON: .*; delete it to resume"):
        pipeline(parse(["--quick", "--run-dir", str(run), "--resume"]))
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
