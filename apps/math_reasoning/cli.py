"""`grpo-suite math <verb>`: train (four algorithms), eval, compare, data. `--help` on each verb.

grpo-suite math data --out-dir runs/math/data
grpo-suite math train --algo scaf --preset smoke
grpo-suite math eval --model runs/math/<run>/final
grpo-suite math compare --algos grpo,codistill --seeds 0,1,2
"""

from dataclasses import dataclass, field
from pathlib import Path

from apps.math_reasoning.compare import PRESETS as COMPARE_PRESETS
from apps.math_reasoning.compare import MathCompareConfig, compare
from apps.math_reasoning.data import MIXES, mix_levels, offline_sets, write_jsonl
from apps.math_reasoning.evaluate import MathEvalConfig, run_eval
from apps.math_reasoning.train import PRESETS, MathTrainConfig, train
from core.cli import add_app, add_command


@dataclass
class MathDataConfig:
    """`grpo-suite math data`: write the generated offline sets as JSONL."""

    out_dir: str = field(default="runs/math/data", metadata={"help": "directory for train/test/sft .jsonl"})
    data_seed: int = field(default=1234, metadata={"help": "seed of the generated sets"})
    data_mix: str = field(default="default", metadata={"help": f"difficulty mix: one of {', '.join(MIXES)}"})

    def __post_init__(self):
        mix_levels(self.data_mix)


def write_data(config: MathDataConfig) -> dict[str, Path]:
    sets = offline_sets(config.data_seed, mix=config.data_mix)
    out = Path(config.out_dir)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "test", "sft")}
    for path in paths.values():  # all three, before any is written
        if path.is_dir():
            raise FileExistsError(f"{path} is a directory; the data file cannot be written there")
    for name, path in paths.items():
        write_jsonl(path, getattr(sets, name))
        levels = sorted({e["level"] for e in getattr(sets, name)})
        print(f"{path}: {len(getattr(sets, name))} problems, levels {levels}")
    return paths


def register(apps) -> None:
    verbs = add_app(
        apps, "math", "math reasoning: GRPO, GTPO, Scaf-GRPO, CoDistill-GRPO (offline tiny models)"
    )
    add_command(verbs, "train", MathTrainConfig, train, "train with --algo grpo|gtpo|scaf|codistill", PRESETS)
    add_command(verbs, "eval", MathEvalConfig, run_eval, "pass@1 / pass@k / maj@k of a model on a data set")
    add_command(
        verbs, "compare", MathCompareConfig, compare, "algorithms x seeds -> a table", COMPARE_PRESETS
    )
    add_command(verbs, "data", MathDataConfig, write_data, "write the generated offline data sets")
