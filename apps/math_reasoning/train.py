"""`grpo-suite math train --algo grpo|gtpo|scaf|codistill`: one train command, four algorithms.

    grpo-suite math train --algo grpo --preset smoke        # seconds: tiny models, 2 steps
    grpo-suite math train --algo codistill                  # offline: builds + SFTs both tiny models first
    grpo-suite math train --algo grpo --model ~/Qwen2.5-Math-1.5B --data math_train.jsonl \
        --eval-data math500.jsonl --preset paper
    grpo-suite math train --algo scaf --model ~/Qwen2.5-Math-1.5B --data hinted.jsonl --preset paper
        # Scaf's data needs tiered `hints` per problem, as `grpo-suite math data` writes them

Without --model the policy is the app's tiny base model (models.py), built and fine-tuned into
<run>/base_model (and <run>/base_model_large for CoDistill's L, or for `--size large`). The offline
defaults are sized for CPU minutes, not the paper: the `paper` preset holds the paper's values (PAPERS.md
sec. 1-3: 32 prompts x 8, lr 1e-6, R1-Zero template, no KL). Algorithms:
- grpo: the core loop as configured (group-std advantages, beta 0);
- gtpo: conflict-token weights + entropy filter (gtpo.py); `advantage_scale auto` becomes "none";
- scaf: hinted successes for all-failed groups after the exemption steps (scaf.py);
- codistill: S = the policy, L trained alongside on S's rollouts (codistill.py).
"""

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from apps.math_reasoning.codistill import CoDistillHooks
from apps.math_reasoning.data import (
    FORMATS,
    HINT_TIERS,
    MIXES,
    check_data_format,
    load_examples,
    mix_levels,
    offline_sets,
)
from apps.math_reasoning.evaluate import (
    benchmark_name,
    check_eval_prompts,
    evaluate_model,
    format_results,
    load_eval_examples,
    pass_at_k_entry,
)
from apps.math_reasoning.gtpo import GTPOHooks
from apps.math_reasoning.models import TINY_CONTEXT, TinySpec, build_base_model, tiny_tokenizer
from apps.math_reasoning.rewards import rubric_for
from apps.math_reasoning.scaf import ScafHooks, exemption_steps
from apps.math_reasoning.templates import TEMPLATES, get_template
from core.atomic import atomic_directory
from core.data import InputError, check_prompt_lengths
from core.launch import build_in_run, build_settings, policy_for, summary_table, with_run_dir
from core.policy import TOKENIZER_FILES, load_policy, load_tokenizer
from core.runs import is_run_dir, models_in_run
from core.trainer import GRPOConfig, GRPOTrainer, TrainerHooks

APP = "math"
ALGORITHMS = ("grpo", "gtpo", "scaf", "codistill")


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class MathTrainConfig(GRPOConfig):
    """The core's GRPO fields (defaults sized for the offline tiny models) plus the algorithm's own."""

    OFFLINE_MODEL_FIELDS: ClassVar = tuple(
        f"{size}_{name}" for size in ("small", "large") for name in ("hidden_size", "num_layers", "sft_steps")
    ) + ("sft_lr", "large_sft_lr", "sft_hint_fraction")

    algo: Literal["grpo", "gtpo", "scaf", "codistill"] = _help("training algorithm", "grpo")
    template: str = _help(f"prompt template: one of {', '.join(TEMPLATES)}", "r1_short")
    data_format: str = _help(f"format of --data: one of {', '.join(FORMATS)}", "auto")
    data_seed: int = _help("seed of the generated offline sets (train, held-out test, SFT)", 1234)
    data_mix: str = _help(
        f"difficulty mix of the generated offline sets: one of {', '.join(MIXES)}", "default"
    )
    # -- departures from the core defaults for the tiny offline models ([choice]; `--preset paper` undoes them)
    max_steps: int = _help("training steps", 40)
    prompts_per_step: int = _help("prompts per step", 16)
    group_size: int = _help("completions per prompt (G)", 8)
    max_new_tokens: int = _help("completion length cap (a level-3 solution is about 65 tokens)", 80)
    learning_rate: float = _help(
        "AdamW learning rate of the policy (tiny models need far more than 1e-6)", 2e-4
    )
    advantage_scale: Literal["auto", "group", "batch", "none"] = _help(
        "divide by group std, batch std, or not; auto = the algorithm's own (none for gtpo, else group)",
        "auto",
    )
    # -- the offline tiny models
    size: Literal["small", "large"] = _help("which tiny base model is the policy (grpo/gtpo/scaf)", "small")
    large_model: str | None = _help(
        "CoDistill's large model (HF dir, same tokenizer as --model); codistill only", None
    )
    small_hidden_size: int = _help("tiny small model: hidden size (multiple of 32)", 128)
    small_num_layers: int = _help("tiny small model: layers", 4)
    small_sft_steps: int = _help("tiny small model: SFT steps (batch 16), short of mastery on purpose", 300)
    large_hidden_size: int = _help("tiny large model: hidden size (multiple of 32)", 256)
    large_num_layers: int = _help("tiny large model: layers", 12)
    large_sft_steps: int = _help("tiny large model: SFT steps (batch 16)", 300)
    sft_lr: float = _help("SFT learning rate of the tiny models", 2e-3)
    large_sft_lr: float | None = _help(
        "SFT learning rate of the tiny large model; none = --sft-lr (a wider model may need a lower one)",
        None,
    )
    sft_hint_fraction: float = _help("share of SFT prompts shown with a partial hint (see models.py)", 0.3)
    # -- Scaf-GRPO
    scaf_exemption_fraction: float = _help(
        "Scaf: share of the first steps without hints (paper: about 0.15)", 0.15
    )
    scaf_tiers: tuple[str, ...] = _help(
        "Scaf: hint tiers in order of help (comma-separated)", ("knowledge", "planning", "solution")
    )
    scaf_progressive: bool = _help("Scaf: reveal each tier chunk by chunk (off: whole tier at once)", True)
    # -- GTPO
    gtpo_conflict_positive: float = _help("GTPO: weight of conflict tokens in positive completions", 2.0)
    gtpo_conflict_negative: float = _help("GTPO: weight of conflict tokens in negative completions", 0.0)
    gtpo_gamma: float = _help("GTPO: entropy penalty on advantages", 0.1)
    gtpo_max_entropy: float = _help(
        "GTPO: mean entropy above which a completion is dropped (ln 2)", math.log(2)
    )
    gtpo_skip_zero_advantage: bool = _help(
        "GTPO: no entropy penalty where A = 0 (zero-spread groups, or a reward at its group's mean); "
        "off = the paper (departure, opt-in)",
        False,
    )
    # -- CoDistill-GRPO
    codistill_alpha: float = _help("CoDistill: weight of the KD reward", 0.1)
    codistill_is_cap: float = _help("CoDistill: cap of the importance weights pi_L / pi_S", 3.0)
    codistill_large_lr: float = _help("CoDistill: learning rate of the large model", 1e-4)
    codistill_train_large: bool = _help("CoDistill: update L (off: a frozen teacher, a control)", True)
    # -- evaluation after training
    eval_samples: int = _help("completions per held-out problem after training; 0 = no evaluation", 4)
    eval_examples: int = _help("held-out problems evaluated after training (evenly spaced); 0 = all", 0)
    eval_data: str | None = _help(
        "benchmark file for the final evaluation; default: the offline held-out set (not part of --data)",
        None,
    )
    eval_data_format: str = _help(f"format of --eval-data: one of {', '.join(FORMATS)}", "auto")

    def __post_init__(self):
        if self.advantage_scale == "auto":  # before the core's checks, which read the scale
            self.advantage_scale = "none" if self.algo == "gtpo" else "group"
        super().__post_init__()
        get_template(self.template)
        mix_levels(self.data_mix)
        for name in ("data_format", "eval_data_format"):  # before a model is built or loaded
            check_data_format(getattr(self, name), name)
        unknown = [t for t in self.scaf_tiers if t not in HINT_TIERS]
        if unknown or not self.scaf_tiers:
            raise ValueError(
                f"scaf_tiers must be a non-empty subset of {', '.join(HINT_TIERS)}, got {unknown}"
            )
        for name in ("data", "eval_data"):  # before the base model is built (and trained)
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name}: {getattr(self, name)} is not a file")
        for size in ("small", "large"):  # the tiny base models' shapes, before either is built
            hidden = getattr(self, f"{size}_hidden_size")
            if hidden < 32 or hidden % 32:
                raise ValueError(
                    f"{size}_hidden_size must be a positive multiple of 32 (head size 32), got {hidden}"
                )
            if getattr(self, f"{size}_num_layers") < 1:
                raise ValueError(f"{size}_num_layers must be >= 1, got {getattr(self, f'{size}_num_layers')}")
            if getattr(self, f"{size}_sft_steps") < 0:
                raise ValueError(f"{size}_sft_steps must be >= 0, got {getattr(self, f'{size}_sft_steps')}")
        for name in ("sft_lr", "large_sft_lr"):
            lr = getattr(self, name)
            if lr is not None and not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"{name} must be > 0 and finite, got {lr}")
        if self.model is None and self.max_new_tokens >= TINY_CONTEXT:  # before it is built (minutes)
            raise ValueError(
                f"max_new_tokens must be below the tiny default model's context of {TINY_CONTEXT} tokens, "
                f"got {self.max_new_tokens}: give a --model with a longer context, or fewer tokens"
            )
        if self.algo == "gtpo" and self.beta != 0:
            raise ValueError(
                f"beta: gtpo has no reference model and no KL term (PAPERS.md sec. 3), got {self.beta}"
            )
        if self.algo == "codistill":
            if self.dynamic_sampling:
                raise ValueError("codistill cannot use dynamic_sampling (its KD term is tied to one batch)")
            if self.model and not self.large_model:
                raise ValueError(
                    "codistill with --model needs --large-model (sharing the small one's tokenizer)"
                )
        # one field a message: build_config names the file or preset it came from
        if not 0 <= self.scaf_exemption_fraction < 1:
            raise ValueError(f"scaf_exemption_fraction must be in [0, 1), got {self.scaf_exemption_fraction}")
        if not 0 <= self.sft_hint_fraction <= 1:
            raise ValueError(f"sft_hint_fraction must be in [0, 1], got {self.sft_hint_fraction}")
        for name in ("eval_samples", "eval_examples", "codistill_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("codistill_is_cap", "codistill_large_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @staticmethod
    def check_given(values: dict, given: set[str]) -> None:
        """core.config.build_config's check: a field of another algorithm given as a flag or in a file (not a
        preset's: smoke sets Scaf's exemption fraction for every --algo) would be ignored without a word."""
        algo = values.get("algo", MathTrainConfig.algo)
        ignored = sorted(name for name in given if algo not in applies_to(name))
        if ignored:
            raise ValueError(
                "; ".join(f"{n}: used by --algo {'/'.join(applies_to(n))} only, not {algo}" for n in ignored)
            )

    def tiny_spec(self, size: str) -> TinySpec:
        if size == "small":
            return TinySpec(self.small_hidden_size, self.small_num_layers, self.small_sft_steps, self.sft_lr)
        lr = self.sft_lr if self.large_sft_lr is None else self.large_sft_lr
        return TinySpec(self.large_hidden_size, self.large_num_layers, self.large_sft_steps, lr)


def applies_to(name: str) -> tuple[str, ...]:
    """The algorithms that read a field: each gtpo_*, scaf_* and codistill_* field its own, large_model
    codistill, size every one but codistill (its policy is the small model), beta every one but gtpo (no
    reference model), any other field all.

    >>> applies_to("scaf_tiers"), applies_to("size"), applies_to("max_steps") == ALGORITHMS
    (('scaf',), ('grpo', 'gtpo', 'scaf'), True)
    """
    if name == "large_model":
        return ("codistill",)
    if name == "beta":
        return ("grpo", "scaf", "codistill")
    if name == "size":
        return ("grpo", "gtpo", "scaf")
    prefix = name.split("_", 1)[0]
    return (prefix,) if prefix in ALGORITHMS else ALGORITHMS


PRESETS = {
    "smoke": {
        "max_steps": 2,
        "prompts_per_step": 2,
        "group_size": 4,
        "max_new_tokens": 24,
        "small_hidden_size": 32,
        "small_num_layers": 1,
        "small_sft_steps": 2,
        "large_hidden_size": 64,
        "large_num_layers": 1,
        "large_sft_steps": 2,
        "scaf_exemption_fraction": 0.0,
        "eval_samples": 2,
        "eval_examples": 4,
    },
    # docs/math_reasoning.md, "Micro reproduction": the micro difficulty mix, where the SFT'd tiny base has a
    # learning signal (pass@1 well above 0 on levels 1-2, ~0 on the hard tail), at minutes per run on one
    # CPU thread. [choice] every value here is a sizing decision, not a paper value.
    "micro": {
        "data_mix": "micro",
        "small_hidden_size": 64,
        "small_num_layers": 2,
        "small_sft_steps": 800,
        "large_hidden_size": 128,
        "large_num_layers": 4,
        "large_sft_steps": 800,
        "sft_lr": 3e-3,
        # the 128x4 model at 3e-3 ends weaker than the 64x2 one (pass@1 0.16 vs 0.42); at 1e-3 it reaches
        # 0.55, the stronger model CoDistill needs (docs/math_reasoning.md, "With a stronger L")
        "large_sft_lr": 1e-3,
        "max_steps": 30,
        "prompts_per_step": 8,
        "group_size": 8,
        "max_new_tokens": 48,
        "learning_rate": 1e-4,
        # at 1e-4 the off-policy update on S's rollouts pulls L 22 points below its own GRPO; at 3e-5 it
        # stays within a few points of it (docs/math_reasoning.md, "L's learning rate")
        "codistill_large_lr": 3e-5,
        "eval_samples": 4,
        "eval_examples": 0,
    },
    "paper": {
        "template": "r1_zero",
        "prompts_per_step": 32,
        "group_size": 8,
        "learning_rate": 1e-6,
        "codistill_large_lr": 1e-6,
        "max_new_tokens": 1024,
        "beta": 0.0,
    },
}


def build_base(config: MathTrainConfig, size: str, path: Path) -> Path:
    template = get_template(config.template)
    sets = offline_sets(config.data_seed, mix=config.data_mix)
    return build_base_model(
        path, config.tiny_spec(size), sets, template, config.sft_hint_fraction, config.seed
    )


def training_examples(config: MathTrainConfig) -> list[dict]:
    examples = (
        load_examples(config.data, config.data_format)
        if config.data
        else offline_sets(config.data_seed, mix=config.data_mix).train
    )
    template = get_template(config.template)
    return [example | {"prompt": template.render(example["question"])} for example in examples]


def require_hints(examples: list[dict], source: str | None) -> None:
    """Scaf builds hinted prompts from each problem's `hints`; a data file without them cannot run it."""
    missing = [e["id"] for e in examples if "hints" not in e][:3]
    if missing:
        raise InputError(
            f"{source}: scaf needs hints per problem (the offline set has them); none for {missing}"
        )


def make_hooks(config: MathTrainConfig, tokenizer) -> TrainerHooks:
    template = get_template(config.template)
    if config.algo == "gtpo":
        return GTPOHooks(
            config.gtpo_conflict_positive,
            config.gtpo_conflict_negative,
            config.gtpo_gamma,
            config.gtpo_max_entropy,
            config.gtpo_skip_zero_advantage,
        )
    if config.algo == "scaf":
        steps = exemption_steps(config.scaf_exemption_fraction, config.max_steps)
        return ScafHooks(template, tuple(config.scaf_tiers), config.scaf_progressive, steps)
    if config.algo == "codistill":
        large, large_tokenizer = large_policy(config)
        refuse_another_tokenizer(config, tokenizer, large_tokenizer)
        return CoDistillHooks(
            large,
            alpha=config.codistill_alpha,
            is_cap=config.codistill_is_cap,
            learning_rate=config.codistill_large_lr,
            weight_decay=config.weight_decay,
            train_large=config.codistill_train_large,
        )
    return TrainerHooks()


def check_large_model(config: MathTrainConfig, tiny_tokenizer) -> None:
    """--large-model, before any model is built or loaded: a model (or LoRA adapter) directory, not a run's,
    with the small model's vocabulary where both directories hold a tokenizer (an adapter without one
    takes its base's: compared once loaded). `tiny_tokenizer`: the offline small model's, without --model."""
    large = Path(config.large_model)
    if is_run_dir(large):
        raise FileNotFoundError(
            f"--large-model {large} is a run directory, not a model: {models_in_run(large)}"
        )
    if not any((large / name).is_file() for name in ("config.json", "adapter_config.json")):
        what = "does not exist" if not large.exists() else "has no config.json"
        raise FileNotFoundError(f"--large-model {large} {what}; expected a local HF model directory")
    small = tiny_tokenizer
    if small is None and any((Path(config.model) / name).is_file() for name in TOKENIZER_FILES):
        small = load_tokenizer(config.model)
    if small is not None and any((large / name).is_file() for name in TOKENIZER_FILES):
        refuse_another_tokenizer(config, small, load_tokenizer(large))


def refuse_another_tokenizer(config: MathTrainConfig, small, large) -> None:
    """CoDistill compares the two models token by token: their tokenizers must have one vocabulary."""
    if large.get_vocab() != small.get_vocab():
        large_dir = config.large_model or Path(config.run_dir) / "base_model_large"
        raise InputError(
            f"{large_dir}: codistill's large model must share the small model's tokenizer "
            f"({config.model or 'the offline tiny model'}'s); their vocabularies differ"
        )


def large_policy(config: MathTrainConfig):
    path = Path(config.large_model) if config.large_model else Path(config.run_dir) / "base_model_large"
    if config.large_model is None:
        build_in_run(
            path,
            lambda out: build_base(config, "large", out),
            resume=config.resume,
            device=config.device,
            settings=build_settings(config),
        )
    return load_policy(path, device=config.device)


def train(config: MathTrainConfig) -> dict:
    """Train, save <run>/final (and <run>/final_large for CoDistill), evaluate; returns history and eval."""
    # the data files first: a bad one stops the command before the base model is built into the run
    examples = training_examples(config)
    if config.algo == "scaf":
        require_hints(examples, config.data)
    eval_examples = (
        load_eval_examples(
            config.eval_data, config.eval_data_format, config.data_seed, config.eval_examples, config.data_mix
        )
        if config.eval_samples
        else []
    )
    if config.data and config.eval_samples and not config.eval_data:
        warnings.warn(
            f"--data {config.data} without --eval-data: the final evaluation is on the offline held-out "
            "arithmetic set, not on problems like yours; give --eval-data FILE (or --eval-samples 0)",
            stacklevel=2,
        )
    if config.model is None:  # the tiny model's SFT takes minutes: a prompt too long is refused before it
        tokenizer = tiny_tokenizer(offline_sets(config.data_seed, mix=config.data_mix))
        check_prompt_lengths(examples, tokenizer, config.max_new_tokens, TINY_CONTEXT)
    if config.algo == "codistill" and config.large_model:  # before the small base model's SFT too
        check_large_model(config, tokenizer if config.model is None else None)
    config = with_run_dir(config, APP, config.algo)
    size = "small" if config.algo == "codistill" else config.size
    model, tokenizer = policy_for(config, lambda path: build_base(config, size, path))
    # before the run is made: the final evaluation (HF generate: the model's context) would fail on a
    # prompt too long only after training
    context = getattr(model.config, "max_position_embeddings", None)
    check_eval_prompts(
        eval_examples, get_template(config.template), tokenizer, config.max_new_tokens, context
    )
    hooks = make_hooks(config, tokenizer)
    rubric = rubric_for(get_template(config.template), config.on_reward_error)
    trainer = GRPOTrainer(
        config, model, tokenizer, examples, rubric, app=APP, algorithm=config.algo, hooks=hooks
    )
    with trainer.until_finished():  # finished once saved and evaluated
        history = trainer.train()
        final = trainer.save_final()
        models = {"eval": (trainer.model, tokenizer)}
        if isinstance(hooks, CoDistillHooks):
            if trainer.rank == 0:
                with atomic_directory(Path(config.run_dir) / "final_large") as tmp:
                    hooks.large.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
            models["eval_large"] = (hooks.large, tokenizer)
        print(summary_table(history))
        results = {}
        if config.eval_samples:
            for key, (policy, tok) in models.items():
                results[key] = evaluate_model(
                    policy,
                    tok,
                    eval_examples,
                    get_template(config.template),
                    samples=config.eval_samples,
                    temperature=config.temperature,
                    max_new_tokens=config.max_new_tokens,
                    seed=config.seed,
                    device=config.device,
                )
                print(
                    f"{key} ({'large' if key == 'eval_large' else 'policy'}):\n{format_results(results[key])}"
                )
            # the dashboard's Math page reads the policy's pass@k per benchmark (docs/dashboards.md)
            pass_at_k = {benchmark_name(config.eval_data): pass_at_k_entry(results["eval"])}
            trainer.write_eval(results | {"pass_at_k": pass_at_k})
    print(f"model saved to {final}")
    return {"history": history, "eval": results, "run_dir": config.run_dir}
