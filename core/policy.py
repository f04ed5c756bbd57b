"""An HF causal LM as a GRPO policy: loading (optionally with a PEFT LoRA adapter), the per-token
log-probabilities and entropies of completions under it, and the frozen reference policy of the KL term.

`completion_logprobs` is the trainer's hot path. It runs the backbone once and then the LM head,
log-softmax, gather and entropy on chunks of `chunk_size` token positions, each chunk recomputed in the
backward (a hand-written backward for a plain linear head, activation checkpointing otherwise), so the
(N, T, V) float32 log-softmax is never materialised. With a `VocabMask` (constrained decoding: each
completion token drawn from an allowed subset of the vocabulary) the logprobs and entropies are those of the
softmax renormalised over the allowed ids, -inf elsewhere, as the sampler drew them. Shape letters:
    N  sequences (prompt + completion)   L  sequence length (left-padded prompt, then completion)
    T  completion tokens                 H  hidden size        V  vocabulary size    C  chunk_size
    K  allowed-id sets of a VocabMask
Tests: `pytest tests/core/test_policy.py`.
"""

import copy
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from core.data import InputError
from core.runs import is_run_dir, models_in_run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The name under which core.sharding registers `_completion_logprobs` as an FSDP forward method of a sharded
# model: the chunked head reads the LM head's weight directly, outside the model's forward, so on an
# FSDP2 model it must run between the root module's unshard and reshard hooks.
SHARDED_LOGPROBS_METHOD = "grpo_completion_logprobs"
# a chunk's (C, V) logits hold at most this many values (256 MiB in float32): C = min(chunk_size, this // V),
# so a 151,936-word head takes 441 positions a chunk and a small vocabulary the whole chunk_size
MAX_CHUNK_LOGITS = 2**26

# Config fields of architectures whose head multiplies or divides the logits after `lm_head` (Cohere
# `logit_scale`, Granite `logits_scaling` (a divisor) but HyperCLOVA X `logits_scaling` (a factor), Falcon-H1
# `lm_head_multiplier`, Muse `output_multiplier`). The same name means different things in different
# models, so we refuse them rather than guess; 1.0 (or None) is neutral either way.
UNSUPPORTED_LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


@dataclass(frozen=True)
class VocabMask:
    """The token ids each completion position may take: the ids of row `index[i, t]` of `table`, or any id
    where `index[i, t] == -1` (padding, unconstrained positions).

    Why an index into a table rather than an (N, T, V) bool: a structural constraint takes few distinct
    allowed sets (Sudoku's triplet grammar: 5 per grid size; a grammar: one per parser state), so K x V
    bools plus an (N, T) index stay small for any V, where an (N, T, V) bool of 64 x 1024 completions over
    a 150k vocabulary is 10 GB. `completion_logprobs` expands one chunk's (C, V) rows at a time, next to the
    (C, V) logits it holds anyway.
    """

    table: Tensor  # (K, V) bool: each row a set of allowed ids (at least one)
    index: Tensor  # (N, T) long: the row of `table` of each completion token; -1 = the whole vocabulary

    def __post_init__(self) -> None:
        if self.table.dim() != 2 or self.table.dtype != torch.bool:
            raise ValueError(
                f"VocabMask.table must be a (K, V) bool tensor, got {self.table.dtype} "
                f"{tuple(self.table.shape)}"
            )
        if self.index.dim() != 2 or self.index.dtype != torch.long:
            raise ValueError(
                f"VocabMask.index must be an (N, T) long tensor, got {self.index.dtype} "
                f"{tuple(self.index.shape)}"
            )
        empty = (~self.table.any(1)).nonzero().flatten().tolist()
        if empty:  # a softmax over no id is NaN
            raise ValueError(f"VocabMask.table rows {empty} allow no token")
        if self.index.numel() and not -1 <= int(self.index.min()) <= int(self.index.max()) < len(self.table):
            raise ValueError(f"VocabMask.index must be in [-1, {len(self.table) - 1}]")

    def expanded(self) -> tuple[Tensor, Tensor]:
        """The table with a last row allowing every id, (K + 1, V), and the index with -1 pointing at it."""
        k, v = self.table.shape
        table = torch.cat([self.table, self.table.new_ones(1, v)])  # (K + 1, V)
        return table, self.index.masked_fill(self.index < 0, k)  # (N, T)

    def check_tokens(self, completion_ids: Tensor, completion_mask: Tensor) -> None:
        """Every token is allowed where the mask is 1, and the index is -1 where it is 0: so no -inf logprob
        reaches the loss (padding times 0 would give NaN). (N, T) each."""
        if tuple(self.index.shape) != tuple(completion_ids.shape):
            raise ValueError(
                f"VocabMask.index has shape {tuple(self.index.shape)}, expected {tuple(completion_ids.shape)}"
            )
        if bool((self.index[completion_mask == 0] != -1).any()):
            raise ValueError("VocabMask.index must be -1 where completion_mask is 0 (padding)")
        table, index = self.expanded()
        if completion_ids.numel() and int(completion_ids.max()) >= table.shape[1]:
            raise ValueError(f"a completion token id is outside the mask's vocabulary of {table.shape[1]}")
        bad = (~table[index, completion_ids]).nonzero().tolist()  # (N, T) lookup, never (N, T, V)
        if bad:
            raise ValueError(f"completion tokens outside their allowed set at (row, position) {bad[:5]}")

    def select(self, rows: Tensor) -> "VocabMask":
        """The mask of the given rows (M,) long."""
        return VocabMask(self.table, self.index[rows])

    @staticmethod
    def concat(
        masks: Sequence["VocabMask | None"], shapes: Sequence[tuple[int, int]], width: int
    ) -> "VocabMask | None":
        """The masks of parts with (rows, T) `shapes`, one after the other and right-padded with -1 to
        `width` columns; a part without a mask (None) is unconstrained. None when no part has one. The
        tables are merged with each distinct row once."""
        present = [m for m in masks if m is not None]
        if not present:
            return None
        if len({m.table.shape[1] for m in present}) != 1:
            raise ValueError(
                f"cannot concat VocabMasks of vocabularies {[m.table.shape[1] for m in present]}"
            )
        table, inverse = torch.unique(torch.cat([m.table for m in present]), dim=0, return_inverse=True)
        parts, offset = [], 0
        for mask, (rows, t) in zip(masks, shapes, strict=True):
            index = torch.full((rows, width), -1, dtype=torch.long)  # (rows, width)
            if mask is not None:
                own = mask.index  # (rows, t)
                index[:, :t] = torch.where(own >= 0, inverse[offset + own.clamp(min=0)], -1)
                offset += len(mask.table)
            parts.append(index)
        return VocabMask(table, torch.cat(parts))  # (sum rows, width)


@dataclass
class LoraSettings:
    """A LoRA adapter on the policy (Hu et al. 2021); only the adapter's parameters are trained."""

    r: int = 16  # rank of the update B @ A
    alpha: int = 32  # scaling numerator: the update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    # PEFT's "all-linear" (every linear layer but the LM head) or a list of module names
    target_modules: str | list[str] = "all-linear"
    # seed of the adapter's random initialisation (lora_A), so that every process starts from the same one
    seed: int = 0


def load_policy(
    path: str | Path,
    *,
    lora: LoraSettings | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local HF model directory, never from the hub.

    With `lora`, the model is wrapped by `peft.get_peft_model`, which freezes every base parameter.
    The tokenizer pads on the left, as generation of a batch of prompts needs. A LoRA adapter directory
    (what a `--lora` run saves as `final/`) gives its base model with the adapter merged in.
    """
    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _load_adapter(path, lora=lora, dtype=dtype, device=device)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(
            f"{path} {what}; expected a local HF model directory (config.json + weights, e.g. from "
            "`save_pretrained`)"
        )
    if is_run_dir(path):
        raise FileNotFoundError(f"{path} is a run directory, not a model: {models_in_run(path)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    with named_if_unreadable(path, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            path.absolute(),  # its name_or_path, which an adapter saved from it records as the base: absolute
            dtype=DTYPES[dtype],
            local_files_only=True,
        ).to(device)
    return _with_lora(model, lora), _ready_tokenizer(_load_tokenizer(path), model, path)


@contextmanager
def named_if_unreadable(path: Path, what: str) -> Iterator[None]:
    """A model directory whose files transformers cannot read (weights missing or cut off, a config that is
    not JSON) is an InputError naming the directory and the reason, not a traceback."""
    try:
        yield
    except InputError:
        raise
    except (OSError, ValueError, SafetensorError) as err:
        reason = str(err).strip().splitlines()
        raise InputError(
            f"{path}: its {what} cannot be loaded ({type(err).__name__}: {reason[0] if reason else 'no message'})"
        ) from err


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A model directory's tokenizer as `load_policy` gives it (the saved class, left padding, eos as pad
    when it has no pad), for code beside the trainer that has no model at hand (a rollout backend)."""
    path = Path(path)
    return _padded(_load_tokenizer(path), path)


def _ready_tokenizer(tokenizer: PreTrainedTokenizerBase, model: nn.Module, path: Path):
    """The tokenizer checked against the model, left padding, and eos as pad when it has no pad."""
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise InputError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model has only {n_embeddings} embeddings"
        )
    return _padded(tokenizer, path)


def _padded(tokenizer: PreTrainedTokenizerBase, path: Path) -> PreTrainedTokenizerBase:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"{path}: the tokenizer has neither a pad nor an eos token; batches need one")
        # Padding is always masked out (attention mask, loss mask), so reusing eos as pad changes no value.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _with_lora(model: PreTrainedModel, lora: LoraSettings | None) -> PreTrainedModel:
    """The model wrapped by `peft.get_peft_model` with a new adapter (seeded), or as it is."""
    if lora is None:
        return model
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng():  # every device's generator restored afterwards
        torch.manual_seed(lora.seed)
        return get_peft_model(model, config)


def save_policy(model: nn.Module, path: str | Path, state_dict: dict | None = None) -> None:
    """`save_pretrained` of a model, or of an adapter without its base's embedding layers: no command
    resizes the vocabulary, and PEFT's "auto" looks the base's config.json up to tell, on the hub for a
    base that is itself an adapter (a run on a LoRA final/), warning at each save."""
    extra = {"save_embedding_layers": False} if isinstance(model, PeftModel) else {}
    model.save_pretrained(path, state_dict=state_dict, **extra)


def _load_adapter(path: Path, *, lora: LoraSettings | None, dtype: str, device: str):
    """The base model named by the adapter's config (a local directory), the adapter merged into it, and
    the tokenizer saved with the adapter (else the base's); `lora` then adds a new adapter on top."""
    with named_if_unreadable(path, "LoRA adapter"):
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base and not Path(base).is_absolute() and not Path(base).is_dir():
        # recorded relative to where training ran (before base paths were made absolute): try the run's
        # directory, whose base_model/ a relative "runs/<app>/<name>/base_model" names
        near = path.parent / Path(base).name
        base = str(near) if (near / "config.json").is_file() else base
    if not base or not any((Path(base) / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(
            f"{path / 'adapter_config.json'}: its base model {base!r} is not a local model directory"
        )
    model, tokenizer = load_policy(base, dtype=dtype, device=device)  # an adapter's base may be an adapter
    with named_if_unreadable(path, "LoRA adapter"):
        model = PeftModel.from_pretrained(model, path, is_trainable=False).merge_and_unload()
    model.requires_grad_(True)  # loaded for inference (frozen); trained in full unless `lora` adds one
    # A new adapter records its base as this model's name: this adapter, not the base it was merged into,
    # so that the new adapter is loaded on the model it was trained on (the chain of adapters, merged).
    model.name_or_path = str(path.absolute())
    if (path / "tokenizer_config.json").is_file():  # the trainer's tokenizer, pad token included
        tokenizer = _ready_tokenizer(_load_tokenizer(path), model, path)
    return _with_lora(model, lora), tokenizer


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The directory's tokenizer, as saved.

    Trap (transformers 5): for model types on its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS list (qwen2,
    phi3, ...) `AutoTokenizer` ignores the saved `tokenizer_class` and rebuilds the model type's own
    tokenizer (Qwen2Tokenizer) from the vocabulary, which silently changes a custom tokenizer's encoding
    (the tiny character-level ones of core/tiny.py lose their spaces) and adds missing special tokens.
    A directory that declares the generic class holds a complete tokenizer.json: load that verbatim.
    """
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one with the model "
            "(`tokenizer.save_pretrained(dir)`)"
        )
    config_file = path / "tokenizer_config.json"
    with named_if_unreadable(path, "tokenizer"):
        declared = (
            json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
        )
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted from each sequence's first real token, (N, L) -> (N, L) long.

    The same as HF `generate` for a left-padded batch, so the training forward sees the positions the
    sampler saw. Padding gets position 0, as in transformers 5 (4.x used 1): padded positions are masked
    out as keys and their own outputs are never read, so the value there changes no result.
    """
    positions = attention_mask.long().cumsum(-1) - 1  # (N, L)
    return positions.masked_fill(attention_mask == 0, 0)  # (N, L)


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """The decoder stack (input ids -> last hidden states), the LM head and the final logit soft-cap
    of a causal LM, plain or PEFT-wrapped (LoRA layers live inside the base model's modules)."""
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embedding (lm_head); expected a causal LM")
    config = lm.config.get_text_config()
    for field in UNSUPPORTED_LOGIT_SCALES:
        value = getattr(config, field, None)
        if value is not None and value != 1.0:
            raise NotImplementedError(
                f"{type(lm).__name__} scales its logits after the LM head (config.{field}={value}); the "
                "chunked head of completion_logprobs does not apply it and would compute wrong logprobs"
            )
    return lm.get_decoder(), head, getattr(config, "final_logit_softcapping", None)


def _blocked(blocked_table: Tensor | None, index: Tensor | None, vocab_size: int) -> Tensor | None:
    """(C, V) bool, True on the ids a chunk's positions may not take: rows `index` (C,) of the negated
    expanded VocabMask table (K + 1, V); None without a mask. One (C, V) bool, used for both fills."""
    if blocked_table is None:
        return None
    if blocked_table.shape[1] != vocab_size:
        raise ValueError(
            f"the VocabMask covers {blocked_table.shape[1]} token ids but the LM head has {vocab_size}"
        )
    return blocked_table[index]  # (C, V)


def _chunk_stats(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
    blocked_table: Tensor | None = None,
    index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probability of each target and entropy of each next-token distribution:
    (C, H), (C,) -> (C,), (C,), in float32 at least (a float64 model stays float64, which the tests use).
    With a VocabMask (`blocked_table` (K + 1, V), the chunk's `index` (C,)), both over the allowed ids."""
    logits = head(hidden)  # (C, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (C, V)
    if softcap is not None:  # Gemma 2 and others: the model's own forward caps before the sampler sees them
        logits = torch.tanh(logits / softcap) * softcap  # (C, V)
    logits = logits / temperature  # (C, V)
    blocked = _blocked(blocked_table, index, logits.shape[-1])  # (C, V) | None
    if blocked is not None:
        logits = logits.masked_fill(blocked, -math.inf)  # (C, V)
    log_z = torch.logsumexp(logits, dim=-1)  # (C,)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z  # (C,)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    # H = log Z - sum_v p_v z_v, without keeping a separate (C, V) log-softmax alive; p_v z_v is 0, not
    # 0 * -inf = NaN, off the allowed ids.
    z = logits if blocked is None else logits.masked_fill(blocked, 0.0)  # (C, V)
    entropy = log_z - (torch.softmax(logits, dim=-1) * z).sum(-1)  # (C,)
    return logp, entropy


class _LinearHeadStats(torch.autograd.Function):
    """`_chunk_stats` for a plain linear head without a soft-cap, with a hand-written backward.

    Saves only the chunk's (C, H) input and (C,) results; the backward recomputes the (C, V) logits once and
    turns them, in place, into their gradient (for z = logits / temperature, p = softmax(z)):
        d logp_target / dz = onehot(target) - p,    d H / dz = -p * (log p + H)
    so one chunk needs two (C, V) buffers in the backward, where autograd's graph of the same formulas
    (checkpointed) keeps five or more. Matmuls run in the dtype the forward's head ran in (bf16 under
    autocast), the softmax algebra in float32 at least, as `_chunk_stats`.
    With a VocabMask (`blocked_table` (K + 1, V), the chunk's `index` (C,)) z is -inf off the allowed ids,
    so p = 0 there and the same formulas hold over the allowed ids; log p is set to 0 where p = 0 so that
    the gradient there is -0 * (...) = 0, not NaN. Only the small table and index are saved; the (C, V)
    bool of blocked ids is rebuilt in the backward, a quarter of one float32 buffer.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, with_entropy, blocked_table=None, index=None
    ):
        logits = torch.nn.functional.linear(hidden, weight, bias)  # (C, V), autocast's dtype
        ctx.compute_dtype = logits.dtype
        z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (C, V)
        del logits
        blocked = _blocked(blocked_table, index, z.shape[-1])  # (C, V) | None
        if blocked is not None:
            z.masked_fill_(blocked, -math.inf)
        log_z = torch.logsumexp(z, dim=-1)  # (C,)
        logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z  # (C,)
        if with_entropy:
            z.sub_(log_z.unsqueeze(-1))  # log p, in place
            p = z.exp()  # (C, V)
            if blocked is not None:
                z.masked_fill_(blocked, 0.0)  # 0 log 0 = 0 off the allowed ids
            entropy = -(p * z).sum(-1)  # (C,)
        else:
            entropy = torch.zeros_like(logp)  # (C,)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy, blocked_table, index)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, log_z, entropy, blocked_table, index = ctx.saved_tensors
        dtype = ctx.compute_dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, H)
            logits = torch.nn.functional.linear(hidden.to(dtype), w, None if bias is None else bias.to(dtype))
            logp = logits.to(torch.promote_types(dtype, torch.float32)).div_(ctx.temperature)  # (C, V)
            del logits
            blocked = _blocked(blocked_table, index, logp.shape[-1])  # (C, V) | None
            if blocked is not None:
                logp.masked_fill_(blocked, -math.inf)
            logp.sub_(log_z.unsqueeze(-1))  # log p (C, V)
            p = logp.exp()  # (C, V)
            if blocked is not None:
                logp.masked_fill_(blocked, 0.0)  # where p = 0: keeps the gradient there 0, not NaN
                del blocked
            grad = logp.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))  # g_H (log p + H)
            grad = grad.add_(grad_logp.unsqueeze(-1)).mul_(p).neg_()  # -p (g_lp + g_H (log p + H))
            del p
            grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1).to(grad.dtype))
            grad = grad.div_(ctx.temperature).to(dtype)  # (C, V) gradient of the logits
            grad_hidden = grad @ w  # (C, H)
            grad_weight = grad.t() @ hidden.to(dtype) if ctx.needs_input_grad[1] else None  # (V, H)
            grad_bias = grad.sum(0) if bias is not None and ctx.needs_input_grad[2] else None  # (V,)
        return (
            grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _has_sliding_window(backbone: nn.Module) -> bool:
    """Whether a layer attends through a sliding window (Mistral, Gemma2/3, Qwen2 with use_sliding_window):
    the shared-prompt cache holds full-attention layers, so such a model takes the plain forward (from
    the config alone: under FSDP every process must take the same path)."""
    config = getattr(backbone, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    window = getattr(config, "sliding_window", None)
    return window is not None and getattr(config, "use_sliding_window", True) is not False


def _completion_hidden(
    backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, t: int, share_prompts: bool
) -> Tensor:
    """Last hidden states (N, T, H) of the positions that predict the last T tokens of `input_ids` (N, L):
    position i predicts token i + 1, so positions L-T-1 .. L-2.

    Prompt sharing: the U distinct prompts (first P = L - T columns, ids and mask) run once, with a KV
    cache; each row's cache is its prompt's, gathered by `index_select` (whose backward sums the G rows'
    gradients into the shared prompt), and the completions run on top of it. The prompt's last position
    predicts the first completion token. A group of G completions thus costs P + G * T token positions
    instead of G * (P + T). Without a repeated prompt, when `share_prompts` is off, or in train mode with
    dropout (a shared prompt would give its G rows one dropout mask), one plain forward.
    """
    n, length = input_ids.shape
    p = length - t
    positions = position_ids_from_mask(attention_mask)  # (N, L)
    prompts = torch.cat([input_ids[:, :p], attention_mask[:, :p].to(input_ids.dtype)], 1)  # (N, 2P)
    unique, inverse = torch.unique(prompts, dim=0, return_inverse=True)  # (U, 2P), (N,)
    # On an FSDP model every forward is collective: the choice of path may not depend on the data.
    sharded = any(isinstance(module, FSDPModule) for module in backbone.modules())
    one_mask = backbone.training and has_dropout(backbone)  # every row must draw its own dropout
    if not share_prompts or one_mask or _has_sliding_window(backbone) or (len(unique) == n and not sharded):
        out = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
        )
        return out.last_hidden_state[:, p - 1 : length - 1]  # (N, T, H)
    first = torch.full((len(unique),), n, dtype=torch.long, device=inverse.device)  # (U,)
    first = first.scatter_reduce(
        0, inverse, torch.arange(n, device=inverse.device), "amin"
    )  # a row per prompt
    prompt_out = backbone(
        input_ids=input_ids[first, :p],
        attention_mask=attention_mask[first, :p],
        position_ids=positions[first, :p],
        use_cache=True,
    )
    cache = DynamicCache(
        [
            (layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse))
            for layer in prompt_out.cache.layers
        ]
    )
    out = backbone(
        input_ids=input_ids[:, p:],
        attention_mask=attention_mask,
        position_ids=positions[:, p:],
        cache=cache,
        use_cache=True,
    )
    last_prompt = prompt_out.last_hidden_state[:, p - 1 : p].index_select(0, inverse)  # (N, 1, H)
    return torch.cat([last_prompt, out.last_hidden_state[:, : t - 1]], 1)  # (N, T, H)


def completion_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_completion_tokens: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    vocab_mask: VocabMask | None = None,
    share_prompts: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Per-token logprobs of the last T = `num_completion_tokens` tokens of `input_ids` (N, L), and the
    entropies of the next-token distributions that produced them, both (N, T) float32 (float64 for a float64
    model; entropy None when `with_entropy=False`). Logits are divided by `temperature`, as the sampler did.
    With `vocab_mask` (index (N, T)) both are taken over each position's allowed ids: the softmax is
    renormalised over them (-inf elsewhere), as a constrained sampler drew the tokens.

    Memory: the backbone's activations (kept for its backward) and the (N*T, H) hidden states are held
    for the whole call; of the head, only one chunk's (C, V) logits and softmax exist at a time. Each chunk
    keeps just its (C, H) input and (C,) outputs for the backward, which recomputes one chunk's logits at a
    time: O(C * V) instead of O(N * T * V),
    with C = `rows_per_chunk(V, chunk_size)`. A plain `nn.Linear` head without a soft-cap takes
    `_LinearHeadStats` (two (C, V) buffers in the backward); any other head runs `_chunk_stats` under
    non-reentrant checkpointing.
    Works for a plain model and a PEFT-wrapped one (adapters included, or disabled by the caller).
    With `share_prompts`, rows whose first L - T tokens are equal (a GRPO group) run that prompt once
    (`_completion_hidden`, not in train mode with dropout); the results equal the per-row forward up to float
    rounding.
    """
    if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"input_ids and attention_mask must both be (N, L); got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    n, length = input_ids.shape
    t = num_completion_tokens
    if not 1 <= t < length:
        raise ValueError(f"num_completion_tokens must be in [1, L - 1] = [1, {length - 1}], got {t}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if vocab_mask is not None and tuple(vocab_mask.index.shape) != (n, t):
        raise ValueError(f"vocab_mask.index has shape {tuple(vocab_mask.index.shape)}, expected {(n, t)}")

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        chunk_size = rows_per_chunk(vocab, chunk_size)
    sharded = getattr(model, SHARDED_LOGPROBS_METHOD, None)  # set by core.sharding on an FSDP model
    compute = sharded if sharded is not None else partial(_completion_logprobs, model)
    return compute(
        input_ids, attention_mask, t, temperature, chunk_size, with_entropy, vocab_mask, share_prompts
    )


def rows_per_chunk(vocab_size: int, chunk_size: int) -> int:
    """Token positions per LM-head chunk: `chunk_size`, fewer where (C, V) logits would exceed
    MAX_CHUNK_LOGITS values.

    >>> rows_per_chunk(151_936, 1024), rows_per_chunk(2048, 1024), rows_per_chunk(10**9, 1024)
    (441, 1024, 1)
    """
    return min(chunk_size, max(1, MAX_CHUNK_LOGITS // vocab_size))


def _completion_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    t: int,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
    vocab_mask: VocabMask | None,
    share_prompts: bool,
) -> tuple[Tensor, Tensor | None]:
    """The computation of `completion_logprobs`, on validated arguments."""
    n, length = input_ids.shape
    backbone, head, softcap = _backbone_and_head(model)
    hidden = _completion_hidden(backbone, input_ids, attention_mask, t, share_prompts).reshape(n * t, -1)
    targets = input_ids[:, length - t :].reshape(n * t)  # (N*T,)
    blocked_table = index = None
    if vocab_mask is not None:
        table, index = vocab_mask.expanded()  # (K + 1, V), (N, T)
        blocked_table = (~table).to(hidden.device)  # (K + 1, V)
        index = index.reshape(n * t).to(hidden.device)  # (N*T,)

    logps, entropies = [], []
    for start in range(0, n * t, chunk_size):
        chunk = slice(start, start + chunk_size)
        index_chunk = None if index is None else index[chunk]  # (C,)
        args = (
            head,
            hidden[chunk],
            targets[chunk],
            temperature,
            softcap,
            with_entropy,
            blocked_table,
            index_chunk,
        )
        # Without autograd there is nothing to recompute, and checkpoint would only add overhead.
        if torch.is_grad_enabled() and softcap is None and type(head) is nn.Linear:
            logp, entropy = _LinearHeadStats.apply(
                hidden[chunk],
                head.weight,
                head.bias,
                targets[chunk],
                temperature,
                with_entropy,
                blocked_table,
                index_chunk,
            )  # (C,), (C,)
        elif torch.is_grad_enabled():
            logp, entropy = checkpoint(_chunk_stats, *args, use_reentrant=False)  # (C,), (C,)
        else:
            logp, entropy = _chunk_stats(*args)  # (C,), (C,)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).reshape(n, t)  # (N, T)
    return logp, (torch.cat(entropies).reshape(n, t) if with_entropy else None)  # (N, T)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the duration, then every module's own train/eval flag restored."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def has_dropout(model: nn.Module) -> bool:
    """Whether train mode changes the model's outputs: a dropout layer, or an attention dropout (HF models
    keep it as a float attribute of the attention module), above 0."""

    def rate(module: nn.Module) -> float:  # Bloom, Falcon, Persimmon keep an nn.Dropout there instead
        value = getattr(module, "attention_dropout", 0)
        return float(value) if isinstance(value, int | float) else 0.0

    return any(
        (isinstance(module, nn.Dropout) and module.p > 0) or rate(module) > 0 for module in model.modules()
    )


class ReferencePolicy:
    """The frozen reference policy pi_ref of the KL term `beta * KL(pi || pi_ref)`.

    Create it only when beta > 0: with beta = 0 the trainer loads no reference at all.
    - A PEFT (LoRA) policy serves as its own reference with the adapter disabled: no copy, no extra memory.
    - A plain policy is deep-copied once, here, before any update: eval mode, no gradients. That copy
      costs one more model's weights.
    Logprobs are taken under `torch.no_grad()` with dropout off, so they are deterministic.
    """

    def __init__(self, policy: nn.Module) -> None:
        self.shares_policy = isinstance(policy, PeftModel)
        if self.shares_policy:
            self.model = policy
        else:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        num_completion_tokens: int,
        *,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        vocab_mask: VocabMask | None = None,
    ) -> Tensor:
        """Reference per-token logprobs of the completions, (N, L) -> (N, T); see `completion_logprobs`."""
        args = (self.model, input_ids, attention_mask, num_completion_tokens)
        kwargs = dict(
            temperature=temperature, chunk_size=chunk_size, with_entropy=False, vocab_mask=vocab_mask
        )
        with eval_mode(self.model):
            if self.shares_policy:
                with self.model.disable_adapter():
                    return completion_logprobs(*args, **kwargs)[0]
            return completion_logprobs(*args, **kwargs)[0]
