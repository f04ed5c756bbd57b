"""Tiny HF causal LMs and character-level tokenizers built locally: the offline default models.

Nothing here downloads anything. `create_tiny_model_dir` writes a directory that loads with
`AutoTokenizer.from_pretrained` / `AutoModelForCausalLM.from_pretrained`, and `sft` gives such a model a
base skill with TRL's `SFTTrainer` on CPU before GRPO. Example:

    path = create_tiny_model_dir("runs/tiny-base", texts=["12+34=46"], extra_tokens=["<answer>"])
    path = sft(path, [{"prompt": "1+1=", "completion": "2"}], "runs/tiny-sft", epochs=3)

The tokenizer is a `Qwen2Tokenizer` (byte-level BPE) whose merges only assemble single characters, so
every character seen in the texts is one token and any other character falls back to its UTF-8 bytes.
Why not a WordLevel vocabulary with <unk>: transformers 5 `AutoTokenizer` loads every directory whose
config says `qwen2` as `Qwen2Tokenizer`, which rebuilds its byte-level pipeline around the saved
vocabulary and ignores the saved pre-tokenizer and decoder; a WordLevel tokenizer then silently drops
spaces, newlines and non-ASCII text. Built as a Qwen2Tokenizer in the first place, it reloads
identically under any loader and arch.

Token ids: the special tokens (`SPECIAL_TOKENS`, ids 0-3), then `extra_tokens` in the order given, then
the 256 bytes in byte order (so an ASCII character's id is its code + the ids before), then each
multi-byte character of the texts in code-point order (after its partial-byte pieces, needed by BPE).
Text is NFC-normalised on encoding, the only case where decode(encode(text)) != text.
Tests: `pytest tests/core/test_tiny.py`.
"""

import json
import os
import subprocess
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from core.atomic import atomic_directory

PAD, ENDOFTEXT, IM_START, IM_END = "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ids 0..3 in this order. eos is <|im_end|> so a chat completion stops at the end of the assistant turn;
# pad is its own token so padding never reads as a stop; <|endoftext|> is the bos id (as in Qwen2's
# config) but is never prepended: encoding a string maps its characters and nothing else. No <unk>:
# the byte fallback leaves nothing unknown.
SPECIAL_TOKENS = (PAD, ENDOFTEXT, IM_START, IM_END)

# ChatML. The `generation` block marks the assistant's reply and its <|im_end|>, so TRL's
# `assistant_only_loss` and `return_assistant_tokens_mask` work with this template as is.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

ARCHS: dict[str, type[PretrainedConfig]] = {"qwen2": Qwen2Config, "llama": LlamaConfig}


def build_char_tokenizer(
    texts_or_alphabet: Iterable[str], extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: each character of `texts_or_alphabet` (a list of texts, or one
    string used as an alphabet) is one token, each of `extra_tokens` (multi-character strings such as
    "<think>") is one token, any other character is its UTF-8 bytes. Left padding, ChatML template."""
    for token in extra_tokens:
        if not isinstance(token, str) or len(token) < 2:
            raise ValueError(
                "extra_tokens must be strings of 2+ characters (a character is a token already), "
                f"got {token!r}"
            )
        if token in SPECIAL_TOKENS:
            raise ValueError(f"extra token {token!r} is already a special token: {', '.join(SPECIAL_TOKENS)}")
    if len(set(extra_tokens)) != len(extra_tokens):
        raise ValueError(f"extra_tokens has duplicates: {list(extra_tokens)}")
    byte_symbol = bytes_to_unicode()  # byte -> the printable character byte-level BPE writes it as
    # an added token is decoded through the byte-level decoder, where these characters stand for one raw
    # byte each (é is byte 0xE9): such a token would decode to U+FFFD
    byte_chars = {c for c in byte_symbol.values() if ord(c) > 126}
    for token in extra_tokens:
        clash = sorted(set(token) & byte_chars)
        if clash:
            raise ValueError(
                f"extra token {token!r}: {', '.join(clash)} cannot be in an added token of a byte-level "
                "tokenizer (it decodes as a raw byte); leave the token out, its characters are tokens already"
            )
    chars: set[str] = set()
    for text in texts_or_alphabet:  # as the encoder will see them: a character NFC rewrites never reaches it
        chars.update(unicodedata.normalize("NFC", text))

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *extra_tokens))}
    vocab.update({byte_symbol[b]: len(vocab) + b for b in range(256)})
    merges: list[tuple[str, str]] = []
    # A multi-byte character is built left to right from its bytes; its prefixes start at a lead byte,
    # so no merge can join bytes of two different characters.
    for char in sorted(chars):
        symbols = [byte_symbol[b] for b in char.encode("utf-8")]
        for i in range(1, len(symbols)):
            left, right = "".join(symbols[:i]), symbols[i]
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        pad_token=PAD,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        padding_side="left",  # prompts are left-padded for batched generation
        clean_up_tokenization_spaces=False,  # the clean-up eats spaces before punctuation: no round trip
        chat_template=CHAT_TEMPLATE,
    )
    # Added tokens are matched in the raw text before BPE, so "<|im_start|>" or "<think>" written in a
    # string encodes as one id. Extra tokens are not special: decoding with skip_special_tokens keeps
    # them, since apps parse them out of completions.
    tokenizer.add_tokens([AddedToken(IM_START, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM sized for `tokenizer`, in float32 and eval mode (as
    `from_pretrained` returns it). The same seed gives bitwise the same weights; the global RNG is
    left as it was. `num_kv_heads` defaults to `num_heads` (no GQA), `intermediate_size` to 4x hidden."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs a pad and an eos token (build it with build_char_tokenizer)")
    config = ARCHS[arch](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    # HF initialises weights from the global torch RNG; fork it so the seed stays local.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # sdpa, not eager: the attention choice is not saved in config.json and from_pretrained picks
        # sdpa, so only sdpa gives the in-memory model bitwise the logits of every reload of it.
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def _new_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; pick a new directory")
    return path


def create_tiny_model_dir(
    path: str | Path, texts: Iterable[str], extra_tokens: Sequence[str] = (), **model_kwargs
) -> Path:
    """Build a tokenizer on `texts` and a tiny model (`model_kwargs` go to `build_tiny_model`) and save
    both to `path` (safetensors). `path` must not exist or be empty, so nothing is silently replaced. It
    appears whole or not at all: a kill during the save leaves no `path` with a cut-off weights file."""
    path = _new_dir(path)
    tokenizer = build_char_tokenizer(texts, extra_tokens)
    model = build_tiny_model(tokenizer, **model_kwargs)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def sft(
    model_dir: str | Path,
    examples: list[dict[str, str]],
    output_dir: str | Path,
    *,
    epochs: float = 1,
    lr: float = 3e-3,
    batch_size: int = 8,
    max_steps: int | None = None,
    seed: int = 0,
) -> Path:
    """Supervised fine-tuning with TRL's `SFTTrainer` on CPU; saves the final model and tokenizer to
    `output_dir` (safetensors; it must not exist or be empty) and returns it. Training runs in a sibling
    directory renamed to `output_dir` once the save is done, so a kill leaves no half-written `output_dir`.

    Examples are plain text: the completion directly follows the prompt string, TRL appends the eos
    token (<|im_end|>) to the completion, and the loss is on the completion and that eos only. For
    chat-style training render the prompt first with `tokenizer.apply_chat_template(messages,
    add_generation_prompt=True, tokenize=False)`: the appended <|im_end|> then closes the assistant turn
    exactly as the template would. `lr` defaults to a from-scratch rate for tiny models (TRL's 2e-5 is
    for pretrained ones). `transformers.Trainer` seeds the global python/numpy/torch RNGs with `seed`.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        args = dict(epochs=epochs, lr=lr, batch_size=batch_size, max_steps=max_steps, seed=seed)
        return _sft_alone(model_dir, examples, output_dir, args)
    # Imported here: trl is an optional extra (`grpo-suite[sft]`) and slow to import.
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    output_dir = _new_dir(output_dir)
    if not examples:
        raise ValueError("examples is empty")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    limit = model.config.max_position_embeddings
    for i, example in enumerate(examples):
        if set(example) != {"prompt", "completion"} or not all(isinstance(v, str) for v in example.values()):
            raise ValueError(f"examples[{i}] must be {{'prompt': str, 'completion': str}}, got {example!r}")
        n_tokens = len(
            tokenizer(example["prompt"] + example["completion"] + tokenizer.eos_token)["input_ids"]
        )
        if n_tokens > limit:
            raise ValueError(f"examples[{i}] is {n_tokens} tokens, over max_position_embeddings {limit}")

    # the Trainer's output_dir too: it creates that directory when built
    with atomic_directory(output_dir) as tmp:
        config = SFTConfig(
            output_dir=str(tmp),
            num_train_epochs=epochs,
            max_steps=-1 if max_steps is None else max_steps,
            learning_rate=lr,
            per_device_train_batch_size=batch_size,
            seed=seed,
            data_seed=seed,
            completion_only_loss=True,
            max_length=None,  # lengths were checked above; TRL would otherwise truncate silently at 1024
            # TRL turns checkpointing on by default; at this size it only costs time. The new name: passing
            # transformers 5's deprecated `gradient_checkpointing` alias warns.
            activation_checkpointing=False,
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            report_to="none",
        )
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(examples), processing_class=tokenizer
        )
        trainer.train()
        # Trainer sets config.use_cache = args.use_cache (False) for training; saved that way, every later
        # generate with the default config would run without a KV cache.
        trainer.model.config.use_cache = True
        trainer.save_model(str(tmp))
    return output_dir


# What torchrun and `accelerate launch` put in a process's environment to make it join their group.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
_LAUNCHER_PREFIXES = ("MASTER_", "TORCHELASTIC_", "ACCELERATE_", "GROUP_", "ROLE_", "PMI_", "OMPI_", "MV2_")


def _sft_alone(model_dir, examples: list[dict[str, str]], output_dir, args: dict) -> Path:
    """`sft` in a child process outside the launch's process group. Under `accelerate launch` or torchrun,
    TRL's Trainer in one process (the one that builds an app's base model while the others wait) would
    join the group: its barriers and gradient all-reduces would pair with the other processes' waits."""
    output_dir = _new_dir(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    spec = output_dir.with_name(output_dir.name + ".sft-job.json")
    spec.write_text(
        json.dumps({"model_dir": str(model_dir), "examples": examples, "output_dir": str(output_dir), **args})
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCHER_VARIABLES and not key.startswith(_LAUNCHER_PREFIXES)
    }
    try:
        subprocess.run([sys.executable, "-m", "core.tiny", str(spec)], env=env, check=True)
    finally:
        spec.unlink()
    return output_dir


if __name__ == "__main__":  # python -m core.tiny JOB.json: the child of `_sft_alone`
    job = json.loads(Path(sys.argv[1]).read_text())
    sft(job.pop("model_dir"), job.pop("examples"), job.pop("output_dir"), **job)
