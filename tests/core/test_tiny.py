"""Tests for core/tiny.py: the character tokenizer, tiny models, their directories and SFT on a toy task.

Run: pytest tests/core/test_tiny.py (about 20 s on 2 cores, most of it the SFT runs and imports).
"""

from pathlib import Path

import pytest
import torch
import transformers
import transformers.modeling_utils
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import core.tiny
from core.tiny import (
    SPECIAL_TOKENS,
    _sft_alone,
    build_char_tokenizer,
    build_tiny_model,
    create_tiny_model_dir,
    sft,
)

EXTRAS = ("<think>", "</think>")
TASK = {"1+1=": "2", "2+3=": "5", "10+4=": "14"}  # prompts of different lengths exercise left padding


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(["hello world\n", "中文，测试", "a+b=c"], extra_tokens=EXTRAS)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return create_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base", list(TASK) + list(TASK.values()))


def completion_nll(model, tokenizer, prompt: str, completion: str) -> float:
    """Summed negative log-likelihood of `completion` + eos after `prompt`."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(completion + tokenizer.eos_token)["input_ids"]])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)  # (L-1, V)
    targets = ids[0, 1:]  # (L-1,)
    token_logprobs = logprobs.gather(-1, targets[:, None])[:, 0]  # (L-1,)
    return -token_logprobs[len(prompt_ids) - 1 :].sum().item()


# ---- tokenizer ----


@pytest.mark.parametrize(
    "text", ["hello world", "a\nb\n\n\tc ", "中文，测试", "<think>hello</think>\n中", "x日本"]
)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_one_id_per_seen_character(tokenizer):
    text = "中文 hello\n，"
    ids = tokenizer(text)["input_ids"]
    assert ids == [tokenizer(c)["input_ids"][0] for c in text]


def test_special_token_ids(tokenizer):
    assert SPECIAL_TOKENS == ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 3)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.unk_token is None
    assert tokenizer.padding_side == "left"
    assert tokenizer("<|im_start|>x<|im_end|>")["input_ids"] == [2, 6 + ord("x"), 3]


def test_vocabulary_order(tokenizer):
    # specials 0-3, extras 4-5, the 256 bytes from 6, then the multi-byte characters in code-point order
    assert tokenizer.convert_tokens_to_ids(list(EXTRAS)) == [4, 5]
    assert tokenizer("ab\n \x00")["input_ids"] == [6 + ord("a"), 6 + ord("b"), 6 + ord("\n"), 6 + ord(" "), 6]
    wide = sorted("中文，测试")
    ids = [tokenizer(c)["input_ids"] for c in wide]
    assert all(len(i) == 1 and i[0] >= 262 for i in ids)
    assert [i[0] for i in ids] == sorted(i[0] for i in ids)
    assert len(tokenizer) == max(tokenizer.get_vocab().values()) + 1


def test_extra_tokens_are_single_ids(tokenizer):
    assert tokenizer("<think>he</think>")["input_ids"] == [4, 6 + ord("h"), 6 + ord("e"), 5]
    # Extra tokens are not special: skipping special tokens keeps them, and drops the chat markers.
    with_markers = tokenizer("<|im_start|><think>he</think><|im_end|>")["input_ids"]
    assert with_markers[0] == 2 and with_markers[-1] == 3
    assert tokenizer.decode(with_markers, skip_special_tokens=True) == "<think>he</think>"


def test_unseen_character_falls_back_to_bytes(tokenizer):
    ids = tokenizer("日")["input_ids"]
    assert ids == [6 + b for b in "日".encode()]  # 3 byte tokens, no merge applies
    assert tokenizer.decode(ids) == "日"


def test_text_is_nfc_normalised(tokenizer):
    assert tokenizer.decode(tokenizer("e\u0301")["input_ids"]) == "\u00e9"


def test_text_not_in_nfc_gives_the_tokens_its_nfc_form_encodes_to():
    """The alphabet is taken from the NFC form, as the encoder sees text: from the raw text, the Ohm sign
    and e + combining acute got entries no encoding produces, and Ω and é fell back to 2 bytes each."""
    tokenizer = build_char_tokenizer(["\u2126 ohm", "cafe\u0301"])
    for char in ("\u03a9", "\u00e9"):  # NFC of the two
        assert len(tokenizer(char)["input_ids"]) == 1


def test_string_is_an_alphabet():
    tokenizer = build_char_tokenizer("中文")
    assert tokenizer("文中")["input_ids"] == [
        tokenizer("文")["input_ids"][0],
        tokenizer("中")["input_ids"][0],
    ]
    assert len(tokenizer) == 4 + 256 + 2 * 2  # each 3-byte character adds a 2-byte piece and itself


@pytest.mark.parametrize("extras", [("",), ("x",), ("<pad>",), ("<x>", "<x>")])
def test_bad_extra_tokens(extras):
    with pytest.raises(ValueError, match="extra"):
        build_char_tokenizer("ab", extra_tokens=extras)


def test_an_extra_token_with_a_byte_symbol_character_is_refused_and_others_round_trip():
    """In a byte-level tokenizer é, ° or Ġ stand for one raw byte: "°C" as an added token decoded to "�C"."""
    with pytest.raises(ValueError, match="extra token '°C': ° cannot be in an added token"):
        build_char_tokenizer("20C", extra_tokens=["°C"])
    tokenizer = build_char_tokenizer(["20°C é"], extra_tokens=["<think>", "中文"])
    for text in ("20°C é", "<think>中文</think>"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids["input_ids"] == tokenizer(text)["input_ids"]


def test_chat_template_assistant_mask(tokenizer):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "中文"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n中文<|im_end|>\n"
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "中文<|im_end|>"


# ---- model ----


def test_same_seed_same_weights(tokenizer):
    rng_before = torch.random.get_rng_state()
    a = build_tiny_model(tokenizer, seed=3).state_dict()
    b = build_tiny_model(tokenizer, seed=3).state_dict()
    c = build_tiny_model(tokenizer, seed=4).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the seed stays local
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_model_config(tokenizer, arch):
    model = build_tiny_model(tokenizer, arch=arch, hidden_size=32, num_heads=4, num_kv_heads=2)
    config = model.config
    assert config.model_type == arch
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (len(tokenizer), 32, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (4, 2, 128)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 3)
    assert model.dtype == torch.float32 and not model.training
    logits = model(**tokenizer(["hello", "a+b"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 5, len(tokenizer)) and torch.isfinite(logits).all()


def test_unknown_arch(tokenizer):
    with pytest.raises(ValueError, match="unknown arch 'gpt9'; valid: qwen2, llama"):
        build_tiny_model(tokenizer, arch="gpt9")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"hidden_size": 30}, "hidden_size 30"), ({"num_kv_heads": 3}, "num_kv_heads 3")],
)
def test_bad_shapes(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(tokenizer, **kwargs)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_saved_dir_reloads_identically(tmp_path, arch):
    texts = ["hello world\n", "中文"]
    path = create_tiny_model_dir(tmp_path / "m", texts, extra_tokens=EXTRAS, arch=arch, seed=7)
    assert (path / "model.safetensors").is_file()
    tokenizer = build_char_tokenizer(texts, EXTRAS)
    model = build_tiny_model(tokenizer, arch=arch, seed=7)
    saved = load_file(path / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)

    reloaded_tokenizer = AutoTokenizer.from_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert reloaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert reloaded_tokenizer.padding_side == "left"
    batch = reloaded_tokenizer(["<think>中文</think>", "hello\n"], padding=True, return_tensors="pt")
    assert (
        batch["input_ids"].tolist()
        == tokenizer(["<think>中文</think>", "hello\n"], padding=True)["input_ids"]
    )
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_refuses_non_empty_dir(base_dir, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        create_tiny_model_dir(tmp_path, ["ab"])
    with pytest.raises(FileExistsError, match="not empty"):
        sft(base_dir, [{"prompt": "1+1=", "completion": "2"}], tmp_path)


class Killed(Exception):
    """Stands for a kill in the tests that cut a build short."""


def die(*args, **kwargs):
    raise Killed


def cut_the_weights_save(monkeypatch):
    """Make the next safetensors save write half its file and die, as a kill during the save would."""

    def dying(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        die()

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", dying)


def test_a_save_cut_short_leaves_no_model_dir_and_the_build_reruns(tmp_path, monkeypatch):
    path = tmp_path / "base"
    with monkeypatch.context() as patch:
        cut_the_weights_save(patch)
        with pytest.raises(Killed):
            create_tiny_model_dir(path, ["ab"])
    assert not path.exists()  # not a config.json beside half a model.safetensors
    create_tiny_model_dir(path, ["ab"])
    AutoModelForCausalLM.from_pretrained(path)


# ---- SFT ----


def test_sft_learns_toy_task(base_dir, tmp_path):
    examples = [{"prompt": p, "completion": c} for p, c in TASK.items()] * 16
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    before = AutoModelForCausalLM.from_pretrained(base_dir)
    out = sft(base_dir, examples, tmp_path / "sft", epochs=3, lr=1e-2, batch_size=8)
    assert out == tmp_path / "sft" and (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache  # not left at the training value (False)
    for prompt, completion in TASK.items():
        nll_before = completion_nll(before, tokenizer, prompt, completion)
        nll_after = completion_nll(model, tokenizer, prompt, completion)
        assert nll_after < 0.25 * nll_before, (prompt, nll_before, nll_after)

    batch = tokenizer(list(TASK), padding=True, return_tensors="pt")  # left-padded
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)  # (B, P + new)
    new = generated[:, batch["input_ids"].shape[1] :]
    assert tokenizer.batch_decode(new, skip_special_tokens=True) == list(TASK.values())
    for row, completion in zip(new.tolist(), TASK.values(), strict=True):
        assert row[len(completion)] == tokenizer.eos_token_id  # it stops right after the answer


def test_sft_is_deterministic(base_dir, tmp_path):
    examples = [{"prompt": p, "completion": c} for p, c in TASK.items()] * 4
    a = sft(base_dir, examples, tmp_path / "a", batch_size=4, max_steps=2, seed=5)
    b = sft(base_dir, examples, tmp_path / "b", batch_size=4, max_steps=2, seed=5)
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    base = load_file(base_dir / "model.safetensors")
    assert not torch.equal(base["model.embed_tokens.weight"], weights_a["model.embed_tokens.weight"])


def test_sft_in_a_child_process_equals_sft_here(base_dir, tmp_path, monkeypatch):
    """Under a multi-process launch `sft` runs in a child outside the process group (`_sft_alone`):
    same weights, and the launcher's variables do not reach the child."""
    examples = [{"prompt": p, "completion": c} for p, c in TASK.items()] * 4
    here = sft(base_dir, examples, tmp_path / "here", batch_size=4, max_steps=2, seed=5)
    # a child that saw these would wait for a second process that never comes
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "1")
    args = dict(epochs=1, lr=3e-3, batch_size=4, max_steps=2, seed=5)
    alone = _sft_alone(base_dir, examples, tmp_path / "alone", args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "here"]  # the job file is gone
    weights_here, weights_alone = (
        load_file(here / "model.safetensors"),
        load_file(alone / "model.safetensors"),
    )
    assert weights_here.keys() == weights_alone.keys()
    assert all(torch.equal(weights_here[k], weights_alone[k]) for k in weights_here)


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([], "empty"),
        ([{"prompt": "1+1="}], r"examples\[0\] must be"),
        ([{"prompt": "1", "completion": "2"}, {"prompt": "1", "completion": 2}], r"examples\[1\] must be"),
        ([{"prompt": "1" * 600, "completion": "2"}], "over max_position_embeddings 512"),
        # prompt + completion + eos one token over the limit (513 of 512)
        (
            [{"prompt": "1" * 511, "completion": "2"}],
            r"examples\[0\] is 513 tokens, over max_position_embeddings 512",
        ),
    ],
)
def test_sft_rejects_bad_examples(base_dir, tmp_path, examples, message):
    with pytest.raises(ValueError, match=message):
        sft(base_dir, examples, tmp_path / "out")


@pytest.mark.parametrize("killed_in", ["train", "save"])
def test_sft_cut_short_leaves_no_output_dir_and_reruns(base_dir, tmp_path, monkeypatch, killed_in):
    examples = [{"prompt": p, "completion": c} for p, c in TASK.items()]
    with monkeypatch.context() as patch:
        if killed_in == "save":
            cut_the_weights_save(patch)
        else:
            patch.setattr(transformers.Trainer, "train", die)
        with pytest.raises(Killed):
            sft(base_dir, examples, tmp_path / "sft", max_steps=1)
    assert list(tmp_path.iterdir()) == []  # no output dir, not even the empty one Trainer makes
    AutoModelForCausalLM.from_pretrained(sft(base_dir, examples, tmp_path / "sft", max_steps=1))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_output_layer_is_the_embedding(tokenizer, arch):
    model = build_tiny_model(tokenizer, arch=arch)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_a_model_dir_may_be_an_existing_empty_directory(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    assert create_tiny_model_dir(path, ["ab"]) == path
    assert (path / "model.safetensors").is_file()


def test_the_sft_child_gets_none_of_the_launchers_variables(base_dir, tmp_path, monkeypatch):
    seen = {}

    def run(command, env, check):
        seen.update(env)

    monkeypatch.setattr(core.tiny.subprocess, "run", run)
    launcher = {
        "RANK": "1",
        "MASTER_ADDR": "h",
        "TORCHELASTIC_RUN_ID": "x",
        "ACCELERATE_MIXED_PRECISION": "no",
    }
    for key, value in {**launcher, "OMPI_COMM_WORLD_SIZE": "2", "MY_SETTING": "kept"}.items():
        monkeypatch.setenv(key, value)
    _sft_alone(base_dir, [{"prompt": "1", "completion": "2"}], tmp_path / "out", {})
    assert seen["MY_SETTING"] == "kept"
    assert not {*launcher, "OMPI_COMM_WORLD_SIZE"} & set(seen)
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_without_a_pad_token_is_refused():
    tokenizer = build_char_tokenizer("ab")
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="the tokenizer needs a pad and an eos token"):
        build_tiny_model(tokenizer)
