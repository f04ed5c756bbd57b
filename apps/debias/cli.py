"""`grpo-suite debias data | train | eval | pipeline`: multi-reward GRPO de-biasing (PAPERS.md sec. 8)."""

from apps.debias.data import DataConfig, run_data
from apps.debias.evaluate import DebiasEvalConfig, evaluate
from apps.debias.pipeline import PipelineConfig, pipeline
from apps.debias.train import PRESETS, DebiasTrainConfig, train
from core.cli import add_app, add_command


def register(apps) -> None:
    verbs = add_app(apps, "debias", "de-biasing with a DeBERTa multi-reward model and multi-reward GRPO")
    add_command(verbs, "data", DataConfig, run_data, "generate the synthetic prompt/response splits")
    add_command(verbs, "train", DebiasTrainConfig, train, "GRPO against the reward model's heads", PRESETS)
    add_command(verbs, "eval", DebiasEvalConfig, evaluate, "fairness, bias intensity, perplexity, distinct-n")
    add_command(verbs, "pipeline", PipelineConfig, pipeline, "data -> reward model -> SFT -> GRPO -> eval")
