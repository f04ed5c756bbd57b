"""`grpo-suite math compare`: run several algorithms x seeds from the same base models and print a table
of held-out results, mean +- std over seeds (also written to <out>/compare.md and compare.json).

    grpo-suite math compare --algos grpo,codistill,grpo_large --seeds 0,1,2
    grpo-suite math compare --algos grpo,gtpo --learning-rate 3e-3 --max-steps 60   # collapse vs GTPO
    grpo-suite math compare --preset micro --algos grpo,scaf       # docs/math_reasoning.md, micro reproduction

Arms: grpo, gtpo, scaf, codistill (two rows: S and L) and grpo_large (GRPO on L's own rollouts, the
reference for CoDistill's L). Without --model the tiny base models are built once, with `base_seed`, into
<out>/base_small and <out>/base_large, so every arm and seed starts from the same weights; seeds vary the
RL run only. Every other training field comes from --train-preset (a `math train` preset, e.g. micro), then
--train-config (a TOML/YAML file of train fields), then the flags below.
"""

import json
import statistics
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path

from apps.math_reasoning.train import ALGORITHMS, MathTrainConfig, applies_to, build_base, train
from apps.math_reasoning.train import PRESETS as TRAIN_PRESETS
from core.atomic import write_atomic
from core.config import config_file_values, config_to_dict
from core.runs import RunDir, is_run_dir, latest_config, refuse_a_file_in_the_way, run_sources, source_digest

ARMS = (*ALGORITHMS, "grpo_large")


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class MathCompareConfig:
    """Algorithms x seeds -> one table."""

    algos: tuple[str, ...] = _help(
        f"arms to run, from {', '.join(ARMS)}", ("grpo", "gtpo", "scaf", "codistill")
    )
    seeds: tuple[int, ...] = _help("RL seeds of every arm", (0, 1, 2))
    out_dir: str | None = _help("directory of the runs and the table; default runs/math/compare-<time>", None)
    model: str | None = _help("small/policy model (HF dir); default: the tiny base built once", None)
    large_model: str | None = _help("large model for codistill and grpo_large; default: the tiny one", None)
    base_seed: int = _help("seed of the tiny base models' initialisation and SFT", 0)
    train_config: str | None = _help("TOML/YAML file of `math train` fields applied to every run", None)
    max_steps: int | None = _help("training steps of every run (none: the train default)", None)
    learning_rate: float | None = _help("policy learning rate of every run (none: the train default)", None)
    eval_samples: int | None = _help("completions per held-out problem (none: the train default)", None)
    eval_examples: int | None = _help("held-out problems evaluated (none: the train default)", None)
    train_preset: str | None = _help(
        "a `math train` preset applied to every run before --train-config and the flags (e.g. micro)", None
    )

    def __post_init__(self):
        unknown = [a for a in self.algos if a not in ARMS]
        if unknown or not self.algos:
            raise ValueError(f"algos: unknown arm(s) {unknown}; valid: {', '.join(ARMS)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for name in ("algos", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} names an entry twice: {','.join(map(str, values))}")
        if self.train_preset is not None and self.train_preset not in TRAIN_PRESETS:
            raise ValueError(
                f"train_preset: unknown train preset {self.train_preset!r}; valid: {', '.join(TRAIN_PRESETS)}"
            )
        for name in ("model", "large_model"):  # else the tiny base model would be built into that path
            if getattr(self, name) and not (Path(getattr(self, name)) / "config.json").is_file():
                raise ValueError(
                    f"{name}: {getattr(self, name)} is not a local model directory (no config.json)"
                )
        if self.model and not self.large_model and {"codistill", "grpo_large"} & set(self.algos):
            raise ValueError("codistill and grpo_large with --model need --large-model")
        # --train-config and the train fields checked now, for every arm: before anything is made
        values = _train_values(self)
        for arm in self.algos:
            try:
                MathTrainConfig(**arm_values(values, arm))
            except ValueError as err:
                raise ValueError(f"arm {arm}: {err}") from err


PRESETS = {
    "smoke": {"train_preset": "smoke", "seeds": (0,), "algos": ("grpo", "codistill")},
    # the micro reproduction of docs/math_reasoning.md: minutes per run on one CPU thread
    "micro": {"train_preset": "micro", "seeds": (0, 1, 2), "algos": ("grpo", "scaf")},
}


def _train_values(config: MathCompareConfig) -> dict:
    values = dict(TRAIN_PRESETS[config.train_preset]) if config.train_preset else {}
    from_file = config_file_values(MathTrainConfig, Path(config.train_config)) if config.train_config else {}
    values.update(from_file)
    unread = [name for name in MathTrainConfig.OFFLINE_MODEL_FIELDS if name in from_file]
    if config.model and unread:  # as `math train` refuses them with --model
        raise ValueError(
            f"{config.train_config}: {', '.join(unread)} sets the offline tiny models, which --model "
            f"{config.model} replaces; leave it out of the train config"
        )
    for name in ("max_steps", "learning_rate", "eval_samples", "eval_examples"):
        if getattr(config, name) is not None:
            values[name] = getattr(config, name)
    per_run = [
        name for name in ("algo", "seed", "model", "large_model", "run_dir", "resume") if name in values
    ]
    if config.train_config and per_run:
        raise ValueError(
            f"{config.train_config}: {', '.join(per_run)} is set per run by compare (--algos, --seeds, "
            "--model, --large-model, --out-dir); leave it out of the train config"
        )
    for name in per_run:
        values.pop(name)  # a train preset's, set per run below
    return values


def shared_settings_left_out(values: dict, arms: Sequence[str]) -> list[str]:
    """A line per arm that trains without a setting the other arms share (and that is not at its default):
    `beta` (GTPO has no reference model), `size` (CoDistill's policy is the small model).

    >>> shared_settings_left_out({"beta": 0.04, "max_steps": 5}, ["grpo", "gtpo"])
    ['gtpo trains without beta 0.04 (the other arms have it)']
    """
    defaults = {f.name: f.default for f in fields(MathTrainConfig)}
    lines = []
    for arm in arms:
        kept = arm_values(values, arm)
        lines += [
            f"{arm} trains without {name} {value} (the other arms have it)"
            for name, value in values.items()
            if name in ("beta", "size") and name not in kept and value != defaults[name]
        ]
    return lines


def arm_values(values: dict, arm: str) -> dict:
    """The train fields of one arm: its algorithm, and of `values` those that algorithm reads (a train
    config's codistill_alpha goes to the codistill arm only; `math train` refuses it with another --algo)."""
    algo = "grpo" if arm == "grpo_large" else arm
    return {k: v for k, v in values.items() if algo in applies_to(k)} | {"algo": algo}


def compare(config: MathCompareConfig) -> dict:
    out = Path(config.out_dir or f"runs/math/compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    refuse_a_file_in_the_way(out, "--out-dir")
    values = _train_values(config)
    base = MathTrainConfig(**arm_values(values, "grpo"), seed=config.base_seed, run_dir=str(out))
    small = Path(config.model) if config.model else out / "base_small"
    large = Path(config.large_model) if config.large_model else out / "base_large"
    needs_large = any(arm in ("codistill", "grpo_large") for arm in config.algos)
    # every run's config first: a run left by an earlier compare into this directory must have had the
    # same settings, checked before anything is made
    planned = [
        (arm, MathTrainConfig(
            **arm_values(values, arm) | ({"size": "large"} if arm == "grpo_large" else {}),  # its policy is L
            seed=seed,
            model=str(large if arm == "grpo_large" else small),
            large_model=str(large) if arm == "codistill" else None,
            run_dir=str(out / f"{arm}-seed{seed}"),
        ))
        for arm in config.algos
        for seed in config.seeds
    ]  # fmt: skip
    for _, run_config in planned:
        _check_earlier_run(run_config)
    to_build = {
        size: path
        for path, size, needed in ((small, "small", True), (large, "large", needs_large))
        if needed and path.parent == out and path.name == f"base_{size}"
    }  # the tiny bases compare builds (and reuses), not a --model / --large-model
    records = _check_earlier_bases(out, base, to_build)
    out.mkdir(parents=True, exist_ok=True)
    print(f"compare directory: {out}")
    for size, path in to_build.items():
        if not (path / "config.json").is_file():
            print(f"building the tiny {size} base model into {path}")
            records[size] = base_settings(base, size)
            write_atomic(out / BASES_FILE, json.dumps(records, indent=2).encode())
            build_base(base, size, path)
    runs: dict[str, list[dict]] = {}
    for arm, run_config in planned:
        runs.setdefault(arm, []).append(run_summary(_finished(run_config) or _train_or_resume(run_config)))
    rows = table_rows(runs)
    left_out = "".join(f"\nnote: {line}" for line in shared_settings_left_out(values, config.algos))
    text = format_table(rows) + left_out + _code_note(runs)
    print(text)
    write_atomic(out / "compare.md", (text + "\n").encode())
    write_atomic(
        out / "compare.json", json.dumps({"runs": runs, "rows": rows}, indent=2, default=str).encode()
    )
    return {"runs": runs, "rows": rows, "out_dir": str(out)}


def _code_note(runs: dict[str, list[dict]]) -> str:
    """A line naming the runs made (in part) by other code than this, whose results may differ from a run
    now (an evaluation or a default changed since): empty when every run is of this code."""
    other = [s["run_dir"] for summaries in runs.values() for s in summaries if s["other_code"]]
    if not other:
        return ""
    return (
        f"\nnote: {len(other)} run(s) made in part by other code than this (source digests differ, or a run "
        f"from before they were recorded): {', '.join(other)}; a new --out-dir compares on this code alone"
    )


def _check_earlier_run(run_config: MathTrainConfig) -> None:
    """An earlier run in this run's directory is continued or reused only if it had these settings."""
    if not is_run_dir(run_config.run_dir):
        return
    wanted = config_to_dict(run_config)
    stored = latest_config(RunDir(run_config.run_dir).read_config())
    # a setting added since that run ran at its default (as `eval_data_format`)
    defaults = {f.name: f.default for f in fields(MathTrainConfig) if f.default is not MISSING}
    stored = {k: defaults[k] for k in wanted.keys() - stored.keys() if k in defaults} | stored
    changed = sorted(
        k for k in stored.keys() | wanted.keys() if k != "resume" and stored.get(k) != wanted.get(k)
    )
    if changed:
        raise ValueError(
            f"{run_config.run_dir}: holds a run with other settings ({', '.join(changed)}); pick another "
            "--out-dir, or give the settings of the compare that made it"
        )


BASES_FILE = "bases.json"  # <out>/bases.json: {size: the settings its tiny base model was built with}


def base_settings(base: MathTrainConfig, size: str) -> dict:
    """What a tiny base model of `size` is built from (`build_base`): its seed, data and SFT budget."""
    built_from = ("data_seed", "data_mix", "template", "sft_hint_fraction")
    return {
        "base_seed": base.seed,
        **{k: getattr(base, k) for k in built_from},
        **asdict(base.tiny_spec(size)),
    }


def _check_earlier_bases(out: Path, base: MathTrainConfig, to_build: dict[str, Path]) -> dict:
    """The bases an earlier compare built into `out` are reused only if built with these settings; returns
    the recorded settings (a base without a record, from a compare before the record, is reused as is)."""
    path = out / BASES_FILE
    records = _read_records(path) if path.is_file() else {}
    for size, base_dir in to_build.items():
        stored = records.get(size)
        if not (base_dir / "config.json").is_file() or stored is None:
            continue
        wanted = base_settings(base, size)
        changed = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        if changed:
            raise ValueError(
                f"{base_dir}: a base model built with other settings ({', '.join(changed)}); pick another "
                "--out-dir, or give the settings of the compare that made it"
            )
    return records


def _read_records(path: Path) -> dict:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: not a JSON file ({err}); remove it to build the base models again"
        ) from err
    if not (isinstance(records, dict) and all(isinstance(v, dict) for v in records.values())):
        raise ValueError(f"{path}: expected an object of base-model settings; remove it to build them again")
    return records


def _finished(run_config: MathTrainConfig) -> dict | None:
    """The result of a run an earlier compare into the same directory finished (its model and its
    evaluation saved), else None."""
    path = Path(run_config.run_dir)
    if not (is_run_dir(path) and (path / "final").is_dir()):
        return None
    run = RunDir(path)
    evals = run.read_eval() if run.eval_path.is_file() else {}
    if run_config.eval_samples and "eval" not in evals:
        return None
    print(f"{path}: finished earlier, its results reused")
    results = {key: evals[key] for key in ("eval", "eval_large") if key in evals}
    return {"history": run.read_metrics(), "eval": results, "run_dir": str(path), **_sources(run)}


def _train_or_resume(run_config: MathTrainConfig) -> dict:
    """Train the run; one an earlier compare left unfinished continues from its last checkpoint. The
    history is the run's whole metrics.jsonl: a resumed `train` returns only the steps it ran."""
    result = train(replace(run_config, resume=is_run_dir(run_config.run_dir)))
    run = RunDir(run_config.run_dir)
    return result | {"history": run.read_metrics(), **_sources(run)}


def _sources(run: RunDir) -> dict:
    """{"other_code": whether any part of the run (its start, a resume) ran other code than this}."""
    return {"other_code": any(source != source_digest() for source in run_sources(run.read_config()))}


def run_summary(result: dict) -> dict:
    """Per run: held-out metrics of the policy (and of L for CoDistill) and training means."""
    history = [m | {"gen_tokens": _generated_tokens(m)} for m in result["history"]]
    evals = result["eval"]
    tail = history[-max(1, len(history) // 4) :]

    def mean(rows, key):
        values = [m[key] for m in rows if m.get(key) is not None]
        return sum(values) / len(values) if values else None

    summary = {
        "run_dir": result["run_dir"],
        "other_code": result.get("other_code", False),
        "zero_spread": mean(history, "zero_spread_frac"),
        "entropy_end": mean(tail, "entropy"),
        "step_time": mean(history, "step_time"),
        "gen_tokens": mean(history, "gen_tokens"),
        "all_fail": mean(history, "scaf/all_fail_frac"),
        "large_time": mean(history, "codistill/large_time"),
        "ess": mean(history, "codistill/ess"),
    }
    for key, prefix in (("eval", ""), ("eval_large", "large_")):
        if key in evals:
            k = evals[key]["samples"]
            summary[prefix + "pass@1"] = evals[key]["all"]["pass@1"]
            summary[prefix + "maj@k"] = evals[key]["all"][f"maj@{k}"]
            summary[prefix + "format"] = evals[key]["all"]["format_rate"]
            summary[prefix + "hard_pass@1"] = evals[key].get("hard", {}).get("pass@1")
    return summary


def _generated_tokens(metrics: dict) -> float | None:
    """Completion tokens generated in a step: the batch's (tokens_per_s x step_time) plus Scaf's hint search,
    which the batch does not hold; None for a step that logged no speed."""
    if metrics.get("tokens_per_s") is None or metrics.get("step_time") is None:
        return None
    return metrics["tokens_per_s"] * metrics["step_time"] + (metrics.get("scaf/hint_tokens") or 0.0)


COLUMNS = (
    "pass@1",
    "hard_pass@1",
    "maj@k",
    "format",
    "entropy_end",
    "zero_spread",
    "step_time",
    "gen_tokens",
)


def table_rows(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per arm (CoDistill: S and L), each column as (mean, std, n) over seeds."""
    rows = []
    for arm, summaries in runs.items():
        rows.append({"arm": arm, **{c: _stats([s.get(c) for s in summaries]) for c in COLUMNS}})
        if arm == "codistill":
            small_time = [
                s["step_time"] - s["large_time"]
                for s in summaries
                if s["step_time"] is not None and s["large_time"] is not None
            ]
            rows[-1]["step_time"] = _stats(small_time)
            rows[-1]["arm"] = "codistill:S"
            large = {c: _stats([s.get("large_" + c) for s in summaries]) for c in COLUMNS[:4]}
            rows.append(
                {"arm": "codistill:L", **large, "step_time": _stats([s["large_time"] for s in summaries])}
            )
    return rows


def _stats(values: list) -> tuple[float, float, int] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def format_table(rows: list[dict]) -> str:
    head = "| arm | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    seeds = max((row[c][2] for row in rows for c in COLUMNS if row.get(c)), default=0)
    for row in rows:
        cells = []
        for c in COLUMNS:
            stat = row.get(c)
            cell = "-" if stat is None else f"{stat[0]:.3f} ± {stat[1]:.3f}"
            cells.append(cell + (f" (n={stat[2]})" if stat is not None and stat[2] < seeds else ""))
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nmean ± std over {seeds} seed(s) (n= where a cell has fewer); step_time in s (codistill:S = step "
        "minus L's share); gen_tokens: completion tokens generated per step, Scaf's hint search included"
    )
    return "\n".join(lines)
