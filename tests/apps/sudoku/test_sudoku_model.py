"""Constrained decoding (exactly 3E well-formed triplet words, seeded) and the SFT batch and loss."""

import math
import random

import pytest
import torch

from apps.sudoku.model import (
    ConstrainedBackend,
    allowed_table,
    create_model_dir,
    masked_completion_logprobs,
    masked_lm_loss,
    sft,
    sft_batch,
)
from apps.sudoku.puzzles import generate_puzzles
from apps.sudoku.rewards import read_completion
from apps.sudoku.serialize import to_example
from core.policy import completion_logprobs, load_policy, position_ids_from_mask
from core.rollout import SamplingSettings


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = create_model_dir(
        tmp_path_factory.mktemp("m") / "model", hidden_size=32, num_layers=1, num_heads=2, seed=0
    )
    return load_policy(path)


@pytest.fixture(scope="module")
def puzzles():
    return generate_puzzles(4, 12, seed=0, givens=(4, 8))


def test_decoding_emits_exactly_3e_well_formed_words_then_eos(policy, puzzles):
    model, tokenizer = policy
    examples = [to_example(p, i, "t") for i, p in enumerate(puzzles)]
    backend = ConstrainedBackend(model, tokenizer, batch_size=5)
    settings = SamplingSettings(max_new_tokens=64)
    rollouts = backend.generate([ex["prompt"] for ex in examples], settings, seed=3)
    for i, ex in enumerate(examples):
        empty = ex["puzzle"].count(".")
        reading = read_completion(rollouts.completions[i], ex)
        assert len(rollouts.completions[i].split()) == 3 * empty
        assert reading.groups == empty and reading.malformed == 0
        assert int(rollouts.completion_mask[i].sum()) == 3 * empty + 1
        assert int(rollouts.completion_ids[i, 3 * empty]) == tokenizer.eos_token_id
    again = backend.generate([ex["prompt"] for ex in examples], settings, seed=3)
    assert again.completions == rollouts.completions
    other = backend.generate([ex["prompt"] for ex in examples], settings, seed=4)
    assert other.completions != rollouts.completions
    assert (rollouts.sampling_logp <= 0).all() and (
        rollouts.sampling_logp[rollouts.completion_mask == 0] == 0
    ).all()
    with pytest.raises(ValueError, match="max_new_tokens"):
        backend.generate([examples[0]["prompt"]], SamplingSettings(max_new_tokens=8), seed=0)


def test_masked_logprobs_renormalize_the_full_softmax_over_allowed_words(policy, puzzles):
    model, tokenizer = policy
    prompts = [to_example(p, i, "t")["prompt"] for i, p in enumerate(puzzles[:4])]
    rollouts = ConstrainedBackend(model, tokenizer).generate(
        prompts, SamplingSettings(max_new_tokens=64), seed=0
    )
    ids, mask, t = rollouts.input_ids(), rollouts.attention_mask(), rollouts.completion_ids.shape[1]
    with torch.no_grad():
        masked, entropy = masked_completion_logprobs(
            model, ids, mask, rollouts.completion_mask, 1.0, allowed_table(tokenizer, 4)
        )
        full, _ = completion_logprobs(model, ids, mask, t)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    on = rollouts.completion_mask.bool()
    # the sampler recorded the full-softmax log-probs: the core's function agrees with it
    torch.testing.assert_close(full[on], rollouts.sampling_logp[on], atol=1e-4, rtol=0)
    # row 0, slot 0 is a row word: its masked log-prob is the full one minus log(mass on r1..r4)
    p0 = logits[0, ids.shape[1] - t - 1].softmax(-1)
    rows = [tokenizer.convert_tokens_to_ids(f"r{i}") for i in range(1, 5)]
    assert float(masked[0, 0]) == pytest.approx(float(full[0, 0] - p0[rows].sum().log()), abs=1e-5)
    assert (masked[on] >= full[on] - 1e-6).all() and (entropy[on] <= math.log(4) + 1e-5).all()


def test_sft_batch_targets_and_masks(policy, puzzles):
    model, tokenizer = policy
    ids, mask, targets, allowed = sft_batch(puzzles[:4], "solver", random.Random(0), tokenizer)
    table = allowed_table(tokenizer, 4)
    for b, puzzle in enumerate(puzzles[:4]):
        empty = puzzle.grid.count(0)
        assert int((targets[b] != -100).sum()) == 3 * empty + 1
        picked = targets[b][targets[b] != -100]
        assert int(picked[-1]) == tokenizer.eos_token_id
        assert all(allowed[b, j, t] for j, t in enumerate(targets[b].tolist()) if t != -100)
        first = int((targets[b] != -100).nonzero()[0])
        assert torch.equal(allowed[b, first], table[0])  # the first completion word is a row
    with torch.no_grad():
        loss = masked_lm_loss(model, ids, mask, targets, allowed)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    # a plain loop over every target position gives the same mean
    terms = [
        -torch.log_softmax(logits[b, j].masked_fill(~allowed[b, j], -math.inf), -1)[t]
        for b in range(4)
        for j, t in enumerate(targets[b].tolist())
        if t != -100
    ]
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-4)


def test_sft_lowers_the_loss_and_changes_weights(tmp_path, puzzles):
    model, tokenizer = load_policy(
        create_model_dir(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2, seed=1)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = sft(model, tokenizer, puzzles, order="solver", steps=12, batch_size=12, lr=1e-2, seed=0)
    assert history[-1]["loss"] < history[0]["loss"] - 0.1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
