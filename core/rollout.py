"""Generation backends behind one interface: completions of a batch of prompts as one `Rollouts` record
(token ids, masks, sampling log-probs, texts). Here: the record, the `RolloutBackend` protocol and
`HFGenerateBackend` (HF `generate`, the default, CPU or GPU). vLLM (the `vllm` extra, CUDA only) is in
core/vllm_backend.py, multi-turn rollouts against an `Environment` in core/multi_turn.py.

Generation is a pure function of (weights, prompts, settings, seed): every call samples under its own
seeded RNG (`torch.random.fork_rng`; per-request seeds in vLLM) and leaves the global RNG untouched, so a
resumed run regenerates exactly. Prompts are full texts, already templated by the app; they are tokenized
with `add_special_tokens=False`. The trainer repeats each prompt G times itself.
Shape letters: N completions, P prompt tokens (left-padded), T completion tokens (right-padded), V vocab.
Tests: `pytest tests/core/test_rollout.py`.
"""

import hashlib
import math
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import (
    Cache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from core.lora_merge import lora_merged
from core.policy import VocabMask
from core.sharding import all_done, is_sharded

_ROW_FIELDS = ("finish_reason", "prompts", "completions", "num_turns")  # the per-row lists of Rollouts


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample one batch. `max_new_tokens` is per call (per turn in multi-turn rollouts)."""

    max_new_tokens: int
    temperature: float = 1.0  # > 0; the sampling log-probs are log_softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = 0  # 0 = off
    stop_strings: tuple[str, ...] = ()  # a completion ends with the first token that completes one of them
    min_new_tokens: int = (
        0  # eos is suppressed before this many tokens; benchmarks force a length with min = max
    )
    greedy: bool = False  # argmax decoding (evaluation); temperature then only scales the reported log-probs

    def __post_init__(self) -> None:
        # Configs read from YAML/TOML give lists; a tuple keeps the settings hashable and immutable. One string
        # is one stop string (tuple() would make each of its characters one).
        stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings)
        object.__setattr__(self, "stop_strings", stops)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature} (use greedy=True)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.stop_strings and self.min_new_tokens:
            # HF ends a completion at a stop string even before min_new_tokens; vLLM does not. Refuse rather
            # than let the two backends disagree.
            raise ValueError("min_new_tokens cannot be combined with stop_strings (the backends disagree)")


@dataclass
class Rollouts:
    """N completions: token ids, masks, sampling log-probs and texts, all aligned row by row (CPU tensors).

    - `prompt_ids`, `prompt_mask` (N, P) long: left-padded with `pad_token_id`, mask 1 on prompt tokens.
    - `completion_ids`, `completion_mask` (N, T) long: right-padded; the mask is 1 on every token up to and
      including the eos or the token that completes a stop string, 0 after (multi-turn: on the whole
      transcript, observations included).
    - `loss_mask` (N, T) float32: `completion_mask`, but 0 on observation tokens of multi-turn rollouts.
    - `sampling_logp` (N, T) float32 or None: log-prob of each sampled token under log_softmax(logits /
      temperature) of the sampler's raw logits, i.e. before eos suppression (min_new_tokens), top-k and
      top-p, which is what the trainer's policy computes (over the allowed ids where there is a
      `vocab_mask`); 0 on padding and observation tokens. None when
      the backend cannot report exactly that (see `VLLMBackend`). `sampling_logp_exact` is False when it
      comes from a KV-cached decode, which differs from a full forward by float noise.
    - `finish_reason`: "stop" (eos or stop string), "length" (max_new_tokens), or in multi-turn rollouts
      "turn_cap" (max_turns reached before the environment ended the episode) or "context" (the next turn
      would not fit the model's context, or an observation did not and was cut at its end, unless the
      environment ended the episode there).
    - `completions`: decoded completion text, without special tokens or padding (multi-turn: the whole
      transcript after the prompt, observations included); `num_turns`: 1 for single-turn rollouts.
    - `turns` (multi-turn only, else None): per row the transcript as `{"role": "model" | "observation",
      "text": str}` entries in order, each model turn's decoded text and each observation as the
      environment gave it (cut at the model's context: its kept tokens decoded); rollouts.jsonl carries it
      for the dashboard's turn view.
    - `vocab_mask` (constrained decoding, else None): the allowed ids of each completion token (index (N, T),
      -1 on padding), which the trainer's logprobs renormalise over; see `core.policy.VocabMask`.
    """

    prompt_ids: Tensor  # (N, P)
    prompt_mask: Tensor  # (N, P)
    completion_ids: Tensor  # (N, T)
    completion_mask: Tensor  # (N, T)
    loss_mask: Tensor  # (N, T)
    sampling_logp: Tensor | None  # (N, T)
    sampling_logp_exact: bool
    finish_reason: list[str]
    prompts: list[str]
    completions: list[str]
    num_turns: list[int]
    pad_token_id: int
    turns: list[list[dict[str, str]]] | None = None
    vocab_mask: VocabMask | None = None

    def __post_init__(self) -> None:
        n, t = self.completion_ids.shape
        expected = {
            "prompt_mask": tuple(self.prompt_ids.shape),
            "completion_mask": (n, t),
            "loss_mask": (n, t),
        }
        if self.sampling_logp is not None:
            expected["sampling_logp"] = (n, t)
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"Rollouts.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}"
                )
        if self.prompt_ids.shape[0] != n:
            raise ValueError(f"Rollouts has {self.prompt_ids.shape[0]} prompt rows but {n} completion rows")
        for name in _ROW_FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"Rollouts.{name} has {len(getattr(self, name))} entries, expected {n}")
        if self.turns is not None and len(self.turns) != n:
            raise ValueError(f"Rollouts.turns has {len(self.turns)} entries, expected {n}")
        if self.vocab_mask is not None:
            self.vocab_mask.check_tokens(self.completion_ids, self.completion_mask)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def input_ids(self) -> Tensor:
        """Prompt then completion, (N, P + T): what the trainer feeds the policy."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    def attention_mask(self) -> Tensor:
        """(N, P + T) long, aligned with `input_ids()`."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def num_completion_tokens(self) -> int:
        """Completion tokens in the batch (`completion_mask` ones, observations included)."""
        return int(self.completion_mask.sum())

    def select(self, indices: Sequence[int] | Tensor) -> "Rollouts":
        """The rows `indices` (in that order, repeats allowed) with the same P and T."""
        idx = torch.as_tensor(indices, dtype=torch.long)  # (M,)
        rows = idx.tolist()
        return replace(
            self,
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx],
            completion_mask=self.completion_mask[idx],
            loss_mask=self.loss_mask[idx],
            sampling_logp=None if self.sampling_logp is None else self.sampling_logp[idx],
            **{name: [getattr(self, name)[i] for i in rows] for name in _ROW_FIELDS},
            turns=None if self.turns is None else [self.turns[i] for i in rows],
            vocab_mask=None if self.vocab_mask is None else self.vocab_mask.select(idx),
        )

    @staticmethod
    def concat(parts: Sequence["Rollouts"]) -> "Rollouts":
        """Rows of all `parts` in order, prompts re-padded on the left to the longest P and completions on
        the right to the longest T. Sampling log-probs survive only if every part has them."""
        if not parts:
            raise ValueError("Rollouts.concat needs at least one part")
        pad = parts[0].pad_token_id
        if any(p.pad_token_id != pad for p in parts):
            raise ValueError(
                f"cannot concat Rollouts with different pad ids {sorted({p.pad_token_id for p in parts})}"
            )
        p_max = max(p.prompt_ids.shape[1] for p in parts)
        t_max = max(p.completion_ids.shape[1] for p in parts)

        def cat(name: str, width: int, value: float, left: bool) -> Tensor:
            padded = []
            for part in parts:
                x = getattr(part, name)  # (n, w)
                fill = x.new_full((x.shape[0], width - x.shape[1]), value)  # (n, width - w)
                padded.append(torch.cat([fill, x] if left else [x, fill], dim=1))  # (n, width)
            return torch.cat(padded)  # (N, width)

        with_logp = all(p.sampling_logp is not None for p in parts)
        turns = None
        if any(p.turns is not None for p in parts):  # a single-turn row is one model turn
            turns = [
                t for p in parts for t in (p.turns or [[{"role": "model", "text": c}] for c in p.completions])
            ]
        return Rollouts(
            prompt_ids=cat("prompt_ids", p_max, pad, left=True),
            prompt_mask=cat("prompt_mask", p_max, 0, left=True),
            completion_ids=cat("completion_ids", t_max, pad, left=False),
            completion_mask=cat("completion_mask", t_max, 0, left=False),
            loss_mask=cat("loss_mask", t_max, 0.0, left=False),
            sampling_logp=cat("sampling_logp", t_max, 0.0, left=False) if with_logp else None,
            sampling_logp_exact=with_logp and all(p.sampling_logp_exact for p in parts),
            finish_reason=[r for p in parts for r in p.finish_reason],
            prompts=[s for p in parts for s in p.prompts],
            completions=[s for p in parts for s in p.completions],
            num_turns=[k for p in parts for k in p.num_turns],
            pad_token_id=pad,
            turns=turns,
            vocab_mask=VocabMask.concat(
                [p.vocab_mask for p in parts], [tuple(p.completion_ids.shape) for p in parts], t_max
            ),
        )


class RolloutBackend(Protocol):
    """A sampler. `generate` is text -> tokens -> `generate_from_ids`; multi-turn rollouts use the latter."""

    tokenizer: PreTrainedTokenizerBase
    # The most tokens a sequence may hold (prompt and completion), None when unknown: prompts and
    # multi-turn contexts are checked against it. Optional: a backend without it is not checked.
    max_context: int | None

    def generate(self, prompts: list[str], settings: SamplingSettings, seed: int) -> Rollouts: ...

    def generate_from_ids(
        self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int
    ) -> Rollouts: ...

    def update_weights(self, model: nn.Module) -> None:
        """Called after each optimizer step with the trained model."""
        ...


# ---------------------------------------------------------------------------------------------------
# Helpers shared by the backends
# ---------------------------------------------------------------------------------------------------


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for (seed, keys): chunk k of a batch, turn k of an episode, request k."""
    # int(): a seed given as np.int64 or a 0-d tensor has another repr but must give the same stream
    digest = hashlib.blake2b(repr(tuple(int(k) for k in (seed, *keys))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def context_limit(backend: RolloutBackend, model: nn.Module | None = None) -> int | None:
    """The most tokens a sequence may hold: the backend's `max_context` (vLLM's max_model_len may be below
    the model's), else the `max_position_embeddings` of `model` or of the backend's `.model`, else None."""
    if hasattr(backend, "max_context"):
        return backend.max_context
    config = getattr(model if model is not None else getattr(backend, "model", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


def prompt_list(prompts: Sequence[str]) -> list[str]:
    """The prompts as a list; one string is refused (list() would make each character a prompt)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string (wrap it: [prompt])")
    return list(prompts)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> ids (N, P) left-padded with `pad_token_id` and mask (N, P) long."""
    if not rows:
        raise ValueError("no prompts to generate from")
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"cannot generate from an empty prompt: rows {empty} have no tokens")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (N, P)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, P)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def right_pad(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype) -> Tensor:
    """Lists of different lengths -> (N, T) right-padded with `value` (T >= 1)."""
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), value, dtype=dtype)  # (N, T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def _stop_string_end(
    row: list[int], stop_strings: tuple[str, ...], tokenizer: PreTrainedTokenizerBase
) -> int | None:
    """Length of the shortest prefix of `row` whose text contains a stop string, or None.

    Binary search over prefixes: the decoded text of a prefix is a prefix of the longer one's text, so
    "contains a stop string" is monotone in the prefix length; log2(T) decodes per row, not T.
    """

    def hit(k: int) -> bool:
        text = tokenizer.decode(row[:k], skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    if not row or not hit(len(row)):
        return None
    lo, hi = 1, len(row)  # invariant: hit(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def eos_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None, vocab_size: int | None
) -> tuple[int, ...]:
    """The ids generation stops at: the tokenizer's eos, then those of the model's `generation_config`
    (below `vocab_size`, when given): an instruct model's end of turn, such as Llama-3's <|eot_id|>, Gemma's
    <end_of_turn> or Phi-3's <|end|>, is often there only. HF `generate` stops at the config's list too.

    >>> from types import SimpleNamespace as NS
    >>> eos_token_ids(NS(eos_token_id=2), NS(eos_token_id=[7, 2, 50256]), vocab_size=100)
    (2, 7)
    """
    extra = getattr(generation_config, "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    extra = [i for i in extra if vocab_size is None or 0 <= i < vocab_size]
    return tuple(dict.fromkeys([tokenizer.eos_token_id, *extra]))


def completion_ends(
    rows: list[list[int]],
    eos_ids: Sequence[int],
    stop_strings: tuple[str, ...],
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[list[int], list[str]]:
    """Per row of sampled tokens: the completion length (through the first of `eos_ids`, or the token that
    completes the first stop string) and the finish reason ("stop", else "length": the row ran out)."""
    eos = set(eos_ids)
    lengths, reasons = [], []
    for row in rows:
        end, reason = len(row), "length"
        first = next((k for k, token in enumerate(row) if token in eos), None)
        if first is not None:
            end, reason = first + 1, "stop"
        stop = _stop_string_end(row[:end], stop_strings, tokenizer) if stop_strings else None
        if stop is not None:
            end, reason = stop, "stop"
        lengths.append(end)
        reasons.append(reason)
    return lengths, reasons


def finalize_rollouts(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    rows: list[list[int]],
    row_logps: list[list[float]] | None,
    settings: SamplingSettings,
    tokenizer: PreTrainedTokenizerBase,
    eos_ids: Sequence[int],
    constraint_rows: tuple[Tensor, Tensor] | None = None,
) -> Rollouts:
    """One call's Rollouts from the sampled tokens of each row (and their log-probs, aligned): masks,
    padding, finish reasons and texts. A row may run past its end (HF pads finished rows); that is cut.
    `eos_ids`: the ids a completion ends at (`eos_token_ids`). `constraint_rows`: a `VocabConstraint`'s
    table (K, V) and the row it allowed at each step (N, steps)."""
    pad = tokenizer.pad_token_id
    lengths, reasons = completion_ends(rows, eos_ids, settings.stop_strings, tokenizer)
    kept = [row[:n] for row, n in zip(rows, lengths, strict=True)]
    completion_mask = right_pad([[1] * n for n in lengths], 0, torch.long)  # (N, T)
    sampling_logp = None
    if row_logps is not None:
        sampling_logp = right_pad(
            [lp[:n] for lp, n in zip(row_logps, lengths, strict=True)], 0.0, torch.float32
        )
    vocab_mask = None
    if constraint_rows is not None:
        table, steps = constraint_rows  # (K, V), (N, steps >= T)
        index = steps[:, : completion_mask.shape[1]].cpu().masked_fill(completion_mask == 0, -1)  # (N, T)
        vocab_mask = VocabMask(table.cpu(), index)
    return Rollouts(
        prompt_ids=prompt_ids.cpu(),
        prompt_mask=prompt_mask.cpu(),
        completion_ids=right_pad(kept, pad, torch.long),  # (N, T)
        completion_mask=completion_mask,
        loss_mask=completion_mask.float(),
        sampling_logp=sampling_logp,  # (N, T)
        sampling_logp_exact=False,  # neither backend recomputes a full forward
        finish_reason=reasons,
        prompts=[
            tokenizer.decode(ids[m.bool()].tolist()) for ids, m in zip(prompt_ids, prompt_mask, strict=True)
        ],
        completions=[tokenizer.decode(row, skip_special_tokens=True) for row in kept],
        num_turns=[1] * len(rows),
        pad_token_id=pad,
        vocab_mask=vocab_mask,
    )


def check_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer needs a pad and an eos token (pad={tokenizer.pad_token!r}, "
            f"eos={tokenizer.eos_token!r}); set tokenizer.pad_token (reusing eos is fine: completions end "
            "at the first eos)"
        )


class TextBackend(ABC):
    """`generate` for every backend: tokenize, left-pad, `generate_from_ids`, keep the prompt texts."""

    tokenizer: PreTrainedTokenizerBase

    def generate(self, prompts: list[str], settings: SamplingSettings, seed: int) -> Rollouts:
        prompts = prompt_list(prompts)
        rows = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        prompt_ids, prompt_mask = left_pad(rows, self.tokenizer.pad_token_id)
        out = self.generate_from_ids(prompt_ids, prompt_mask, settings, seed)
        return replace(out, prompts=prompts)

    @abstractmethod
    def generate_from_ids(
        self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int
    ) -> Rollouts: ...


# ---------------------------------------------------------------------------------------------------
# HF generate
# ---------------------------------------------------------------------------------------------------


class VocabConstraint(Protocol):
    """Constrained decoding for `HFGenerateBackend`: the ids each sequence's next token may take, as a row
    of a small table of allowed-id sets. The rollouts carry what was allowed as a `core.policy.VocabMask`
    (see there why a table and not an (N, T, V) bool), and the trainer's logprobs renormalise over it."""

    table: Tensor  # (K, V) bool, each row a set of allowed ids

    def rows(self, prompt_ids: Tensor, prompt_mask: Tensor, generated: Tensor) -> Tensor:
        """(N,) long: the row of `table` of each sequence's next token (-1: any id), given the left-padded
        prompts (N, P) and the tokens generated so far (N, t) (pad after a finished row's eos)."""
        ...


def _constrain(scores: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """`scores` (N, V) with -inf off the allowed ids of table row `rows` (N,) (-1: all allowed)."""
    allowed = table[rows.clamp(min=0)] | (rows < 0).unsqueeze(1)  # (N, V)
    return scores.masked_fill(~allowed, -math.inf)  # (N, V)


class _VocabConstraintProcessor(LogitsProcessor):
    """Applies a `VocabConstraint` inside `generate` and records the row it allowed at each step. It runs
    before `_SamplingLogpRecorder`, so the recorded log-probs are over the allowed ids, as the trainer's."""

    def __init__(self, constraint: VocabConstraint, prompt_ids: Tensor, prompt_mask: Tensor):
        self.constraint, self.prompt_ids, self.prompt_mask = constraint, prompt_ids, prompt_mask
        self.table = constraint.table.to(prompt_ids.device)  # (K, V)
        self.steps: list[Tensor] = []  # per step, (N,)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        generated = input_ids[:, self.prompt_ids.shape[1] :]  # (N, t)
        rows = self.constraint.rows(self.prompt_ids, self.prompt_mask, generated)  # (N,)
        self.steps.append(rows)
        return _constrain(scores, self.table, rows)

    def result(self) -> tuple[Tensor, Tensor]:
        """The table (K, V) and the rows of every step (N, steps); `finalize_rollouts` keeps the first T."""
        return self.table, torch.stack(self.steps, dim=1)


class _CompletionStopStrings(StoppingCriteria):
    """Stops a row of HF `generate` once its completion contains a stop string. HF's own `stop_strings`
    match the end of the whole sequence, so a stop string that begins in the prompt stopped the row and the
    pad after it counted as completion. A string that appears in the completion first appears when its last
    character is sampled, so the newest tokens suffice (a token that decodes to no text can make this miss
    a stop; `finalize_rollouts` cuts exactly either way)."""

    def __init__(self, stop_strings: Sequence[str], tokenizer: PreTrainedTokenizerBase, prompt_width: int):
        self.stop_strings, self.tokenizer, self.prompt_width = tuple(stop_strings), tokenizer, prompt_width
        self.window = max(map(len, self.stop_strings)) + 4  # tokens; each decodes to >= 1 character

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:  # input_ids (N, P + t)
        start = max(self.prompt_width, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        hits = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)  # (N,)


def _raise_if_unsampleable(invalid: Tensor, synced: bool) -> None:
    """FloatingPointError if a row (N,) of `invalid` had no token to sample; with `synced`, every process
    raises when one does, so that none is left waiting in a collective."""
    if not all_done(~invalid.any(), synced):
        bad = invalid.nonzero().flatten().tolist()
        where = f"in rows {bad[:10]} of this process's batch" if bad else "on another process"
        raise FloatingPointError(f"no token could be sampled (NaN logits, or every token excluded) {where}")


class _SamplingLogpRecorder(LogitsProcessor):
    """Records log_softmax(raw logits / temperature) at each sampled token, and suppresses eos before
    `min_new_tokens` (in place of HF's MinNewTokens processor, which would run before us).

    Why not `output_logits=True`: it keeps T x (N, V) float32 logits, 40 GB for 64 x 1024 tokens of a
    150k vocabulary. Here one step's (N, V) is alive at a time: at step t we learn the token sampled at
    step t - 1 (the last column of `input_ids`) and gather its log-prob from the previous step.
    This must be the first processor, so that it sees raw logits: `HFGenerateBackend` runs `generate`
    with a default generation config, which puts no processor before the user's ones. Only a
    `_VocabConstraintProcessor` comes first: its -inf are part of the distribution the trainer computes.
    """

    def __init__(self, temperature: float, min_new_tokens: int, eos_ids: Sequence[int], prompt_len: int):
        self.temperature = temperature
        self.min_new_tokens = min_new_tokens
        self.eos_ids = list(eos_ids)
        self.eos = torch.tensor(self.eos_ids)  # (E,), moved to the scores' device on first use
        self.prompt_len = prompt_len
        self.previous: Tensor | None = None  # (N, V) log-probs of the last step
        self.logps: list[Tensor] = []  # per step, (N,)
        self.invalid: Tensor | None = None  # (N,): an unfinished row with no token to sample (no host sync)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.logps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))  # (N,)
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (N, V)
        generated = input_ids[:, self.prompt_len :]  # (N, t)
        if generated.shape[1] < self.min_new_tokens:
            scores = scores.clone()
            scores[:, self.eos_ids] = -math.inf
        # NaN logits, or every token excluded (a constraint allowing only eos before min_new_tokens): greedy
        # would pick a pad silently and sampling fail in torch.multinomial with an unclear message. Such a
        # row gets uniform scores so that generate runs to its end (no host sync here), then we raise.
        if self.eos.device != generated.device:
            self.eos = self.eos.to(generated.device)
        finished = torch.isin(generated, self.eos).any(1)  # (N,)
        unsampleable = ~scores.max(-1).values.isfinite()  # (N,)
        bad = unsampleable & ~finished  # (N,): a finished row's token is replaced by a pad anyway
        self.invalid = bad if self.invalid is None else self.invalid | bad
        return scores.masked_fill(unsampleable[:, None], 0.0)  # (N, V)

    def result(self, completion_ids: Tensor) -> Tensor:
        """(N, T) log-probs of `completion_ids` (N, T), the tokens `generate` returned."""
        t = completion_ids.shape[1]
        # generate may run steps past the end and undo them (deferred stop checks): keep the first T.
        logps = self.logps[:t]
        if len(logps) < t:  # the last token was sampled in the last call: gather it here
            logps.append(self.previous.gather(1, completion_ids[:, -1:]).squeeze(1))
        return torch.stack(logps, dim=1)  # (N, T)


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU (`CXX`, else g++), or None if there is none."""
    return shutil.which(os.environ.get("CXX") or "g++")


@contextmanager
def _generation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and a default `generation_config` for the duration, then both restored.

    The model's own generation config (a hub `generation_config.json`: repetition penalty, top-k,
    suppressed tokens, extra eos ids, ...) fills every field `generate` is not given; we swap in a default
    one so that nothing but `SamplingSettings` shapes the sampling. PEFT's `generate` copies the base
    model's config, so the swap happens on the base model.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved_config = target.generation_config
    modes = {m: m.training for m in model.modules()}
    target.generation_config = GenerationConfig()
    model.eval()
    try:
        yield
    finally:
        target.generation_config = saved_config
        for module, training in modes.items():
            module.training = training


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG of the CPU and of `device` (if CUDA) seeded for the duration, then restored.
    Not `torch.manual_seed`: it would reseed every GPU, and fork_rng restores only `device`."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class HFGenerateBackend(TextBackend):
    """Batched `model.generate` with a KV cache on left-padded prompts.

    The backend shares the model object with the trainer, so `update_weights` has nothing to do.
    `batch_size` splits a call into chunks of at most that many rows (chunk k sampled with seed
    `derive_seed(seed, k)`); None generates all rows at once. Sampling log-probs are not exact
    (`sampling_logp_exact=False`): a KV-cached decode differs from a full forward by float noise.
    With a `constraint`, every token is drawn from its allowed ids (a logits processor for `generate`) and
    the rollouts carry them as `vocab_mask`; the sampling log-probs are then over the allowed ids.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        constraint: VocabConstraint | None = None,
        compile_decode: bool = False,
    ):
        check_special_tokens(tokenizer)
        self.autocast_dtype = autocast_dtype  # generation runs under torch.autocast in this dtype
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):  # the only RNGs `_seeded` controls
            raise ValueError(f"HFGenerateBackend runs on cpu or cuda, got device={self.device}")
        param_device = next(model.parameters()).device
        if param_device.type != self.device.type:
            raise ValueError(
                f"the model is on {param_device} but HFGenerateBackend was given device={self.device}"
            )
        self.model = model
        self.tokenizer = tokenizer
        # a PEFT model's generation config is its base model's
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_ids = eos_token_ids(tokenizer, getattr(base, "generation_config", None), vocab_size)
        self.batch_size = batch_size
        self.constraint = constraint
        if compile_decode and self.device.type == "cpu" and not _cxx_compiler():
            raise RuntimeError(
                "compile_decode on CPU needs a C++ compiler for torch.compile's inductor (g++, or set CXX); "
                "none was found on PATH"
            )
        # `generate_groups`' decode steps through torch.compile (one graph per shape; a static KV cache)
        self._decode_step = torch.compile(model) if compile_decode else model

    @property
    def max_context(self) -> int | None:
        """The model's `max_position_embeddings`, where its config has one."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def update_weights(self, model: nn.Module) -> None:
        """Nothing to do: generation runs on the trained model object itself."""

    def _autocast(self) -> torch.autocast:
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)

    def generate_from_ids(
        self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int
    ) -> Rollouts:
        """Completions of left-padded prompts (N, P); rows are generated in chunks of `batch_size`."""
        n = prompt_ids.shape[0]
        size = self.batch_size or n
        parts = []
        for k, start in enumerate(range(0, n, size)):
            ids, mask = prompt_ids[start : start + size], prompt_mask[start : start + size]  # (n_k, P)
            first = int(mask.any(0).long().argmax())  # drop the columns that are padding in every row
            parts.append(
                self._generate_chunk(ids[:, first:], mask[:, first:], settings, derive_seed(seed, k))
            )
        return parts[0] if len(parts) == 1 else Rollouts.concat(parts)

    def _generate_chunk(
        self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int
    ) -> Rollouts:
        p = prompt_ids.shape[1]
        recorder = _SamplingLogpRecorder(settings.temperature, settings.min_new_tokens, self.eos_ids, p)
        sampling = (
            {}
            if settings.greedy
            else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
        )
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=not settings.greedy,
            num_beams=1,
            num_return_sequences=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=list(self.eos_ids),
            use_cache=True,
            **sampling,
        )
        ids, mask = prompt_ids.to(self.device), prompt_mask.to(self.device)  # (N, P)
        constrain = None if self.constraint is None else _VocabConstraintProcessor(self.constraint, ids, mask)
        merge = self.autocast_dtype is None  # under autocast the merged weight would be rounded too
        with (
            _generation_mode(self.model),
            lora_merged(self.model, merge),
            _seeded(seed, self.device),
            self._autocast(),
        ):
            sequences = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList(
                    [recorder] if constrain is None else [constrain, recorder]
                ),
                stopping_criteria=StoppingCriteriaList(
                    [_CompletionStopStrings(settings.stop_strings, self.tokenizer, p)]
                    if settings.stop_strings
                    else []
                ),
                synced_gpus=is_sharded(self.model),  # FSDP: decode until every process is done
            )  # (N, P + T)
        _raise_if_unsampleable(recorder.invalid, is_sharded(self.model))
        completion_ids = sequences[:, p:]  # (N, T)
        sampling_logp = recorder.result(completion_ids)  # (N, T)
        return finalize_rollouts(
            prompt_ids,
            prompt_mask,
            completion_ids.tolist(),
            sampling_logp.tolist(),
            settings,
            self.tokenizer,
            self.eos_ids,
            None if constrain is None else constrain.result(),
        )

    def generate_groups(
        self, prompts: list[str], settings: SamplingSettings, seeds: Sequence[int], group_size: int
    ) -> Rollouts:
        """Completions of `prompts` in one batched decode, where rows [g * group_size, (g + 1) * group_size)
        are sampled with their own generator seeded `seeds[g]`: a group's tokens depend on its seed, its
        prompt and the batch's shapes, not on which other groups share the call.

        A lean KV-cached loop on the model's forward instead of HF `generate` (whose sampler draws every
        row from one global RNG): per token one forward, the sampling log-probs of the raw logits (as
        `_SamplingLogpRecorder`), eos suppression before `min_new_tokens`, HF's own top-k / top-p warpers,
        one draw per token for all groups (`sample_groups`). Stops when every row has emitted eos or at
        `max_new_tokens`; stop strings are cut afterwards by `finalize_rollouts`, as for `generate`.
        """
        prompts = prompt_list(prompts)
        if len(prompts) != len(seeds) * group_size:
            raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds x group_size {group_size}")
        rows = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        prompt_ids, prompt_mask = left_pad(rows, self.tokenizer.pad_token_id)  # (N, P)
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        shared = all(prompts[i] == prompts[i - i % group_size] for i in range(len(prompts)))
        merge = self.autocast_dtype is None  # under autocast the merged weight would be rounded too
        with _generation_mode(self.model), lora_merged(self.model, merge), torch.no_grad(), self._autocast():
            tokens, logps, steps = self._decode(
                prompt_ids, prompt_mask, settings, generators, group_size, shared
            )
        constraint_rows = None if steps is None else (self.constraint.table, steps)
        out = finalize_rollouts(
            prompt_ids,
            prompt_mask,
            tokens.tolist(),
            logps.tolist(),
            settings,
            self.tokenizer,
            self.eos_ids,
            constraint_rows,
        )
        return replace(out, prompts=list(prompts))

    def _decode(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        settings: SamplingSettings,
        generators: list[torch.Generator],
        group_size: int,
        shared_prompts: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Sampled tokens (N, T) (pad after a row's eos), their sampling log-probs (N, T) and, with a
        constraint, the table row it allowed at each step (N, T). With `shared_prompts` (every group's rows
        hold one prompt) the prefill runs each group's prompt once into a dynamic cache, whose keys and
        values, repeated G times, fill the decode cache; its last logits are repeated likewise: N / G prompt
        rows instead of N."""
        eos, pad = list(self.eos_ids), self.tokenizer.pad_token_id
        warpers = []
        if settings.top_k:
            warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(settings.top_p))
        eos_ids = torch.tensor(eos, device=self.device)  # (E,)
        mask = prompt_mask.to(self.device)  # (N, P)
        ids = prompt_ids.to(self.device)  # (N, P) then (N, 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, P), as position_ids_from_mask
        n, p = ids.shape
        finished = torch.zeros(n, dtype=torch.bool, device=self.device)  # (N,)
        invalid = torch.zeros(n, dtype=torch.bool, device=self.device)  # (N,): a row with nothing to sample
        tokens, logps, steps = [], [], []
        table = None if self.constraint is None else self.constraint.table.to(self.device)  # (K, V)
        prompt = (ids, mask)  # (N, P) each: what the constraint reads (ids and mask are rebound below)
        cache = _static_cache(self.model, p + settings.max_new_tokens)
        static = cache is not None
        if static:  # the cache's full length, filled in column by column: one shape for every decode step
            mask = torch.cat([mask, mask.new_zeros(n, settings.max_new_tokens)], dim=1)  # (N, P + T)
        synced = is_sharded(self.model)  # every process decodes until all are done: forwards are collective
        for t in range(settings.max_new_tokens):
            prefill_once = t == 0 and shared_prompts and group_size > 1
            rows = slice(None, None, group_size) if prefill_once else slice(None)  # (N / G or N) rows
            forward = self._decode_step if t > 0 and static else self.model  # compiled: fixed shapes only
            out = forward(
                input_ids=ids[rows],
                attention_mask=mask[rows, : p if prefill_once else None],
                position_ids=positions[rows],
                cache=None if prefill_once else cache,  # transformers 5's name for past_key_values
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1]  # (N / G or N, V)
            if prefill_once:
                cache = _repeated(out.cache, group_size, cache)
                logits = logits.repeat_interleave(group_size, 0)  # (N, V)
            else:
                cache = out.cache
            scores = logits.float() / settings.temperature  # (N, V)
            if table is not None:
                generated = torch.stack(tokens, 1) if tokens else ids.new_zeros(n, 0)  # (N, t)
                steps.append(self.constraint.rows(*prompt, generated))  # (N,)
                scores = _constrain(scores, table, steps[-1])  # (N, V)
            logp_all = torch.log_softmax(scores, dim=-1)  # (N, V)
            if t < settings.min_new_tokens:
                scores[:, eos] = -math.inf
            for warper in [] if settings.greedy else warpers:
                scores = warper(None, scores)  # (N, V)
            # NaN logits, or every token excluded (a constraint that allows only eos before min_new_tokens):
            # recorded here, raised after the loop, so that no step waits on a host sync.
            invalid |= ~scores.max(-1).values.isfinite() & ~finished
            if settings.greedy:
                next_ids = scores.argmax(-1)  # (N,)
            else:
                next_ids = sample_groups(torch.softmax(scores, dim=-1), generators, group_size)  # (N,)
            next_ids = next_ids.masked_fill(finished, pad)  # (N,)
            tokens.append(next_ids)
            logps.append(logp_all.gather(1, next_ids[:, None]).squeeze(1))  # (N,)
            finished = finished | torch.isin(next_ids, eos_ids)
            if all_done(finished.all(), synced):
                break
            ids = next_ids[:, None]  # (N, 1)
            if static:
                mask[:, p + t] = 1
            else:
                mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)  # (N, P + t + 1)
            positions = positions[:, -1:] + 1  # (N, 1)
        rows = torch.stack(steps, 1).cpu() if steps else None  # (N, T)
        _raise_if_unsampleable(invalid, synced)
        return torch.stack(tokens, 1).cpu(), torch.stack(logps, 1).cpu(), rows  # (N, T), (N, T)


def sample_groups(probs: Tensor, generators: Sequence[torch.Generator], group_size: int) -> Tensor:
    """One token per row of `probs` (N, V), group g's rows drawn with `generators[g]`: (N,).

    Exactly what `torch.multinomial(probs[group], 1, generator=gen)` draws, group by group (its one-sample
    path is argmax(p / q) with q ~ Exp(1) from the generator, the exponential form of the Gumbel-max trick),
    but with one division and one argmax for the whole batch and without multinomial's validity checks per
    group and token (which may wait on the device). `_decode` instead records the rows with nothing to sample
    and raises once, after the loop.
    """
    noise = torch.empty_like(probs)  # (N, V)
    for g, generator in enumerate(generators):
        noise[g * group_size : (g + 1) * group_size].exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)  # (N,)


def _repeated(prefill: Cache, times: int, into: StaticCache | None) -> Cache:
    """The dynamic cache of a prefill over U rows with every row repeated `times` times in place, (U, ...)
    -> (U * times, ...): written into the static cache `into`, or, without one, the dynamic cache itself."""
    if into is None:
        prefill.batch_repeat_interleave(times)
        return prefill
    for index, layer in enumerate(prefill.layers):
        into.update(layer.keys.repeat_interleave(times, 0), layer.values.repeat_interleave(times, 0), index)
    return into


def _static_cache(model: nn.Module, length: int) -> StaticCache | None:
    """A preallocated KV cache of `length` positions for the decode loop: each token writes its keys and
    values in place, where the default dynamic cache concatenates the whole cache once per token and layer
    (about 11% of a 64-token decode of a 4-layer model on CPU; tokens and logprobs are the same). None, i.e.
    the model's default cache, for a model whose layers a static cache cannot describe (sliding windows)."""
    config = model.config.get_text_config()
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return None
    return StaticCache(config=model.config, max_cache_len=length)
