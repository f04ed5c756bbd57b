"""reward_models/deberta.py and train.py: shapes, save/load, the loss by hand, one step lowers it, metrics."""

import json
import math
from pathlib import Path

import pytest
import torch

from core.data import InputError
from reward_models.deberta import (
    HEADS,
    MultiHeadRewardModel,
    build_tiny_reward_model,
    from_pretrained_encoder,
    tiny_deberta_config,
)
from reward_models.pairs import labels
from reward_models.train import calibration, evaluate_rows, flatten, rm_loss


def tiny_model(seed=0):
    config = tiny_deberta_config(
        50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    return build_tiny_reward_model(config, seed=seed)


def batch(b=8, length=12):
    ids = torch.randint(5, 50, (b, length), generator=torch.Generator().manual_seed(0))  # (B, L)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    ids[0, 8:] = 0
    return ids, mask


def test_forward_shapes_and_save_load(tmp_path):
    model = tiny_model().eval()
    ids, mask = batch()
    logits = model(ids, mask)
    assert logits.shape == (8, len(HEADS)) and model.head_names == list(HEADS)
    assert torch.equal(tiny_model().eval()(ids, mask), logits)  # the seed fixes the weights
    model.save(tmp_path / "rm")
    loaded = MultiHeadRewardModel.load(tmp_path / "rm")
    assert torch.allclose(loaded(ids, mask), logits, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="reward_heads.json"):
        (tmp_path / "rm" / "reward_heads.json").unlink()
        MultiHeadRewardModel.load(tmp_path / "rm")


def test_a_failed_save_leaves_no_model_directory(tmp_path, monkeypatch):
    import reward_models.deberta as deberta

    def cut_short(state, path):
        Path(path).write_bytes(b"\x00" * 8)  # a weights file cut short, as a kill would leave it
        raise KeyboardInterrupt

    monkeypatch.setattr(deberta, "save_file", cut_short)
    with pytest.raises(KeyboardInterrupt):
        tiny_model().save(tmp_path / "rm")
    assert list(tmp_path.iterdir()) == []  # the rerun finds no half-written model in its way


def test_loss_by_hand():
    logits = torch.zeros(8, 3)  # 2 rows x 4 responses
    targets = torch.ones(8, 3)
    loss, metrics = rm_loss(logits, targets, head_loss_weight=0.5)
    assert metrics["bt"] == pytest.approx(math.log(2)) and metrics["bce"] == pytest.approx(math.log(2))
    assert float(loss) == pytest.approx(1.5 * math.log(2))
    logits[0, 0], logits[1, 0] = 2.0, -1.0  # row 0: neutral fairness 2, biased -1 -> margin 3
    _, metrics = rm_loss(logits, targets, 1.0)
    assert metrics["bt"] == pytest.approx((math.log1p(math.exp(-3)) + math.log(2)) / 2)
    assert metrics["pair_acc"] == 0.5


def test_one_training_step_lowers_the_loss():
    model = tiny_model()
    ids, mask = batch()
    targets = torch.tensor(
        [[1.0, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]] * 2
    )  # neutral, biased, off-topic, garbled
    model.eval()  # no dropout: the two losses are comparable
    before, _ = rm_loss(model(ids, mask), targets, 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before.backward()
    optimizer.step()
    after, _ = rm_loss(model(ids, mask), targets, 1.0)
    assert after.item() < before.item()


def test_calibration_counts_a_probability_of_one():
    """p = 1.0 falls in the last bin (index 10 clamped to 9), not outside every bin."""
    assert calibration(torch.tensor([1.0]), torch.tensor([0.0])) == {"ece": 1.0, "brier": 1.0}
    assert calibration(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == {"ece": 0.5, "brier": 0.5}


def test_calibration_and_pairwise_metrics_with_a_fake_scorer():
    assert calibration(torch.tensor([0.95, 0.95, 0.05]), torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(
        {"ece": 2 / 3 * 0.45 + 1 / 3 * 0.05, "brier": (0.05**2 + 0.95**2 + 0.05**2) / 3}
    )
    rows = [
        {"prompt": "p1", "category": "a", "neutral": "n", "biased": "b", "off_topic": "o", "garbled": "g",
         "garbled_source": "neutral"},
        {"prompt": "p2", "category": "b", "neutral": "n", "biased": "b", "off_topic": "o", "garbled": "g",
         "garbled_source": "biased"},
    ]  # fmt: skip

    class Fake:  # fairness prefers neutral only in row 1; relevance and quality always right
        def score(self, prompts, responses):
            table = {"n": [0.9, 0.9, 0.9], "b": [0.2, 0.9, 0.9], "o": [0.9, 0.1, 0.9], "g": [0.5, 0.9, 0.1]}
            out = [table[r] for r in responses]
            out[5] = [0.95, 0.9, 0.9]  # row 2's biased answer scores fairer than its neutral one
            return {h: [o[k] for o in out] for k, h in enumerate(HEADS)}

    results = evaluate_rows(Fake(), rows)
    assert results["pair_acc/fairness"] == 0.5 and results["pair_acc/relevance"] == 1.0
    assert results["pair_acc/quality"] == 1.0
    assert results["per_category"]["a"]["pair_acc/fairness"] == 1.0
    assert results["per_category"]["b"]["pair_acc/fairness"] == 0.0
    assert results["per_category"]["a"]["n"] == results["per_category"]["b"]["n"] == 1  # rows of each
    # each kind's mean of each head over the two rows: biased fairness (0.2 + 0.95) / 2
    assert results["mean_score"]["biased"]["fairness"] == pytest.approx(0.575)
    assert results["mean_score"]["off_topic"]["relevance"] == pytest.approx(0.1)
    assert results["mean_score"]["garbled"]["quality"] == pytest.approx(0.1)
    assert results["mean_score"]["neutral"] == pytest.approx(
        {"fairness": 0.9, "relevance": 0.9, "quality": 0.9}
    )
    _, _, targets = flatten(rows)
    assert targets[7].tolist() == [labels(rows[1], "garbled")[h] for h in HEADS] == [0.0, 1.0, 0.0]


def test_quality_compares_the_garbled_answer_with_its_clean_source():
    """A row garbled from its biased answer: quality wins when the biased answer beats the garbled one,
    whatever the neutral answer's quality."""
    rows = [
        {"prompt": "p", "category": "a", "neutral": "n", "biased": "b", "off_topic": "o", "garbled": "g",
         "garbled_source": "biased"},
    ]  # fmt: skip

    class Fake:  # quality: neutral 0.05 < garbled 0.1 < biased (the source) 0.9
        def score(self, prompts, responses):
            table = {"n": [0.9, 0.9, 0.05], "b": [0.2, 0.9, 0.9], "o": [0.9, 0.1, 0.9], "g": [0.5, 0.9, 0.1]}
            return {h: [table[r][k] for r in responses] for k, h in enumerate(HEADS)}

    results = evaluate_rows(Fake(), rows)
    assert results["pair_acc/quality"] == 1.0 and results["per_category"]["a"]["pair_acc/quality"] == 1.0


def test_a_missing_encoder_directory_is_a_command_line_error(tmp_path, capsys):
    """`reward-model train --model <typo>` ended in a Hub repo-id traceback after loading the data."""
    from core.cli import main

    with pytest.raises(SystemExit):
        main(
            [
                "reward-model",
                "train",
                "--model",
                str(tmp_path / "deberta-v3-smal"),
                "--run-dir",
                str(tmp_path),
            ]
        )
    assert "is not a local model directory (no config.json)" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", ["qwen2", "deberta"])
def test_an_encoder_that_is_not_deberta_v2_is_a_command_line_error(tmp_path, capsys, model_type):
    """`reward-model train --model <a Qwen2 directory>` trained a DeBERTa with every weight new, exit 0."""
    from core.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": model_type}))
    run_dir = tmp_path / "rm"
    with pytest.raises(SystemExit) as exit_info:
        main(["reward-model", "train", "--model", str(model), "--run-dir", str(run_dir)])
    message = f"model: {model} is a {model_type!r} model, not a DeBERTa-v2/v3 encoder"
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not run_dir.exists()


def test_from_pretrained_encoder_takes_a_deberta_v2_directory(tmp_path):
    tiny_model().encoder.save_pretrained(tmp_path / "deberta")
    assert from_pretrained_encoder(tmp_path / "deberta").head_names == list(HEADS)
    (tmp_path / "deberta" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(InputError, match="is a 'qwen2' model, not a DeBERTa-v2/v3 encoder"):
        from_pretrained_encoder(tmp_path / "deberta")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"heads": [\n', r"reward_heads.json: malformed JSON \(Expecting value at line 2 column 1\)"),
        ("[]", r"reward_heads.json: expected a JSON object, got list"),
        ('{"max_length": 96}', r"reward_heads.json: missing key\(s\) 'heads', 'dropout'"),
        (
            '{"heads": "fairness", "dropout": 0.1}',
            r"reward_heads.json: \"heads\" must be a list of distinct head names",
        ),
        ('{"heads": ["fairness"], "dropout": null}', r"reward_heads.json: \"dropout\" must be a number"),
        ('{"heads": ["fairness"], "dropout": true}', r"reward_heads.json: \"dropout\" must be a number"),
        (
            '{"heads": [], "dropout": 0.1}',
            r"reward_heads.json: \"heads\" must be a list of distinct head names",
        ),
        ('{"heads": ["a", ""], "dropout": 0.1}', r"reward_heads.json: \"heads\" must be a list of distinct"),
        (
            '{"heads": ["fairness", "fairness", "quality"], "dropout": 0.1}',
            r"reward_heads.json: \"heads\" must be a list of distinct head names, got \['fairness', 'fairness'",
        ),
        (
            '{"heads": ["fairness"], "dropout": 0.1, "max_length": "128"}',
            r"reward_heads.json: \"max_length\" must be an int >= 5 or null, got '128'",
        ),
        (
            '{"heads": ["fairness"], "dropout": 0.1, "max_length": 4}',
            r"reward_heads.json: \"max_length\" must be an int >= 5 or null, got 4",
        ),
        (
            '{"heads": ["fairness"], "dropout": 0.1, "max_length": true}',
            r"reward_heads.json: \"max_length\" must be an int >= 5 or null, got True",
        ),
        (
            '{"heads": ["fairness"], "dropout": 0.1, "training_data": 5}',
            r"reward_heads.json: \"training_data\" must be null or the record .* got 5$",
        ),
        (
            '{"heads": ["fairness"], "dropout": 0.1, "training_data": {"data_dir": "d", "splits": {"t": {}}}}',
            r"reward_heads.json: \"training_data\" must be null or the record",
        ),
    ],
)
def test_a_damaged_heads_file_is_an_input_error_naming_it(tmp_path, text, message):
    """A damaged reward_heads.json was a bare JSONDecodeError (or KeyError) traceback."""
    tiny_model().save(tmp_path / "rm")
    (tmp_path / "rm" / "reward_heads.json").write_text(text)
    with pytest.raises(InputError, match=f"{tmp_path / 'rm'}/{message}"):
        MultiHeadRewardModel.load(tmp_path / "rm")


def test_the_head_loss_weight_scales_the_bce_not_the_bradley_terry_loss():
    """Row 0's neutral fairness logit 2, every other logit 0, every target 1: BT = (softplus(-2) + log 2) / 2,
    BCE = (softplus(-2) + 23 log 2) / 24 (24 logits); loss = BT + 0.5 * BCE."""
    logits, targets = torch.zeros(8, 3), torch.ones(8, 3)
    logits[0, 0] = 2.0
    loss, metrics = rm_loss(logits, targets, head_loss_weight=0.5)
    bt = (math.log1p(math.exp(-2)) + math.log(2)) / 2
    bce = (math.log1p(math.exp(-2)) + 23 * math.log(2)) / 24
    assert metrics["bt"] == pytest.approx(bt) and metrics["bce"] == pytest.approx(bce)
    assert float(loss) == pytest.approx(bt + 0.5 * bce)


def test_each_heads_calibration_is_against_its_own_targets():
    """One row, targets (fairness, relevance, quality): neutral 1 1 1, biased 0 1 1, off-topic 1 0 1,
    garbled (from neutral) 1 1 0. Fairness 0.9 0.2 0.9 0.5: ECE 2/4 * 0.1 + 1/4 * 0.2 + 1/4 * 0.5 = 0.225,
    Brier (0.01 + 0.04 + 0.01 + 0.25) / 4. Relevance 0.9 0.9 0.1 0.9: ECE 3/4 * 0.1 + 1/4 * 0.1 = 0.1,
    Brier 0.01."""
    rows = [
        {"prompt": "p", "category": "a", "neutral": "n", "biased": "b", "off_topic": "o", "garbled": "g",
         "garbled_source": "neutral"},
    ]  # fmt: skip

    class Fake:
        def score(self, prompts, responses):
            table = {"n": [0.9, 0.9, 0.9], "b": [0.2, 0.9, 0.9], "o": [0.9, 0.1, 0.9], "g": [0.5, 0.9, 0.1]}
            return {h: [table[r][k] for r in responses] for k, h in enumerate(HEADS)}

    calibrated = evaluate_rows(Fake(), rows)["calibration"]
    assert calibrated["fairness"] == pytest.approx({"ece": 0.225, "brier": 0.31 / 4})
    assert calibrated["relevance"] == pytest.approx({"ece": 0.1, "brier": 0.01})
    assert calibrated["quality"] == pytest.approx({"ece": 0.1, "brier": 0.01})


def test_duplicate_head_names_are_refused():
    """Two heads of one name would be one module in the ModuleDict, read into two columns."""
    encoder = tiny_model().encoder
    with pytest.raises(ValueError, match=r"heads must be distinct non-empty names, got \['a', 'a'\]"):
        MultiHeadRewardModel(encoder, ["a", "a"])
    with pytest.raises(ValueError, match="heads must be distinct"):
        MultiHeadRewardModel(encoder, [])


def test_a_weights_file_missing_a_weight_is_refused(tmp_path):
    """Loading is strict: a missing head would otherwise keep its random initialisation."""
    from safetensors.torch import load_file, save_file

    tiny_model().save(tmp_path / "rm")
    weights = load_file(str(tmp_path / "rm" / "model.safetensors"))
    del weights["heads.quality.weight"]
    save_file(weights, str(tmp_path / "rm" / "model.safetensors"))
    with pytest.raises(InputError) as info:  # a command-line error naming the file, not a traceback
        MultiHeadRewardModel.load(tmp_path / "rm")
    assert str(info.value).startswith(
        f"{tmp_path / 'rm' / 'model.safetensors'}: the weights do not fit the directory's config.json and "
        "reward_heads.json (Error(s) in loading state_dict for MultiHeadRewardModel: Missing key(s) in "
        'state_dict: "heads.quality.weight".'
    )


def test_the_tiny_models_config_takes_its_overrides_and_its_seed_leaves_the_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model = tiny_model(seed=1)
    assert torch.equal(torch.rand(3), expected)  # the global RNG is left as it was
    config = model.encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (16, 1, 2)
    assert config.intermediate_size == 32 and config.vocab_size == 50
    assert model.heads["fairness"].in_features == 16
    assert not torch.equal(model.heads["fairness"].weight, tiny_model(seed=2).heads["fairness"].weight)


def test_from_pretrained_encoder_seeds_the_heads_whatever_the_global_rng(tmp_path):
    tiny_model().encoder.save_pretrained(tmp_path / "deberta")
    torch.manual_seed(1)
    first = from_pretrained_encoder(tmp_path / "deberta", seed=7)
    torch.manual_seed(2)
    again = from_pretrained_encoder(tmp_path / "deberta", seed=7)
    other = from_pretrained_encoder(tmp_path / "deberta", seed=8)
    for name in HEADS:
        assert torch.equal(first.heads[name].weight, again.heads[name].weight)
    assert not torch.equal(first.heads["fairness"].weight, other.heads["fairness"].weight)


def test_a_missing_directory_or_a_training_run_is_named_as_such(tmp_path):
    """A missing directory was reported as a missing config.json; a run directory as a missing heads file."""
    with pytest.raises(
        FileNotFoundError, match=f"reward model directory {tmp_path / 'nope'} does not exist$"
    ):
        MultiHeadRewardModel.load(tmp_path / "nope")
    tiny_model().save(tmp_path / "run" / "model")
    with pytest.raises(InputError, match=f"{tmp_path / 'run'} is a reward-model training run; its model is "):
        MultiHeadRewardModel.load(tmp_path / "run")
    assert MultiHeadRewardModel.load(tmp_path / "run" / "model").head_names == list(tiny_model().head_names)
