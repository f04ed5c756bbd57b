"""`grpo-suite toy train`: GRPO from a randomly initialised tiny model on the toy task, offline.

grpo-suite toy train --preset demo      # about a minute on 2 CPU cores; prints the reward curve
"""

from dataclasses import dataclass, field

from apps.toy.task import LETTERS, alphabet_fraction, letter_fraction, make_examples, read_data_file
from core.cli import add_app, add_command
from core.launch import policy_for, summary_table, with_run_dir
from core.rewards import Rubric
from core.tiny import create_tiny_model_dir
from core.trainer import GRPOConfig, GRPOTrainer

APP = "toy"


@dataclass
class ToyTrainConfig(GRPOConfig):
    """The core's GRPO fields with defaults that make a tiny model learn the toy task quickly."""

    max_steps: int = field(default=120, metadata={"help": "training steps"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per step"})
    group_size: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    max_new_tokens: int = field(default=6, metadata={"help": "completion length cap"})
    learning_rate: float = field(
        default=3e-3, metadata={"help": "AdamW learning rate (high: a from-scratch model)"}
    )
    num_examples: int = field(
        default=256, metadata={"help": "generated training prompts (not used with --data)"}
    )
    alphabet_weight: float = field(default=0.25, metadata={"help": "weight of the shaping reward"})

    def __post_init__(self):
        super().__post_init__()
        if self.num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {self.num_examples}")
        if self.alphabet_weight < 0:  # a negative weight rewards leaving the task's alphabet
            raise ValueError(f"alphabet_weight must be >= 0, got {self.alphabet_weight}")


PRESETS = {
    "demo": {"max_steps": 120},
    "smoke": {"max_steps": 2, "prompts_per_step": 2, "group_size": 4, "num_examples": 8},
}


def build_default_model(path, seed: int):
    texts = [example["prompt"] for example in make_examples(64, seed)] + [LETTERS]
    return create_tiny_model_dir(path, texts, hidden_size=64, num_layers=2, num_heads=4, seed=seed)


def train(config: ToyTrainConfig) -> list[dict]:
    config = with_run_dir(config, APP)
    if config.data:  # a file of the task's own rows: prompt and letter
        examples = read_data_file(config.data)
    else:
        examples = make_examples(config.num_examples, config.seed)
    model, tokenizer = policy_for(config, lambda path: build_default_model(path, config.seed))
    rubric = Rubric(
        {"letter": letter_fraction, "alphabet": alphabet_fraction},
        weights={"letter": 1.0, "alphabet": config.alphabet_weight},
        on_error=config.on_reward_error,
    )
    trainer = GRPOTrainer(config, model, tokenizer, examples, rubric, app=APP)
    with trainer.until_finished():  # finished once saved and evaluated
        history = trainer.train()
        final = trainer.save_final()
    print(summary_table(history))
    print(f"model saved to {final}")
    return history


def register(apps) -> None:
    verbs = add_app(apps, APP, "toy task: learn to repeat a letter (a minute, offline)")
    add_command(verbs, "train", ToyTrainConfig, train, "GRPO on the toy task", PRESETS)
