"""`grpo-suite reward-model train | eval | score`: the multi-head DeBERTa reward model."""

from core.cli import add_app, add_command
from reward_models.score import RMScoreConfig, score_file
from reward_models.train import RMEvalConfig, RMTrainConfig, evaluate_reward_model, train_reward_model

PRESETS = {"smoke": {"epochs": 0.05, "max_train_rows": 64, "batch_size": 8}}


def register(apps) -> None:
    verbs = add_app(apps, "reward-model", "DeBERTa multi-head reward model: fairness, relevance, quality")
    add_command(verbs, "train", RMTrainConfig, train_reward_model, "train on neutral/biased pairs", PRESETS)
    add_command(verbs, "eval", RMEvalConfig, evaluate_reward_model, "pairwise accuracy and calibration")
    add_command(verbs, "score", RMScoreConfig, score_file, "score a JSONL of {prompt, response}")
