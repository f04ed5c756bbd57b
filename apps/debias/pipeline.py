"""`grpo-suite debias pipeline`: data -> reward model -> SFT policy -> GRPO (one run per seed) -> eval.

Layout of the run directory:
    data/             the generated splits (train/validation/test/heldout .jsonl)
    reward_model/     the reward model's run: model/, checkpoints/, eval.json (pairwise accuracy, calibration)
    sft_model/        the starting policy (tiny default: char-level LM + SFT on a neutral/biased mix)
    grpo-seed<k>/     one GRPO run per seed: config, metrics, rollouts, final/, eval.json (before/after)
    timings.json      seconds per stage, summed over the pipeline's attempts (a resume included)
    config.json       the pipeline's config (the directory is a run: the dashboard's De-bias page lists it)
    eval.json         the reward model's accuracies and, per seed and as mean/std over seeds, the
                      fairness gain and perplexity ratio on the test split and the held-out category;
                      `bias` per category before / after, the mean over seeds (each seed's eval.json
                      has its own, with example `responses`)

    grpo-suite debias pipeline                          # the default: one seed
    grpo-suite debias pipeline --seeds 0,1,2            # the 3-seed result
    grpo-suite debias pipeline --quick --grpo-steps 5   # smoke-sized, but 5 GRPO steps
    grpo-suite debias pipeline --run-dir runs/debias/a --resume   # continue one that was stopped
A failed stage marks the run "failed" in status.json (with the error) and re-raises. `--resume` keeps the
stages that finished (data/, reward_model/ with its eval.json, sft_model/, a seed with its eval.json),
continues an unfinished reward model or GRPO run with its own --resume (from its newest checkpoint: the
reward model's every 50 steps, a GRPO run's every --grpo-save-every steps), rebuilds an unfinished SFT policy,
and refuses settings other than the run's own, naming them: the stages it keeps were computed with
those. Only --device and --grpo-save-every may change.
"""

import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from apps.debias.data import DataConfig, generate_splits, load_splits, write_splits
from apps.debias.evaluate import DebiasEvalConfig, evaluate, evaluation_settings
from apps.debias.train import DebiasTrainConfig, build_sft_policy, train
from core.atomic import write_json_atomic
from core.config import config_to_dict
from core.runs import (
    RunDir,
    default_run_dir,
    failure_recorded,
    refuse_a_file_in_the_way,
    refuse_changed_pipeline,
    run_to_resume,
)
from reward_models.train import RMTrainConfig, train_reward_model

APP = "debias"
TIMINGS_FILE = "timings.json"  # seconds per stage over the pipeline's attempts (StageClock)
# fields a resumed pipeline may change: where and how it runs, not what it computes
HOW_IT_RUNS = ("resume", "run_dir", "device", "grpo_save_every")


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


# the sizes --quick gives the fields left unset (None); an explicit flag keeps its value
QUICK = {"rm_epochs": 0.1, "sft_epochs": 0.05, "grpo_steps": 2, "eval_prompts": 8}
FULL = {"rm_epochs": 2.0, "sft_epochs": 2.0, "grpo_steps": 40, "eval_prompts": 64}


@dataclass
class PipelineConfig:
    """`grpo-suite debias pipeline`: every stage with the defaults of its own command, sizes below."""

    run_dir: str | None = _help("run directory; default runs/debias/<timestamp>", None)
    seeds: tuple[int, ...] = _help(
        "GRPO seeds (one GRPO run + eval each; data, reward model and SFT shared)", (0,)
    )
    device: str = _help("cpu or cuda", "cpu")
    rm_epochs: float | None = _help("reward model epochs; unset: 2, with --quick 0.1", None)
    sft_epochs: float | None = _help("SFT epochs of the tiny policy; unset: 2, with --quick 0.05", None)
    grpo_steps: int | None = _help("GRPO steps per seed; unset: 40, with --quick 2", None)
    beta: float | None = _help("GRPO KL coefficient; unset: that of `debias train`", None)
    multi_reward: str = _help("sum_then_normalize or normalize_then_sum", "sum_then_normalize")
    grpo_save_every: int = _help(
        "checkpoint each GRPO run every N steps, for --resume after a kill (0 = only at its end)", 10
    )
    eval_prompts: int | None = _help("prompts per split in the evaluation; unset: 64, with --quick 8", None)
    quick: bool = _help(
        "a smoke-sized run (seconds): tiny data, models and sizes; explicit size flags are kept", False
    )
    resume: bool = _help(
        "continue the pipeline in --run-dir with its own settings: keep its finished stages, continue an "
        "unfinished reward model or GRPO run with its own --resume, rebuild an unfinished SFT policy; "
        "only --device and --grpo-save-every may change",
        False,
    )

    def __post_init__(self):
        if self.grpo_save_every < 0:
            raise ValueError(f"grpo_save_every must be >= 0, got {self.grpo_save_every}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            raise ValueError(
                f"seeds: {', '.join(map(str, repeated))} given more than once (one GRPO run per seed)"
            )
        for name, value in (QUICK if self.quick else FULL).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.beta is None:  # resolved as the sizes are: config.json records the value the run used
            self.beta = DebiasTrainConfig.beta
        for name in ("rm_epochs", "sft_epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("grpo_steps", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # the GRPO stage's own checks (multi_reward, beta, ...) now, not after the data and reward model
        # stages: its reward model does not exist yet, so any directory stands in for it
        stage = grpo_config(self, data_dir=None, reward_model=str(Path(__file__).parent))
        for seed in self.seeds:  # each seed's run checks it (its range) too
            replace(stage, seed=seed)


def _own_evaluation(grpo_dir: Path, eval_config: DebiasEvalConfig) -> dict | None:
    """The seed's eval.json when the pipeline's own evaluation wrote it (its settings are these); None when
    there is none, or when a `debias eval` of other settings replaced it (that seed is evaluated again)."""
    if not (grpo_dir / "eval.json").is_file():
        return None
    evaluation = RunDir(grpo_dir).read_eval()
    if evaluation.get("settings") == json.loads(json.dumps(evaluation_settings(eval_config))):  # as saved
        return evaluation
    why = "other settings" if "settings" in evaluation else "written before evaluations kept their settings"
    print(f"{grpo_dir / 'eval.json'}: not known to be this pipeline's evaluation ({why}): evaluated again")
    return None


def grpo_config(config: PipelineConfig, data_dir: str | None, reward_model: str) -> DebiasTrainConfig:
    """The GRPO stage's config (one seed's, less its seed, policy and run directory)."""
    return DebiasTrainConfig(
        data_dir=data_dir,
        reward_model=reward_model,
        device=config.device,
        max_steps=config.grpo_steps,
        save_every=config.grpo_save_every,
        sft_epochs=config.sft_epochs,
        multi_reward=config.multi_reward,
        beta=config.beta,
        **(
            {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 24, "hidden_size": 32}
            if config.quick
            else {}
        ),
    )


def pipeline(config: PipelineConfig) -> dict:
    if config.run_dir is not None:
        refuse_a_file_in_the_way(config.run_dir, "--run-dir")
    run = Path(config.run_dir or default_run_dir(APP))
    if config.resume:
        _check_same_settings(config)
    elif run.exists() and any(run.iterdir()):
        raise FileExistsError(
            f"{run} exists and is not empty; pick a new --run-dir (or pass --resume to continue it)"
        )
    print(f"run directory: {run}")
    root = RunDir.create(
        run, config_to_dict(config), app=APP, algorithm="pipeline", exist_ok_for_resume=config.resume
    )
    root.set_status("running", step=0)
    stages_done = [0]  # the status step of a pipeline: the stages it has finished

    def stage_done() -> None:
        stages_done[0] += 1
        root.set_status("running", step=stages_done[0])

    # SIGTERM included: the dashboard must not show a dead pipeline as running
    with failure_recorded(root, step=lambda: stages_done[0]):
        # resolved: a resume gives its stages the same paths however --run-dir is spelled
        results = run_stages(config, run.resolve(), stage_done)
        root.write_eval(results)
    root.set_status("finished", step=stages_done[0])
    print(pipeline_table(results))
    print(f"pipeline results written to {run / 'eval.json'}")
    return results


class StageClock:
    """Seconds per stage summed over every attempt of a pipeline, kept in a JSON file: a resumed pipeline
    reports the time of the whole run, a stage's cut-off attempt included (an error or SIGTERM; a
    SIGKILL loses that attempt's part)."""

    def __init__(self, path: Path, on_stage_done: Callable[[], None] = lambda: None):
        self.path = path
        self.on_stage_done = on_stage_done  # called after each stage that ends without an error
        self.seconds: dict[str, float] = {}
        if path.is_file():
            try:
                self.seconds = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: malformed JSON: {err}; delete it to resume") from err

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began
            write_json_atomic(self.path, self.seconds)
        self.on_stage_done()


def run_stages(config: PipelineConfig, run: Path, stage_done: Callable[[], None] = lambda: None) -> dict:
    """Data, reward model, SFT, then GRPO and eval per seed, in `run`; returns the pipeline's results.
    A stage that finished (each writes its outputs whole or not at all) is read back instead of run: only
    a resumed pipeline finds any, a fresh one starts in an empty directory. `stage_done()` is called after
    each of the four stages."""
    q = config.quick
    clock = StageClock(run / TIMINGS_FILE, stage_done)
    data_config = DataConfig(out_dir=str(run / "data"), num_prompts=240 if q else 3000)
    with clock.stage("data"):
        if Path(data_config.out_dir).is_dir():
            splits = load_splits(data_config.out_dir)
        else:
            splits = generate_splits(data_config)
            write_splits(splits, data_config.out_dir)

    rm_dir = run / "reward_model"
    with clock.stage("reward_model"):
        if (rm_dir / "eval.json").is_file():  # written last, after model/
            rm = RunDir(rm_dir).read_eval()
        else:
            rm = train_reward_model(
                RMTrainConfig(
                    data=data_config.out_dir,
                    run_dir=str(rm_dir),
                    device=config.device,
                    epochs=config.rm_epochs,
                    hidden_size=32 if q else 64,
                    resume=config.resume,
                )
            )

    base = grpo_config(config, data_config.out_dir, str(run / "reward_model" / "model"))
    sft_dir = run / "sft_model"
    with clock.stage("sft"):
        if not sft_dir.is_dir():  # saved whole (core.tiny.sft)
            build_sft_policy(sft_dir, splits["train"], base)

    per_seed, bias_per_seed = {}, []
    with clock.stage("grpo_and_eval"):
        for seed in config.seeds:
            grpo_dir = run / f"grpo-seed{seed}"
            eval_config = DebiasEvalConfig(
                model=str(grpo_dir / "final"),
                baseline_model=str(sft_dir),
                reward_model=base.reward_model,
                data_dir=data_config.out_dir,
                max_prompts=config.eval_prompts,
                max_new_tokens=base.max_new_tokens,
                seed=seed,
                device=config.device,
            )
            evaluation = _own_evaluation(grpo_dir, eval_config)
            if evaluation is None:  # not evaluated yet, or the eval.json is another evaluation's
                if not (grpo_dir / "final").is_dir():  # saved whole once the run has finished
                    begun = (grpo_dir / "config.json").is_file()  # then continue from its newest checkpoint
                    train(replace(base, seed=seed, model=str(sft_dir), run_dir=str(grpo_dir), resume=begun))
                evaluation = evaluate(eval_config)
            per_seed[seed] = evaluation["metrics"]
            bias_per_seed.append(evaluation["bias"])

    keys = sorted(per_seed[config.seeds[0]])
    over_seeds = {
        key: {
            "mean": statistics.fmean(m[key] for m in per_seed.values()),
            "std": statistics.pstdev(m[key] for m in per_seed.values()),
        }
        for key in keys
    }
    return {
        "reward_model": {
            s: {k: v for k, v in rm[s].items() if k.startswith("pair_acc")} for s in ("test", "heldout")
        },
        "per_seed": {str(s): m for s, m in per_seed.items()},
        "over_seeds": over_seeds,
        "bias": {
            category: {stage: statistics.fmean(b[category][stage] for b in bias_per_seed) for stage in stages}
            for category, stages in bias_per_seed[0].items()
        },
        "timings_s": {**clock.seconds, "total": sum(clock.seconds.values())},
    }


def _check_same_settings(config: PipelineConfig) -> None:
    """A resumed pipeline keeps the stages it finished: refuse settings other than the run's own."""
    refuse_changed_pipeline(
        run_to_resume(config.run_dir, "pipeline"),
        config_to_dict(config),
        HOW_IT_RUNS,
        resolve=_resolved,
    )


def _resolved(stored: dict) -> dict:
    """A stored pipeline config as this command resolves it: a run from before beta was resolved at the
    start stored it unset."""
    known = {f.name for f in fields(PipelineConfig)}
    return config_to_dict(PipelineConfig(**{k: v for k, v in stored.items() if k in known}))


def pipeline_table(results: dict) -> str:
    lines = [
        f"reward model fairness pairwise accuracy: test {results['reward_model']['test']['pair_acc/fairness']:.3f}"
        f"  held-out {results['reward_model']['heldout']['pair_acc/fairness']:.3f}"
    ]
    lines.append(
        f"{'split':<9}{'fair before':>12}{'fair after':>11}{'delta':>8}{'ppl ratio':>10}   (mean over seeds)"
    )
    o = results["over_seeds"]
    for split in ("test", "heldout"):
        if f"{split}/fairness/delta" in o:
            lines.append(
                f"{split:<9}{o[f'{split}/fairness/before']['mean']:>12.3f}{o[f'{split}/fairness/after']['mean']:>11.3f}"
                f"{o[f'{split}/fairness/delta']['mean']:>+8.3f}{o[f'{split}/perplexity/ratio']['mean']:>10.3f}"
            )
    lines.append("time: " + "  ".join(f"{k} {v:.0f}s" for k, v in results["timings_s"].items()))
    return "\n".join(lines)
