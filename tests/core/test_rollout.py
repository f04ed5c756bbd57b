"""Tests of core/rollout.py, core/lora_merge.py, core/multi_turn.py and core/vllm_backend.py on a tiny
random Qwen2 and a character-level tokenizer, both built here.

Run: `pytest tests/core/test_rollout.py` (the vLLM test is marked `gpu` and needs vllm + CUDA).
"""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from core.lora_merge import merged_state_dict
from core.multi_turn import multi_turn_rollouts
from core.policy import VocabMask, completion_logprobs
from core.rollout import (
    HFGenerateBackend,
    Rollouts,
    SamplingSettings,
    completion_ends,
    derive_seed,
    left_pad,
)
from core.vllm_backend import VLLMBackend

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 =+-.,?\n"
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
PROMPTS = ["a", "hello wor", "x = 1+2", "what is 7?\n", "zz", "the end."]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level: every character of ALPHABET is one token; pad, eos and unk are distinct."""
    vocab = {PAD: 0, EOS: 1, UNK: 2, **{c: i + 3 for i, c in enumerate(ALPHABET)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def build_model(
    vocab_size: int, seed: int = 0, token_bias: dict[int, float] | None = None
) -> Qwen2ForCausalLM:
    """A tiny random Qwen2 (global RNG untouched); `token_bias` adds a fixed logit bias per token id
    through an LM head with a bias, e.g. to make eos likely."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    if token_bias:
        head = nn.Linear(config.hidden_size, vocab_size, bias=True)
        head.weight = model.lm_head.weight
        with torch.no_grad():
            head.bias.zero_()
            for token, bias in token_bias.items():
                head.bias[token] = bias
        model.lm_head = head
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def eos_model(tok) -> Qwen2ForCausalLM:
    """eos about as likely as a 1-in-10 event per step: completions of varied lengths."""
    return build_model(len(tok), token_bias={tok.eos_token_id: 2.0})


def step_logprobs(model: nn.Module, r: Rollouts, temperature: float) -> Tensor:
    """Full forward of prompt + completion: log_softmax(logits / temperature) over the vocabulary at each
    completion position (N, T, V)."""
    ids, mask = r.input_ids(), r.attention_mask()  # (N, P + T)
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)  # (N, P + T)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    p = r.prompt_ids.shape[1]
    return torch.log_softmax(logits[:, p - 1 : -1] / temperature, dim=-1)  # position i predicts token i + 1


def reference_logp(model: nn.Module, r: Rollouts, temperature: float) -> tuple[Tensor, Tensor]:
    """log_softmax(logits / temperature) of a full forward at the completion tokens (N, T), 0 on padding,
    and the argmax token at each completion position (N, T)."""
    step_logp = step_logprobs(model, r, temperature)  # (N, T, V)
    logp = step_logp.gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return logp * r.completion_mask, step_logp.argmax(-1)


def kept_tokens(r: Rollouts, i: int) -> list[int]:
    return r.completion_ids[i, : int(r.completion_mask[i].sum())].tolist()


# ---------------------------------------------------------------------------------------------------
# SamplingSettings
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": 0.0}, "temperature"),
        ({"max_new_tokens": 4, "temperature": float("inf")}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 4, "top_k": -1}, "top_k"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens"),
        ({"max_new_tokens": 4, "stop_strings": ("",)}, "stop_strings"),
        ({"max_new_tokens": 4, "min_new_tokens": 2, "stop_strings": ("x",)}, "min_new_tokens"),
    ],
)
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**kwargs)


def test_settings_accept_a_list_of_stop_strings():
    assert SamplingSettings(max_new_tokens=4, stop_strings=["a", "b"]).stop_strings == ("a", "b")
    assert SamplingSettings(max_new_tokens=4, stop_strings="</a>").stop_strings == ("</a>",)  # not < / a >


def test_one_string_is_not_taken_as_a_list_of_prompts(tok, eos_model):
    backend = HFGenerateBackend(eos_model, tok)
    settings = SamplingSettings(max_new_tokens=2)
    with pytest.raises(TypeError, match="got one string"):
        backend.generate("hello", settings, seed=0)
    with pytest.raises(TypeError, match="got one string"):
        backend.generate_groups("ab", settings, [0], group_size=2)
    with pytest.raises(TypeError, match="got one string"):
        multi_turn_rollouts(backend, "ab", [{"id": 0}, {"id": 1}], ToyEnv(1), settings, seed=0, max_turns=1)


def test_derive_seed_reads_the_value_not_the_type():
    assert derive_seed(np.int64(3), 1) == derive_seed(torch.tensor(3), 1) == derive_seed(3, np.int32(1))
    assert derive_seed(3, 1) != derive_seed(3, 2)


# ---------------------------------------------------------------------------------------------------
# Masks, padding, finish reasons
# ---------------------------------------------------------------------------------------------------


def test_completion_ends_on_hand_made_rows(tok):
    a, b, x, y = (tok.convert_tokens_to_ids(c) for c in "abxy")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = [[a, b, eos, a, pad], [a, b, a, b, a], [eos, pad, pad, pad, pad], [a, x, y, b, eos], [x, y, a]]
    assert completion_ends(rows[:3], [eos], (), tok) == ([3, 5, 1], ["stop", "length", "stop"])
    # "xy" is completed by token 3 of row 3, before its eos; row 4 completes it at token 2.
    assert completion_ends(rows, [eos], ("xy", "zz"), tok) == (
        [3, 5, 1, 3, 2],
        ["stop", "length", "stop", "stop", "stop"],
    )
    # A stop string after the eos does not count: the row ends at its eos.
    assert completion_ends([[a, eos, x, y]], [eos], ("xy",), tok) == ([2], ["stop"])
    # the first token may complete one already
    assert completion_ends([[x, a, b], [a, x, b]], [eos], ("x",), tok) == ([1, 2], ["stop", "stop"])


def test_shapes_padding_and_masks(tok, eos_model):
    backend = HFGenerateBackend(eos_model, tok)
    settings = SamplingSettings(max_new_tokens=8)
    r = backend.generate(PROMPTS, settings, seed=3)

    n, longest = len(PROMPTS), max(len(p) for p in PROMPTS)
    assert r.prompt_ids.shape == (n, longest) and r.completion_ids.shape[0] == n
    assert r.completion_ids.shape[1] <= 8 and len(r) == n
    assert r.prompts == PROMPTS and r.num_turns == [1] * n
    for i, prompt in enumerate(PROMPTS):
        # prompts: left padding with the pad id, mask 0 there, the prompt's characters after it
        pad_len = longest - len(prompt)
        assert r.prompt_ids[i, :pad_len].tolist() == [tok.pad_token_id] * pad_len
        assert r.prompt_mask[i].tolist() == [0] * pad_len + [1] * len(prompt)
        assert tok.decode(r.prompt_ids[i, pad_len:].tolist()) == prompt
        # completions: mask 1 then 0, pad ids after the end, eos only as the last kept token
        length = int(r.completion_mask[i].sum())
        assert r.completion_mask[i].tolist() == [1] * length + [0] * (r.completion_ids.shape[1] - length)
        assert r.completion_ids[i, length:].eq(tok.pad_token_id).all()
        kept = kept_tokens(r, i)
        assert tok.eos_token_id not in kept[:-1]
        if r.finish_reason[i] == "stop":
            assert kept[-1] == tok.eos_token_id
        else:
            assert r.finish_reason[i] == "length" and length == 8 and kept[-1] != tok.eos_token_id
        assert r.completions[i] == tok.decode(kept, skip_special_tokens=True)
        assert "<" not in r.completions[i]  # no special token text
    assert set(r.finish_reason) == {"stop", "length"}  # this seed gives both (checked by hand)
    assert torch.equal(r.loss_mask, r.completion_mask.float())
    assert r.sampling_logp[r.completion_mask == 0].eq(0).all()
    assert r.sampling_logp_exact is False
    assert r.num_completion_tokens == int(r.completion_mask.sum())
    assert torch.equal(r.input_ids(), torch.cat([r.prompt_ids, r.completion_ids], 1))
    assert torch.equal(r.attention_mask(), torch.cat([r.prompt_mask, r.completion_mask], 1))


def test_an_empty_prompt_is_refused(tok, eos_model):
    backend = HFGenerateBackend(eos_model, tok)
    with pytest.raises(ValueError, match=r"empty prompt: rows \[1\]"):
        backend.generate(["ab", ""], SamplingSettings(max_new_tokens=2), seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        HFGenerateBackend(eos_model, tok, batch_size=0)


@pytest.mark.parametrize("path", ["generate", "generate_groups"])
def test_generation_stops_at_every_eos_of_the_models_generation_config(tok, path):
    """An instruct model's end of turn is often an eos of generation_config.json only (Llama-3's <|eot_id|>):
    rows ran on to max_new_tokens past it, and the text after it was scored. Token `turn_end` is likely at
    every step and listed there (with an id beyond the vocabulary, ignored); min_new_tokens suppresses it too."""
    turn_end = tok.convert_tokens_to_ids("b")
    model = build_model(len(tok), token_bias={turn_end: 8.0})
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end, 10**6]
    backend = HFGenerateBackend(model, tok)
    assert backend.eos_ids == (tok.eos_token_id, turn_end)

    def sample(settings: SamplingSettings) -> Rollouts:
        if path == "generate":
            return backend.generate(PROMPTS, settings, seed=0)
        return backend.generate_groups(PROMPTS, settings, list(range(len(PROMPTS))), group_size=1)

    r = sample(SamplingSettings(max_new_tokens=6))
    assert r.completion_mask.sum(1).tolist() == [1] * len(PROMPTS) and r.finish_reason == ["stop"] * len(
        PROMPTS
    )
    assert r.completion_ids[:, 0].eq(turn_end).all()
    forced = sample(SamplingSettings(max_new_tokens=8, min_new_tokens=3))
    assert forced.completion_mask.sum(1).tolist() == [4] * len(PROMPTS)
    assert (
        not forced.completion_ids[:, :3].eq(turn_end).any() and forced.completion_ids[:, 3].eq(turn_end).all()
    )
    expected, _ = reference_logp(model, forced, 1.0)
    torch.testing.assert_close(forced.sampling_logp, expected, atol=1e-4, rtol=0)
    model.generation_config.eos_token_id = tok.eos_token_id  # the tokenizer's alone: the token is text
    assert HFGenerateBackend(model, tok).eos_ids == (tok.eos_token_id,)


def test_generate_from_ids_decodes_the_prompts_without_their_padding(tok, eos_model):
    rows = tok(PROMPTS[:3], add_special_tokens=False)["input_ids"]
    ids, mask = left_pad(rows, tok.pad_token_id)
    assert (mask == 0).any()  # the batch is padded
    r = HFGenerateBackend(eos_model, tok).generate_from_ids(ids, mask, SamplingSettings(max_new_tokens=2), 0)
    assert r.prompts == PROMPTS[:3]


@pytest.mark.parametrize("path", ["generate", "generate_groups"])
def test_min_new_tokens_forces_the_length(tok, path):
    model = build_model(len(tok), token_bias={tok.eos_token_id: 8.0})  # eos almost surely at every step
    backend = HFGenerateBackend(model, tok)

    def sample(settings: SamplingSettings) -> Rollouts:
        if path == "generate":
            return backend.generate(PROMPTS, settings, seed=0)
        return backend.generate_groups(PROMPTS, settings, list(range(len(PROMPTS))), group_size=1)

    forced = sample(SamplingSettings(max_new_tokens=6, min_new_tokens=6))
    assert forced.completion_ids.shape[1] == 6 and forced.completion_mask.eq(1).all()
    assert forced.finish_reason == ["length"] * len(PROMPTS)
    assert not forced.completion_ids.eq(tok.eos_token_id).any()

    # eos suppressed for 3 tokens, then taken at once; the log-probs are those before the suppression
    r = sample(SamplingSettings(max_new_tokens=8, min_new_tokens=3))
    assert r.completion_mask.sum(1).tolist() == [4] * len(PROMPTS)
    assert r.completion_ids[:, 3].eq(tok.eos_token_id).all() and r.finish_reason == ["stop"] * len(PROMPTS)
    expected, _ = reference_logp(model, r, 1.0)
    torch.testing.assert_close(r.sampling_logp, expected, atol=1e-4, rtol=0)


def test_stop_strings_cut_the_completion(tok):
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    model = build_model(len(tok), token_bias={a: 3.0, b: 3.0, tok.eos_token_id: -10.0})  # no eos
    backend = HFGenerateBackend(model, tok)
    r = backend.generate(PROMPTS, SamplingSettings(max_new_tokens=12, stop_strings=("ab",)), seed=0)
    assert r.finish_reason.count("stop") >= 2 and "length" in r.finish_reason  # this seed (checked by hand)
    for i, text in enumerate(r.completions):
        length = int(r.completion_mask[i].sum())
        if r.finish_reason[i] == "stop":
            assert text.endswith("ab") and "ab" not in text[:-1]
        else:
            assert "ab" not in text and length == 12
        assert r.completion_ids[i, length:].eq(tok.pad_token_id).all()


def test_a_stop_string_that_begins_in_the_prompt_does_not_stop_the_completion(tok):
    newline = tok.convert_tokens_to_ids("\n")
    model = build_model(len(tok), token_bias={newline: 8.0, tok.eos_token_id: -10.0})
    settings = SamplingSettings(max_new_tokens=6, stop_strings=("\n\n",))
    r = HFGenerateBackend(model, tok).generate(["what is 7?\n"] * 3, settings, seed=0)
    assert r.completions == ["\n\n"] * 3 and r.finish_reason == ["stop"] * 3
    assert r.completion_mask.sum(-1).tolist() == [2, 2, 2]
    assert r.completion_ids[:, :2].eq(newline).all()  # sampled tokens, not the pad after an early stop


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_both_generation_paths_run_under_the_backends_autocast(tok, eos_model, dtype):
    seen = []
    hook = eos_model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        backend = HFGenerateBackend(eos_model, tok, autocast_dtype=dtype)
        backend.generate(PROMPTS[:2], SamplingSettings(max_new_tokens=3), seed=0)
        backend.generate_groups(PROMPTS[:2], SamplingSettings(max_new_tokens=3), [0, 1], 1)
    finally:
        hook.remove()
    assert seen and set(seen) == {dtype is not None}


# ---------------------------------------------------------------------------------------------------
# Seeds and sampling log-probs
# ---------------------------------------------------------------------------------------------------


def test_generation_is_a_pure_function_of_the_seed(tok, eos_model):
    backend = HFGenerateBackend(eos_model, tok)
    settings = SamplingSettings(max_new_tokens=8, temperature=1.3)
    rng_before = torch.get_rng_state()
    first = backend.generate(PROMPTS, settings, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    torch.rand(7)  # move the global RNG: no effect on generation
    again = backend.generate(PROMPTS, settings, seed=5)
    other = backend.generate(PROMPTS, settings, seed=6)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.sampling_logp, again.sampling_logp) and first.completions == again.completions
    assert first.completions != other.completions


def test_each_chunk_of_a_batch_size_is_drawn_with_its_own_seed(tok, eos_model):
    """With batch_size, chunk k is sampled with derive_seed(seed, k): two equal prompts in chunks of one get
    different completions, each the one its chunk's seed gives alone."""
    backend = HFGenerateBackend(eos_model, tok, batch_size=1)
    settings = SamplingSettings(max_new_tokens=8, min_new_tokens=8)
    r = backend.generate(["ab", "ab"], settings, seed=0)
    assert r.completions[0] != r.completions[1]
    ids, mask = r.prompt_ids[:1], r.prompt_mask[:1]
    for k in range(2):
        alone = backend._generate_chunk(ids, mask, settings, derive_seed(0, k))
        assert torch.equal(r.completion_ids[k], alone.completion_ids[0])
    # batch_size None is one chunk, k = 0: its seed is derive_seed(seed, 0) too
    assert (
        HFGenerateBackend(eos_model, tok).generate(["ab"], settings, seed=0).completions == r.completions[:1]
    )


@pytest.mark.parametrize("batch_size", [None, 4])
def test_sampling_logp_equals_a_full_forward(
    tok, eos_model, batch_size, assert_sampled_within_top_k_and_top_p
):
    """log_softmax(logits / T) at the sampled tokens, before top-k / top-p truncation; with batch_size
    the chunks are re-padded by concat, which must keep prompts and completions aligned."""
    backend = HFGenerateBackend(eos_model, tok, batch_size=batch_size)
    settings = SamplingSettings(max_new_tokens=10, temperature=0.7, top_k=5, top_p=0.6)
    r = backend.generate(PROMPTS, settings, seed=11)
    expected, _ = reference_logp(eos_model, r, 0.7)
    torch.testing.assert_close(r.sampling_logp, expected, atol=1e-4, rtol=0)
    assert r.prompts == PROMPTS
    # yet the tokens were drawn after truncation: each within the top 5, and inside the 0.6 nucleus
    step_logp = step_logprobs(eos_model, r, 0.7)  # (N, T, V)
    assert_sampled_within_top_k_and_top_p(step_logp, r.completion_ids, r.completion_mask, top_k=5, top_p=0.6)


def test_greedy_takes_the_argmax(tok, eos_model):
    backend = HFGenerateBackend(eos_model, tok)
    settings = SamplingSettings(max_new_tokens=8, greedy=True)
    r = backend.generate(PROMPTS, settings, seed=0)
    assert torch.equal(r.completion_ids, backend.generate(PROMPTS, settings, seed=1).completion_ids)
    _, argmax = reference_logp(eos_model, r, 1.0)
    assert torch.equal(r.completion_ids[r.completion_mask == 1], argmax[r.completion_mask == 1])


def test_model_defaults_do_not_leak_and_modes_are_restored(tok, eos_model):
    """A hub generation_config (here: every token but one suppressed) must not change the sampling;
    the model's config and train/eval flags come back as they were."""
    polluted = copy.deepcopy(eos_model)
    polluted.generation_config.suppress_tokens = list(range(1, len(tok)))
    polluted.generation_config.repetition_penalty = 5.0
    saved_config = polluted.generation_config
    polluted.train()
    polluted.model.layers[0].eval()
    settings = SamplingSettings(max_new_tokens=8)
    r = HFGenerateBackend(polluted, tok).generate(PROMPTS, settings, seed=2)
    clean = HFGenerateBackend(eos_model, tok).generate(PROMPTS, settings, seed=2)
    assert torch.equal(r.completion_ids, clean.completion_ids)
    assert polluted.generation_config is saved_config
    assert polluted.training and polluted.model.layers[1].training and not polluted.model.layers[0].training


def test_peft_model_generates_with_its_adapter(tok, eos_model):
    model = get_peft_model(copy.deepcopy(eos_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    r = HFGenerateBackend(model, tok).generate(PROMPTS, SamplingSettings(max_new_tokens=8), seed=4)
    expected, _ = reference_logp(model, r, 1.0)
    torch.testing.assert_close(r.sampling_logp, expected, atol=1e-4, rtol=0)


def with_random_adapter(base: nn.Module, config: LoraConfig) -> nn.Module:
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return model


def test_lora_generates_with_its_adapter_merged_and_leaves_the_weights_bitwise(tok, eos_model):
    model = with_random_adapter(eos_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter_calls = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda *args: adapter_calls.append(1))
    plain = copy.deepcopy(eos_model)
    plain.load_state_dict(merged_state_dict(model))
    settings = SamplingSettings(max_new_tokens=8, min_new_tokens=8)
    prompts = ["ab", "ab", "hello", "hello"]
    ours = HFGenerateBackend(model, tok).generate_groups(prompts, settings, [3, 4], group_size=2)
    merged = HFGenerateBackend(plain, tok).generate_groups(prompts, settings, [3, 4], group_size=2)
    # The same tokens as the model with the adapter merged for good, and no adapter matmul ran.
    assert torch.equal(ours.completion_ids, merged.completion_ids)
    torch.testing.assert_close(ours.sampling_logp, merged.sampling_logp, atol=1e-6, rtol=0)
    ours = HFGenerateBackend(model, tok).generate(PROMPTS, settings, seed=4)  # HF generate: the same
    assert torch.equal(
        ours.completion_ids, HFGenerateBackend(plain, tok).generate(PROMPTS, settings, 4).completion_ids
    )
    assert adapter_calls == []
    # Afterwards the adapter is live again and every weight is bitwise what it was.
    assert all(not m.merged_adapters for m in model.modules() if hasattr(m, "merged_adapters"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(input_ids=torch.tensor([[5, 6]]))
    assert adapter_calls


def test_lora_stays_unmerged_in_bf16_with_adapters_disabled_and_is_restored_after_an_error(tok, eos_model):
    settings = SamplingSettings(max_new_tokens=4)
    calls = []

    def count_adapter_calls(model: nn.Module) -> None:
        for name, module in model.named_modules():
            if name.endswith("lora_A.default"):
                module.register_forward_hook(lambda *args: calls.append(1))

    # bf16 weights: W + d rounded to bf16 would lose the small updates, so the adapter runs as is
    bf16 = with_random_adapter(eos_model, LoraConfig(r=4, target_modules=["q_proj"])).to(torch.bfloat16)
    count_adapter_calls(bf16)
    HFGenerateBackend(bf16, tok).generate_groups(["ab", "ab"], settings, [1], group_size=2)
    assert calls

    model = with_random_adapter(eos_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = HFGenerateBackend(eos_model, tok).generate_groups(["ab", "ab"], settings, [1], group_size=2)
    with model.disable_adapter():  # generation with the adapter off is the base model's
        off = HFGenerateBackend(model, tok).generate_groups(["ab", "ab"], settings, [1], group_size=2)
    assert torch.equal(off.completion_ids, plain.completion_ids)

    def fail(*args):
        raise RuntimeError("in the middle of decoding")

    hook = model.base_model.model.lm_head.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="in the middle of decoding"):
        HFGenerateBackend(model, tok).generate_groups(["ab", "ab"], settings, [1], group_size=2)
    hook.remove()
    assert all(not m.merged_adapters for m in model.modules() if hasattr(m, "merged_adapters"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lora_merges_every_active_adapter(tok, eos_model):
    """Two adapters active at once on the same layers: the merged weight carries both deltas, so the
    sampling log-probs are those of the model running both adapters."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = with_random_adapter(eos_model, config)
    model.add_adapter("two", config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.two" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model.base_model.set_adapter(["default", "two"])
    r = HFGenerateBackend(model, tok).generate_groups(
        ["ab", "ab"], SamplingSettings(max_new_tokens=6), [1], 2
    )
    expected, _ = reference_logp(model, r, 1.0)
    torch.testing.assert_close(r.sampling_logp, expected, atol=1e-5, rtol=0)


def test_lora_on_a_tied_head_is_not_merged(tok):
    base = build_model(len(tok), seed=3)
    base.lm_head.weight = base.model.embed_tokens.weight  # tied: a merge would change the embedding too
    model = with_random_adapter(base, LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    r = HFGenerateBackend(model, tok).generate_groups(
        ["ab", "ab"], SamplingSettings(max_new_tokens=6), [1], 2
    )
    expected, _ = reference_logp(model, r, 1.0)
    torch.testing.assert_close(r.sampling_logp, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# select / concat
# ---------------------------------------------------------------------------------------------------


def hand_made(prompt_rows: list[list[int]], completion_rows: list[list[int]], tag: str) -> Rollouts:
    """Rollouts with pad 0; prompt tokens and completion tokens as given, sampling logp = -token / 10."""
    width, t = max(map(len, prompt_rows)), max(map(len, completion_rows))
    pids = torch.tensor([[0] * (width - len(p)) + p for p in prompt_rows])
    cids = torch.tensor([c + [0] * (t - len(c)) for c in completion_rows])
    cmask = torch.tensor([[1] * len(c) + [0] * (t - len(c)) for c in completion_rows])
    return Rollouts(
        prompt_ids=pids,
        prompt_mask=(pids != 0).long(),
        completion_ids=cids,
        completion_mask=cmask,
        loss_mask=cmask.float(),
        sampling_logp=-cids.float() / 10,
        sampling_logp_exact=False,
        finish_reason=["stop"] * len(prompt_rows),
        prompts=[f"{tag}{i}" for i in range(len(prompt_rows))],
        completions=[f"{tag}c{i}" for i in range(len(prompt_rows))],
        num_turns=[1] * len(prompt_rows),
        pad_token_id=0,
    )


def test_select_and_concat_keep_rows_aligned():
    first = hand_made([[5], [6, 7]], [[8, 9, 10], [11]], "a")
    second = hand_made([[1, 2, 3]], [[4, 4, 4, 4]], "b")
    both = Rollouts.concat([first, second])
    assert both.prompt_ids.tolist() == [[0, 0, 5], [0, 6, 7], [1, 2, 3]]
    assert both.prompt_mask.tolist() == [[0, 0, 1], [0, 1, 1], [1, 1, 1]]
    assert both.completion_ids.tolist() == [[8, 9, 10, 0], [11, 0, 0, 0], [4, 4, 4, 4]]
    assert both.completion_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(both.sampling_logp, -both.completion_ids.float() / 10)
    assert both.prompts == ["a0", "a1", "b0"] and both.completions == ["ac0", "ac1", "bc0"]

    picked = both.select([2, 0])
    assert picked.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 5]]
    assert picked.completion_ids.tolist() == [[4, 4, 4, 4], [8, 9, 10, 0]]
    assert picked.loss_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert picked.prompts == ["b0", "a0"] and picked.completions == ["bc0", "ac0"]

    # multi-turn transcripts follow their rows; a single-turn part's rows read as one model turn each
    assert both.turns is None
    turns = [[{"role": "model", "text": "b?"}, {"role": "observation", "text": "ok"}]]
    mixed = Rollouts.concat([first, Rollouts(**{**vars(second), "turns": turns})])
    assert mixed.turns == [[{"role": "model", "text": "ac0"}], [{"role": "model", "text": "ac1"}], *turns]
    assert mixed.select([2, 0]).turns == [*turns, [{"role": "model", "text": "ac0"}]]
    with pytest.raises(ValueError, match="Rollouts.turns has 1 entries, expected 2"):
        Rollouts(**{**vars(first), "turns": turns})

    no_logp = Rollouts.concat([first, Rollouts(**{**vars(second), "sampling_logp": None})])
    assert no_logp.sampling_logp is None and no_logp.sampling_logp_exact is False
    with pytest.raises(ValueError, match="completion_mask"):
        Rollouts(**{**vars(first), "completion_mask": first.completion_mask[:, :2]})


def test_concat_is_exact_only_when_every_part_is():
    """One part with inexact sampling log-probs makes the whole concat inexact."""
    first = hand_made([[5]], [[8, 9]], "a")
    exact = Rollouts(**{**vars(hand_made([[6]], [[7]], "b")), "sampling_logp_exact": True})
    assert Rollouts.concat([exact, exact]).sampling_logp_exact is True
    assert Rollouts.concat([exact, first]).sampling_logp_exact is False
    assert Rollouts.concat([first, exact]).sampling_logp_exact is False
    # no sampling log-probs at all is not exact either, whatever the parts say
    no_logp = Rollouts(**{**vars(exact), "sampling_logp": None})
    assert Rollouts.concat([exact, no_logp]).sampling_logp_exact is False


def test_rollouts_refuse_misaligned_rows_and_concat_refuses_mixed_pad_ids():
    first = hand_made([[5], [6, 7]], [[8, 9, 10], [11]], "a")
    with pytest.raises(ValueError, match="1 prompt rows but 2 completion rows"):
        Rollouts(**{**vars(first), "prompt_ids": first.prompt_ids[:1], "prompt_mask": first.prompt_mask[:1]})
    with pytest.raises(ValueError, match=r"different pad ids \[0, 3\]"):
        Rollouts.concat([first, Rollouts(**{**vars(first), "pad_token_id": 3})])


def test_select_keeps_the_vocab_mask_with_its_rows():
    first = hand_made([[5], [6, 7], [4]], [[8, 9, 10], [11], [9, 9]], "a")
    table = torch.zeros(2, 12, dtype=torch.bool)  # (K, V)
    table[0, [8, 9, 10]] = True
    table[1, 11] = True
    index = torch.tensor([[0, 0, 0], [1, -1, -1], [0, -1, -1]])  # row 2's second token is unconstrained
    r = Rollouts(**{**vars(first), "vocab_mask": VocabMask(table, index)})
    picked = r.select([1, 0, 2])
    assert picked.vocab_mask.index.tolist() == [[1, -1, -1], [0, 0, 0], [0, -1, -1]]
    assert torch.equal(picked.vocab_mask.table, table)


# ---------------------------------------------------------------------------------------------------
# Multi-turn
# ---------------------------------------------------------------------------------------------------


class ToyEnv:
    """Appends "=ok\\n" after every turn; the episode ends after `turns_to_done` turns (None: never)."""

    def __init__(self, turns_to_done: int | None):
        self.turns_to_done = turns_to_done

    def reset(self, prompt: str, example: dict) -> dict:
        return {"turns": 0, "seen": [], "id": example["id"]}

    def step(self, state: dict, turn_text: str) -> tuple[str | None, bool]:
        state["turns"] += 1
        state["seen"].append(turn_text)
        return "=ok\n", state["turns"] == self.turns_to_done


def zero_runs(row: list[float]) -> list[tuple[int, int]]:
    """(start, end) of each run of zeros in `row`."""
    runs, start = [], None
    for j, v in enumerate([*row, 1.0]):
        if v == 0 and start is None:
            start = j
        elif v != 0 and start is not None:
            runs.append((start, j))
            start = None
    return runs


def test_multi_turn_masks_observations(tok, eos_model):
    backend = HFGenerateBackend(eos_model, tok)
    settings = SamplingSettings(max_new_tokens=6, temperature=0.9)
    examples = [{"id": i} for i in range(len(PROMPTS))]
    r = multi_turn_rollouts(backend, PROMPTS, examples, ToyEnv(2), settings, seed=7, max_turns=4)

    assert r.num_turns == [2] * len(PROMPTS) and set(r.finish_reason) <= {"stop", "length"}
    assert r.prompts == PROMPTS
    for i in range(len(PROMPTS)):
        length = int(r.completion_mask[i].sum())
        loss = r.loss_mask[i, :length].tolist()
        runs = zero_runs(loss)
        # exactly two observations, 4 tokens each, the second one at the very end
        assert [e - s for s, e in runs] == [4, 4] and runs[1][1] == length
        for s, e in runs:
            assert tok.decode(r.completion_ids[i, s:e].tolist()) == "=ok\n"
        assert r.completions[i].count("=ok\n") == 2 and r.completions[i].endswith("=ok\n")
        assert [t["role"] for t in r.turns[i]] == ["model", "observation"] * 2
        assert r.turns[i][1]["text"] == r.turns[i][3]["text"] == "=ok\n"
        assert "".join(t["text"] for t in r.turns[i]) == r.completions[i]
        assert r.sampling_logp[i, :length][torch.tensor(loss) == 0].eq(0).all()
    assert r.loss_mask[r.completion_mask == 0].eq(0).all()

    # Turn 2 was sampled from prompt + turn 1 + observation: the full forward over the transcript agrees.
    expected, _ = reference_logp(eos_model, r, 0.9)
    torch.testing.assert_close(r.sampling_logp, expected * r.loss_mask, atol=1e-4, rtol=0)
    again = multi_turn_rollouts(backend, PROMPTS, examples, ToyEnv(2), settings, seed=7, max_turns=4)
    assert torch.equal(again.completion_ids, r.completion_ids)


def test_multi_turn_turn_cap(tok, eos_model):
    backend = HFGenerateBackend(eos_model, tok)
    examples = [{"id": i} for i in range(3)]
    r = multi_turn_rollouts(
        backend, PROMPTS[:3], examples, ToyEnv(None), SamplingSettings(max_new_tokens=4), seed=0, max_turns=3
    )
    assert r.num_turns == [3, 3, 3] and r.finish_reason == ["turn_cap"] * 3
    assert all(c.count("=ok\n") == 3 for c in r.completions)
    with pytest.raises(ValueError, match="max_turns"):
        multi_turn_rollouts(
            backend, PROMPTS[:3], examples, ToyEnv(1), SamplingSettings(max_new_tokens=4), 0, 0
        )


def test_multi_turn_refuses_more_prompts_than_examples(tok, eos_model):
    """Each prompt needs its example: a count mismatch either way is refused with both counts."""
    backend = HFGenerateBackend(eos_model, tok)
    settings = SamplingSettings(max_new_tokens=2)
    with pytest.raises(ValueError, match=r"^got 2 prompts but 1 examples$"):
        multi_turn_rollouts(backend, ["ab", "cd"], [{"id": 0}], ToyEnv(1), settings, seed=0, max_turns=1)
    with pytest.raises(ValueError, match=r"^got 1 prompts but 2 examples$"):
        multi_turn_rollouts(backend, ["ab"], [{"id": 0}, {"id": 1}], ToyEnv(1), settings, seed=0, max_turns=1)


def test_multi_turn_ends_an_episode_whose_next_turn_would_not_fit_the_context(tok):
    model = build_model(len(tok))
    backend = HFGenerateBackend(model, tok)
    settings = SamplingSettings(max_new_tokens=8, min_new_tokens=8)  # 8 tokens + "=ok\n" (4) per turn
    # "ab" (2 tokens) + 12 after turn 1 = 14; turn 2 could reach 22 and turn 3 34: the next turn's whole
    # max_new_tokens must fit, not only what the context holds already
    for context, turns in ((24, 2), (22, 2), (21, 1), (20, 1)):  # 22: turn 2 fits exactly; 21: one short
        model.config.max_position_embeddings = context  # what the check reads (rotary runs longer)
        r = multi_turn_rollouts(backend, ["ab"], [{"id": 0}], ToyEnv(None), settings, seed=0, max_turns=5)
        assert r.num_turns == [turns] and r.finish_reason == ["context"]
        # at 24, turn 2 ends at 22 and its observation is cut to the 2 tokens left
        assert r.prompt_ids.shape[1] + r.completion_ids.shape[1] == min(2 + turns * 12, context)


def test_multi_turn_plays_no_turn_when_the_first_would_not_fit_the_context(tok):
    model = build_model(len(tok))
    model.config.max_position_embeddings = 9  # "ab" (2) + max_new_tokens 8 = 10: one token too many
    backend = HFGenerateBackend(model, tok)
    settings = SamplingSettings(max_new_tokens=8)
    r = multi_turn_rollouts(backend, ["ab"], [{"id": 0}], ToyEnv(None), settings, seed=0, max_turns=3)
    assert r.num_turns == [0] and r.finish_reason == ["context"] and r.completions == [""]
    assert r.turns == [[]] and r.completion_mask.sum() == 0
    assert r.completion_ids.tolist() == [[tok.pad_token_id]] and r.loss_mask.tolist() == [[0.0]]


def test_a_backend_without_max_context_is_held_to_its_models_context(tok):
    """A backend of one's own that has a `.model` but no `max_context` keeps the model's limit."""
    model = build_model(len(tok))
    model.config.max_position_embeddings = 9  # "ab" (2) + max_new_tokens 8 = 10: one token too many
    backend = RecordingBackend(HFGenerateBackend(model, tok))
    del backend.max_context
    settings = SamplingSettings(max_new_tokens=8)
    r = multi_turn_rollouts(backend, ["ab"], [{"id": 0}], ToyEnv(None), settings, seed=0, max_turns=3)
    assert r.num_turns == [0] and r.finish_reason == ["context"]


class RecordingBackend:
    """Wraps a backend: records each turn's seed; reports sampling_logp exact (as a backend recomputing a
    full forward would) except on the turns in `inexact_turns`."""

    def __init__(self, inner: HFGenerateBackend, inexact_turns: tuple[int, ...] = ()):
        self.inner, self.inexact_turns = inner, inexact_turns
        self.tokenizer, self.model, self.max_context = inner.tokenizer, inner.model, inner.max_context
        self.seeds: list[int] = []

    def generate_from_ids(self, prompt_ids, prompt_mask, settings, seed):
        out = self.inner.generate_from_ids(prompt_ids, prompt_mask, settings, seed)
        out.sampling_logp_exact = len(self.seeds) not in self.inexact_turns
        self.seeds.append(seed)
        return out


def test_multi_turn_draws_each_turn_with_its_own_seed(tok, eos_model):
    backend = RecordingBackend(HFGenerateBackend(eos_model, tok))
    settings = SamplingSettings(max_new_tokens=4)
    r = multi_turn_rollouts(
        backend, PROMPTS[:2], [{"id": 0}, {"id": 1}], ToyEnv(2), settings, seed=11, max_turns=3
    )
    assert r.num_turns == [2, 2]
    assert backend.seeds == [derive_seed(11, 0), derive_seed(11, 1)] and len(set(backend.seeds)) == 2


@pytest.mark.parametrize(("inexact_turns", "exact"), [((), True), ((0,), False), ((1,), False)])
def test_an_inexact_turn_makes_the_episodes_sampling_logp_inexact(tok, eos_model, inexact_turns, exact):
    backend = RecordingBackend(HFGenerateBackend(eos_model, tok), inexact_turns)
    settings = SamplingSettings(max_new_tokens=4)
    r = multi_turn_rollouts(backend, ["ab"], [{"id": 0}], ToyEnv(2), settings, seed=0, max_turns=2)
    assert r.num_turns == [2] and r.sampling_logp is not None
    assert r.sampling_logp_exact is exact


class NoLogpBackend(RecordingBackend):
    """A backend that reports no sampling log-probs (as vLLM with top-k), yet calls each turn exact."""

    def generate_from_ids(self, prompt_ids, prompt_mask, settings, seed):
        out = super().generate_from_ids(prompt_ids, prompt_mask, settings, seed)
        out.sampling_logp = None
        return out


def test_an_episode_without_sampling_logp_is_not_exact(tok, eos_model):
    backend = NoLogpBackend(HFGenerateBackend(eos_model, tok))
    settings = SamplingSettings(max_new_tokens=4)
    r = multi_turn_rollouts(backend, ["ab"], [{"id": 0}], ToyEnv(2), settings, seed=0, max_turns=2)
    assert r.num_turns == [2] and r.sampling_logp is None and r.sampling_logp_exact is False


class LongObservationEnv(ToyEnv):
    """Answers every turn with "=ok\n" five times (20 tokens)."""

    def step(self, state: dict, turn_text: str) -> tuple[str | None, bool]:
        return "=ok\n" * 5, False


def test_multi_turn_cuts_an_observation_at_the_context_and_ends_the_episode(tok):
    model = build_model(len(tok))
    model.config.max_position_embeddings = 14  # "ab" (2) + one turn of 8 leaves room for 4 tokens
    backend = HFGenerateBackend(model, tok)
    settings = SamplingSettings(max_new_tokens=8, min_new_tokens=8)
    r = multi_turn_rollouts(backend, ["ab"], [{"id": 0}], LongObservationEnv(None), settings, 0, max_turns=3)
    assert r.num_turns == [1] and r.finish_reason == ["context"]
    assert r.prompt_ids.shape[1] + r.completion_ids.shape[1] == 14
    assert r.loss_mask[0].tolist() == [1.0] * 8 + [0.0] * 4
    assert r.turns[0][1] == {"role": "observation", "text": "=ok\n"} and r.completions[0].endswith("=ok\n")


def test_an_episode_the_environment_ended_at_the_context_keeps_its_reason(tok):
    """The turn fills the context exactly and the environment ends the episode: no room for its
    observation, so none is added (no empty entry), and the finish reason is the turn's, not "context"."""
    model = build_model(len(tok))
    model.config.max_position_embeddings = 10  # "ab" (2) + 8 tokens
    backend = HFGenerateBackend(model, tok)
    settings = SamplingSettings(max_new_tokens=8, min_new_tokens=8)
    r = multi_turn_rollouts(backend, ["ab"], [{"id": 0}], ToyEnv(1), settings, 0, max_turns=3)
    assert r.finish_reason == ["length"] and r.num_turns == [1]
    assert [t["role"] for t in r.turns[0]] == ["model"] and r.loss_mask[0].tolist() == [1.0] * 8


# ---------------------------------------------------------------------------------------------------
# Constrained decoding (VocabConstraint -> Rollouts.vocab_mask)
# ---------------------------------------------------------------------------------------------------


class AlternatingConstraint:
    """A `VocabConstraint`: a digit at even steps, a letter a-e at odd ones, any token from step 6;
    rows whose prompt has an odd number of tokens are never constrained (the prompt is read)."""

    def __init__(self, tok):
        self.table = torch.zeros(2, len(tok), dtype=torch.bool)  # (K, V)
        self.table[0, [tok.convert_tokens_to_ids(c) for c in "0123456789"]] = True
        self.table[1, [tok.convert_tokens_to_ids(c) for c in "abcde"]] = True

    def expected(self, prompt_mask: Tensor, t: int) -> Tensor:
        """(N,) row of step t."""
        odd = prompt_mask.sum(1) % 2 == 1  # (N,)
        return torch.full_like(odd, t % 2 if t < 6 else -1, dtype=torch.long).masked_fill(odd, -1)

    def rows(self, prompt_ids: Tensor, prompt_mask: Tensor, generated: Tensor) -> Tensor:
        return self.expected(prompt_mask, generated.shape[1])


@pytest.mark.parametrize("path", ["generate", "generate_groups"])
def test_a_vocab_constraint_shapes_sampling_and_is_carried_as_a_mask(tok, eos_model, path):
    constraint = AlternatingConstraint(tok)
    backend = HFGenerateBackend(eos_model, tok, batch_size=4, constraint=constraint)
    settings = SamplingSettings(max_new_tokens=10, temperature=0.8)
    prompts = [p for p in PROMPTS for _ in range(2)]
    if path == "generate":
        r = backend.generate(prompts, settings, seed=0)
    else:
        r = backend.generate_groups(prompts, settings, list(range(len(PROMPTS))), group_size=2)
    assert isinstance(r.vocab_mask, VocabMask)
    steps = torch.stack([constraint.expected(r.prompt_mask, t) for t in range(r.completion_ids.shape[1])], 1)
    expected = steps.masked_fill(r.completion_mask == 0, -1)  # (N, T)
    constrained = expected >= 0
    assert torch.equal(r.vocab_mask.index >= 0, constrained)
    # concat merges the chunks' tables (rows may be renumbered): compare the allowed sets themselves
    assert torch.equal(
        r.vocab_mask.table[r.vocab_mask.index[constrained]], constraint.table[expected[constrained]]
    )
    assert constrained.sum() > 10 and (r.completion_mask.bool() & ~constrained).sum() > 10  # both kinds
    allowed = constraint.table[expected.clamp(min=0), r.completion_ids]  # (N, T)
    assert allowed[constrained].all()  # Rollouts checks this too
    # the sampler's log-probs are over the allowed ids: the trainer's masked logprobs reproduce them
    with torch.no_grad():
        logp, _ = completion_logprobs(
            eos_model,
            r.input_ids(),
            r.attention_mask(),
            r.completion_ids.shape[1],
            temperature=0.8,
            vocab_mask=r.vocab_mask,
        )
    torch.testing.assert_close(logp * r.completion_mask, r.sampling_logp, atol=1e-4, rtol=0)
    unmasked, _ = reference_logp(eos_model, r, 0.8)
    assert (r.sampling_logp[constrained] > unmasked[constrained] + 1e-3).all()  # renormalised


class RecordingConstraint:
    """A `VocabConstraint` that allows every id and records the tokens generated so far at each step."""

    def __init__(self, tok):
        self.table = torch.ones(1, len(tok), dtype=torch.bool)  # (K, V)
        self.generated: list[Tensor] = []

    def rows(self, prompt_ids: Tensor, prompt_mask: Tensor, generated: Tensor) -> Tensor:
        self.generated.append(generated.clone())
        return torch.full((generated.shape[0],), -1, dtype=torch.long, device=generated.device)


@pytest.mark.parametrize("path", ["generate", "generate_groups"])
def test_a_vocab_constraint_sees_pad_after_a_finished_rows_eos(tok, eos_model, path):
    """`VocabConstraint.rows` is given the tokens generated so far with pad after a row's eos, on both
    generation paths."""
    constraint = RecordingConstraint(tok)
    backend = HFGenerateBackend(eos_model, tok, constraint=constraint)
    settings = SamplingSettings(max_new_tokens=10)
    if path == "generate":
        backend.generate(PROMPTS, settings, seed=0)
    else:
        backend.generate_groups(PROMPTS, settings, list(range(len(PROMPTS))), group_size=1)
    after_eos = 0
    for generated in constraint.generated:  # (N, t)
        ended = (generated == tok.eos_token_id).long().cumsum(1) > 0  # (N, t): at or after the first eos
        after = ended & (generated != tok.eos_token_id)
        after_eos += int(after.sum())
        assert generated[after].eq(tok.pad_token_id).all()
    assert after_eos > 0  # some row ended before the last step


def test_multi_turn_refuses_a_vocab_constraint(tok, eos_model):
    backend = HFGenerateBackend(eos_model, tok, constraint=AlternatingConstraint(tok))
    with pytest.raises(NotImplementedError, match="vocabulary mask"):
        multi_turn_rollouts(
            backend, ["ab"], [{"id": 0}], ToyEnv(2), SamplingSettings(max_new_tokens=3), seed=0, max_turns=2
        )


# ---------------------------------------------------------------------------------------------------
# vLLM: never imported on the CPU path
# ---------------------------------------------------------------------------------------------------


def test_importing_rollout_does_not_import_vllm():
    code = (
        "import sys, core.rollout, core.vllm_backend; assert 'vllm' not in sys.modules, 'vllm was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install '\.\[vllm\]'.*CUDA"):
        VLLMBackend("/nonexistent")


def test_merged_state_dict_matches_merge_and_unload(tok, eos_model):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(copy.deepcopy(eos_model), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], atol=1e-6, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    assert merged_state_dict(eos_model).keys() == eos_model.state_dict().keys()


def test_merged_state_dict_of_a_merged_adapter_adds_its_delta_once(eos_model):
    """After PEFT's merge_adapter the base weights hold the delta already: it is not added a second time."""
    model = with_random_adapter(eos_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    model.merge_adapter()
    merged = merged_state_dict(model)
    assert merged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], atol=1e-5, rtol=0)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (reference[key] - eos_model.state_dict()[key]).abs().max() > 0.1  # the delta is not tiny


def test_merged_state_dict_takes_the_active_adapters_modules_to_save_copy(eos_model):
    """Two adapters each save their own lm_head: the merged head is the active adapter's copy."""
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(copy.deepcopy(eos_model), config, adapter_name="one")
    model.add_adapter("two", config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save.one." in name:
                param.fill_(1.0)
            elif "modules_to_save.two." in name:
                param.fill_(2.0)
    for active, value in (("one", 1.0), ("two", 2.0)):
        model.set_adapter(active)
        merged = merged_state_dict(model)
        assert merged["lm_head.weight"].eq(value).all() and merged["lm_head.bias"].eq(value).all()
        assert merged.keys() == eos_model.state_dict().keys()


@pytest.mark.gpu
def test_vllm_backend_on_gpu(tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs CUDA")
    from transformers import AutoModelForCausalLM

    from core.tiny import create_tiny_model_dir

    path = create_tiny_model_dir(tmp_path / "tiny", texts=[ALPHABET], hidden_size=64, num_heads=4)
    backend = VLLMBackend(str(path), gpu_memory_utilization=0.2, dtype="float32", max_model_len=256)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    settings = SamplingSettings(max_new_tokens=12, temperature=0.8)
    r = backend.generate(PROMPTS, settings, seed=0)
    assert r.prompts == PROMPTS and r.completion_ids.shape[0] == len(PROMPTS)
    assert set(r.finish_reason) <= {"stop", "length"}
    assert torch.equal(r.completion_ids, backend.generate(PROMPTS, settings, seed=0).completion_ids)
    expected, _ = reference_logp(model.cpu(), r, 0.8)
    torch.testing.assert_close(r.sampling_logp, expected, atol=2e-3, rtol=0)
    assert backend.generate(PROMPTS, SamplingSettings(max_new_tokens=4, top_k=3), 0).sampling_logp is None

    # new weights reach the engine: after update_weights, vLLM's greedy completions are the HF model's
    greedy = SamplingSettings(max_new_tokens=8, greedy=True)
    before = backend.generate(PROMPTS, greedy, seed=0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    backend.update_weights(model)
    after = backend.generate(PROMPTS, greedy, seed=0)
    hf = HFGenerateBackend(model, backend.tokenizer).generate(PROMPTS, greedy, seed=0)
    assert after.completions == hf.completions and after.completions != before.completions


def test_merged_state_dict_refuses_an_adapter_on_a_tied_embedding(eos_model):
    """With tied embeddings, merging the input embedding's adapter would change the output head too, which
    the trained model does not: refused. Adapters elsewhere in a tied model merge as usual."""
    tied = copy.deepcopy(eos_model)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    model = get_peft_model(copy.deepcopy(tied), LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(NotImplementedError, match="embed_tokens.*shared with another module"):
        merged_state_dict(model)
    model = get_peft_model(copy.deepcopy(tied), LoraConfig(r=4, target_modules=["q_proj"]))
    assert "model.layers.0.self_attn.q_proj.weight" in merged_state_dict(model)


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "lora-bias"])
def test_merged_state_dict_refuses_an_adapter_that_is_not_a_plain_delta(eos_model, variant):
    model = get_peft_model(copy.deepcopy(eos_model), LoraConfig(r=4, target_modules=["q_proj"], **variant))
    with pytest.raises(NotImplementedError, match="LoRA variant .* not a plain weight delta"):
        merged_state_dict(model)


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "lora-bias"])
def test_a_dora_adapter_generates_unmerged_with_its_own_forward(tok, eos_model, variant):
    """DoRA, or a LoRA bias (lora_B's bias, random here), is more than B @ A: merging only B @ A would
    sample from another model; the adapter runs unmerged and the log-probs are the model's."""
    model = with_random_adapter(eos_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **variant))
    r = HFGenerateBackend(model, tok).generate_groups(
        ["ab", "ab"], SamplingSettings(max_new_tokens=6), [1], 2
    )
    expected, _ = reference_logp(model, r, 1.0)
    torch.testing.assert_close(r.sampling_logp, expected, atol=1e-5, rtol=0)
