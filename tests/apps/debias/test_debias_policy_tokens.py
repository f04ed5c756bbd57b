"""The tiny policy's tokenizer: the corpus's words are single tokens, and the prompt ends on a token
boundary, so the answer's tokens are the same whether tokenized after the prompt (SFT) or alone
(generation continues the prompt's tokens)."""

import re
import statistics
from pathlib import Path

from apps.debias.data import DataConfig, generate_splits, load_splits
from apps.debias.train import policy_prompt, word_tokens
from core.tiny import build_char_tokenizer


def _rows():
    return generate_splits(DataConfig(num_prompts=60, seed=3))["train"]


def test_answers_are_words_not_characters():
    rows = _rows()
    texts = [policy_prompt(r["prompt"]) for r in rows] + [r["neutral"] for r in rows]
    tokenizer = build_char_tokenizer(texts, word_tokens(texts))
    answer = rows[0]["neutral"]
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == answer
    assert len(ids) <= len(answer.split()) + answer.count(",") + answer.count(";") + 2
    assert len(ids) < len(answer) / 3


def test_prompt_ends_on_a_token_boundary():
    rows = _rows()
    texts = [policy_prompt(r["prompt"]) for r in rows] + [r[k] for r in rows for k in ("neutral", "biased")]
    tokenizer = build_char_tokenizer(texts, word_tokens(texts))
    for row in rows[:20]:
        prompt = policy_prompt(row["prompt"])
        for answer in (row["neutral"], row["biased"]):
            joint = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
            alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert joint[: len(alone)] == alone
            assert joint[len(alone) :] == tokenizer(answer, add_special_tokens=False)["input_ids"]


def test_a_prompt_ending_in_a_space_would_merge_into_the_answer():
    # the trap the newline avoids: " It" is one token, so "Answer: " + "It" is not "Answer: " then "It"
    tokenizer = build_char_tokenizer(["Answer: It would"], word_tokens(["It would"]))
    joint = tokenizer("Answer: It", add_special_tokens=False)["input_ids"]
    alone = tokenizer("Answer: ", add_special_tokens=False)["input_ids"]
    assert joint[: len(alone)] != alone


def test_the_documented_word_token_figures_hold_on_the_default_data():
    doc = " ".join((Path(__file__).parents[3] / "docs" / "debias.md").read_text().split())
    figures = r"(\d+) words, about (\d+) tokens a neutral answer instead of about (\d+) characters"
    words, tokens, chars = map(int, re.search(figures, doc).groups())
    rows = load_splits(None)["train"]  # the texts the tiny policy is built on (build_sft_policy)
    texts = [policy_prompt(r["prompt"]) for r in rows] + [r[k] for r in rows for k in ("neutral", "biased")]
    forms = word_tokens(texts)
    tokenizer = build_char_tokenizer(texts, forms)
    answers = [r["neutral"] for r in rows]
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert len(forms) == 2 * words
    assert round(statistics.mean(lengths)) == tokens
    assert round(statistics.mean(map(len, answers)), -1) == chars


def test_the_tiny_policy_has_word_tokens_for_the_biased_answers_too(tmp_path, monkeypatch):
    """build_sft_policy builds its tokenizer on the neutral and the biased answers: a word only a biased
    answer has is one token (the SFT is replaced by a stub that reads the built tokenizer)."""
    from apps.debias import train as debias_train
    from apps.debias.train import DebiasTrainConfig, build_sft_policy
    from core.policy import load_tokenizer

    rows = _rows()

    def words(texts):
        return {w for text in texts for w in re.findall(r"[A-Za-z']{2,}", text)}

    others = words(r["neutral"] for r in rows) | words(policy_prompt(r["prompt"]) for r in rows)
    only_biased = sorted(words(r["biased"] for r in rows) - others)
    assert only_biased
    seen = {}

    def stub_sft(init, examples, path, **kwargs):
        seen["tokenizer"] = load_tokenizer(init)
        return Path(path)

    monkeypatch.setattr(debias_train, "sft", stub_sft)
    config = DebiasTrainConfig(reward_model=str(tmp_path), hidden_size=16, num_layers=1)
    build_sft_policy(tmp_path / "policy", rows, config)
    tokenizer = seen["tokenizer"]
    for word in only_biased:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
