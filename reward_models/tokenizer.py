"""A sentencepiece tokenizer trained locally on a corpus, loaded as a `DebertaV2Tokenizer`: the offline
default of the reward model (the real path loads a `deberta-v3-*` directory's own tokenizer).

Traps (transformers 5, MEASURED.md): `DebertaV2Tokenizer(vocab_file=...)` silently ignores the file, so we
load with `from_pretrained(dir)` and the special tokens named explicitly, with the ids trained here; and
sentencepiece refuses a vocabulary larger than the corpus supports unless `hard_vocab_limit=False`.

    tokenizer = train_tokenizer(texts, "runs/rm/tokenizer", vocab_size=2000)
Tests: `pytest tests/reward_models/test_rm_tokenizer.py`.
"""

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from transformers import DebertaV2Tokenizer

from core.atomic import atomic_directory

SPM_FILE = "spm.model"  # the file name DebertaV2Tokenizer.from_pretrained looks for
# ids 0..4, in the order DeBERTa-v3's own vocabulary has them
PAD, CLS, SEP, UNK, MASK = "<pad>", "[CLS]", "[SEP]", "<unk>", "[MASK]"
SPECIAL = {"unk_token": UNK, "pad_token": PAD, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2000) -> DebertaV2Tokenizer:
    """Train a unigram sentencepiece model on `texts`, save it (and the HF tokenizer files) to `out_dir`
    and return it loaded. `out_dir` is replaced whole (core.atomic.atomic_directory): no file of a
    tokenizer trained there before is left to be loaded instead. decode(encode(text)) == text for text
    written in the corpus's characters, up to sentencepiece's whitespace normalisation (runs of spaces
    collapse, ends are stripped); any other character is <unk> (sentencepiece's byte fallback is not
    carried over by the HF conversion)."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no texts to train the tokenizer on")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus supports fewer pieces: take what it has
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        unk_id=3,
        bos_id=-1,
        eos_id=-1,
        control_symbols=[CLS, SEP, MASK],  # ids 1, 2, 4 around unk (the first free ids, in order)
        num_threads=1,
        minloglevel=2,
    )
    with atomic_directory(out_dir) as tmp:
        (tmp / SPM_FILE).write_bytes(buffer.getvalue())
        load_spm_tokenizer(tmp).save_pretrained(tmp)
    return load_spm_tokenizer(out_dir)


def load_spm_tokenizer(path: str | Path) -> DebertaV2Tokenizer:
    """The tokenizer of a directory written by `train_tokenizer` (or any DeBERTa-v2/v3 directory)."""
    path = Path(path)
    if not ((path / SPM_FILE).is_file() or (path / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"{path} has neither {SPM_FILE} nor tokenizer.json; train a tokenizer first")
    return DebertaV2Tokenizer.from_pretrained(path, local_files_only=True, **SPECIAL)
