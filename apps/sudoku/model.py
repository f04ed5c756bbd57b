"""The Sudoku policy: a small GPT-style (Llama-config) Transformer as an HF model directory, built locally;
decoding constrained to the triplet structure; and supervised fine-tuning on ordered completions.

Structure (the same mask in SFT's loss and in sampling): completion slot t of a puzzle with E empty cells
may only be a row (t % 3 == 0), column (1) or value (2) token of the puzzle's size while t < 3E, then eos;
so every completion has exactly 3E triplet words. Which cells and values is the model's to learn.

GRPO's logprobs use the same mask: the backend's rollouts carry it as a `core.policy.VocabMask` (the 5-row
table of a size and each token's slot kind), which the core's `completion_logprobs` renormalises over.
Without it, after masked SFT only 48% of the unmasked softmax mass sat on allowed words, and GRPO's gradient
went mostly to words the sampler never emits.
Why Llama and not Qwen2: transformers 5 rebuilds the tokenizer of a `qwen2` directory as Qwen2Tokenizer,
which breaks a WordLevel vocabulary; a `llama` directory loads it verbatim.
Tests: `pytest tests/apps/sudoku/test_sudoku_model.py`.
"""

import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from apps.sudoku.puzzles import Puzzle
from apps.sudoku.serialize import (
    COLS,
    EOS,
    ROWS,
    SIZE_TOKENS,
    VALUES,
    VOCAB,
    build_tokenizer,
    completion_text,
    fill_order,
)
from core.data import InputError
from core.policy import VocabMask, load_policy, position_ids_from_mask
from core.rollout import Rollouts, SamplingSettings, left_pad
from core.tiny import build_tiny_model

ROW, COL, VALUE, END, AFTER = range(5)  # slot kinds of a completion token


def create_model_dir(
    path: str | Path, *, hidden_size: int, num_layers: int, num_heads: int, seed: int
) -> Path:
    """A randomly initialised Llama-config model and the Sudoku tokenizer saved to `path` (no download)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; pick a new directory")
    tokenizer = build_tokenizer()
    model = build_tiny_model(
        tokenizer,
        arch="llama",
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=512,  # a 9x9 prompt (<= 245 tokens) + the 244-token completion cap
        seed=seed,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, model_dir: str | Path) -> None:
    """Refuse a model whose tokenizer lacks Sudoku's words (one not built by `create_model_dir`): decoding
    would fail on the first missing word."""
    vocab = tokenizer.get_vocab()
    missing = [word for word in VOCAB if word not in vocab]
    if missing:
        raise InputError(
            f"{model_dir}: its tokenizer has no Sudoku cell tokens (missing {len(missing)} of {len(VOCAB)}: "
            f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}); expected a Sudoku model, e.g. "
            "the final/ of a `sudoku sft` or `sudoku train` run"
        )


def load_sudoku_policy(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) of a local model directory (core.policy.load_policy) built for Sudoku: a missing
    directory or another tokenizer is an error naming the directory."""
    model, tokenizer = load_policy(path, device=device)
    check_tokenizer(tokenizer, path)
    return model, tokenizer


def allowed_table(tokenizer: PreTrainedTokenizerBase, n: int) -> Tensor:
    """(5, V) bool: the words allowed in a ROW, COL, VALUE, END (eos) and AFTER (pad) slot of size n."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(5, len(tokenizer), dtype=torch.bool)  # (5, V)
    for kind, words in ((ROW, ROWS), (COL, COLS), (VALUE, VALUES)):
        table[kind, [vocab[w] for w in words[:n]]] = True
    table[END, tokenizer.eos_token_id] = True
    table[AFTER, tokenizer.pad_token_id] = True
    return table


def slot_kinds(t: int, empty: Tensor) -> Tensor:
    """Kind of completion slot t for rows with `empty` (N,) empty cells, (N,) long."""
    kinds = torch.full_like(empty, t % 3)  # (N,)
    kinds[t == 3 * empty] = END
    kinds[t > 3 * empty] = AFTER
    return kinds


def prompt_shape(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(n, E) of a prompt's token ids (without padding): the size token, then the givens' triplets, then <sol>."""
    size = {tokenizer.convert_tokens_to_ids(tok): n for n, tok in SIZE_TOKENS.items()}
    if not ids or ids[0] not in size or (len(ids) - 2) % 3:
        raise ValueError(f"not a Sudoku prompt: {tokenizer.decode(ids)!r}")
    n = size[ids[0]]
    return n, n * n - (len(ids) - 2) // 3


class ConstrainedBackend:
    """A `core.rollout.RolloutBackend` that samples exactly 3E triplet words then eos per prompt, with a
    KV cache and a seeded `torch.Generator` (the global RNG is untouched). The rollouts carry the structural
    mask as `vocab_mask` (index -1 after eos); `sampling_logp` is each token's log_softmax(logits /
    temperature) over its allowed words, which is what the trainer's policy computes under that mask."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.tables = {n: allowed_table(tokenizer, n) for n in SIZE_TOKENS}

    def update_weights(self, model: nn.Module) -> None:
        """Nothing to do: sampling runs on the trained model object."""

    def generate(self, prompts: list[str], settings: SamplingSettings, seed: int) -> Rollouts:
        rows = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id)
        return replace(self.generate_from_ids(ids, mask, settings, seed), prompts=list(prompts))

    def generate_from_ids(
        self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int
    ):
        if settings.top_p != 1.0 or settings.top_k or settings.stop_strings or settings.min_new_tokens:
            raise ValueError("ConstrainedBackend samples with temperature (or greedy) only")
        parts = []
        for k, start in enumerate(range(0, len(prompt_ids), self.batch_size)):
            chunk = slice(start, start + self.batch_size)
            parts.append(self._chunk(prompt_ids[chunk], prompt_mask[chunk], settings, seed * 7919 + k))
        return parts[0] if len(parts) == 1 else Rollouts.concat(parts)

    @torch.no_grad()
    def _chunk(
        self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int
    ) -> Rollouts:
        shapes = [
            prompt_shape(i[m.bool()].tolist(), self.tokenizer)
            for i, m in zip(prompt_ids, prompt_mask, strict=True)
        ]
        if len({n for n, _ in shapes}) != 1:
            raise ValueError("a batch must hold puzzles of one size")
        table = self.tables[shapes[0][0]]  # (5, V), on the CPU as the rollouts carry it
        device = next(
            self.model.parameters()
        ).device  # the model's; sampling and the rollouts stay on the CPU
        allowed = table.to(device)  # (5, V)
        empty = torch.tensor([e for _, e in shapes])  # (N,)
        steps = int(3 * empty.max()) + 1
        if steps > settings.max_new_tokens:
            raise ValueError(f"max_new_tokens={settings.max_new_tokens} < {steps} (3E + 1) for this puzzle")
        generator = torch.Generator().manual_seed(seed % 2**63)
        was_training = self.model.training
        self.model.eval()
        mask = prompt_mask.to(device, copy=True)  # (N, P + t)
        positions = position_ids_from_mask(mask)  # (N, P)
        out = self.model(
            input_ids=prompt_ids.to(device), attention_mask=mask, position_ids=positions, use_cache=True
        )
        next_position = positions[:, -1:] + 1  # (N, 1)
        tokens, logps, kinds = [], [], []
        for t in range(steps):
            logits = out.logits[:, -1].float() / settings.temperature  # (N, V)
            kinds.append(slot_kinds(t, empty))  # (N,)
            masked = logits.masked_fill(~allowed[kinds[-1].to(device)], -math.inf)  # (N, V)
            if settings.greedy:
                token = masked.argmax(-1)  # (N,)
            else:  # drawn on the CPU from the seeded generator: the same tokens on any device
                probs = masked.softmax(-1).cpu()  # (N, V)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)  # (N,)
            logps.append(masked.log_softmax(-1).gather(1, token[:, None]).squeeze(1).cpu())  # (N,)
            tokens.append(token.cpu())
            if t + 1 < steps:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (N, P + t + 1)
                out = self.model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=next_position,
                    cache=out.cache,
                    use_cache=True,
                )
                next_position = next_position + 1
        self.model.train(was_training)
        completion = torch.stack(tokens, 1)  # (N, T)
        keep = torch.arange(steps)[None, :] <= 3 * empty[:, None]  # (N, T): through eos
        completion = completion.masked_fill(~keep, self.tokenizer.pad_token_id)
        pad = self.tokenizer.pad_token_id
        return Rollouts(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion,
            completion_mask=keep.long(),
            loss_mask=keep.float(),
            sampling_logp=torch.stack(logps, 1) * keep,  # (N, T)
            sampling_logp_exact=False,
            finish_reason=["stop"] * len(completion),
            prompts=[
                self.tokenizer.decode(i[m.bool()].tolist())
                for i, m in zip(prompt_ids, prompt_mask, strict=True)
            ],
            completions=[
                self.tokenizer.decode(row[: e * 3].tolist())
                for row, e in zip(completion, empty.tolist(), strict=True)
            ],
            num_turns=[1] * len(completion),
            pad_token_id=pad,
            vocab_mask=VocabMask(table, torch.stack(kinds, 1).masked_fill(~keep, -1)),  # (5, V), (N, T)
        )


# ---------------------------------------------------------------------------------------------------------
# Supervised fine-tuning on ordered completions
# ---------------------------------------------------------------------------------------------------------


def sft_batch(
    puzzles: list[Puzzle], order: str, rng: random.Random, tokenizer: PreTrainedTokenizerBase
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, targets, allowed) for prompt + ordered completion + eos, right-padded:
    input (B, L); targets (B, L-1) the next token or -100 outside completions; allowed (B, L-1, V) the
    structural mask of each target slot (all True where there is no target)."""
    from apps.sudoku.serialize import prompt_text  # local: keeps the module's import list short

    rows, starts = [], []
    for puzzle in puzzles:
        prompt = tokenizer(prompt_text(puzzle), add_special_tokens=False)["input_ids"]
        cells = fill_order(puzzle, order, rng)
        completion = tokenizer(completion_text(puzzle, cells) + " " + EOS, add_special_tokens=False)[
            "input_ids"
        ]
        rows.append(prompt + completion)
        starts.append(len(prompt))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # (B, L)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
    targets = torch.full((len(rows), width - 1), -100)  # (B, L-1)
    kinds = torch.full((len(rows), width - 1), AFTER)  # (B, L-1)
    for b, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        targets[b, start - 1 : len(row) - 1] = ids[b, start : len(row)]
        slots = torch.arange(len(row) - start)  # completion slot of each target
        kinds[b, start - 1 : len(row) - 1] = torch.where(slots == len(row) - start - 1, END, slots % 3)
    table = allowed_table(tokenizer, puzzles[0].n)  # (5, V)
    allowed = table[kinds] | (targets == -100)[..., None]  # (B, L-1, V)
    return ids, mask, targets, allowed


def masked_lm_loss(
    model: nn.Module, ids: Tensor, mask: Tensor, targets: Tensor, allowed: Tensor | None
) -> Tensor:
    """Mean cross-entropy of the completion targets under the structurally masked softmax (plain softmax
    when `allowed` is None)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, :-1].float()  # (B, L-1, V)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)  # (B, L-1, V)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


def sft(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    puzzles: list[Puzzle],
    *,
    order: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    structure_mask: bool = True,
    log: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """`steps` AdamW updates on batches of `puzzles` (seeded epochs) with completions in `order` (`random`
    draws a fresh order each time a puzzle is seen), the loss under the structural mask if
    `structure_mask`, else plain cross-entropy; linear warm-up over 5% of the steps, cosine decay.
    Returns (and passes to `log(step, metrics)`) the loss of each step."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    device = next(model.parameters()).device
    order_pool: list[int] = []
    history = []
    for step in range(1, steps + 1):
        while len(order_pool) < batch_size:  # fewer puzzles than batch_size: several epochs in one batch
            order_pool += torch.randperm(len(puzzles), generator=generator).tolist()
        picks, order_pool = order_pool[:batch_size], order_pool[batch_size:]
        start = time.perf_counter()
        batch = sft_batch([puzzles[i] for i in picks], order, rng, tokenizer)
        ids, mask, targets, allowed = (t.to(device) for t in batch)
        loss = masked_lm_loss(model, ids, mask, targets, allowed if structure_mask else None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"step": step, "loss": float(loss.detach()), "lr": schedule.get_last_lr()[0]}
        metrics["step_time"] = time.perf_counter() - start
        history.append(metrics)
        if log is not None:
            log(step, metrics)
    model.eval()
    return history
