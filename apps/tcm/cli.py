"""`grpo-suite tcm ...`: the TCM QA app's commands (found through the `tcm` entry point).

grpo-suite tcm train --preset tiny
grpo-suite tcm evaluate --model runs/tcm/<run>/final --system-prompt short --max-new-tokens 80
"""

from apps.tcm.evaluate import TcmEvalConfig
from apps.tcm.evaluate import main as evaluate
from apps.tcm.train import PRESETS, TcmTrainConfig, train
from core.cli import add_app, add_command


def register(apps) -> None:
    verbs = add_app(apps, "tcm", "Traditional Chinese Medicine QA with GRPO (Ladder-base recipe)")
    add_command(
        verbs,
        "train",
        TcmTrainConfig,
        train,
        "GRPO on TCM QA; evaluates the test split before/after",
        PRESETS,
    )
    add_command(verbs, "evaluate", TcmEvalConfig, evaluate, "per-type accuracy, format rate, ROUGE-L/BLEU")
