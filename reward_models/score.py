"""Scoring with a trained multi-head reward model: batched, one forward per batch for all heads.

`RewardModelScorer` is loaded once and scores (prompt, response) pairs in batches; it keeps the last
batch's scores so that several rubric functions (one per head, apps/debias/rewards.py) share one forward.
`score_file` is `grpo-suite reward-model score`: it reads JSONL rows with "prompt" and "response" and
writes each row back with "scores": {head: probability}.

    grpo-suite reward-model score --reward-model runs/rm/model --input in.jsonl --output out.jsonl
Tests: `pytest tests/reward_models/test_rm_score.py`.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from core.atomic import write_atomic
from core.data import InputError, read_jsonl
from core.policy import named_if_unreadable
from reward_models.deberta import MultiHeadRewardModel
from reward_models.tokenizer import SPM_FILE


def encode(tokenizer, prompts: list[str], responses: list[str], max_length: int, device: str) -> dict:
    """[CLS] prompt [SEP] response [SEP], padded to the longest, at most `max_length` tokens. Only the
    prompt's end is cut when too long, so the response (what is judged) is seen whole when it fits beside
    one prompt token; a response too long for that keeps its first tokens, rather than failing the batch.
    The special tokens are placed by the tokenizer's own post-processor, on the cut token lists."""
    backend = tokenizer.backend_tokenizer
    room = max_length - backend.num_special_tokens_to_add(is_pair=True)
    if room < 2:
        raise ValueError(f"max_length {max_length} leaves no room for a prompt token and a response token")
    # each call resets the backend's truncation and padding, so post_process below does neither
    prompt_tokens = tokenizer(prompts, add_special_tokens=False).encodings
    response_tokens = tokenizer(responses, add_special_tokens=False).encodings
    rows = []
    for prompt, response in zip(prompt_tokens, response_tokens, strict=True):
        response.truncate(room - min(len(prompt), 1))
        prompt.truncate(room - len(response))
        pair = backend.post_process(prompt, response, add_special_tokens=True)
        rows.append({"input_ids": pair.ids, "attention_mask": pair.attention_mask})
    enc = tokenizer.pad(rows, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


class RewardModelScorer:
    """A reward model directory, loaded once. `score(prompts, responses) -> {head: [probability, ...]}`."""

    def __init__(
        self, path: str | Path, device: str = "cpu", batch_size: int = 64, max_length: int | None = None
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = MultiHeadRewardModel.load(path, device=device)
        if not any((Path(path) / name).is_file() for name in ("tokenizer.json", SPM_FILE)):
            # transformers would build a tokenizer of another vocabulary from tokenizer_config.json alone
            raise FileNotFoundError(
                f"{path} has neither tokenizer.json nor {SPM_FILE}; a reward model directory from `grpo-suite "
                "reward-model train` holds the tokenizer it was trained with"
            )
        with named_if_unreadable(Path(path), "tokenizer"):
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.heads = list(self.model.head_names)
        self.training_data = self.model.training_data  # `pairs.data_record`, or None in older directories
        self.device = device
        self.batch_size = batch_size
        # as trained (saved with the model), else all the encoder takes
        self.max_length = (
            max_length or self.model.max_length or self.model.encoder.config.max_position_embeddings
        )
        self.forward_calls = 0  # batches scored by the model (a cache hit adds none)
        self._last_key: tuple | None = None
        self._last: dict[str, list[float]] = {}

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        key = (tuple(prompts), tuple(responses))
        if key == self._last_key:  # copies: a caller that edits its result must not change the cache
            return {h: list(values) for h, values in self._last.items()}
        parts = []
        for start in range(0, len(prompts), self.batch_size):
            enc = encode(
                self.tokenizer,
                prompts[start : start + self.batch_size],
                responses[start : start + self.batch_size],
                self.max_length,
                self.device,
            )
            parts.append(torch.sigmoid(self.model(**enc).float()).cpu())  # (b, K)
            self.forward_calls += 1
        probs = torch.cat(parts) if parts else torch.zeros(0, len(self.heads))  # (N, K)
        self._last_key = key
        self._last = {h: probs[:, k].tolist() for k, h in enumerate(self.heads)}
        return {h: list(values) for h, values in self._last.items()}


@dataclass
class RMScoreConfig:
    """`grpo-suite reward-model score`."""

    reward_model: str = field(default="runs/reward_model/model", metadata={"help": "reward model directory"})
    input: str = field(default="", metadata={"help": 'JSONL file, one {"prompt", "response", ...} per line'})
    output: str = field(default="", metadata={"help": 'JSONL file to write (each row plus "scores")'})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    batch_size: int = field(default=64, metadata={"help": "sequences per forward"})

    def __post_init__(self):
        if not self.input or not self.output:
            raise ValueError("--input and --output are required")
        if Path(self.output).is_dir():  # before the scoring, not at the write after it
            raise ValueError(f"--output {self.output} is a directory; expected a JSONL file to write")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def read_pairs(path: str | Path) -> list[dict]:
    """Rows of a JSONL file, each an object with string "prompt" and "response"; an error names the line.
    A file without rows is an error too."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"input file {path} is a directory, expected a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    rows = []
    for number, row in read_jsonl(path):
        for name in ("prompt", "response"):
            if name not in row:
                raise ValueError(f"{path}:{number}: missing field {name!r}")
            if not isinstance(row[name], str):
                raise ValueError(f"{path}:{number}: field {name!r} must be a string, got {row[name]!r}")
        rows.append(row)
    if not rows:
        raise InputError(f"input file {path} has no rows")
    return rows


def score_file(config: RMScoreConfig) -> list[dict]:
    rows = read_pairs(config.input)  # all lines are checked before the model is loaded
    scorer = RewardModelScorer(config.reward_model, device=config.device, batch_size=config.batch_size)
    scores = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    out_rows = [{**row, "scores": {h: scores[h][i] for h in scorer.heads}} for i, row in enumerate(rows)]
    Path(config.output).parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in out_rows)
    write_atomic(Path(config.output), text.encode())
    print(f"scored {len(rows)} rows -> {config.output}")
    return out_rows
