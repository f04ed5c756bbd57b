"""A 2-step run under `accelerate launch` (`python failing_rank_worker.py MODEL RUN WHERE`) where one process
only fails: WHERE = "reward", process 1's reward raises in step 2 ("reward0": process 0's); "after", process 1
raises after training, inside `until_finished` (as in its share of an evaluation). Every process must raise,
and process 0 record the run as failed."""

import sys

from core.policy import load_policy
from core.rewards import Rubric
from core.trainer import GRPOConfig, GRPOTrainer, join_processes

model_dir, run_dir, where = sys.argv[1:4]
state = join_processes("cpu")
calls = 0


def flaky(completion: str, example: dict) -> float:
    global calls
    calls += 1
    failing = {"reward": 1, "reward0": 0}.get(where)
    if state.process_index == failing and calls > 8:  # step 1 scores 2 groups of 4 here; step 2 fails
        raise ValueError("reward server unreachable")
    return len(completion) % 3 / 3


model, tokenizer = load_policy(model_dir)
config = GRPOConfig(
    run_dir=run_dir, max_steps=2, prompts_per_step=4, group_size=4, max_new_tokens=4, micro_batch_size=8
)
examples = [{"id": f"ex{i}", "prompt": f"go {i}"} for i in range(8)]
trainer = GRPOTrainer(config, model, tokenizer, examples, Rubric({"flaky": flaky}), app="test")
with trainer.until_finished():
    trainer.train()
    if where == "after" and state.process_index == 1:
        raise RuntimeError("evaluation failed on process 1")
