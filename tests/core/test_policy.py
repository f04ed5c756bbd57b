"""Tests of core/policy.py: chunked logprobs and entropies against a plain full-logits reference (values
and gradients), left padding, agreement with HF `generate`, LoRA and the reference policy, loading.

A per-token allowed-vocabulary mask (VocabMask) is checked the same way, against a plain masked
log_softmax, and the hand-written backward also by `torch.autograd.gradcheck`.
Run: `pytest tests/core/test_policy.py`. Tiny models are built from configs with fixed seeds; nothing
is downloaded.
"""

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from core import policy
from core.data import InputError
from core.policy import (
    LoraSettings,
    ReferencePolicy,
    VocabMask,
    _LinearHeadStats,
    completion_logprobs,
    has_dropout,
    load_policy,
    position_ids_from_mask,
    save_policy,
)
from core.runs import RunDir

VOCAB = 50
PAD = 0
EOS = 1
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,  # peaked next-token distributions, so the comparisons are not all near-uniform
)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary, with an eos token and no pad token."""
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def left_padded_batch(seed: int = 0, n: int = 4, prompt_len: int = 6, t: int = 5) -> tuple[Tensor, Tensor]:
    """(N, P + T) ids and mask: prompts of lengths P, P-1, ... left-padded, then T completion tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, prompt_len + t), generator=g)  # (N, L)
    mask = torch.ones_like(ids)  # (N, L)
    for i in range(n):
        mask[i, : min(i, prompt_len - 1)] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def completion_logprobs_unchunked(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, t: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The plain reference: the model's full (N, L, V) logits -> float32 log_softmax -> gather, entropy."""
    positions = position_ids_from_mask(attention_mask)  # (N, L)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    logits = out.logits  # (N, L, V)
    logits = logits[:, -t - 1 : -1].to(torch.promote_types(logits.dtype, torch.float32))  # (N, T, V)
    logp_all = torch.log_softmax(logits / temperature, dim=-1)  # (N, T, V)
    logp = logp_all.gather(-1, input_ids[:, -t:].unsqueeze(-1)).squeeze(-1)  # (N, T)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N, T)
    return logp, entropy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_qwen2().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_position_ids_from_mask_counts_from_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 2, 0]])
    assert torch.equal(position_ids_from_mask(mask), expected)


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_llama], ids=["qwen2", "llama"])
@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunked_equals_unchunked(build, chunk_size: int):
    model = build()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, ids, mask, 5, temperature=0.7, chunk_size=chunk_size)
        ref_logp, ref_entropy = completion_logprobs_unchunked(model, ids, mask, 5, temperature=0.7)
    assert logp.shape == entropy.shape == (4, 5)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=0)
    assert entropy.min() > 0.1 and entropy.max() < torch.log(torch.tensor(VOCAB)) - 0.1  # not degenerate


def test_a_large_vocabulary_takes_fewer_positions_a_chunk(monkeypatch):
    """C = min(chunk_size, MAX_CHUNK_LOGITS // V): here 3 positions a chunk, whatever chunk_size asks."""
    assert policy.rows_per_chunk(151_936, 1024) == 441 and policy.rows_per_chunk(2048, 1024) == 1024
    assert policy.rows_per_chunk(10**9, 1024) == 1
    model = tiny_qwen2()
    monkeypatch.setattr(policy, "MAX_CHUNK_LOGITS", 3 * VOCAB + 1)
    sizes = []
    original = policy._LinearHeadStats.apply
    monkeypatch.setattr(
        policy._LinearHeadStats, "apply", lambda *args: sizes.append(len(args[0])) or original(*args)
    )
    ids, mask = left_padded_batch()
    logp, entropy = completion_logprobs(model, ids, mask, 5, chunk_size=10_000)  # the trained path
    with torch.no_grad():
        ref_logp, ref_entropy = completion_logprobs_unchunked(model, ids, mask, 5)
    assert sizes == [3] * 6 + [2]  # 4 x 5 positions
    torch.testing.assert_close(logp.detach(), ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.detach(), ref_entropy, atol=1e-5, rtol=0)


def test_without_entropy_returns_none_and_same_logprobs():
    model = tiny_qwen2()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, ids, mask, 5, chunk_size=3, with_entropy=False)
        ref_logp, _ = completion_logprobs_unchunked(model, ids, mask, 5)
    assert entropy is None
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_gradients_equal_unchunked(chunk_size: int):
    # In float64: in float32 both sides carry ~5e-7 relative rounding (1e-5 absolute on gradients of size
    # ~20) whatever the chunking, which would hide what this test is about.
    model = tiny_qwen2().double()
    ids, mask = left_padded_batch()
    weights = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))  # (N, T)

    def grads(logp: Tensor, entropy: Tensor) -> dict[str, Tensor]:
        model.zero_grad()
        ((logp * weights).sum() + 0.3 * entropy.sum()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    chunked = grads(*completion_logprobs(model, ids, mask, 5, temperature=0.7, chunk_size=chunk_size))
    plain = grads(*completion_logprobs_unchunked(model, ids, mask, 5, temperature=0.7))
    assert chunked.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], atol=1e-10, rtol=0, msg=name)
    assert plain["lm_head.weight"].abs().sum() > 0 and plain["model.embed_tokens.weight"].abs().sum() > 0


def saved_vocab_rows(compute) -> int:
    """The most positions of any (..., V) tensor autograd keeps for the backward while `compute` runs
    (the LM head's transposed (H, V) weight, which every path keeps, is not a logits tensor)."""
    rows = [0]

    def pack(x: Tensor) -> Tensor:
        if x.dim() >= 2 and x.shape[-1] == VOCAB and tuple(x.shape) != (TINY["hidden_size"], VOCAB):
            rows.append(x.numel() // VOCAB)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        compute()
    return max(rows)


def test_chunk_logits_are_not_kept_for_backward():
    """Memory: checkpointing leaves no chunk's (C, V) logits saved for the backward; the plain path
    keeps (N, T, V) ones (which shows the probe sees them)."""
    model = tiny_qwen2()
    ids, mask = left_padded_batch()
    assert saved_vocab_rows(lambda: completion_logprobs(model, ids, mask, 5, chunk_size=3)) == 0
    assert saved_vocab_rows(lambda: completion_logprobs_unchunked(model, ids, mask, 5)) >= 4 * 5


def test_left_padding_does_not_change_logprobs():
    model = tiny_qwen2()
    ids, _ = left_padded_batch(n=1, prompt_len=6, t=5)  # (1, 11), no padding
    padded = torch.cat([torch.full((1, 4), PAD), ids], dim=1)  # (1, 15)
    padded_mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)  # (1, 15)
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, ids, torch.ones_like(ids), 5)
        padded_logp, padded_entropy = completion_logprobs(model, padded, padded_mask, 5)
    torch.testing.assert_close(padded_logp, logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_entropy, entropy, atol=1e-5, rtol=0)


def test_logprobs_match_hf_generate():
    """The sampler-vs-trainer check: what `generate` saw for its sampled tokens is what training sees."""
    model = tiny_qwen2()
    prompt, prompt_mask = left_padded_batch(t=0)  # (N, P), left-padded
    t, temperature = 8, 0.7
    torch.manual_seed(3)
    out = model.generate(
        input_ids=prompt,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        max_new_tokens=t,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
    )
    assert out.sequences.shape == (4, prompt.shape[1] + t)
    sampled = out.sequences[:, -t:]  # (N, T)
    gen_logp = torch.log_softmax(torch.stack(out.logits, dim=1).float() / temperature, dim=-1)  # (N, T, V)
    gen_logp = gen_logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)  # (N, T)
    mask = torch.cat([prompt_mask, torch.ones_like(sampled)], dim=1)  # (N, P + T)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, out.sequences, mask, t, temperature=temperature, chunk_size=5)
    torch.testing.assert_close(logp, gen_logp, atol=1e-4, rtol=0)


def test_softcapped_logits_are_handled():
    torch.manual_seed(0)
    config = Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=0.3)  # a cap that bites hard
    model = Gemma2ForCausalLM(config).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, ids, mask, 5, temperature=0.7, chunk_size=3)
        ref_logp, ref_entropy = completion_logprobs_unchunked(model, ids, mask, 5, temperature=0.7)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=0)


def test_logit_scale_is_refused():
    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(**TINY, logit_scale=0.0625))
    ids, mask = left_padded_batch()
    with pytest.raises(NotImplementedError, match="logit_scale"):
        completion_logprobs(model, ids, mask, 5)
    granite = GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=4.0))
    with pytest.raises(NotImplementedError, match=r"config.logits_scaling=4.0"):
        completion_logprobs(granite, ids, mask, 5)


def test_bad_arguments_are_refused():
    model = tiny_qwen2()
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="num_completion_tokens"):
        completion_logprobs(model, ids, mask, ids.shape[1])
    with pytest.raises(ValueError, match="attention_mask"):
        completion_logprobs(model, ids, mask[:, 1:], 5)
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, ids, mask, 5, temperature=0.0)
    narrow = VocabMask(torch.ones(1, VOCAB, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"vocab_mask.index has shape \(4, 4\), expected \(4, 5\)"):
        completion_logprobs(model, ids, mask, 5, vocab_mask=narrow)


def test_load_policy_round_trip(model_dir: Path):
    model, tokenizer = load_policy(model_dir)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<eos>"  # the tiny tokenizer has no pad token: eos stands in
    # The saved tokenizer itself, not the Qwen2Tokenizer AutoTokenizer would rebuild for a qwen2 config.
    assert len(tokenizer) == VOCAB
    assert tokenizer("w3 w4 <eos>").input_ids == [3, 4, EOS]
    ids, mask = left_padded_batch()
    with torch.no_grad():
        loaded, _ = completion_logprobs(model, ids, mask, 5)
        original, _ = completion_logprobs(tiny_qwen2(), ids, mask, 5)
    torch.testing.assert_close(loaded, original, atol=0, rtol=0)


def test_load_policy_dtype(model_dir: Path):
    model, _ = load_policy(model_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float32"):
        load_policy(model_dir, dtype="fp8")


def test_load_policy_missing_dir_or_config(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="config.json") as info:
        load_policy(missing)
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json") as info:
        load_policy(empty)
    assert str(empty) in str(info.value)
    (empty / "config.json").write_text('{"app": "toy", "algorithm": "grpo", "config": {}}')  # a run's
    with pytest.raises(
        FileNotFoundError, match=f"{empty} is a run directory, not a model: it holds no model yet"
    ):
        load_policy(empty)


def test_a_run_given_for_a_model_names_the_models_it_and_its_runs_hold(tmp_path: Path):
    """A pipeline's models: its own, those of the runs inside it; checkpoints and data left out."""
    pipeline = RunDir.create(
        tmp_path / "p", {}, app="debias", algorithm="pipeline", exist_ok_for_resume=False
    )
    seed = RunDir.create(
        pipeline.path / "grpo-seed0", {}, app="debias", algorithm="grpo", exist_ok_for_resume=False
    )
    for model in (pipeline.path / "sft_model", seed.path / "final", seed.path / "checkpoints" / "step-2"):
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
    (seed.path / "lora").mkdir()
    (seed.path / "lora" / "adapter_config.json").write_text("{}")
    (pipeline.path / "data").mkdir()
    (pipeline.path / "data" / "train.jsonl").write_text("")
    expected = f"its models are {seed.path / 'final'}, {seed.path / 'lora'}, {pipeline.path / 'sft_model'}"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{pipeline.path} is a run directory, not a model: {expected}")
    ):
        load_policy(pipeline.path)
    (seed.path / "lora" / "adapter_config.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"not a model: its model is {seed.path / 'final'}") + "$"
    ):
        load_policy(seed.path)


def test_lora_policy_and_reference(model_dir: Path):
    policy, _ = load_policy(model_dir, lora=LoraSettings(r=4, alpha=8))
    base = tiny_qwen2()
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("lora_" in name and "q_proj" in name for name in trainable)  # all-linear reached attention

    reference = ReferencePolicy(policy)
    assert reference.model is policy  # no copy
    ids, mask = left_padded_batch()
    with torch.no_grad():
        base_logp, _ = completion_logprobs(base, ids, mask, 5, temperature=0.7)
        # Before training B = 0: policy, reference and base all agree.
        torch.testing.assert_close(
            completion_logprobs(policy, ids, mask, 5, temperature=0.7)[0], base_logp, atol=1e-6, rtol=0
        )
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
        policy_logp, _ = completion_logprobs(policy, ids, mask, 5, temperature=0.7)
    policy.train()
    ref_logp = reference.logprobs(ids, mask, 5, temperature=0.7, chunk_size=3)
    assert policy.training and all(m.training for m in policy.modules())  # modes restored
    assert not ref_logp.requires_grad
    assert (policy_logp - base_logp).abs().max() > 1e-2
    torch.testing.assert_close(ref_logp, base_logp, atol=1e-5, rtol=0)
    # The adapter is back on after the reference call.
    with torch.no_grad():
        torch.testing.assert_close(
            completion_logprobs(policy, ids, mask, 5, temperature=0.7)[0], policy_logp, atol=1e-6, rtol=0
        )


def test_lora_settings_reach_the_adapter(model_dir: Path):
    """alpha is PEFT's lora_alpha, not r: r = 4, alpha = 8 scales each update by alpha / r = 2."""
    policy, _ = load_policy(model_dir, lora=LoraSettings(r=4, alpha=8))
    config = policy.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8)
    q_proj = policy.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.r["default"] == 4 and q_proj.scaling["default"] == 2.0


def test_lora_defaults_and_a_seeded_initialisation(model_dir: Path):
    """r = 16, alpha = 32 on every linear layer by default; lora_A is drawn from `seed` (every process starts
    from the same adapter), without moving the global RNG."""
    assert LoraSettings() == LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear", seed=0)
    rng = torch.get_rng_state()
    first, again, other = (load_policy(model_dir, lora=LoraSettings(r=2, seed=s))[0] for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), rng)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    a, b, c = (m.state_dict()[name] for m in (first, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_reference_without_lora_is_a_frozen_copy():
    policy = tiny_qwen2().train()
    reference = ReferencePolicy(policy)
    assert reference.model is not policy
    assert not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    ids, mask = left_padded_batch()
    before = reference.logprobs(ids, mask, 5)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        policy_logp, _ = completion_logprobs(policy, ids, mask, 5)
    torch.testing.assert_close(reference.logprobs(ids, mask, 5), before, atol=0, rtol=0)
    assert (policy_logp - before).abs().max() > 1e-2


def test_load_policy_refuses_a_tokenizer_larger_than_the_model(tmp_path: Path):
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**{**TINY, "vocab_size": VOCAB - 10})).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(
        InputError, match=f"^{tmp_path}: the tokenizer has {VOCAB} tokens but the model has only {VOCAB - 10}"
    ):
        load_policy(tmp_path)


def test_load_policy_refuses_a_tokenizer_with_neither_pad_nor_eos_naming_the_directory(tmp_path: Path):
    """A command-line error (its message starts with the directory), not a traceback."""
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(tmp_path)
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(InputError, match=f"^{tmp_path}: the tokenizer has neither a pad nor an eos token"):
        load_policy(tmp_path)


# -- the allowed-vocabulary mask ------------------------------------------------------------------------------


def random_vocab_mask(ids: Tensor, t: int, k: int = 3, seed: int = 0) -> VocabMask:
    """K random allowed sets (a few ids each) and a random row, or -1, per completion token; each token is
    added to its row's set, so the sampled tokens are allowed as a constrained sampler's would be."""
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(k, VOCAB, generator=g) < 0.2  # (K, V)
    index = torch.randint(-1, k, (ids.shape[0], t), generator=g)  # (N, T)
    targets = ids[:, -t:]  # (N, T)
    table[index[index >= 0], targets[index >= 0]] = True
    return VocabMask(table, index)


def masked_logprobs_unchunked(model, ids, mask, t, vocab_mask: VocabMask, temperature: float = 1.0):
    """The plain reference: full (N, T, V) logits, -inf off the allowed ids, log_softmax, gather, entropy."""
    positions = position_ids_from_mask(mask)  # (N, L)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (N, L, V)
    logits = logits[:, -t - 1 : -1].to(torch.promote_types(logits.dtype, torch.float32))  # (N, T, V)
    table, index = vocab_mask.expanded()  # (K + 1, V), (N, T)
    allowed = table[index]  # (N, T, V)
    logp_all = torch.log_softmax((logits / temperature).masked_fill(~allowed, float("-inf")), dim=-1)
    logp = logp_all.gather(-1, ids[:, -t:].unsqueeze(-1)).squeeze(-1)  # (N, T)
    entropy = -(logp_all.exp() * logp_all.masked_fill(~allowed, 0.0)).sum(-1)  # (N, T)
    return logp, entropy


class CustomHead(nn.Linear):
    """Not exactly `nn.Linear`: `completion_logprobs` takes its checkpointed autograd path."""


def tiny_qwen2_custom_head() -> Qwen2ForCausalLM:
    model = tiny_qwen2()
    head = CustomHead(TINY["hidden_size"], VOCAB, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    return model


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_qwen2_custom_head], ids=["linear-head", "custom-head"])
@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_vocab_mask_values_and_gradients_equal_a_plain_masked_softmax(build, chunk_size: int):
    """Both chunk paths (the hand-written backward of a plain linear head; checkpointed autograd for any
    other head) against autograd through a plain masked log_softmax, in float64."""
    model = build().double()
    ids, mask = left_padded_batch()
    vocab_mask = random_vocab_mask(ids, 5)
    weights = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))  # (N, T)

    def grads(logp: Tensor, entropy: Tensor) -> dict[str, Tensor]:
        model.zero_grad()
        ((logp * weights).sum() + 0.3 * entropy.sum()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    kwargs = dict(temperature=0.7, chunk_size=chunk_size, vocab_mask=vocab_mask)
    chunked = completion_logprobs(model, ids, mask, 5, **kwargs)
    plain = masked_logprobs_unchunked(model, ids, mask, 5, vocab_mask, temperature=0.7)
    for got, expected in zip(chunked, plain, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    with torch.no_grad():  # the no-grad path
        for got, expected in zip(completion_logprobs(model, ids, mask, 5, **kwargs), plain, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    # renormalised: a restricted position's logprob is at least the full softmax's, its entropy at most
    # log(|allowed|); unrestricted positions (-1) are the plain values
    with torch.no_grad():
        full, full_entropy = completion_logprobs(model, ids, mask, 5, temperature=0.7)
    free = vocab_mask.index < 0
    assert free.any() and (~free).any()
    torch.testing.assert_close(chunked[0][free], full[free], atol=1e-10, rtol=0)
    assert (chunked[0][~free] >= full[~free] - 1e-12).all()
    sizes = vocab_mask.table[vocab_mask.index.clamp(min=0)].sum(-1).double()  # (N, T)
    assert (chunked[1][~free] <= sizes.log()[~free] + 1e-9).all()
    chunked_grads, plain_grads = grads(*chunked), grads(*plain)
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], atol=1e-10, rtol=0, msg=name)
    assert all(torch.isfinite(g).all() for g in chunked_grads.values())


def test_masked_linear_head_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    c, h, v = 6, 5, 11
    hidden = torch.randn(c, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, generator=g, requires_grad=True)
    table = torch.rand(3, v, generator=g) < 0.4  # (K, V); the expanded table's last row allows all
    table = torch.cat([table, torch.ones(1, v, dtype=torch.bool)])  # (K + 1, V)
    index = torch.tensor([0, 1, 2, 3, 1, 0])  # (C,)
    targets = torch.stack([table[i].nonzero()[0, 0] for i in index.tolist()])  # an allowed id each

    def stats(hidden, weight, bias):
        return _LinearHeadStats.apply(hidden, weight, bias, targets, 0.7, True, ~table, index)  # blocked ids

    assert torch.autograd.gradcheck(stats, (hidden, weight, bias))


def test_reference_policy_applies_the_vocab_mask():
    policy = tiny_qwen2()
    ids, mask = left_padded_batch()
    vocab_mask = random_vocab_mask(ids, 5)
    with torch.no_grad():
        expected, _ = completion_logprobs(policy, ids, mask, 5, vocab_mask=vocab_mask)
    got = ReferencePolicy(policy).logprobs(ids, mask, 5, chunk_size=3, vocab_mask=vocab_mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_vocab_mask_select_concat_and_validation():
    a = VocabMask(torch.tensor([[True, False, True], [False, True, False]]), torch.tensor([[0, 1], [-1, -1]]))
    b = VocabMask(torch.tensor([[False, True, False]]), torch.tensor([[0, 0, -1]]))
    both = VocabMask.concat([a, None, b], [(2, 2), (1, 4), (1, 3)], width=4)
    assert both.table.shape == (2, 3)  # b's row equals a's second row: stored once
    allowed = [[both.table[i].tolist() if i >= 0 else None for i in row] for row in both.index.tolist()]
    assert allowed == [
        [[True, False, True], [False, True, False], None, None],
        [None, None, None, None],
        [None, None, None, None],
        [[False, True, False], [False, True, False], None, None],
    ]
    assert VocabMask.concat([None, None], [(1, 2), (1, 2)], width=2) is None
    assert torch.equal(both.select(torch.tensor([3, 0])).index, both.index[[3, 0]])
    ids = torch.tensor([[0, 1], [2, 0]])
    a.check_tokens(ids, torch.tensor([[1, 1], [1, 0]]))
    with pytest.raises(ValueError, match="outside the mask's vocabulary of 3"):  # id 3 of 0..2
        a.check_tokens(torch.tensor([[0, 1], [3, 0]]), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside their allowed set"):
        a.check_tokens(torch.tensor([[1, 1], [2, 0]]), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="-1 where completion_mask is 0"):
        a.check_tokens(ids, torch.tensor([[1, 0], [1, 0]]))
    with pytest.raises(ValueError, match="allow no token"):
        VocabMask(torch.tensor([[True], [False]]), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        VocabMask(torch.tensor([[True], [True]]), torch.tensor([[2]]))
    ids, mask = left_padded_batch()
    narrow = VocabMask(torch.ones(1, 7, dtype=torch.bool), torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="LM head has 50"):
        completion_logprobs(tiny_qwen2(), ids, mask, 5, vocab_mask=narrow)


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_llama], ids=["qwen2", "llama"])
def test_shared_prompts_equal_one_forward_per_row(build):
    # 3 groups of 4 completions: prompts of different padding, one completion padded at its end. Sharing runs
    # each prompt once and gathers its KV cache; values and gradients must equal the per-row forward.
    # Gradients agree to float32 precision only, even in float64: Qwen2/Llama RMSNorm computes in float32,
    # so the two paths' different summation orders (G rows' prompt gradients summed by index_select's
    # backward vs. G separate prompt passes) differ at ~1e-7 relative.
    model = build().double()
    ids, mask = left_padded_batch(n=3, prompt_len=6, t=5)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # (12, 11)
    completions = torch.randint(2, VOCAB, (12, 5), generator=torch.Generator().manual_seed(2))
    ids[:, 6:] = completions
    mask[1, -2:] = 0
    weights = torch.randn(12, 5, generator=torch.Generator().manual_seed(1)) * mask[:, 6:]  # (N, T)

    def run(share: bool):
        model.zero_grad()
        logp, entropy = completion_logprobs(model, ids, mask, 5, temperature=0.7, share_prompts=share)
        ((logp * weights).sum() + 0.3 * (entropy * mask[:, 6:]).sum()).backward()
        return logp.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    embedded = []  # token positions through the embedding per call: the work done
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: embedded.append(args[0].numel())
    )
    shared, plain = run(True), run(False)
    hook.remove()
    assert embedded == [3 * 6, 12 * 5, 12 * 11]  # 3 prompts once + 12 completions, then 12 full rows
    real = mask[:, 6:].bool()
    torch.testing.assert_close(shared[0][real], plain[0][real], atol=1e-12, rtol=0)
    torch.testing.assert_close(shared[1][real], plain[1][real], atol=1e-12, rtol=0)
    for name in plain[2]:
        scale = float(plain[2][name].abs().max())
        torch.testing.assert_close(shared[2][name], plain[2][name], atol=1e-6 * scale, rtol=0, msg=name)
    reference, _ = completion_logprobs_unchunked(model, ids, mask, 5, temperature=0.7)
    torch.testing.assert_close(shared[0][real], reference.detach()[real], atol=1e-12, rtol=0)


# -- sliding windows, loading edge cases ----------------------------------------------------------------------


def test_a_sliding_window_model_takes_the_plain_forward_when_prompts_repeat():
    """The shared-prompt cache has full-attention layers only: with a window shorter than the prompt it
    gave log-probs off by up to 2.4 nats (Mistral) or crashed (Qwen2's use_sliding_window)."""
    torch.manual_seed(0)
    config = MistralConfig(**{k: v for k, v in TINY.items()}, sliding_window=3)
    model = MistralForCausalLM(config).eval()
    ids, mask = left_padded_batch(n=2, prompt_len=6, t=5)
    ids = torch.cat([ids[:1].repeat(3, 1), ids[1:].repeat(3, 1)])  # two groups of three with one prompt
    mask = torch.cat([mask[:1].repeat(3, 1), mask[1:].repeat(3, 1)])
    ids[:, -5:] = torch.randint(2, VOCAB, (6, 5), generator=torch.Generator().manual_seed(1))
    expected, _ = completion_logprobs_unchunked(model, ids, mask, 5)
    with torch.no_grad():
        got, _ = completion_logprobs(model, ids, mask, 5, share_prompts=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_model_whose_layer_types_slide_takes_the_plain_forward_whatever_its_window_flag():
    """`layer_types` naming a sliding layer is enough: a config whose use_sliding_window reads False while its
    layers were built sliding (the window is what they attend through) takes the plain forward too."""
    torch.manual_seed(0)
    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=3, max_window_layers=0)
    model = Qwen2ForCausalLM(config).eval()
    assert "sliding_attention" in model.config.layer_types
    model.config.use_sliding_window = False  # the layer types still slide
    ids, mask = left_padded_batch(n=1, prompt_len=6, t=5)
    ids, mask = ids.repeat(3, 1), mask.repeat(3, 1)  # one group of three rows with one prompt
    ids[:, -5:] = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    expected, _ = completion_logprobs_unchunked(model, ids, mask, 5)
    embedded = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.append(a[0].numel()))
    with torch.no_grad():
        got, _ = completion_logprobs(model, ids, mask, 5, share_prompts=True)
    hook.remove()
    assert embedded == [3 * 11]  # one plain forward over every row
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_sliding_window_the_config_turns_off_still_shares_prompts():
    """transformers 4.x Qwen2 configs keep sliding_window=4096 with use_sliding_window=False: every layer
    attends fully, so a repeated prompt still runs once."""
    model = tiny_qwen2()
    model.config.sliding_window = 4096  # use_sliding_window stays False
    ids, mask = left_padded_batch(n=1, prompt_len=6, t=5)
    ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)  # one group of two rows with one prompt
    embedded = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.append(a[0].numel()))
    with torch.no_grad():
        completion_logprobs(model, ids, mask, 5)
    hook.remove()
    assert embedded == [6, 2 * 5]  # the prompt once, then each row's completion


def test_a_model_directory_without_a_tokenizer_is_named(tmp_path: Path):
    tiny_qwen2().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no tokenizer"):
        load_policy(tmp_path)


def test_a_lora_final_loads_trainable_with_its_tokenizers_pad_from_another_directory(
    model_dir: Path, tmp_path: Path, monkeypatch
):
    """An adapter saved from a model loaded by a relative path records an absolute base; the merged model
    trains in full; an adapter's own tokenizer without a pad gets eos as pad, as a model directory's."""
    monkeypatch.chdir(model_dir.parent)
    model, _ = load_policy(model_dir.name, lora=LoraSettings(r=2, alpha=4))
    model.save_pretrained(tmp_path / "final")
    tiny_tokenizer().save_pretrained(tmp_path / "final")  # eos, no pad
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == model_dir.absolute()
    monkeypatch.chdir(tmp_path)
    merged, tokenizer = load_policy(tmp_path / "final")
    assert all(p.requires_grad for p in merged.parameters())
    assert tokenizer.pad_token == "<eos>" and tokenizer.padding_side == "left"
    # an adapter saved before bases were recorded absolute: "runs/<app>/<run>/base_model", relative to
    # where training ran, is found next to the adapter
    shutil.copytree(model_dir, tmp_path / "base_model")
    relative = config | {"base_model_name_or_path": "runs/app/run/base_model"}
    (tmp_path / "final" / "adapter_config.json").write_text(json.dumps(relative))
    monkeypatch.chdir(model_dir)  # where no runs/ directory exists
    again, _ = load_policy(tmp_path / "final")
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], weight)


def test_has_dropout_reads_a_rate_or_a_dropout_module():
    """Bloom, Falcon and Persimmon keep an nn.Dropout as `attention_dropout`: float() of it had raised."""

    class Attention(nn.Module):
        def __init__(self, attention_dropout):
            super().__init__()
            self.attention_dropout = attention_dropout

    assert has_dropout(Attention(0.1)) and not has_dropout(Attention(0.0))
    assert has_dropout(Attention(nn.Dropout(0.1))) and not has_dropout(Attention(nn.Dropout(0.0)))


def test_rows_of_a_group_draw_their_own_dropout_in_train_mode():
    """A shared prompt gave its G rows one dropout mask: in train mode with dropout every row runs whole,
    the same draws as the per-row forward; in eval mode the prompt is still shared."""
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, attention_dropout=0.5)).train()
    ids, mask = left_padded_batch(n=1, prompt_len=6, t=5)
    ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)  # one group of two identical rows

    def logprobs(share: bool) -> Tensor:
        torch.manual_seed(3)
        with torch.no_grad():
            return completion_logprobs(model, ids, mask, 5, share_prompts=share)[0]

    shared, per_row = logprobs(True), logprobs(False)
    assert torch.equal(shared, per_row)
    assert (shared[0] - shared[1]).abs().max() > 1e-3  # the two identical rows drew different masks
    model.eval()
    embedded = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.append(a[0].numel()))
    logprobs(True)
    hook.remove()
    assert sum(embedded) == 6 + 2 * 5  # the prompt once, then each row's completion


def test_reference_logprobs_are_taken_with_dropout_off(tmp_path: Path):
    """A reference in train mode (a plain copy switched back to train, or a LoRA policy being trained) with
    attention and adapter dropout still gives the deterministic eval-mode logprobs, and keeps its mode."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, attention_dropout=0.5))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected, _ = completion_logprobs(model.eval(), ids, mask, 5)
        noisy, _ = completion_logprobs(model.train(), ids, mask, 5)
    assert (noisy - expected).abs().max() > 1e-2  # the dropout is live in train mode

    reference = ReferencePolicy(model)
    reference.model.train()
    first = reference.logprobs(ids, mask, 5, chunk_size=3)
    second = reference.logprobs(ids, mask, 5, chunk_size=3)
    assert reference.model.training
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)

    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    policy, _ = load_policy(tmp_path, lora=LoraSettings(r=4, alpha=8, dropout=0.5))
    policy.train()
    lora_reference = ReferencePolicy(policy)
    first = lora_reference.logprobs(ids, mask, 5, chunk_size=3)
    second = lora_reference.logprobs(ids, mask, 5, chunk_size=3)
    assert policy.training
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("damage", "what", "reason"),
    [
        (
            lambda d: (d / "model.safetensors").unlink(),
            "model",
            "OSError: Error no file named model.safetensors",
        ),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 100), "model", "SafetensorError"),
        (lambda d: (d / "config.json").write_text("{bad"), "model", "OSError"),
        (lambda d: (d / "tokenizer_config.json").write_text("{bad"), "tokenizer", "JSONDecodeError"),
    ],
    ids=["weights missing", "weights cut off", "config not JSON", "tokenizer config not JSON"],
)
def test_a_model_directory_transformers_cannot_read_is_named_with_the_reason(
    model_dir: Path, tmp_path: Path, damage, what, reason
):
    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    damage(damaged)
    with pytest.raises(InputError) as info:
        load_policy(damaged)
    assert str(info.value).startswith(f"{damaged}: its {what} cannot be loaded ({reason}")
    assert "\n" not in str(info.value)


def test_an_adapter_trained_on_an_adapter_loads_on_the_model_it_was_trained_on(
    model_dir: Path, tmp_path: Path
):
    """A --lora run on a LoRA final/ trains a second adapter on the base with the first merged in. Its
    final/ had recorded the bare base, so loading it dropped the first adapter without a word."""

    def trained(model):  # an adapter that changes the output: every lora_B set non-zero
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        return model

    first = trained(load_policy(model_dir, lora=LoraSettings(r=2, alpha=4))[0])
    first.save_pretrained(tmp_path / "a1")
    second = trained(load_policy(tmp_path / "a1", lora=LoraSettings(r=2, alpha=4, seed=1))[0])
    with warnings.catch_warnings():  # PEFT had warned "Could not find a config file in <a1>" at each save
        warnings.simplefilter("error")
        save_policy(second, tmp_path / "a2")
    config = json.loads((tmp_path / "a2" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (tmp_path / "a1").absolute()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = second.eval()(ids).logits
        got = load_policy(tmp_path / "a2")[0].eval()(ids).logits
        first_only = load_policy(tmp_path / "a1")[0].eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - first_only).abs().max() > 1e-3  # the second adapter counts too
