"""`grpo-suite sudoku sft` and `grpo-suite sudoku train`: supervised fine-tuning on ordered completions,
then GRPO with the bootstrapped cell:order mixture (PAPERS.md section 6).

grpo-suite sudoku sft --order random            # a tiny model from a config, SFT on random-order completions
grpo-suite sudoku train --model runs/sudoku/<sft-run>/final --cell-weight 0.75
grpo-suite sudoku train                          # no --model: builds and SFTs its own base model first

The reward is R = w * s_cell * R_cell + (1 - w) * s_order * R_order with s_k = 1 / mean |R_k| frozen from
rollouts of the starting model before the first step (bootstrapped scaling, core.rewards.Rubric.fit_scales).
"""

import math
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar, Literal

from apps.sudoku.data import PuzzleConfig, load_puzzles
from apps.sudoku.evaluate import ThreadsField, evaluate_model, table
from apps.sudoku.model import (
    ConstrainedBackend,
    check_tokenizer,
    create_model_dir,
    load_sudoku_policy,
    sft,
)
from apps.sudoku.puzzles import Puzzle
from apps.sudoku.rewards import board_fields, cell_reward, order_reward
from apps.sudoku.serialize import to_example
from core.atomic import atomic_directory
from core.config import config_to_dict
from core.data import InputError
from core.launch import policy_for, summary_table, with_run_dir
from core.policy import load_policy
from core.rewards import Rubric
from core.rollout import derive_seed
from core.runs import RunDir, default_run_dir, failure_recorded
from core.trainer import GRPOConfig, GRPOTrainer, TrainerHooks

APP = "sudoku"


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class ModelFields(ThreadsField):
    """The tiny default model and its supervised fine-tuning."""

    hidden_size: int = _help("hidden size of a newly built model", 64)
    num_layers: int = _help("layers of a newly built model", 3)
    num_heads: int = _help("attention heads of a newly built model", 4)
    sft_steps: int = _help("SFT optimizer steps", 400)
    sft_batch_size: int = _help("SFT puzzles per step", 64)
    sft_learning_rate: float = _help("SFT peak learning rate (warm-up then cosine decay)", 3e-3)
    sft_mask: bool = _help(
        "SFT loss under the decoding's structural mask (off: plain cross-entropy, which learned far slower)",
        True,
    )
    eval_puzzles: int = _help("held-out puzzles evaluated at the end (0 = none)", 256)

    def __post_init__(self):
        ThreadsField.__post_init__(self)
        for name in ("hidden_size", "num_layers", "num_heads", "sft_steps", "sft_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.sft_learning_rate < math.inf:  # else found in AdamW, after the run directory is made
            raise ValueError(f"sft_learning_rate must be > 0 and finite, got {self.sft_learning_rate}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size // self.num_heads % 2:  # rotary position embeddings rotate pairs of dimensions
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_heads {self.num_heads} gives an odd head size "
                f"{self.hidden_size // self.num_heads}; rotary positions need an even one"
            )
        if self.eval_puzzles < 0:
            raise ValueError(f"eval_puzzles must be >= 0 (0 = none), got {self.eval_puzzles}")


@dataclass
class SudokuSFTConfig(ModelFields, PuzzleConfig):
    """SFT of a tiny model (or --model) on completions in one order."""

    OFFLINE_MODEL_FIELDS: ClassVar = ("hidden_size", "num_layers", "num_heads")

    model: str | None = _help("HF model directory to start from; default: a new tiny model", None)
    order: Literal["random", "solver", "row-major"] = _help("order of the completion's triplets", "random")
    run_dir: str | None = _help("run directory; default runs/sudoku/<timestamp>", None)
    seed: int = _help("seed of initialisation, batch order and random orders", 0)
    device: str = _help("cpu or cuda", "cpu")

    def __post_init__(self):
        ModelFields.__post_init__(self)
        PuzzleConfig.__post_init__(self)


@dataclass
class SudokuTrainConfig(ModelFields, PuzzleConfig, GRPOConfig):
    """The core's GRPO fields with Sudoku's rewards and defaults."""

    OFFLINE_MODEL_FIELDS: ClassVar = (
        "hidden_size",
        "num_layers",
        "num_heads",
        "sft_steps",
        "sft_batch_size",
        "sft_learning_rate",
        "sft_mask",
    )

    cell_weight: float = _help("w of the mixture w * cell + (1 - w) * order (paper: 1, .75, .5, .25)", 0.75)
    bootstrap_scaling: bool = _help(
        "scale each reward by 1 / its mean on the starting model's rollouts", True
    )
    bootstrap_prompts: int = _help("puzzles (x group_size samples) for the bootstrapped scales", 32)
    max_steps: int = _help("GRPO steps", 60)
    prompts_per_step: int = _help("puzzles per step", 16)
    group_size: int = _help("completions per puzzle (G)", 8)
    max_new_tokens: int = _help("completion cap; decoding emits exactly 3E + 1 tokens (E empty cells)", 244)
    learning_rate: float = _help("AdamW learning rate", 2e-4)
    micro_batch_size: int = _help("completions per forward/backward", 128)
    save_every: int = _help("checkpoint every N steps (and always at the end); 0 = only at the end", 10)

    def __post_init__(self):
        # first: the core's own check of these ("set generation_groups > 1 too") would send the user astray
        unsupported = {
            "generation_groups": 1,
            "compile_decode": False,
            "autocast": "off",
            "top_p": 1.0,
            "top_k": 0,
            "min_new_tokens": 0,
        }
        changed = [f"{k}={getattr(self, k)}" for k, v in unsupported.items() if getattr(self, k) != v]
        if changed:  # else found at the first GRPO step, after the SFT stages
            raise ValueError(
                f"{', '.join(changed)}: Sudoku's constrained decoder has no grouped generation, compiled "
                "decode, autocast, top-p, top-k or minimum length (it emits exactly 3E + 1 tokens); leave "
                "them at their defaults"
            )
        GRPOConfig.__post_init__(self)
        ModelFields.__post_init__(self)
        PuzzleConfig.__post_init__(self)
        if not 0 <= self.cell_weight <= 1:
            raise ValueError(f"cell_weight must be in [0, 1], got {self.cell_weight}")
        if self.bootstrap_scaling and self.bootstrap_prompts < 1:  # else found after the SFT stages
            raise ValueError(
                f"bootstrap_prompts must be >= 1 with bootstrap_scaling, got {self.bootstrap_prompts}"
            )


def refuse_short_completions(puzzles: list[Puzzle], max_new_tokens: int) -> None:
    """Decoding emits exactly 3E + 1 tokens (E empty cells): a cap below that for some training puzzle would
    stop GRPO at its first step, after the SFT stages, so it is refused before anything runs."""
    empty = max(p.n * p.n - p.givens for p in puzzles)
    if 3 * empty + 1 > max_new_tokens:
        raise InputError(
            f"--max-new-tokens {max_new_tokens} is below 3E + 1 = {3 * empty + 1} tokens for the puzzles with "
            f"the most empty cells (E = {empty}); raise it"
        )


def run_sft(config: SudokuSFTConfig, puzzles=None, *, resume: bool = False) -> dict:
    """SFT into <run_dir>/final; returns the held-out evaluation (empty with eval_puzzles = 0).

    `resume`: reopen an unfinished SFT run and start it over, as SFT keeps no checkpoints.
    """
    config.set_threads()
    run_path = Path(config.run_dir or default_run_dir(APP))
    print(f"run directory: {run_path}")
    train, held_out = puzzles or load_puzzles(config)  # a bad puzzle file stops here, before a run exists
    if config.model:  # and so does a bad --model
        model, tokenizer = load_sudoku_policy(config.model, device=config.device)
    run = RunDir.create(
        run_path, config_to_dict(config), app=APP, algorithm=f"sft-{config.order}", exist_ok_for_resume=resume
    )
    if resume:
        run.truncate_logs_after(0)
        shutil.rmtree(run_path / "base_model", ignore_errors=True)  # rebuilt from its seed, bit for bit
    if not config.model:
        start = create_model_dir(
            run_path / "base_model",
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            seed=config.seed,
        )
        model, tokenizer = load_policy(start, device=config.device)
    run.set_status("running", step=0)
    reached = [0]  # the last step logged, which a failure records

    def log(step: int, metrics: dict) -> None:
        run.log_metrics(step, {k: v for k, v in metrics.items() if k != "step"})
        reached[0] = step
        if step % max(1, config.sft_steps // 10) == 0 or step == config.sft_steps:
            print(
                f"sft {config.order} step {step:>5}  loss {metrics['loss']:.4f}  {metrics['step_time']:.2f}s"
            )

    with failure_recorded(run, step=lambda: reached[0]):
        sft(
            model,
            tokenizer,
            train,
            order=config.order,
            steps=config.sft_steps,
            batch_size=config.sft_batch_size,
            lr=config.sft_learning_rate,
            seed=config.seed,
            structure_mask=config.sft_mask,
            log=log,
        )
        with atomic_directory(run_path / "final") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        result = {}
        if config.eval_puzzles:  # inside: a run is finished once evaluated
            examples = [to_example(p, i, "eval") for i, p in enumerate(held_out[: config.eval_puzzles])]
            result = evaluate_model(model, tokenizer, examples)
            run.write_eval({"model": str(run_path / "final"), **result})
            print(table({f"sft-{config.order}": result}))
    run.set_status("finished", step=config.sft_steps)
    print(f"model saved to {run_path / 'final'}")
    return result


class SudokuHooks(TrainerHooks):
    """Each rollouts.jsonl row carries its board (puzzle, solution, emitted cells, solver order) for the
    dashboard's Sudoku page."""

    def rollout_fields(self, trainer, example: dict, rollouts, index: int) -> dict:
        return board_fields(rollouts.completions[index], example)


def build_rubric(config: SudokuTrainConfig) -> Rubric:
    return Rubric(
        {"cell": cell_reward, "order": order_reward},
        weights={"cell": config.cell_weight, "order": 1.0 - config.cell_weight},
        on_error=config.on_reward_error,
    )


def fit_bootstrap_scales(
    trainer: GRPOTrainer, rubric: Rubric, examples: list[dict], config: SudokuTrainConfig
):
    """Freeze s_k = 1 / mean |R_k| over group_size samples of `bootstrap_prompts` training puzzles drawn
    from the starting model (a seed of their own: the trainer's sampling is untouched)."""
    picks = examples[: config.bootstrap_prompts]
    prompts = [ex["prompt"] for ex in picks for _ in range(config.group_size)]
    rollouts = trainer.backend.generate(prompts, config.sampling(), derive_seed(config.seed, -1))
    repeated = [ex for ex in picks for _ in range(config.group_size)]
    return rubric.fit_scales(rubric.score(rollouts.completions, repeated))


def run_train(config: SudokuTrainConfig, puzzles=None) -> dict:
    """GRPO into <run_dir>/final; returns the held-out evaluation (empty with eval_puzzles = 0)."""
    config.set_threads()
    config = with_run_dir(config, APP)
    train, held_out = puzzles or load_puzzles(config)
    refuse_short_completions(train, config.max_new_tokens)  # GRPO's rollouts; evaluation has its own cap

    def build_default(path: Path) -> None:  # no --model: SFT on random order first, as the paper does
        sft_config = sft_config_from(
            config,
            model=None,
            run_dir=str(Path(config.run_dir) / "sft-random"),
            order="random",
            eval_puzzles=0,
        )
        run_sft(sft_config, (train, held_out), resume=True)  # starts over an SFT a crash cut short
        (Path(config.run_dir) / "sft-random" / "final").rename(path)

    model, tokenizer = policy_for(config, build_default)
    # a --model not built for Sudoku stops here, before the trainer makes the run directory
    check_tokenizer(tokenizer, config.model or Path(config.run_dir) / "base_model")
    examples = [to_example(p, i, "train") for i, p in enumerate(train)]
    rubric = build_rubric(config)
    backend = ConstrainedBackend(model, tokenizer)
    trainer = GRPOTrainer(
        config,
        model,
        tokenizer,
        examples,
        rubric,
        app=APP,
        algorithm="grpo",
        backend=backend,
        hooks=SudokuHooks(),
    )
    with trainer.until_finished():  # finished once saved and evaluated; failed if the scales' fit dies
        if config.bootstrap_scaling and not rubric.fitted:
            scales = fit_bootstrap_scales(trainer, rubric, examples, config)
            print("bootstrapped scales: " + ", ".join(f"{k} {v:.3f}" for k, v in scales.items()))
        history = trainer.train()
        final = trainer.save_final()
        print(summary_table(history))
        result = {}
        if config.eval_puzzles:
            examples = [to_example(p, i, "eval") for i, p in enumerate(held_out[: config.eval_puzzles])]
            result = evaluate_model(model, tokenizer, examples)
            trainer.write_eval({"model": final, "scales": rubric.scales, **result})
            print(table({f"grpo w={config.cell_weight}": result}))
    print(f"model saved to {final}")
    return result


def sft_config_from(config, **changes) -> SudokuSFTConfig:
    """An SFT config taking every field it shares with `config` (a train or pipeline config)."""
    shared = {f.name: getattr(config, f.name) for f in fields(SudokuSFTConfig) if hasattr(config, f.name)}
    return replace(SudokuSFTConfig(**shared), **changes)
