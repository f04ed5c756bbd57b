"""apps/debias/pipeline.py with its stages faked: --quick keeps explicit sizes, duplicate seeds are refused
up front, and a failed stage marks the run failed."""

import argparse
import json
from pathlib import Path

import pytest

from apps.debias import pipeline as pipeline_module
from apps.debias.pipeline import PipelineConfig, pipeline
from core.config import add_config_arguments, build_config


@pytest.fixture
def stages(monkeypatch):
    """Fake reward model, SFT, GRPO and eval stages; returns the configs each was called with."""
    calls = {}

    def train_reward_model(config):
        calls["rm"] = config
        (Path(config.run_dir) / "model").mkdir(parents=True)
        return {s: {"pair_acc/fairness": 1.0} for s in ("test", "heldout")}

    def build_sft_policy(path, rows, config):
        calls["sft"] = config
        return path

    def train(config):
        calls.setdefault("train", []).append(config)

    def evaluate(config):
        calls.setdefault("eval", []).append(config)
        return {"metrics": {"test/fairness/after": 0.9}, "bias": {"hukou": {"before": 0.5, "after": 0.1}}}

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
    assert stages["rm"].epochs == 5 and stages["rm"].hidden_size == 32  # quick's model size, our epochs
    assert (stages["sft"].sft_epochs, stages["sft"].max_steps) == (3, 7)
    assert stages["eval"][0].max_prompts == 16
    quick, full = parse(["--quick"]), parse([])
    assert (quick.rm_epochs, quick.sft_epochs, quick.grpo_steps, quick.eval_prompts) == (0.1, 0.05, 2, 8)
    assert (full.rm_epochs, full.sft_epochs, full.grpo_steps, full.eval_prompts) == (2.0, 2.0, 40, 64)


def test_duplicate_seeds_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="seeds: 0 given more than once"):
        PipelineConfig(seeds=(0, 1, 0), run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_failed_stage_marks_the_run_failed(stages, monkeypatch, tmp_path):
    def broken(config):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipeline_module, "train", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipeline(PipelineConfig(quick=True, run_dir=str(tmp_path / "run")))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert (status["status"], status["error"]) == ("failed", "RuntimeError: out of memory")
