"""Constrained decoding (exactly 3E well-formed triplet words, seeded), the core's logprobs under its mask,
and the SFT batch and loss."""

import copy
import math
import random

import pytest
import torch

from apps.sudoku.model import (
    ConstrainedBackend,
    allowed_table,
    create_model_dir,
    masked_lm_loss,
    sft,
    sft_batch,
    slot_kinds,
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


def plain_masked_logprobs(model, tokenizer, rollouts, temperature: float):
    """The reference, as the app computed it before the core had a vocabulary mask: the model's full
    (N, L, V) logits, the structural mask rebuilt from each row's E, a masked log_softmax, gather, entropy."""
    ids, mask, t = rollouts.input_ids(), rollouts.attention_mask(), rollouts.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, -t - 1 : -1].to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    empty = (rollouts.completion_mask.sum(1) - 1) // 3  # (N,)
    kinds = torch.stack([slot_kinds(k, empty) for k in range(t)], dim=1)  # (N, T)
    allowed = allowed_table(tokenizer, 4)[kinds]  # (N, T, V)
    logp_all = logits.masked_fill(~allowed, -math.inf).log_softmax(-1)  # (N, T, V)
    logp = logp_all.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)  # (N, T)
    probs = logp_all.exp()  # (N, T, V)
    entropy = -(probs * logp_all.masked_fill(probs == 0, 0.0)).sum(-1)  # (N, T)
    return logp, entropy, kinds


def test_core_masked_logprobs_equal_a_plain_masked_softmax(policy, puzzles):
    """The rollouts' VocabMask through the core's chunked `completion_logprobs` (hand-written backward)
    gives the values and gradients of a plain masked log_softmax over the full logits."""
    model, tokenizer = policy
    prompts = [to_example(p, i, "t")["prompt"] for i, p in enumerate(puzzles[:4])]
    temperature = 0.8
    rollouts = ConstrainedBackend(model, tokenizer).generate(
        prompts, SamplingSettings(max_new_tokens=64, temperature=temperature), seed=0
    )
    on = rollouts.completion_mask.bool()
    _, _, kinds = plain_masked_logprobs(model, tokenizer, rollouts, temperature)
    assert torch.equal(rollouts.vocab_mask.index, kinds.masked_fill(~on, -1))
    # float64, so that rounding (~1e-7 relative in float32) cannot hide a wrong gradient
    model64 = copy.deepcopy(model).double()
    weights = torch.randn(on.shape, generator=torch.Generator().manual_seed(0)) * on  # (N, T)

    def grads(logp, entropy):
        model64.zero_grad()
        ((logp * weights).sum() + 0.3 * (entropy * on).sum()).backward()
        return {name: p.grad.clone() for name, p in model64.named_parameters()}

    ids, mask, t = rollouts.input_ids(), rollouts.attention_mask(), rollouts.completion_ids.shape[1]
    core = completion_logprobs(
        model64, ids, mask, t, temperature=temperature, chunk_size=7, vocab_mask=rollouts.vocab_mask
    )
    plain = plain_masked_logprobs(model64, tokenizer, rollouts, temperature)[:2]
    for got, expected in zip(core, plain, strict=True):
        torch.testing.assert_close(got[on], expected[on], atol=1e-10, rtol=0)
    core_grads, plain_grads = grads(*core), grads(*plain)
    for name, expected in plain_grads.items():
        torch.testing.assert_close(core_grads[name], expected, atol=1e-10, rtol=0, msg=name)
    assert plain_grads["model.embed_tokens.weight"].abs().sum() > 0  # the tied embedding and LM head
    # the sampler recorded the masked log-probs: the core's function agrees with it
    torch.testing.assert_close(core[0][on].float(), rollouts.sampling_logp[on], atol=1e-4, rtol=0)
    # row 0, slot 0 is a row word: its masked log-prob is the full one minus log(mass on r1..r4)
    with torch.no_grad():
        full, _ = completion_logprobs(model64, ids, mask, t, temperature=temperature)
        logits = model64(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    p0 = (logits[0, ids.shape[1] - t - 1] / temperature).softmax(-1)
    rows = [tokenizer.convert_tokens_to_ids(f"r{i}") for i in range(1, 5)]
    assert float(core[0][0, 0].detach()) == pytest.approx(float(full[0, 0] - p0[rows].sum().log()), abs=1e-10)
    assert (core[1][on] <= math.log(4) + 1e-9).all()


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


def test_sft_batches_are_full_with_fewer_puzzles_than_the_batch_size(policy, puzzles, monkeypatch):
    import apps.sudoku.model as model_module

    model, tokenizer = copy.deepcopy(policy[0]), policy[1]
    sizes = []

    def counting_batch(batch, *args):
        sizes.append(len(batch))
        return sft_batch(batch, *args)

    monkeypatch.setattr(model_module, "sft_batch", counting_batch)
    sft(model, tokenizer, puzzles[:10], order="random", steps=3, batch_size=16, lr=1e-3, seed=0)
    assert sizes == [16, 16, 16]


def test_each_chunk_of_a_generation_draws_its_own_samples(policy, puzzles):
    """One prompt twice in chunks of one: each chunk's generator is seeded apart, so the two samples differ
    (one seed for every chunk gave a batch of copies)."""
    model, tokenizer = policy
    prompt = to_example(puzzles[0], 0, "t")["prompt"]
    backend = ConstrainedBackend(model, tokenizer, batch_size=1)
    settings = SamplingSettings(max_new_tokens=64, temperature=1.0)
    first, second = backend.generate([prompt, prompt], settings, seed=0).completions
    assert first != second


def test_one_sft_step_already_updates_the_weights(policy, puzzles):
    """The warm-up's first step has a learning rate above zero: sft(steps=1) trains."""
    model, tokenizer = copy.deepcopy(policy[0]), policy[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = sft(model, tokenizer, puzzles, order="solver", steps=1, batch_size=4, lr=1e-2, seed=0)
    assert len(history) == 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sft_sees_every_puzzle_once_per_epoch(policy, puzzles, monkeypatch):
    """12 puzzles in batches of 4 for 3 steps: one epoch, each puzzle exactly once."""
    import apps.sudoku.model as model_module

    model, tokenizer = copy.deepcopy(policy[0]), policy[1]
    seen = []

    def recording_batch(batch, *args):
        seen.extend(next(i for i, p in enumerate(puzzles) if p is q) for q in batch)
        return sft_batch(batch, *args)

    monkeypatch.setattr(model_module, "sft_batch", recording_batch)
    sft(model, tokenizer, puzzles, order="solver", steps=3, batch_size=4, lr=1e-3, seed=0)
    assert len(puzzles) == 12 and sorted(seen) == list(range(12))


def test_sft_learning_rate_warms_up_then_follows_a_cosine_to_zero(policy, puzzles):
    """20 steps: warm-up over max(1, 20 // 20) = 1 step, then lr * 0.5 * (1 + cos(pi * s / 20)); the lr
    logged at step k is the one the next update uses (s = k)."""
    model, tokenizer = copy.deepcopy(policy[0]), policy[1]
    lr, steps = 1e-3, 20
    history = sft(model, tokenizer, puzzles[:1], order="solver", steps=steps, batch_size=1, lr=lr, seed=0)
    expected = [lr * 0.5 * (1 + math.cos(math.pi * k / steps)) for k in range(1, steps + 1)]
    assert [h["lr"] for h in history] == pytest.approx(expected)
    assert history[0]["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 20)))
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_sft_and_sampling_leave_the_model_in_the_mode_they_should(policy, puzzles):
    """SFT ends in eval mode; the sampler puts the model back in the mode it found it in."""
    model, tokenizer = copy.deepcopy(policy[0]), policy[1]
    sft(model, tokenizer, puzzles[:2], order="solver", steps=1, batch_size=2, lr=1e-3, seed=0)
    assert not model.training
    model.train()
    prompt = to_example(puzzles[0], 0, "t")["prompt"]
    ConstrainedBackend(model, tokenizer).generate([prompt], SamplingSettings(max_new_tokens=64), seed=0)
    assert model.training
