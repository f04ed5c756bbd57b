"""A 2-step run whose reward raises on process 1 only, in step 2 (`python failing_rank_worker.py MODEL RUN`
under `accelerate launch`): every process must raise, process 0 recording process 1's error."""

import sys

from core.policy import load_policy
from core.rewards import Rubric
from core.trainer import GRPOConfig, GRPOTrainer, join_processes

model_dir, run_dir = sys.argv[1:3]
state = join_processes("cpu")
calls = 0


def flaky(completion: str, example: dict) -> float:
    global calls
    calls += 1
    if state.process_index == 1 and calls > 8:  # step 1 scores 2 groups of 4 here; step 2 fails
        raise ValueError("reward server unreachable")
    return len(completion) % 3 / 3


model, tokenizer = load_policy(model_dir)
config = GRPOConfig(
    run_dir=run_dir, max_steps=2, prompts_per_step=4, group_size=4, max_new_tokens=4, micro_batch_size=8
)
examples = [{"id": f"ex{i}", "prompt": f"go {i}"} for i in range(8)]
GRPOTrainer(config, model, tokenizer, examples, Rubric({"flaky": flaky}), app="test").train()
