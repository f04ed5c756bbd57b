"""A CoDistill or GTPO run for the 1-vs-2-process tests (`python algo_worker.py ALGO SMALL LARGE OUT`, alone
or under `accelerate launch`): process 0 saves both models' weights to OUT/{small,large}.safetensors."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from apps.math_reasoning.codistill import CoDistillHooks
from apps.math_reasoning.data import offline_sets
from apps.math_reasoning.gtpo import GTPOHooks
from apps.math_reasoning.templates import get_template
from apps.math_reasoning.train import MathTrainConfig
from core.policy import load_policy
from core.rewards import Rubric
from core.trainer import GRPOTrainer, join_processes, leave_process_group

algo, small_dir, large_dir, out = sys.argv[1:5]
state = join_processes("cpu")
small, tokenizer = load_policy(small_dir)
large, _ = load_policy(large_dir)
template = get_template("r1_short")
examples = [e | {"prompt": template.render(e["question"])} for e in offline_sets(1234, 20, 10, 20).train[:8]]
config = MathTrainConfig(
    run_dir=str(Path(out) / "run"), algo=algo, max_steps=2, prompts_per_step=4, group_size=4,
    max_new_tokens=6, learning_rate=1e-5, micro_batch_size=4, eval_samples=0,
)  # fmt: skip
hooks = (
    CoDistillHooks(large, alpha=0.5, is_cap=2.0, learning_rate=1e-5) if algo == "codistill" else GTPOHooks()
)
# an untrained model earns no math reward (no spread, nothing moves): the completion's length mod 5 instead
rubric = Rubric({"length": lambda completion, example: len(completion) % 5 / 5})
GRPOTrainer(config, small, tokenizer, examples, rubric, app="t", hooks=hooks).train()
if state.is_main_process:
    for name, model in (("small", small), ("large", large)):
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}/{name}.safetensors")
leave_process_group()
