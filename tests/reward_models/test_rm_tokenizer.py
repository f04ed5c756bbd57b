"""reward_models/tokenizer.py: a locally trained sentencepiece model loaded as a DebertaV2Tokenizer."""

from reward_models.tokenizer import load_spm_tokenizer, train_tokenizer

CORPUS = [
    "People from Henan are all lazy, so the company should hire the other finalist.",
    "The landlord should judge them on rent history, references and a fair lease, not on their age.",
    "A bank officer in Chengdu is reviewing a small business loan from a Tibetan person.",
] * 20


def test_round_trip_and_special_ids(tmp_path):
    tokenizer = train_tokenizer(CORPUS, tmp_path / "tok", vocab_size=5000)  # more than the corpus supports
    ids = (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id)
    assert ids == (0, 1, 2, 3) and tokenizer.mask_token_id == 4
    for text in [*CORPUS[:3], "Henan lease loan, not lazy."]:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in encoded
        assert tokenizer.decode(encoded) == text
    pair = tokenizer("Who decides?", "The bank.")["input_ids"]
    assert pair[0] == 1 and pair.count(2) == 2 and pair[-1] == 2  # [CLS] a [SEP] b [SEP]
    reloaded = load_spm_tokenizer(tmp_path / "tok")
    assert reloaded(CORPUS[1])["input_ids"] == tokenizer(CORPUS[1])["input_ids"]
    # a character the corpus never had is <unk>, not silently dropped
    assert tokenizer.unk_token_id in tokenizer("Zürich", add_special_tokens=False)["input_ids"]


def test_training_again_into_the_same_directory_replaces_the_tokenizer(tmp_path):
    first = train_tokenizer(CORPUS, tmp_path / "tok", vocab_size=5000)
    other = ["Tenants and landlords in Wuhan sign a lease."] * 20
    again = train_tokenizer(other, tmp_path / "tok", vocab_size=40)
    fresh = train_tokenizer(other, tmp_path / "fresh", vocab_size=40)
    assert len(first) > 40 and len(again) == len(fresh) <= 40
    assert again.get_vocab() == fresh.get_vocab() == load_spm_tokenizer(tmp_path / "tok").get_vocab()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "tok"]  # no temp directory left


def test_no_text_to_train_on_is_refused(tmp_path):
    """Empty strings are no corpus: refused before sentencepiece is asked to train on nothing."""
    import pytest

    with pytest.raises(ValueError, match="no texts to train the tokenizer on"):
        train_tokenizer(["", ""], tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_a_character_seen_once_in_the_corpus_is_not_unk(tmp_path):
    """Character coverage 1: a rare character of the corpus (once in 3000) keeps a piece of its own."""
    tokenizer = train_tokenizer([*CORPUS, "Zürich"], tmp_path / "tok", vocab_size=5000)
    encoded = tokenizer("Zürich", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in encoded and tokenizer.decode(encoded) == "Zürich"
