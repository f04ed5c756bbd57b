"""`HFGenerateBackend.generate_groups`: several groups in one batched decode, each with its own seed."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache

from core import rollout
from core.policy import completion_logprobs
from core.rollout import HFGenerateBackend, SamplingSettings
from core.tiny import build_char_tokenizer


@pytest.fixture(scope="module")
def backend():
    tok = build_char_tokenizer("abcdefgh ")
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    return HFGenerateBackend(model, tok)


def test_each_group_follows_its_own_seed(backend):
    settings = SamplingSettings(max_new_tokens=12, min_new_tokens=12)
    prompts = ["abc", "abc", "hgf", "hgf"]  # two groups of two, same prompt lengths
    first = backend.generate_groups(prompts, settings, [11, 22], group_size=2)
    again = backend.generate_groups(prompts, settings, [11, 22], group_size=2)
    assert torch.equal(first.completion_ids, again.completion_ids)
    other = backend.generate_groups(prompts, settings, [11, 33], group_size=2)
    # The group with the same seed and prompt samples the same tokens whatever its neighbour does.
    assert torch.equal(other.completion_ids[:2], first.completion_ids[:2])
    assert not torch.equal(other.completion_ids[2:], first.completion_ids[2:])
    assert first.completion_mask.sum(1).tolist() == [12] * 4  # min_new_tokens forces the length
    assert first.prompts == prompts


def test_sampling_logp_equals_a_full_forward(backend, assert_sampled_within_top_k_and_top_p):
    """The recorded log-probs are the untruncated log_softmax(logits / T) of a full forward, while the
    tokens themselves were drawn after top-k and top-p."""
    settings = SamplingSettings(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.6)
    out = backend.generate_groups(["ab", "ab", "cdef", "cdef"], settings, [1, 2], group_size=2)
    logp, _ = completion_logprobs(
        backend.model, out.input_ids(), out.attention_mask(), out.completion_ids.shape[1], temperature=0.7
    )
    torch.testing.assert_close(logp * out.completion_mask, out.sampling_logp, atol=1e-5, rtol=0)
    # the full forward's distribution at every step (N, T, V), to check where each token was drawn from
    ids, mask = out.input_ids(), out.attention_mask()  # (N, P + T)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (N, P + T)
    with torch.no_grad():
        logits = backend.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    step_logp = torch.log_softmax(logits[:, out.prompt_ids.shape[1] - 1 : -1] / 0.7, dim=-1)  # (N, T, V)
    assert_sampled_within_top_k_and_top_p(step_logp, out.completion_ids, out.completion_mask, 5, 0.6)


def test_greedy_and_a_count_mismatch(backend):
    settings = SamplingSettings(max_new_tokens=4, greedy=True)
    a = backend.generate_groups(["ab", "ab"], settings, [1], group_size=2)
    b = backend.generate_groups(["ab", "ab"], settings, [2], group_size=2)
    assert torch.equal(a.completion_ids, b.completion_ids)
    with pytest.raises(ValueError, match="3 prompts for 1 seeds"):
        backend.generate_groups(["a", "b", "c"], settings, [1], group_size=2)


def test_a_group_that_mixes_prompts_gives_each_row_its_own_prompts_completion(backend):
    """Rows of one group with different prompts are each prefilled on their own prompt (no shared prefill):
    greedy, each row's completion is the one its prompt gets alone."""
    settings = SamplingSettings(max_new_tokens=6, greedy=True)
    mixed = backend.generate_groups(["ab", "hg"], settings, [0], group_size=2)
    alone = [backend.generate_groups([p], settings, [0], group_size=1).completions[0] for p in ("ab", "hg")]
    assert alone[0] != alone[1]
    assert mixed.completions == alone and mixed.prompts == ["ab", "hg"]


def test_static_cache_decodes_like_the_dynamic_cache(backend, monkeypatch):
    settings = SamplingSettings(max_new_tokens=10, temperature=1.2)
    prompts = ["ab", "ab", "cdefg", "cdefg"]  # left padding in the batch
    assert isinstance(rollout._static_cache(backend.model, 16), StaticCache)
    static = backend.generate_groups(prompts, settings, [3, 4], group_size=2)
    monkeypatch.setattr(rollout, "_static_cache", lambda model, length: None)  # the model's default cache
    dynamic = backend.generate_groups(prompts, settings, [3, 4], group_size=2)
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    torch.testing.assert_close(static.sampling_logp, dynamic.sampling_logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_one_prefill_per_group_decodes_like_one_per_row(backend, monkeypatch, cache):
    """A group's prompt is prefilled once and its KV cache repeated G times: the same tokens and sampling
    log-probs as prefilling every row (what a batch whose groups mix prompts does)."""
    if cache == "dynamic":
        monkeypatch.setattr(rollout, "_static_cache", lambda model, length: None)
    settings = SamplingSettings(max_new_tokens=10, temperature=1.2)
    prompts = ["ab", "ab", "ab", "cdefg", "cdefg", "cdefg"]  # left padding in the batch
    calls = []
    forward = backend.model.forward
    monkeypatch.setattr(
        backend.model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or forward(*a, **k)
    )
    shared = backend.generate_groups(prompts, settings, [3, 4], group_size=3)
    assert calls[0] == (2, 5)  # the prefill: one row per group
    rows = backend.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ids, mask = rollout.left_pad(rows, backend.tokenizer.pad_token_id)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    with torch.no_grad():
        tokens, logps, _ = backend._decode(ids, mask, settings, generators, 3, shared_prompts=False)
    assert torch.equal(shared.completion_ids[:, : tokens.shape[1]], tokens)
    torch.testing.assert_close(shared.sampling_logp[:, : logps.shape[1]], logps, atol=1e-5, rtol=0)


def test_sample_groups_draws_what_multinomial_draws_per_group():
    probs = torch.softmax(torch.randn(12, 50, generator=torch.Generator().manual_seed(0)) * 3, -1)  # (12, 50)
    probs[:, 7] = 0.0  # a token that may never be drawn
    seeds = [5, 6, 7]
    theirs = [torch.Generator().manual_seed(s) for s in seeds]
    ours = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(3):  # three tokens in a row: each group's stream advances the same way
        expected = torch.cat(
            [torch.multinomial(probs[g * 4 : (g + 1) * 4], 1, generator=gen) for g, gen in enumerate(theirs)]
        )
        assert torch.equal(rollout.sample_groups(probs, ours, 4), expected.squeeze(1))
    draws = rollout.sample_groups(probs[:1].expand(4000, 50), [torch.Generator().manual_seed(1)], 4000)
    frequencies = torch.bincount(draws, minlength=50) / 4000  # (50,): row 0's distribution
    assert frequencies[7] == 0
    torch.testing.assert_close(frequencies, probs[0], atol=0.03, rtol=0)


@pytest.mark.parametrize("path", ["generate_groups", "generate"])
@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("logit", [float("nan"), -float("inf")])
def test_rows_with_nothing_to_sample_are_an_error_not_tokens(backend, greedy, logit, path):
    def spoil(module, args, out):  # the second row's logits at the second step: NaN, or every token excluded
        spoil.calls += 1
        if spoil.calls == 2:
            out[1] = logit
        return out

    spoil.calls = 0
    hook = backend.model.lm_head.register_forward_hook(spoil)
    settings = SamplingSettings(max_new_tokens=3, min_new_tokens=3, greedy=greedy)
    try:
        with pytest.raises(FloatingPointError, match=r"no token could be sampled .* in rows \[1\]"):
            if path == "generate_groups":
                backend.generate_groups(["ab", "ab"], settings, [1], group_size=2)
            else:  # HF generate: greedy had picked pad tokens, sampling failed in torch.multinomial
                backend.generate(["ab", "ab"], settings, seed=1)
    finally:
        hook.remove()


@pytest.mark.parametrize("path", ["generate_groups", "generate"])
def test_a_row_that_has_ended_may_have_any_logits(backend, path):
    """Row 1 emits eos as its second token; its later logits (NaN here) are never sampled from: no error,
    eos kept. (Call 1 is the prefill, shared by the group in generate_groups; call 2 the first decode.)"""
    eos = backend.tokenizer.eos_token_id

    def spoil(module, args, out):
        spoil.calls += 1
        if spoil.calls == 2:
            out[1, -1] = -1e4
            out[1, -1, eos] = 1e4
        elif spoil.calls > 2:
            out[1] = float("nan")
        return out

    spoil.calls = 0
    hook = backend.model.lm_head.register_forward_hook(spoil)
    settings = SamplingSettings(max_new_tokens=4)
    try:
        if path == "generate_groups":
            out = backend.generate_groups(["ab", "ab"], settings, [1], group_size=2)
        else:
            out = backend.generate(["ab", "ab"], settings, seed=1)
    finally:
        hook.remove()
    assert out.completion_ids[1, 1] == eos and out.completion_mask[1].tolist()[:3] == [1, 1, 0]


@pytest.mark.skipif(rollout._cxx_compiler() is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_samples_what_the_eager_decode_samples(backend):
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = HFGenerateBackend(backend.model, backend.tokenizer, compile_decode=True)
    settings = SamplingSettings(max_new_tokens=10, temperature=0.8, top_k=6)
    widths = (["ab", "ab", "hgfe", "hgfe"], ["abcdefg", "abcdefg", "h", "h"], ["abc", "abc", "de", "de"])
    for index, prompts in enumerate(widths):  # three prompt widths: the third one reuses the dynamic graph
        eager = backend.generate_groups(prompts, settings, [3, 4], group_size=2)
        with torch._dynamo.config.patch(error_on_recompile=index == 2):
            ours = compiled.generate_groups(prompts, settings, [3, 4], group_size=2)
        assert torch.equal(ours.completion_ids, eager.completion_ids)
        torch.testing.assert_close(ours.sampling_logp, eager.sampling_logp, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode steps did go through torch.compile
    assert not counters["graph_break"]  # in one graph, none of it left to eager


def test_compiled_decode_without_a_compiler_says_so(backend, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        HFGenerateBackend(backend.model, backend.tokenizer, compile_decode=True)
