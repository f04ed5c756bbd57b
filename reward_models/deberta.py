"""A multi-head reward model: a DeBERTa-v2/v3 encoder (`DebertaV2Model`) and one linear head per reward
(fairness, relevance, quality) on a pooled [CLS] state. Each head gives a logit; its score is the
sigmoid, in [0, 1].

The offline default is a tiny DeBERTa built from a config (`build_tiny_reward_model`) with the locally
trained sentencepiece tokenizer of reward_models/tokenizer.py; the real path starts from a local
`deberta-v3-*` directory (`from_pretrained_encoder`). A saved reward model directory holds
    config.json (the encoder's), reward_heads.json, model.safetensors (encoder + pooler + heads),
    and the tokenizer files.
Shapes: B sequences, L tokens, H hidden size, K heads.
Tests: `pytest tests/reward_models/test_rm_model.py`.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import DebertaV2Config, DebertaV2Model

from core.atomic import atomic_directory
from core.data import InputError, read_text
from core.policy import named_if_unreadable

HEADS = ("fairness", "relevance", "quality")
HEADS_FILE = "reward_heads.json"
WEIGHTS_FILE = "model.safetensors"
MIN_MAX_LENGTH = 5  # [CLS] prompt [SEP] response [SEP] with one token of each (score.encode)


class MultiHeadRewardModel(nn.Module):
    """`forward(input_ids, attention_mask, token_type_ids=None) -> (B, K)` logits, one column per head."""

    def __init__(self, encoder: DebertaV2Model, heads: Sequence[str] = HEADS, dropout: float = 0.1):
        super().__init__()
        if len(set(heads)) != len(heads) or not heads:
            raise ValueError(f"heads must be distinct non-empty names, got {list(heads)}")
        self.encoder = encoder
        self.head_names = list(heads)
        hidden = encoder.config.hidden_size
        # DeBERTa's own sequence classifier pools the same way: dense + GELU on the [CLS] state.
        self.pooler = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout)
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, 1) for name in self.head_names})
        self.dropout = dropout
        self.max_length: int | None = None  # the token cap of training, when known (`save`, `load`)
        self.training_data: dict | None = None  # what it was trained on (`pairs.data_record`), when known

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, L, H)
        pooled = self.pooler(states[:, 0])  # (B, H), the [CLS] position
        return torch.cat([self.heads[name](pooled) for name in self.head_names], dim=-1)  # (B, K)

    def save(
        self,
        path: str | Path,
        tokenizer=None,
        max_length: int | None = None,
        training_data: dict | None = None,
    ) -> Path:
        """The model (and tokenizer) as a directory; `max_length`, the token cap it was trained with, is
        kept in reward_heads.json so that scoring cuts inputs as training did, and so is `training_data`
        (`pairs.data_record`), which `debias train/eval` check their splits against."""
        path = Path(path)
        with atomic_directory(path) as tmp:  # a killed save leaves no directory that looks complete
            self.encoder.config.save_pretrained(tmp)
            meta = {
                "heads": self.head_names,
                "dropout": self.dropout,
                "max_length": max_length,
                "training_data": training_data,
            }
            (tmp / HEADS_FILE).write_text(json.dumps(meta, indent=1))
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "MultiHeadRewardModel":
        """A reward model saved by `save`, in eval mode; every weight must be present (strict)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"reward model directory {path} does not exist")
        if (path / "model" / HEADS_FILE).is_file() and not (path / HEADS_FILE).is_file():
            raise InputError(f"{path} is a reward-model training run; its model is {path / 'model'}")
        for name in ("config.json", HEADS_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{path / name} is missing; expected a reward model directory from `grpo-suite reward-model train`"
                )
        meta = read_heads_file(path / HEADS_FILE)
        with named_if_unreadable(path, "reward model"):
            config = DebertaV2Config.from_pretrained(path, local_files_only=True)
            weights = load_file(str(path / WEIGHTS_FILE))
        model = cls(DebertaV2Model(config), meta["heads"], meta["dropout"])
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as err:  # torch's "Error(s) in loading state_dict", then the keys or shapes
            detail = " ".join(line.strip() for line in str(err).splitlines()[:2])
            raise InputError(
                f"{path / WEIGHTS_FILE}: the weights do not fit the directory's config.json and {HEADS_FILE} "
                f"({detail})"
            ) from err
        model.max_length = meta.get("max_length")  # None in directories saved before it was kept
        model.training_data = meta.get("training_data")  # likewise
        return model.to(device).eval()


def read_heads_file(path: Path) -> dict:
    """reward_heads.json as saved by `MultiHeadRewardModel.save`: a JSON object with at least "heads" (a
    list of names) and "dropout"; a damaged file is an error naming it."""
    try:
        meta = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}: malformed JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from err
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [key for key in ("heads", "dropout") if key not in meta]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(map(repr, missing))}")
    heads = meta["heads"]
    if (
        not isinstance(heads, list)
        or not heads
        or not all(isinstance(h, str) and h for h in heads)
        or len(set(heads)) < len(heads)
    ):
        raise InputError(f'{path}: "heads" must be a list of distinct head names, got {heads!r}')
    if isinstance(meta["dropout"], bool) or not isinstance(meta["dropout"], int | float):
        raise InputError(f'{path}: "dropout" must be a number, got {meta["dropout"]!r}')
    max_length = meta.get("max_length")  # absent or null in directories saved before it was kept
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < MIN_MAX_LENGTH
    ):
        raise InputError(
            f'{path}: "max_length" must be an int >= {MIN_MAX_LENGTH} or null, got {max_length!r}'
        )
    if not _is_data_record(meta.get("training_data")):  # likewise
        raise InputError(
            f'{path}: "training_data" must be null or the record `grpo-suite reward-model train` saves '
            f'({{"data_dir": ..., "splits": {{name: {{"categories": [...], "sha256": ...}}}}}}), '
            f"got {meta['training_data']!r}"
        )
    return meta


def _is_data_record(record: object) -> bool:
    """None, or `pairs.data_record`'s shape: what the data checks of eval and de-bias training read."""
    if record is None:
        return True
    if not isinstance(record, dict) or not isinstance(record.get("data_dir"), str):
        return False
    splits = record.get("splits")
    return isinstance(splits, dict) and all(
        isinstance(split, dict)
        and isinstance(split.get("sha256"), str)
        and isinstance(split.get("categories"), list)
        for split in splits.values()
    )


def from_pretrained_encoder(
    path: str | Path, heads: Sequence[str] = HEADS, seed: int = 0
) -> MultiHeadRewardModel:
    """A local pre-trained DeBERTa-v2/v3 directory (e.g. deberta-v3-small) with fresh heads (seeded)."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; expected a local deberta-v3-* model directory")
    check_deberta_encoder(path)
    encoder = DebertaV2Model.from_pretrained(path, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultiHeadRewardModel(encoder, heads)


def check_deberta_encoder(path: str | Path) -> None:
    """Refuse a model directory whose config.json is not a DeBERTa-v2/v3 encoder's (model_type
    'deberta-v2', which deberta-v3-* checkpoints also say): `DebertaV2Model.from_pretrained` would build
    any other (a causal LM, DeBERTa v1's other attention weights) with untrained weights, and only warn."""
    config_file = Path(path) / "config.json"
    try:
        model_type = json.loads(read_text(config_file)).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise InputError(f"{config_file}: not a JSON object of a model's config") from err
    if model_type != "deberta-v2":
        raise InputError(
            f"model: {path} is a {model_type!r} model, not a DeBERTa-v2/v3 encoder (model_type 'deberta-v2')"
        )


def build_tiny_reward_model(
    config: DebertaV2Config, heads: Sequence[str] = HEADS, seed: int = 0
) -> MultiHeadRewardModel:
    """A randomly initialised reward model from `config`; the same seed gives the same weights and the
    global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultiHeadRewardModel(DebertaV2Model(config), heads)


def tiny_deberta_config(vocab_size: int, pad_token_id: int = 0, **overrides) -> DebertaV2Config:
    """A DeBERTa-v3-shaped config (relative position buckets, c2p + p2c attention, no absolute positions),
    scaled down for CPU: hidden 128, 2 layers, 4 heads unless overridden."""
    values = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=256,
        relative_attention=True,
        position_buckets=64,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        type_vocab_size=0,
        pad_token_id=pad_token_id,
    )
    values.update(overrides)
    return DebertaV2Config(**values)
