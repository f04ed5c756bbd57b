"""The GRPO loop and its config.

One step: take `prompts_per_step` examples, sample `group_size` completions for each, score them with
the app's rubric, turn rewards into group advantages, then `mu` epochs of `mini_batches` optimizer
updates on micro-batches (gradient accumulation), logging to the run directory and checkpointing.

Apps plug in through `TrainerHooks` (Scaf-GRPO transforms rollouts, CoDistill adds reward terms that need
a model, GTPO sets token weights and adjusts advantages, Sudoku adds fields to rollouts.jsonl) and never
fork the loop.

Multi-process: under `accelerate launch` every process takes the same prompt batch, generates and scores
its contiguous share, and all processes gather the reward table so advantages are those of the global
batch; losses use the global token and sequence counts and gradients are summed across processes, so
N processes give the update of one process with the same global batch. Each group is sampled with its
own seed (from the run seed, the step and the group's index in the global batch), which makes the
rollouts independent of how the batch is split. Dynamic sampling draws its extra rounds the same way; the
processes gather which groups have reward spread, so they agree on the rounds and on the chosen groups, and
pass each other the chosen groups that land in another process's share. With FSDP (`fsdp`, or accelerate's
FSDP config) the weights, gradients and optimizer state are sharded instead of replicated (core/sharding.py);
with DeepSpeed ZeRO stage 1 or 2 (`deepspeed`, or accelerate's DeepSpeed config) the optimizer state and
gradients are partitioned (core/zero.py). The update is the same.
"""

import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import get_scheduler

from core import algos, sharding, zero
from core.atomic import atomic_directory, write_atomic
from core.config import config_to_dict
from core.data import InputError, PromptSampler, check_prompt_lengths
from core.multi_turn import Environment, multi_turn_rollouts
from core.policy import ReferencePolicy, completion_logprobs, eval_mode, has_dropout, save_policy
from core.rewards import RewardTable, Rubric
from core.rng_state import capture_rng_state, restore_rng_state
from core.rollout import (
    HFGenerateBackend,
    RolloutBackend,
    Rollouts,
    SamplingSettings,
    context_limit,
    derive_seed,
)
from core.runs import RunDir, default_run_dir, load_checkpoint, sigterm_as_exit

# metrics of policy_loss that are a micro-batch's share of its mini-batch's value, summed not averaged
ADDITIVE_METRICS = ("loss", "pg_loss")


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class GRPOConfig:
    """Fields shared by every GRPO training command; apps subclass it to add theirs and change defaults."""

    model: str | None = _help("HF causal-LM directory to train; default: the app's offline tiny model", None)
    data: str | None = _help("training data file (JSONL/JSON/CSV/Parquet); default: the app's own set", None)
    run_dir: str | None = _help("run directory; default runs/<app>/<timestamp>", None)
    resume: bool = _help(
        "continue the newest complete checkpoint in --run-dir (without one, start over: see --save-every)",
        False,
    )
    seed: int = _help("seed of data order, sampling and initialisation", 0)
    device: str = _help("cpu or cuda", "cpu")
    max_steps: int = _help("training steps (one batch of prompts each)", 50)
    prompts_per_step: int = _help("prompts per step (global, over all processes)", 8)
    group_size: int = _help("completions per prompt (G)", 8)
    max_new_tokens: int = _help("completion length cap (per turn in multi-turn tasks)", 64)
    min_new_tokens: int = _help("eos is suppressed before this many tokens (benchmarks force a length)", 0)
    max_turns: int = _help("turn cap of multi-turn tasks (apps with an environment)", 4)
    temperature: float = _help("sampling temperature (the logprob pass divides by it too)", 1.0)
    top_p: float = _help("nucleus sampling mass", 1.0)
    top_k: int = _help("top-k sampling; 0 = off", 0)
    learning_rate: float = _help("AdamW learning rate", 1e-6)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = _help(
        "learning-rate schedule after warm-up", "constant"
    )
    warmup_steps: int = _help("optimizer updates of linear warm-up", 0)
    max_grad_norm: float = _help("gradient clipping norm; 0 = off", 1.0)
    mu: int = _help("update epochs per batch (GRPO's mu); > 1 computes old logprobs once", 1)
    mini_batches: int = _help("optimizer updates per epoch (the batch is split in this many)", 1)
    micro_batch_size: int = _help("completions per forward/backward (gradient accumulation)", 64)
    loss_aggregation: str = _help(
        f"one of {', '.join(algos.AGGREGATIONS.names())} (seq-mean-token-sum-norm divides by the completion's "
        "token budget: max_new_tokens, times max_turns in multi-turn tasks)",
        "seq-mean-token-mean",
    )
    eps_low: float = _help("lower clip range of the ratio", 0.2)
    eps_high: float | None = _help("upper clip range (clip-higher); none = eps_low", None)
    dual_clip: float | None = _help("dual-clip bound c > 1 for negative advantages; none = off", None)
    ratio_level: Literal["token", "sequence"] = _help("per-token ratio, or one per sequence (GSPO)", "token")
    beta: float = _help("KL coefficient; 0 loads no reference model", 0.0)
    kl_estimator: str = _help(f"one of {', '.join(algos.KL_ESTIMATORS.names())}", "k3")
    advantage_scale: Literal["group", "batch", "none"] = _help(
        "divide by group std, batch std, or not", "group"
    )
    advantage_baseline: Literal["mean", "leave_one_out"] = _help(
        "group mean or leave-one-out baseline", "mean"
    )
    advantage_eps: float = _help("epsilon added to the std", 1e-6)
    multi_reward: str = _help(f"one of {', '.join(algos.MULTI_REWARD.names())}", "sum_then_normalize")
    dynamic_sampling: bool = _help(
        "drop groups without signal (advantages all 0) and sample more prompts (DAPO)", False
    )
    max_sampling_rounds: int = _help("cap on sampling rounds per step with dynamic sampling", 3)
    on_reward_error: Literal["raise", "zero"] = _help(
        "a failing reward function stops the run or scores 0", "raise"
    )
    lora: bool = _help("train a LoRA adapter instead of all weights", False)
    lora_r: int = _help("LoRA rank", 16)
    lora_alpha: int = _help("LoRA alpha", 32)
    fsdp: bool = _help(
        "shard weights, gradients and optimizer state over the processes (FSDP2); also chosen by "
        "accelerate's FSDP config. Needed on CPU, where accelerate refuses --use_fsdp",
        False,
    )
    deepspeed: str | None = _help(
        "DeepSpeed JSON config: ZeRO stage 1 or 2 partitions optimizer state (and gradients) over the "
        "processes; also chosen by accelerate's DeepSpeed config (launch --use_deepspeed --zero_stage N)",
        None,
    )
    logprob_chunk_size: int = _help(
        "token positions per chunk of the LM head in the logprob pass (at most 2^26 / vocabulary size)", 1024
    )
    autocast: Literal["off", "bfloat16"] = _help(
        "run generation and the logprob passes under torch.autocast in bf16 (weights, gradients and the "
        "optimizer stay in the model's dtype); off = the model's dtype throughout",
        "off",
    )
    generation_groups: int = _help(
        "groups per batched generate call (HF backend, single-turn); each group keeps its own seed. "
        "1 = one call per group. Must divide each process's share of prompts_per_step",
        1,
    )
    compile_decode: bool = _help(
        "torch.compile the decode step of batched generation (needs generation_groups > 1): about a "
        "quarter off the decode time on CPU after a one-off compile of 15-30 s; not under FSDP",
        False,
    )
    save_every: int = _help("checkpoint every N steps (and always at the end); 0 = only at the end", 0)
    keep_checkpoints: int = _help("complete checkpoints kept", 2)
    rollouts_to_log: int = _help("completions written to rollouts.jsonl per step; -1 = all", -1)
    report_to: Literal["none", "tensorboard"] = _help("extra logging backend", "none")

    def __post_init__(self):
        for name in ("model", "data"):  # "" would be taken for no path in one place and a path in another
            if getattr(self, name) == "":
                raise ValueError(f"{name}: an empty path; leave --{name} out for the app's own")
        positive = (
            "max_steps",
            "prompts_per_step",
            "max_new_tokens",
            "max_turns",
            "mu",
            "mini_batches",
        )
        extra = ("micro_batch_size", "logprob_chunk_size", "keep_checkpoints", "lora_r", "generation_groups")
        extra += ("max_sampling_rounds",)
        for name in positive + extra:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # numpy's range; the data order multiplies it within torch's int64
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.group_size < 2:  # advantages compare a prompt's completions: one alone always gets 0
            raise ValueError(
                f"group_size must be >= 2 (GRPO compares a prompt's completions), got {self.group_size}"
            )
        # lora_alpha: LoRA's scale is alpha / r, so 0 trains nothing
        for name in ("learning_rate", "temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in (
            "beta",
            "max_grad_norm",
            "warmup_steps",
            "save_every",
            "advantage_eps",
            "top_k",
            "weight_decay",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rollouts_to_log < -1:
            raise ValueError(f"rollouts_to_log must be >= -1 (-1 = all), got {self.rollouts_to_log}")
        eps_high = self.eps_low if self.eps_high is None else self.eps_high
        if not 0 <= self.eps_low < 1 or eps_high < 0:
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 or none, got {self.dual_clip}")
        registries = {
            "loss_aggregation": algos.AGGREGATIONS,
            "kl_estimator": algos.KL_ESTIMATORS,
            "multi_reward": algos.MULTI_REWARD,
        }
        for name, registry in registries.items():
            try:
                registry.get(getattr(self, name))
            except ValueError as err:  # "field: ..." lets build_config name the file the value came from
                raise ValueError(f"{name}: {err}") from None
        if self.multi_reward == "normalize_then_sum" and self.advantage_scale != "group":
            raise ValueError(
                "multi_reward normalize_then_sum (GDPO) divides each component by its group std: it needs "
                f"advantage_scale group, got {self.advantage_scale}"
            )
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.compile_decode and self.generation_groups == 1:
            raise ValueError("compile_decode compiles batched generation: set generation_groups > 1 too")
        if self.prompts_per_step % self.generation_groups:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} must be divisible by "
                f"generation_groups={self.generation_groups}"
            )
        if (self.prompts_per_step * self.group_size) % self.mini_batches:
            raise ValueError(
                f"prompts_per_step * group_size must be divisible by mini_batches={self.mini_batches}"
            )

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_new_tokens=self.min_new_tokens,
        )

    def autocast_context(self):
        """torch.autocast for the forward passes, or a disabled one (`autocast = "off"`)."""
        device = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast == "bfloat16")


class TrainerHooks:
    """Named extension points of the loop; each default leaves the step unchanged."""

    # Whether a hook calls the policy a data-dependent number of times per process (Scaf-GRPO's hint
    # search): FSDP needs every process to make the same forward calls, so such hooks refuse it.
    data_dependent_forwards: bool = False

    def extra_rewards(self, trainer: "GRPOTrainer", rollouts: Rollouts, examples: list[dict]) -> dict:
        """Reward terms that need a model (CoDistill's KD term): {name: (N,) tensor}, added with weight 1."""
        return {}

    def transform_rollouts(
        self,
        trainer: "GRPOTrainer",
        rollouts: Rollouts,
        examples: list[dict],
        table: RewardTable,
        round_: int,
    ) -> tuple[Rollouts, RewardTable]:
        """Replace rollouts of a group after scoring (Scaf-GRPO's hinted successes); rows stay group-ordered.
        `round_` is the sampling round of the step (0, then 1, 2, ... under dynamic sampling)."""
        return rollouts, table

    def token_weights(self, trainer: "GRPOTrainer", rollouts: Rollouts, advantages: torch.Tensor):
        """Per-token weights (N, T) of the policy term (GTPO's conflict tokens), or None."""
        return None

    def adjust_advantages(self, advantages: torch.Tensor, mean_entropy: torch.Tensor) -> torch.Tensor:
        """Per-completion advantages of a micro-batch given its mean token entropies (GTPO, EGPO)."""
        return advantages

    def after_update(self, trainer: "GRPOTrainer", batch: "Batch") -> dict:
        """Called after the policy's updates of a step (CoDistill trains its second model here); metrics."""
        return {}

    def state_dict(self) -> dict:
        """What the hooks need to continue exactly after a resume (CoDistill: its model and optimizer),
        saved in each checkpoint: tensors and plain data; an entry that is a {name: tensor} map (a model's
        weights) is stored as safetensors (`core.runs.RunDir.save_checkpoint`)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (tensors on the CPU), when the trainer resumes."""

    def rollout_fields(self, trainer: "GRPOTrainer", example: dict, rollouts: Rollouts, index: int) -> dict:
        """Extra JSON fields of row `index` of rollouts.jsonl, the completion of `example` (Sudoku's board
        for the dashboard); a field the trainer writes itself (docs/dashboards.md) may not be replaced."""
        return {}


@dataclass
class Batch:
    """One step's scored rollouts on this process, with what the update needs."""

    examples: list[dict]  # this process's examples, one per group
    rollouts: Rollouts  # (N_local rows, group-ordered)
    table: RewardTable  # this process's reward table
    advantages: torch.Tensor  # (N_local,)
    global_components: torch.Tensor  # (N, K) over all processes, for logging
    sampling_rounds: int = 1


def join_processes(device: str) -> PartialState:
    """Accelerate's process state, whose first creation joins the process group of a multi-process launch
    (`accelerate launch --multi_gpu`, `torchrun`); on CPU over gloo, which accelerate only picks when told
    the run is on CPU. One process without a launcher: nothing to join.
    (`accelerate launch --cpu --num_processes N` starts a single process unless given an MPI hostfile.)
    accelerate launch's --mixed_precision is refused: the trainer does not apply it (it keeps the model's
    dtype; `--autocast bfloat16` is its bf16 path), so a bf16 launch would train in float32 without a word."""
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":
        raise InputError(
            f"accelerate launch --mixed_precision {precision} is not applied: the trainer keeps the model's "
            "dtype; launch with --mixed_precision no and pass --autocast bfloat16 for bf16 compute"
        )
    return PartialState(cpu=torch.device(device).type == "cpu")


def leave_process_group() -> None:
    """The end of a multi-process launch (no-op in one process): every process waits for the others, then
    leaves the process group. A process that left early (or just exited) while another was still writing
    files took gloo down under it and aborted ("terminate called without an active exception", seen in
    CI under FSDP and in a GTPO 2-process test)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device(x: torch.Tensor) -> torch.device:
    """Where a collective on `x` can run: NCCL (a GPU launch) only takes CUDA tensors, and the reward
    tables and counts live on the CPU."""
    if x.device.type == "cpu" and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped (n, ...) tensors of every process in rank order."""
    rank, world = _world()
    if world == 1:
        return x
    y = x.contiguous().to(_collective_device(x))
    parts = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


# where a process other than 0 leaves its error for process 0, which records the run's status
PROCESS_ERROR_FILE = "process-{rank}-error.txt"


class ResumeRefused(InputError):
    """A checkpoint these settings cannot continue (another model, other LoRA settings, other examples):
    the run is left as it was, its status included."""


class _OtherSettings(ValueError):
    """Raised while a checkpoint is put back, where it was saved with other settings than this run's."""


def _first_lines(err: Exception, keep: int = 2) -> str:
    """An error's first `keep` non-blank lines on one line, with a count of the rest (torch's state-dict
    errors list every weight)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    more = f" (and {len(lines) - keep} more lines)" if len(lines) > keep else ""
    return " ".join(lines[:keep]) + more


class OtherProcessFailed(RuntimeError):
    """Raised on every process but the one whose error `_raise_together` relays (which names it)."""


def _raise_together(work):
    """`work()`'s result; if it raises on any process, every process raises (the others naming the one that
    failed and its error) before any reaches its next collective, where it would wait forever."""
    _, world = _world()
    try:
        result, error = work(), None
    except Exception as err:
        result, error = None, err
    if world > 1:
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed and error is None:
            raise OtherProcessFailed(f"process {failed[0][0]} failed: {failed[0][1]}")
    if error is not None:
        raise error
    return result


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the processes of a multi-process launch, in place (unchanged in one process)."""
    if _world()[1] > 1:
        device = _collective_device(x)
        if device == x.device:
            dist.all_reduce(x)
        else:
            y = x.to(device)
            dist.all_reduce(y)
            x.copy_(y)
    return x


class GRPOTrainer:
    """Trains `model` on `examples` scored by `rubric`; `app` and `algorithm` name the run."""

    def __init__(
        self,
        config: GRPOConfig,
        model,
        tokenizer,
        examples: list[dict],
        rubric: Rubric,
        *,
        app: str,
        algorithm: str = "grpo",
        hooks: TrainerHooks | None = None,
        backend: RolloutBackend | None = None,
        environment: Environment | None = None,
    ):
        # the rubric applies on_error: the config must not say otherwise
        if rubric.on_error != config.on_reward_error:
            raise ValueError(
                f"on_reward_error is {config.on_reward_error!r} but the rubric's on_error is "
                f"{rubric.on_error!r}: build the Rubric with on_error=config.on_reward_error"
            )
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.rubric = rubric
        self.hooks = hooks or TrainerHooks()
        self.backend = backend or HFGenerateBackend(
            model,
            tokenizer,
            device=config.device,
            autocast_dtype=torch.bfloat16 if config.autocast == "bfloat16" else None,
            compile_decode=config.compile_decode,
        )
        self.environment = environment
        # the model tokens a completion may hold: Dr.GRPO's constant normaliser (TRL's max_completion_length)
        self.completion_budget = config.max_new_tokens * (1 if environment is None else config.max_turns)
        not_text = [e.get("id") for e in examples if not isinstance(e.get("prompt"), str)][:3]
        if not_text:  # a list of messages would be joined into one string by the tokenizer without a word
            raise ValueError(
                f"every example needs a `prompt` string (the templated text); not for ids {not_text}"
            )
        self.sampler = PromptSampler(examples, config.seed)
        join_processes(config.device)
        self.rank, self.world = _world()
        if config.prompts_per_step % self.world:
            raise InputError(
                f"prompts_per_step={config.prompts_per_step} must divide by {self.world} processes"
            )
        if (config.prompts_per_step // self.world * config.group_size) % config.mini_batches:
            raise InputError(
                f"mini_batches={config.mini_batches} must divide each process's "
                f"{config.prompts_per_step // self.world * config.group_size} completions"
            )
        if (config.prompts_per_step // self.world) % config.generation_groups:
            raise InputError(
                f"generation_groups={config.generation_groups} must divide each process's "
                f"{config.prompts_per_step // self.world} prompts"
            )
        self.max_context = context_limit(self.backend, model)
        # every prompt now, not only those of the batch that holds it, many steps in (a hook's hinted
        # prompts are checked again in `generate`); every process holds the same examples and settings, so
        # all of them raise or none does
        self._check_prompt_lengths(examples)
        self.reference = ReferencePolicy(model) if config.beta > 0 else None
        self.fsdp = sharding.fsdp_requested(config.fsdp) and self.world > 1
        if config.fsdp and self.world == 1:
            warnings.warn(
                "--fsdp in a single process: nothing to shard (launch with torchrun or accelerate)",
                stacklevel=2,
            )
        zero_config = zero.deepspeed_config(config.deepspeed)
        if zero_config is not None and self.fsdp:
            raise InputError("choose FSDP or DeepSpeed, not both")
        if zero_config is not None and self.world == 1:
            warnings.warn(
                "DeepSpeed ZeRO in a single process: nothing to partition (launch with accelerate)",
                stacklevel=2,
            )
            zero_config = None
        if self.fsdp:
            # under FSDP every forward is collective: each process must make the same calls
            if environment is not None:  # episodes end at different turns on different processes
                raise NotImplementedError("multi-turn rollouts (an environment) do not run under FSDP yet")
            if type(self.backend) is not HFGenerateBackend:
                raise NotImplementedError(
                    f"{type(self.backend).__name__} under FSDP: only HFGenerateBackend decodes in step "
                    "across processes"
                )
            if config.compile_decode:
                raise NotImplementedError("compile_decode under FSDP: the sharded forward is not compiled")
            if self.hooks.data_dependent_forwards:
                raise NotImplementedError(
                    f"{type(self.hooks).__name__} calls the policy a data-dependent number of times per "
                    "process; it does not run under FSDP"
                )
            sharding.shard(model)
            if self.reference is not None and not self.reference.shares_policy:  # the frozen copy too
                sharding.shard(self.reference.model, reshard_root=True)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        updates = config.max_steps * config.mu * config.mini_batches
        name = "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule
        self.scheduler = get_scheduler(name, self.optimizer, config.warmup_steps, updates)
        self.engine = None  # the DeepSpeed engine under ZeRO: it runs backward and the optimizer step
        if zero_config is not None:
            share = config.prompts_per_step // self.world * config.group_size // config.mini_batches
            micro, accumulation = zero.micro_batching(share, config.micro_batch_size)
            self.engine = zero.initialize(
                model,
                self.optimizer,
                self.scheduler,
                zero_config,
                micro_batch_size=micro,
                accumulation_steps=accumulation,
                max_grad_norm=config.max_grad_norm,
            )
        self.step = self.completed_step = 0  # completed: the last step whose update and logging are done
        self.checkpointed_step = -1  # the step of the newest checkpoint this run wrote or resumed from
        self._finish_later = False  # set inside until_finished()
        chosen = [config.run_dir or (str(default_run_dir(app)) if self.rank == 0 else None)]
        if self.world > 1:  # the default is a timestamp, claimed by rank 0: every process uses it
            dist.broadcast_object_list(chosen, src=0)
        run_dir = chosen[0]
        self.run = None
        if self.rank == 0:
            self.run = RunDir.create(
                run_dir,
                config_to_dict(config),
                app=app,
                algorithm=algorithm,
                exist_ok_for_resume=config.resume,
            )
        self.run_path = run_dir
        self._started_at = time.time()  # a process's error file older than this is an earlier attempt's
        if self.rank == 0:
            for stale in Path(run_dir).glob(PROCESS_ERROR_FILE.format(rank="*")):
                stale.unlink(missing_ok=True)
        # dropout reads torch's global generator: seeded per process, so a run does not depend on what ran
        # before it in the same process (a pipeline's earlier stages); a resume restores the saved state
        torch.manual_seed(derive_seed(config.seed, self.rank))
        if config.resume:
            try:
                with sigterm_as_exit():
                    self._resume()
            except BaseException as err:
                if self.rank == 0:
                    # refused, it changed nothing: a later --resume must not take its settings as the run's
                    self.run.forget_last_resume()
                    # a checkpoint refused for these settings leaves the run as it was (finished, say); a
                    # resume cut off otherwise (Ctrl-C) must not leave it saying "finished" or "running"
                    if not isinstance(err, ResumeRefused):
                        step = self.run.read_status().get("step", 0) if self.run.status_path.is_file() else 0
                        self.run.set_status("failed", step=step, error=f"resume: {type(err).__name__}: {err}")
                raise
        self.writer = self._tensorboard() if config.report_to == "tensorboard" and self.rank == 0 else None

    # -- run directory -------------------------------------------------------------------------------------

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter  # optional dependency, imported only when asked

        # On resume, as _resume truncates metrics.jsonl, TensorBoard drops the earlier files' events from the
        # first step logged again (the resumed step + 1; self.step is 0 without a checkpoint).
        purge_step = self.step + 1 if self.config.resume else None
        return SummaryWriter(log_dir=str(self.run.path / "tensorboard"), purge_step=purge_step)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if self.config.lora:
            return {n: p.detach() for n, p in self.model.named_parameters() if n in names}
        return self.model.state_dict()

    def save_checkpoint(self) -> None:
        self.checkpointed_step = self.step
        if self.fsdp:  # every process takes part in gathering the shards
            model_state, optimizer_state = sharding.full_state(self.model, self.optimizer)
        elif self.engine is not None:  # every process sends its partition of the optimizer state
            model_state, optimizer_state = self._trainable_state(), zero.full_optimizer_state(self.engine)
        else:
            model_state, optimizer_state = self._trainable_state(), self.optimizer.state_dict()
        rng_state = capture_rng_state()
        if self.world > 1:  # each process's own: dropout draws as many numbers as its tensors hold
            states = [None] * self.world if self.rank == 0 else None
            dist.gather_object(rng_state, states, dst=0)
            rng_state = {"processes": states}
        if self.rank != 0:
            return
        self.run.save_checkpoint(
            self.step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            scheduler_state=self.scheduler.state_dict(),
            trainer_state={
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "rubric": self.rubric.state_dict(),
            },
            rng_state=rng_state,
            keep_last=self.config.keep_checkpoints,
            hooks_state=self.hooks.state_dict(),
        )

    def _own_rng_state(self, saved: dict, path) -> dict:
        """This process's generator states from a checkpoint: its own entry when every process's were saved
        (a run of one process saved one state, which every process then takes)."""
        if "processes" not in saved:
            return saved
        states = saved["processes"]
        if len(states) != self.world:
            warnings.warn(
                f"{path} was saved by {len(states)} processes, resumed by {self.world}: the random streams "
                "are not those of an uninterrupted run",
                stacklevel=2,
            )
        return states[self.rank % len(states)]

    def _resume(self) -> None:
        if self.world > 1:  # process 0 alone puts back a checkpoint a cut-off save moved aside (a rename)
            if self.rank == 0:
                RunDir(self.run_path).list_checkpoints()
            dist.barrier()
        path = RunDir(self.run_path).latest_checkpoint()
        if path is None:  # --resume on a run without a checkpoint starts from the beginning
            if self.rank == 0:
                dropped = self.run.truncate_logs_after(0).get(self.run.metrics_path.name, 0)
                if dropped:  # said, not silent: the steps it had logged are trained again
                    warnings.warn(
                        f"--resume: {self.run_path} has no complete checkpoint (it stopped before its first; "
                        f"--save-every N checkpoints every N steps): it starts over from step 0, and its "
                        f"{dropped} logged steps are dropped",
                        stacklevel=2,
                    )
            return
        checkpoint = load_checkpoint(path)
        try:
            self._load_state(checkpoint)
        except _OtherSettings as err:  # the path first: the CLI shows it as a bad input
            raise ResumeRefused(f"{path}: cannot resume from it with these settings: {err}") from err
        except (KeyError, ValueError) as err:  # a damaged checkpoint: the run is marked failed
            raise InputError(f"{path}: cannot resume from it: {type(err).__name__}: {err}") from err
        self.step = self.completed_step = self.checkpointed_step = checkpoint.step
        self.backend.update_weights(self.model)
        if self.rank == 0:
            self.run.truncate_logs_after(self.step)

    def _load_state(self, checkpoint) -> None:
        """Put a checkpoint's weights, optimizer, schedule, data order, rubric, hooks and RNG state back."""
        if zero.PARTITIONS in checkpoint.optimizer_state and self.engine is None:
            raise _OtherSettings(
                "it was written under DeepSpeed ZeRO: resume it under ZeRO, launched on several processes"
            )
        if self.fsdp:
            try:
                sharding.load_full_state(
                    self.model, checkpoint.model_state, self.optimizer, checkpoint.optimizer_state
                )
            except RuntimeError as err:  # another model's or other LoRA settings' weights (not an OOM)
                if isinstance(err, torch.OutOfMemoryError):
                    raise
                raise _OtherSettings(f"its weights do not fit this model: {_first_lines(err)}") from err
        else:
            if self.config.lora:
                own = dict(self.model.named_parameters())
                foreign = sorted(set(checkpoint.model_state) - set(own))
                if foreign:
                    raise _OtherSettings(
                        f"it holds weights this model lacks ({', '.join(foreign[:3])}): it was saved with "
                        "other --lora settings or another model"
                    )
                with torch.no_grad():
                    for name, tensor in checkpoint.model_state.items():
                        own[name].copy_(tensor)
            else:
                try:
                    self.model.load_state_dict(checkpoint.model_state)
                except RuntimeError as err:  # missing, unexpected or resized weights (not an OOM: raised on)
                    if isinstance(err, torch.OutOfMemoryError):
                        raise
                    raise _OtherSettings(f"its weights do not fit this model: {_first_lines(err)}") from err
            if self.engine is not None:
                zero.load_optimizer_state(self.engine, checkpoint.optimizer_state)
            else:
                self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.scheduler.load_state_dict(checkpoint.scheduler_state)
        self._schedule_from_config()
        try:
            self.sampler.load_state_dict(checkpoint.trainer_state["sampler"])
        except ValueError as err:  # other training examples
            raise _OtherSettings(str(err)) from err
        self.rubric.load_state_dict(checkpoint.trainer_state["rubric"])
        self.hooks.load_state_dict(checkpoint.hooks_state)
        restore_rng_state(self._own_rng_state(checkpoint.rng_state, checkpoint.path))

    def _schedule_from_config(self) -> None:
        """A resume goes on with this config's learning rate, weight decay and schedule length (--max-steps,
        --mu, --warmup-steps may change): the loaded optimizer and scheduler states hold the old run's rate,
        which would be kept, and after a longer --max-steps the old schedule's last rate (0 when linear)
        would drive the first update. The scheduler's rate functions are this config's already."""
        cfg, groups = self.config, self.optimizer.param_groups
        for group in groups:
            group["initial_lr"], group["weight_decay"] = cfg.learning_rate, cfg.weight_decay
        self.scheduler.base_lrs = [cfg.learning_rate] * len(groups)
        rates = [cfg.learning_rate * rate(self.scheduler.last_epoch) for rate in self.scheduler.lr_lambdas]
        for group, lr in zip(groups, rates, strict=True):
            group["lr"] = lr
        self.scheduler._last_lr = rates

    def write_eval(self, results: dict) -> None:
        """eval.json of the run, written by process 0 (every process may have evaluated, as FSDP needs)."""
        if self.rank == 0:
            self.run.write_eval(results)

    def save_final(self) -> str:
        """Save the trained model (or adapter) and tokenizer to <run>/final for evaluation and reuse."""
        path = f"{self.run_path}/final"
        state = None
        if self.fsdp:  # gathered by every process
            state = sharding.without_tied_copies(self.model, sharding.full_state(self.model)[0])
        if self.rank == 0:
            with atomic_directory(path) as tmp:
                save_policy(self.model, tmp, state)
                self.tokenizer.save_pretrained(tmp)
        return path

    # -- collecting a batch ----------------------------------------------------------------------------------

    def _check_prompt_lengths(self, examples: list[dict]) -> None:
        check_prompt_lengths(examples, self.tokenizer, self.config.max_new_tokens, self.max_context)

    def generate(self, examples: list[dict], first_index: int, round_: int = 0) -> Rollouts:
        """G completions per example, each group sampled with its own seed (see the module docstring)."""
        _raise_together(lambda: self._check_prompt_lengths(examples))
        cfg, parts = self.config, []
        if (
            cfg.generation_groups > 1
            and self.environment is None
            and hasattr(self.backend, "generate_groups")
        ):
            # Chunks of k groups aligned on the global group index (first_index is a multiple of k), so the
            # same chunks, with the same shapes and seeds, are generated however the batch is split.
            k = cfg.generation_groups
            for start in range(0, len(examples), k):
                chunk = examples[start : start + k]
                seeds = [
                    derive_seed(cfg.seed, self.step, round_, first_index + start + i)
                    for i in range(len(chunk))
                ]
                prompts = [example["prompt"] for example in chunk for _ in range(cfg.group_size)]
                parts.append(self.backend.generate_groups(prompts, cfg.sampling(), seeds, cfg.group_size))
            return Rollouts.concat(parts)
        for offset, example in enumerate(examples):
            seed = derive_seed(cfg.seed, self.step, round_, first_index + offset)
            prompts = [example["prompt"]] * cfg.group_size
            if self.environment is None:
                parts.append(self.backend.generate(prompts, cfg.sampling(), seed))
            else:
                parts.append(
                    multi_turn_rollouts(
                        self.backend,
                        prompts,
                        [example] * cfg.group_size,
                        self.environment,
                        cfg.sampling(),
                        seed,
                        cfg.max_turns,
                    )
                )
        return Rollouts.concat(parts)

    def score(self, rollouts: Rollouts, examples: list[dict]) -> RewardTable:
        """The rubric's table for group-ordered rollouts of `examples`, plus the hooks' model-based terms."""
        repeated = [example for example in examples for _ in range(self.config.group_size)]
        table = _raise_together(lambda: self.rubric.score(rollouts.completions, repeated))
        extra = self.hooks.extra_rewards(self, rollouts, examples)
        return table.with_components(extra) if extra else table

    def advantage_weights(self, table: RewardTable) -> torch.Tensor:
        """The weights (K,) the advantage aggregation takes: weight_k * scale_k, except under
        normalize_then_sum, whose per-component z-score already removes the bootstrapped scale_k (applying
        it again turned a 50:50 mix into 91:9)."""
        weights = table.effective_weights()  # (K,)
        if self.config.multi_reward != "normalize_then_sum":
            return weights
        scales = self.rubric.scales  # the rubric's components; model-based extra ones have no scale
        return weights / torch.tensor([scales.get(name, 1.0) for name in table.names])  # (K,)

    def _advantages(self, components: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        aggregate = algos.MULTI_REWARD.get(self.config.multi_reward)
        return aggregate(
            components,
            weights,
            self.config.group_size,
            scale=self.config.advantage_scale,
            baseline=self.config.advantage_baseline,
            eps=self.config.advantage_eps,
        )

    def collect(self) -> Batch:
        cfg = self.config
        examples = self.sampler.take(cfg.prompts_per_step)
        share = cfg.prompts_per_step // self.world
        mine = examples[self.rank * share : (self.rank + 1) * share]
        rollouts = self.generate(mine, self.rank * share)
        table = self.score(rollouts, mine)
        rollouts, table = self.hooks.transform_rollouts(self, rollouts, mine, table, 0)
        rounds = 1
        if cfg.dynamic_sampling:
            rollouts, table, mine, rounds = self._dynamic_sampling(rollouts, table, mine)
        components = _all_gather_rows(table.components)  # (N, K)
        advantages = self._advantages(components, self.advantage_weights(table))  # (N,)
        n_local = len(mine) * cfg.group_size
        local = advantages[self.rank * n_local : (self.rank + 1) * n_local]  # (N_local,)
        return Batch(mine, rollouts, table, local, components, rounds)

    def _dynamic_sampling(self, rollouts, table, examples):
        """DAPO's dynamic sampling: keep groups with signal (advantages not all 0), draw more prompts until
        the batch is full or `max_sampling_rounds` is reached; a short batch is filled with groups without
        (advantage 0).

        Groups are named (round, index in the round's global draw). Each round every process generates and
        scores its share of the same draw, and all gather every group's has-signal flag, so all count the
        same kept groups, stop after the same round and choose the same groups in the same order: kept ones
        by round and index, then spare ones. Process r takes the chosen groups r * share ... (r + 1) * share
        - 1, receiving those another process generated; the batch is the one a single process would build.
        """
        cfg, size = self.config, self.config.group_size
        share = cfg.prompts_per_step // self.world
        owned = {}  # (round, global index) -> (rollouts, table, example) of each group generated here
        kept, spare = [], []  # (round, global index) of every process's groups
        rounds = 0
        while True:
            for g in range(share):
                rows = range(g * size, (g + 1) * size)
                group = (rollouts.select(rows), table.select(rows), examples[g])
                owned[(rounds, self.rank * share + g)] = group
            # a group has signal when its advantages are not all 0: a spread of its weighted total, or
            # under normalize_then_sum a spread of components that does not cancel out
            advantages = self._advantages(table.components, self.advantage_weights(table)).view(-1, size)
            has_signal = _all_gather_rows((advantages != 0).any(1).long())  # (prompts_per_step,)
            for g, spread_flag in enumerate(has_signal.tolist()):
                (kept if spread_flag else spare).append((rounds, g))
            rounds += 1
            if len(kept) >= cfg.prompts_per_step or rounds == cfg.max_sampling_rounds:
                break
            more = self.sampler.take(cfg.prompts_per_step)
            examples = more[self.rank * share : (self.rank + 1) * share]
            rollouts = self.generate(examples, self.rank * share, round_=rounds)
            table = self.score(rollouts, examples)
            rollouts, table = self.hooks.transform_rollouts(self, rollouts, examples, table, rounds)
        chosen = (kept + spare)[: cfg.prompts_per_step]
        groups = self._receive_groups(owned, chosen, share)
        return (
            Rollouts.concat([g[0] for g in groups]),
            RewardTable.concat([g[1] for g in groups]),
            [g[2] for g in groups],
            rounds,
        )

    def _receive_groups(self, owned: dict, chosen: list[tuple[int, int]], share: int) -> list[tuple]:
        """This process's share of the `chosen` groups, in order: its own ones from `owned`, the others sent
        by the processes that generated them (each sends the chosen groups it owns but does not keep)."""
        mine = chosen[self.rank * share : (self.rank + 1) * share]
        if self.world == 1:
            return [owned[key] for key in mine]
        keeper = {key: i // share for i, key in enumerate(chosen)}  # the rank each chosen group goes to
        outgoing = {key: group for key, group in owned.items() if keeper.get(key, self.rank) != self.rank}
        received: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(received, outgoing)
        pool = {key: group for part in [owned, *received] for key, group in part.items()}
        return [pool[key] for key in mine]

    # -- the update ------------------------------------------------------------------------------------------

    def _logprobs(self, rollouts: Rollouts, with_grad: bool, reference: bool = False):
        ids, mask = rollouts.input_ids(), rollouts.attention_mask()
        t = rollouts.completion_ids.shape[1]
        if reference:
            with self.config.autocast_context():
                return self.reference.logprobs(
                    ids,
                    mask,
                    t,
                    temperature=self.config.temperature,
                    chunk_size=self.config.logprob_chunk_size,
                    vocab_mask=rollouts.vocab_mask,
                )
        with torch.set_grad_enabled(with_grad), self.config.autocast_context():
            return completion_logprobs(
                self.model,
                ids,
                mask,
                t,
                temperature=self.config.temperature,
                chunk_size=self.config.logprob_chunk_size,
                with_entropy=with_grad,
                vocab_mask=rollouts.vocab_mask,
            )

    def _no_grad_pass(self, rollouts: Rollouts, reference: bool) -> torch.Tensor:
        """Log-probs (N, T) of the old (or reference) policy, dropout off as when the rollouts were sampled:
        in the model's leftover mode they would depend on what ran before (and differ after a resume)."""
        parts = []
        for start in range(0, len(rollouts.completions), self.config.micro_batch_size):
            micro = rollouts.select(
                range(start, min(start + self.config.micro_batch_size, len(rollouts.completions)))
            )
            with eval_mode(self.model):
                out = self._logprobs(micro, with_grad=False, reference=reference)
            parts.append(out if reference else out[0])
        width = rollouts.completion_ids.shape[1]
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

    def update(self, batch: Batch) -> dict[str, float]:
        cfg = self.config
        rollouts = batch.rollouts
        n_local = len(rollouts.completions)
        # Old log-probs for the ratio: with one mini-batch every forward of the first epoch runs before its
        # optimizer step, so its log-probs are the old ones, kept for the later epochs (no extra pass); with
        # several mini-batches, or dropout (the first epoch's forwards run with it, the rollouts were
        # sampled without), a no-grad pass first. None while on-policy: the ratio is 1.
        old_pass = cfg.mini_batches > 1 or (cfg.mu > 1 and has_dropout(self.model))
        old_from_first_epoch = cfg.mu > 1 and not old_pass
        old_logp = self._no_grad_pass(rollouts, reference=False) if old_pass else None  # (N_local, T)
        ref_logp = self._no_grad_pass(rollouts, reference=True) if self.reference else None  # (N_local, T)
        token_weights = self.hooks.token_weights(self, rollouts, batch.advantages)  # (N_local, T) | None
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}  # the weights of the means in `sums`
        extremes: dict[str, float] = {}
        grad_norms, rates = [], []
        width = rollouts.completion_ids.shape[1]
        first_epoch_logp = []  # (n, t) per micro-batch, when old_from_first_epoch
        self.model.train()
        for epoch in range(cfg.mu):
            for m in range(cfg.mini_batches):
                # Mini-batch m: rows m, m + M, m + 2M, ... of this process's share. Each share holds a
                # multiple of M rows, so the processes' mini-batches m make up the global batch's rows
                # m, m + M, ...: one process's mini-batch m, however many processes split the batch.
                rows = torch.arange(m, n_local, cfg.mini_batches)  # (n_local / M,)
                loss_mask = rollouts.loss_mask[rows]
                totals = all_reduce_sum(torch.stack([loss_mask.sum(), torch.tensor(float(len(rows)))]))
                for start in range(0, len(rows), cfg.micro_batch_size):
                    idx = rows[start : start + cfg.micro_batch_size]  # (n,)
                    micro = rollouts.select(idx)
                    t = micro.completion_ids.shape[1]
                    logp, entropy = self._logprobs(micro, with_grad=True)  # (n, t) each
                    if old_from_first_epoch and epoch == 0:
                        first_epoch_logp.append(torch.nn.functional.pad(logp.detach(), (0, width - t)))
                    mean_entropy = algos.masked_mean(entropy.detach(), micro.loss_mask, dim=-1)  # (n,)
                    advantages = self.hooks.adjust_advantages(batch.advantages[idx], mean_entropy)
                    loss, metrics = algos.policy_loss(
                        logp,
                        None if old_logp is None else old_logp[idx, :t],
                        advantages,
                        micro.loss_mask,
                        eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high,
                        dual_clip=cfg.dual_clip,
                        ratio_level=cfg.ratio_level,
                        aggregation=cfg.loss_aggregation,
                        max_length=self.completion_budget,
                        total_tokens=totals[0],
                        total_seqs=totals[1],
                        ref_logp=None if ref_logp is None else ref_logp[idx, :t],
                        beta=cfg.beta,
                        kl_estimator=cfg.kl_estimator,
                        token_weights=None if token_weights is None else token_weights[idx, :t],
                    )
                    self._backward(loss, last=start + cfg.micro_batch_size >= len(rows))
                    metrics["entropy"] = algos.masked_mean(entropy.detach(), micro.loss_mask)
                    metrics["loss"] = loss.detach()
                    tokens = float(micro.loss_mask.sum())
                    completions = float((micro.loss_mask.sum(-1) > 0).sum())
                    for key, value in metrics.items():
                        # loss and pg_loss of a micro-batch are its share of the mini-batch's loss: they add up;
                        # extremes (ratio/max, ratio/min) are the extreme over every micro-batch and update;
                        # the other metrics are means over the micro-batch's tokens (clip fractions at the
                        # sequence level: its completions), kept as sums so that they average over all
                        # tokens of the step whatever the micro-batch size or the number of processes
                        if key in extremes:
                            pick = max if key.endswith("/max") else min
                            extremes[key] = pick(extremes[key], float(value))
                        elif key.endswith(("/max", "/min")):
                            extremes[key] = float(value)
                        elif key in ADDITIVE_METRICS:
                            sums[key] = sums.get(key, 0.0) + float(value)
                        else:
                            per_completion = key.startswith("clip/") and cfg.ratio_level == "sequence"
                            weight = completions if per_completion else tokens
                            if weight:  # a mean over no token is nan: it weighs nothing
                                sums[key] = sums.get(key, 0.0) + float(value) * weight
                            counts[key] = counts.get(key, 0.0) + weight
                rates.append(self.scheduler.get_last_lr()[0])  # the rate this update applies
                grad_norms.append(self._optimizer_step())
            if old_from_first_epoch and epoch == 0:
                old_logp = torch.cat(first_epoch_logp)  # (N_local, T)
        self.backend.update_weights(self.model)
        out = self._over_processes(sums, counts, extremes, updates=cfg.mu * cfg.mini_batches)
        for name in ("ratio/max", "ratio/min"):  # still the reduction's identity: no token was trained on
            if name in out and math.isinf(out[name]) and (out[name] < 0) == name.endswith("/max"):
                out[name] = math.nan
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["lr"] = sum(rates) / len(rates)  # the step's updates' mean rate (not the next update's)
        return out

    def _over_processes(
        self, sums: dict[str, float], counts: dict[str, float], extremes: dict[str, float], updates: int
    ) -> dict[str, float]:
        """Update metrics of the global batch from every process's sums: the loss terms (each process's is
        its share of the global loss) add up and are averaged over the updates; the means are weighted sums
        over their weights (tokens or completions); extremes are the extreme over processes."""
        names = sorted(sums.keys() | counts.keys())  # the same on every process: the same metrics
        totals = torch.tensor([[sums.get(n, 0.0), counts.get(n, 0.0)] for n in names], dtype=torch.float64)
        totals = all_reduce_sum(totals.reshape(-1, 2))  # (K, 2)
        out = {}
        for name, (total, weight) in zip(names, totals.tolist(), strict=True):
            if name in ADDITIVE_METRICS:
                out[name] = total / updates
            else:
                out[name] = total / weight if weight else math.nan
        for name in sorted(extremes):
            value = torch.tensor([extremes[name]], dtype=torch.float64)
            if self.world > 1:
                op = dist.ReduceOp.MAX if name.endswith("/max") else dist.ReduceOp.MIN
                value = value.to(_collective_device(value))
                dist.all_reduce(value, op=op)
            out[name] = float(value)
        return out

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of a micro-batch's loss; `last`: the mini-batch's last micro-batch (before its step)."""
        if self.engine is None:
            loss.backward()
            return
        # The trainer calls the model itself, not engine(...), whose hooks would tell ZeRO where the
        # accumulation boundary is: it is set here. DeepSpeed averages gradients over processes; the
        # loss wants their sum.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world, scale_wrt_gas=False)

    def _optimizer_step(self) -> float:
        if self.engine is not None:  # reduces, clips, steps the optimizer and the scheduler, zeroes grads
            self.engine.step()
            return float(self.engine.get_global_grad_norm())
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None or self.world == 1:
                continue
            if self.fsdp:  # FSDP's reduce-scatter averaged the shards' gradients; the loss wants their sum
                p.grad.mul_(self.world)
            else:
                dist.all_reduce(p.grad)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    # -- the loop --------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        batch = self.collect()
        generated = time.perf_counter()
        metrics = self.update(batch)
        metrics.update(self.hooks.after_update(self, batch))
        self.step += 1
        elapsed = time.perf_counter() - start
        tokens = float(all_reduce_sum(batch.rollouts.completion_mask.sum().float()))
        metrics.update(self._reward_metrics(batch))
        metrics.update(
            {
                "step_time": elapsed,
                "generate_time": generated - start,
                "tokens_per_s": tokens / elapsed,
                "completion_length": tokens / len(batch.global_components),
                "sampling_rounds": float(batch.sampling_rounds),
                "processes": float(self.world),
            }
        )
        records = self._rollout_records(batch)  # every process's share, gathered on process 0
        if self.rank == 0:
            self.run.log_metrics(self.step, metrics)
            self.run.log_rollouts(records)
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(key, value, self.step)
        return {"step": self.step, **metrics}

    def _reward_metrics(self, batch: Batch) -> dict[str, float]:
        components = batch.global_components  # (N, K)
        weights = batch.table.effective_weights()  # (K,)
        total = components @ weights  # (N,)
        grouped = total.view(-1, self.config.group_size)  # (B, G)
        local = batch.advantages.abs()  # (N_local,)
        failed = batch.table.failed.sum(dim=0).to(local)  # (K,) this process's failed calls
        sums = all_reduce_sum(
            torch.cat([local.sum()[None], torch.tensor([float(local.numel())]).to(local), failed])
        )
        abs_sum, count, failed = sums[0], sums[1], sums[2:]  # failed: (K,) over every process
        out = {
            "reward": float(total.mean()),
            "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
            "zero_spread_frac": float((grouped.amax(1) == grouped.amin(1)).float().mean()),
            "advantage_abs_mean": float(abs_sum / count),
        }
        for k, name in enumerate(batch.table.names):
            out[f"reward/{name}"] = float(components[:, k].mean())
        for name, failures in zip(batch.table.names, failed.tolist(), strict=True):
            out[f"reward/{name}/failures"] = failures
        return out

    def _rollout_records(self, batch: Batch) -> list[dict]:
        """The step's rollouts.jsonl records in global order (groups numbered over all processes), the
        first `rollouts_to_log` of them; the whole list on process 0, [] on the others."""
        table, rollouts = batch.table, batch.rollouts
        total = table.components @ table.effective_weights()
        first_group = self.rank * len(batch.examples)  # every process holds the same number of groups
        n = len(rollouts.completions) * self.world
        n = n if self.config.rollouts_to_log < 0 else min(n, self.config.rollouts_to_log)
        records = []
        for i in range(min(n - self.rank * len(rollouts.completions), len(rollouts.completions))):
            example = batch.examples[i // self.config.group_size]
            record = {
                "step": self.step,
                "group": first_group + i // self.config.group_size,
                "example_id": example["id"],
                "prompt": rollouts.prompts[i],
                "completion": rollouts.completions[i],
                "rewards": {name: float(table.components[i, k]) for k, name in enumerate(table.names)},
                "reward": float(total[i]),
                "advantage": float(batch.advantages[i]),
                "finish_reason": rollouts.finish_reason[i],
            }
            if rollouts.turns is not None:  # multi-turn: the dashboard shows turns and observations apart
                record["turns"] = rollouts.turns[i]
            extra = self.hooks.rollout_fields(self, example, rollouts, i)
            clash = sorted(extra.keys() & record.keys())
            if clash:
                raise ValueError(f"TrainerHooks.rollout_fields may not replace the trainer's fields {clash}")
            records.append(record | extra)
        if self.world == 1:
            return records
        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object(records, gathered, dst=0)
        return [record for part in gathered for record in part] if self.rank == 0 else []

    @contextmanager
    def until_finished(self) -> Iterator[None]:
        """Around `train()` and what the app does after it (saving final/, evaluating): the run is marked
        finished when the block ends rather than when training does, and failed if it raises (SIGTERM
        included), so a run stopped while it saves or evaluates does not claim to be finished."""
        self._finish_later = True
        try:
            with sigterm_as_exit():
                try:
                    yield
                    # every process finished its part (another one's error reaches this one here: or its
                    # exit, or the launcher's SIGTERM), before process 0 says the run is
                    _raise_together(lambda: None)
                except BaseException as err:
                    error = f"{type(err).__name__}: {err}"
                    if self.rank == 0:
                        error = self._with_other_processes_errors(error)
                        self.run.set_status("failed", step=self.completed_step, error=error)
                    elif self.world > 1 and not isinstance(err, OtherProcessFailed):
                        # process 0, which records the run, may only see the lost connection
                        path = Path(self.run_path) / PROCESS_ERROR_FILE.format(rank=self.rank)
                        try:
                            write_atomic(path, error.encode("utf-8"))
                        except OSError:  # a run directory not on this machine: its own error stands
                            pass
                    raise
            if self.rank == 0:
                self.run.set_status("finished", step=self.step)
        finally:
            self._finish_later = False

    def _with_other_processes_errors(self, error: str) -> str:
        """Process 0's `error`, after the errors the other processes wrote in this attempt that it does not
        name already (one failing outside a collective leaves process 0 with a lost connection only)."""
        others = []  # (when written, what): the first to fail first
        for rank in range(1, self.world):
            path = Path(self.run_path) / PROCESS_ERROR_FILE.format(rank=rank)
            try:
                written = path.stat().st_mtime
                if written >= self._started_at and f"process {rank} failed" not in error:
                    others.append((written, f"process {rank} failed: {path.read_text(encoding='utf-8')}"))
            except OSError:  # none: that process did not fail, or its disk is not this one's
                continue
        return "; ".join([text for _, text in sorted(others)] + [f"process 0: {error}"]) if others else error

    def train(self) -> list[dict[str, float]]:
        """Run to `max_steps` (from the resumed step), checkpointing; returns the metrics of each step.
        Killed by SIGTERM (torchrun stops the others when one process fails) the run is still marked failed."""
        with sigterm_as_exit():
            return self._train()

    def _train(self) -> list[dict[str, float]]:
        cfg = self.config
        history = []
        if self.rank == 0:
            self.run.set_status("running", step=self.step)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True)
        try:
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                self.completed_step = self.step
                history.append(metrics)
                bar.update(1)
                if self.rank == 0:  # tqdm's write prints even where the bar is disabled
                    bar.write(
                        f"step {self.step:>4}  reward {metrics['reward']:.3f}"
                        f"  zero-spread {metrics['zero_spread_frac']:.2f}"
                        f"  loss {metrics['loss']:+.4f}  entropy {metrics['entropy']:.3f}  {metrics['step_time']:.2f}s"
                        f"  {metrics['tokens_per_s']:.0f} tok/s"
                    )
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
                    if self.rank == 0:  # the step a kill would resume from
                        self.run.set_status("running", step=self.step)
            if self.checkpointed_step != self.step:  # a resumed run that was already done has it
                self.save_checkpoint()
        except BaseException as err:
            if self.rank == 0:
                error = f"{type(err).__name__}: {err}"
                self.run.set_status("failed", step=self.completed_step, error=error)
            raise
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
        if self.rank == 0 and not self._finish_later:
            self.run.set_status("finished", step=self.step)
        return history
