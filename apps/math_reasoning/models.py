"""The offline tiny base models: a character-level Qwen2 model given a base skill by SFT on the generated
step-by-step solutions (levels 1 and 2), stopped early so that RL has room.

Both sizes share one tokenizer (built from the offline texts, so the same `data_seed` gives the same
vocabulary), which CoDistill needs: its importance weights pi_L / pi_S compare the two models token by
token. [choice] A fraction of the SFT prompts carries a random hint prefix (a tier, some of its chunks), so
that a tiny model has seen the "Hint:" format before Scaf-GRPO shows it one; set `sft_hint_fraction=0`
for a base model that never saw hints.
"""

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from apps.math_reasoning.data import HINT_TIERS, OfflineSets
from apps.math_reasoning.templates import TAGS, TEMPLATES, Template
from core.tiny import build_char_tokenizer, create_tiny_model_dir, sft

TINY_CONTEXT = 1024  # tokens a tiny base model holds, prompt and completion together


@dataclass(frozen=True)
class TinySpec:
    """Shape and SFT budget of one tiny base model."""

    hidden_size: int
    num_layers: int
    sft_steps: int
    sft_lr: float

    def __post_init__(self):
        if self.hidden_size % 32 or self.hidden_size < 32:
            raise ValueError(
                f"hidden_size must be a positive multiple of 32 (head size 32), got {self.hidden_size}"
            )
        if self.num_layers < 1 or self.sft_steps < 0 or not self.sft_lr > 0:
            raise ValueError(f"need num_layers >= 1, sft_steps >= 0, sft_lr > 0; got {self}")


def tokenizer_texts(sets: OfflineSets) -> list[str]:
    """Every text the offline app writes: questions, hints, solutions and the template scaffolding."""
    texts = [template.text for template in TEMPLATES.values()] + ["0123456789+-=,. \\boxed{} Hint:"]
    for example in sets.train + sets.test + sets.sft:
        texts.append(example["question"])
        texts.extend(chunk for tier in HINT_TIERS for chunk in example["hints"][tier])
    return texts


def tiny_tokenizer(sets: OfflineSets):
    """The tokenizer `build_base_model` builds for `sets`, on its own (in well under a second)."""
    return build_char_tokenizer(tokenizer_texts(sets), TAGS)


def sft_examples(sets: OfflineSets, template: Template, hint_fraction: float, seed: int) -> list[dict]:
    """Prompt/completion pairs of the SFT problems; `hint_fraction` of them with a random partial hint."""
    rng = random.Random(f"sft-hints-{seed}")
    out = []
    for example in sets.sft:
        hint = None
        if rng.random() < hint_fraction:
            chunks = example["hints"][rng.choice(HINT_TIERS)]
            hint = " ".join(chunks[: rng.randint(1, len(chunks))])
        out.append(
            {
                "prompt": template.render(example["question"], hint),
                "completion": template.target(example["steps"], example["answer"]),
            }
        )
    return out


def build_base_model(
    path: Path, spec: TinySpec, sets: OfflineSets, template: Template, hint_fraction: float, seed: int
) -> Path:
    """A fresh tiny model fine-tuned on the SFT problems, saved to `path` (which must not exist)."""
    path = Path(path)
    init = path.with_name(path.name + "-init")
    shutil.rmtree(init, ignore_errors=True)  # a leftover of a build that was killed
    create_tiny_model_dir(
        init,
        tokenizer_texts(sets),
        extra_tokens=TAGS,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.hidden_size // 32,
        max_position_embeddings=TINY_CONTEXT,
        seed=seed,
    )
    if spec.sft_steps == 0:
        init.rename(path)
        return path
    examples = sft_examples(sets, template, hint_fraction, seed)
    sft(init, examples, path, max_steps=spec.sft_steps, lr=spec.sft_lr, batch_size=16, seed=seed)
    shutil.rmtree(init)
    return path
