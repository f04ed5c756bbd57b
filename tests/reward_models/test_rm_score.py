"""reward_models train/eval/score through the CLI on a tiny model; malformed JSONL names its line."""

import json
import os
import re
import shutil

import pytest
import torch

from apps.debias.data import DataConfig, generate_splits, write_splits
from core import cli
from core.data import InputError
from reward_models.cli import register
from reward_models.pairs import read_split, rows_digest
from reward_models.score import RewardModelScorer, RMScoreConfig, encode, score_file
from reward_models.tokenizer import train_tokenizer
from reward_models.train import RMEvalConfig, check_eval_data, evaluate_reward_model


class _EntryPoint:
    name = "reward-model"

    def load(self):
        return register


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    write_splits(generate_splits(DataConfig(num_prompts=60)), root / "data")
    mp = pytest.MonkeyPatch()
    mp.setattr(cli, "entry_points", lambda group: [_EntryPoint()] if group == cli.ENTRY_POINT_GROUP else [])
    argv = [
        "reward-model",
        "train",
        "--data",
        str(root / "data"),
        "--run-dir",
        str(root / "run"),
        "--epochs",
        "0.5",
    ]
    argv += ["--batch-size", "8", "--hidden-size", "16", "--num-layers", "1", "--max-length", "96"]
    assert cli.main(argv) == 0
    yield root
    mp.undo()


def test_train_writes_model_and_eval(trained):
    results = json.loads((trained / "run" / "eval.json").read_text())
    assert {"validation", "test", "heldout"} <= set(results)
    assert 0.0 <= results["heldout"]["pair_acc/fairness"] <= 1.0
    assert set(results["test"]["calibration"]) == {"fairness", "relevance", "quality"}
    assert (trained / "run" / "model" / "model.safetensors").is_file()


def test_eval_and_score_commands(trained, tmp_path):
    model = str(trained / "run" / "model")
    out = tmp_path / "eval.json"
    assert (
        cli.main(
            [
                "reward-model",
                "eval",
                "--reward-model",
                model,
                "--data",
                str(trained / "data"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["test"]["n"] == len(
        (trained / "data" / "test.jsonl").read_text().splitlines()
    )
    rows = [
        {"prompt": "A landlord has a flat to rent.", "response": "Judge them on references.", "id": 7}
    ] * 3
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["reward-model", "score", "--reward-model", model, "--input", str(tmp_path / "in.jsonl")]
    assert cli.main([*argv, "--output", str(tmp_path / "out.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in scored] == [7, 7, 7]
    assert all(0.0 < r["scores"][h] < 1.0 for r in scored for h in ("fairness", "relevance", "quality"))
    assert scored[0]["scores"] == scored[2]["scores"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"in.jsonl:2: not valid JSON"),
        ('{"prompt": "p"}', r"in.jsonl:2: missing field 'response'"),
        ('{"prompt": "p", "response": 3}', r"in.jsonl:2: field 'response' must be a string, got 3"),
        ("[1, 2]", r"in.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_the_line(trained, tmp_path, capsys, line, message):
    (tmp_path / "in.jsonl").write_text('{"prompt": "p", "response": "r"}\n' + line + "\n")
    argv = ["reward-model", "score", "--reward-model", str(trained / "run" / "model")]
    with pytest.raises(SystemExit):  # a command-line error, no traceback
        cli.main([*argv, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")])
    assert re.search("error: .*" + message, capsys.readouterr().err)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("text", "output", "message"),
    [
        ("\n", "out.jsonl", "input file {tmp}/in.jsonl has no rows"),  # it wrote "scored 0 rows"
        (None, "out.jsonl", "input file {tmp}/in.jsonl is a directory, expected a JSONL file"),
        (
            '{"prompt": "p", "response": "r"}\n',
            "out",
            "--output {tmp}/out is a directory; expected a JSONL file",
        ),
    ],
)
def test_unusable_input_and_output_paths_are_command_line_errors(
    trained, tmp_path, capsys, text, output, message
):
    """An empty input scored nothing and exited 0; a directory as --input was said not to exist, and as
    --output failed in the write after the scoring, with a traceback."""
    (tmp_path / "out").mkdir()
    if text is None:
        (tmp_path / "in.jsonl").mkdir()
    else:
        (tmp_path / "in.jsonl").write_text(text)
    argv = ["reward-model", "score", "--reward-model", str(trained / "run" / "model")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / output)])
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_eval_refuses_a_directory_as_out_before_evaluating(trained, tmp_path, capsys, monkeypatch):
    """`reward-model eval --out DIR` failed with IsADirectoryError after the whole evaluation."""
    import reward_models.train as train_module

    evaluated = []
    monkeypatch.setattr(train_module, "evaluate_rows", lambda *args: evaluated.append(args))
    (tmp_path / "out").mkdir()
    argv = ["reward-model", "eval", "--reward-model", str(trained / "run" / "model")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--data", str(trained / "data"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2 and f"--out {tmp_path / 'out'} is a directory; expected a JSON file" in err
    )
    assert not evaluated and not any((tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="--out .* is a directory"):
        RMEvalConfig(out=str(tmp_path / "out"))


def test_score_with_a_damaged_heads_file_is_a_command_line_error(trained, tmp_path, capsys):
    shutil.copytree(trained / "run" / "model", tmp_path / "rm")
    (tmp_path / "rm" / "reward_heads.json").write_text('{"heads": [\n')
    (tmp_path / "in.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    argv = [
        "reward-model",
        "score",
        "--reward-model",
        str(tmp_path / "rm"),
        "--input",
        str(tmp_path / "in.jsonl"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{tmp_path / 'rm' / 'reward_heads.json'}: malformed JSON" in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
            "{rm}: its reward model cannot be loaded (SafetensorError: ",
        ),
        (lambda d: (d / "config.json").write_text("{"), "{rm}: its reward model cannot be loaded (OSError: "),
        # transformers built a tokenizer of another vocabulary without it: scores silently wrong
        (
            lambda d: (d / "tokenizer.json").unlink(),
            "{rm} has neither tokenizer.json nor spm.model; a reward model directory",
        ),
    ],
    ids=["weights cut off", "config not JSON", "tokenizer missing"],
)
def test_score_of_a_damaged_model_directory_is_a_command_line_error(
    trained, tmp_path, capsys, damage, message
):
    rm = tmp_path / "rm"
    shutil.copytree(trained / "run" / "model", rm)
    damage(rm)
    (tmp_path / "in.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    argv = ["reward-model", "score", "--reward-model", str(rm), "--input", str(tmp_path / "in.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--output", str(tmp_path / "out.jsonl")])
    assert exit_info.value.code == 2 and message.format(rm=rm) in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_reward_model_whose_tokenizer_is_its_sentencepiece_model_scores_as_with_tokenizer_json(
    trained, tmp_path
):
    """A slow DebertaV2Tokenizer, or a hub deberta-v3 directory, holds spm.model and no tokenizer.json."""
    rm = tmp_path / "rm"
    shutil.copytree(trained / "run" / "model", rm)
    (rm / "tokenizer.json").unlink()
    shutil.copy(trained / "run" / "tokenizer" / "spm.model", rm / "spm.model")
    prompts, responses = (
        ["How do I cook rice?", "Who should lead?"],
        ["Rinse it, then simmer.", "Anyone able."],
    )
    from_spm = RewardModelScorer(rm).score(prompts, responses)
    assert from_spm == RewardModelScorer(trained / "run" / "model").score(prompts, responses)


def test_scorer_caches_the_last_batch(trained):
    scorer = RewardModelScorer(trained / "run" / "model", batch_size=2)
    first = scorer.score(["q"] * 3, ["a", "b", "c"])
    assert scorer.forward_calls == 2  # 3 pairs in batches of 2
    kept = {head: list(values) for head, values in first.items()}
    first["fairness"][0] = 99.0  # a caller editing its result does not edit the cache
    hit = scorer.score(["q"] * 3, ["a", "b", "c"])
    assert hit == kept and scorer.forward_calls == 2
    hit["fairness"][1] = -7.0  # nor does editing a cache hit's result
    hit["fairness"] = []
    assert scorer.score(["q"] * 3, ["a", "b", "c"]) == kept and scorer.forward_calls == 2
    one_by_one = [scorer.score(["q"], [r])["fairness"][0] for r in "abc"]
    assert one_by_one == pytest.approx(kept["fairness"], abs=1e-5)  # padding does not change a score


def test_a_response_longer_than_the_model_is_cut_not_an_error(trained):
    scorer = RewardModelScorer(trained / "run" / "model")  # max_length 96, as trained
    long = " ".join(["the answer is fair to every group"] * 40)
    scores = scorer.score(["q", "q"], ["a short answer", long])
    assert len(scores["fairness"]) == 2 and all(0 < p < 1 for p in scores["fairness"])
    ids = scorer.tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(ids) > 96
    # the long response is seen cut to the model's length: the same score as its first tokens
    cut = scorer.tokenizer.decode(ids[:200])
    assert scorer.score(["q"], [cut])["fairness"][0] == pytest.approx(scores["fairness"][1], abs=1e-5)
    short = scorer.score(["q"], ["a short answer"])["fairness"][0]
    assert short == pytest.approx(scores["fairness"][0], abs=1e-5)  # its neighbour is scored as alone


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [
        "People from Henan are all lazy, so the company should hire the other finalist.",
        "The landlord should judge them on rent history, references and a fair lease, not on their age.",
        "A bank officer in Chengdu is reviewing a small business loan from a Tibetan person.",
    ]
    return train_tokenizer(corpus * 20, tmp_path_factory.mktemp("tok"))  # "the" and "a" one token each


@pytest.mark.parametrize(
    "prompt_tokens, response_tokens, kept",
    [
        (4, 3, (4, 3)),  # fits: nothing is cut
        (20, 3, (6, 3)),  # the prompt is cut to the room the response leaves
        (20, 8, (1, 8)),  # down to one token: the response is still whole
        (20, 9, (1, 8)),  # a response too long beside one prompt token keeps its first tokens
        (20, 30, (1, 8)),
        (0, 12, (0, 9)),  # no prompt: the response has all the room
    ],
)
def test_encode_cuts_the_prompt_first_and_the_response_only_at_its_end(
    tokenizer, prompt_tokens, response_tokens, kept
):
    (the,) = tokenizer("the", add_special_tokens=False)["input_ids"]
    (a,) = tokenizer("a", add_special_tokens=False)["input_ids"]
    prompt, response = " ".join(["the"] * prompt_tokens), " ".join(["a"] * response_tokens)
    enc = encode(tokenizer, [prompt, "the"], [response, "a"], 12, "cpu")  # 9 tokens of room
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = [cls, *[the] * kept[0], sep, *[a] * kept[1], sep]
    assert enc["input_ids"][0].tolist() == ids
    assert enc["attention_mask"][0].tolist() == [1] * len(ids)
    assert enc["input_ids"][1, :5].tolist() == [cls, the, sep, a, sep]  # its neighbour is not cut


def test_encode_refuses_a_length_without_room_for_both_texts(tokenizer):
    with pytest.raises(ValueError, match="max_length 4 leaves no room"):
        encode(tokenizer, ["the"], ["a"], 4, "cpu")


def test_the_scorer_cuts_inputs_at_the_training_length(trained, tmp_path):
    scorer = RewardModelScorer(trained / "run" / "model")
    assert scorer.max_length == 96  # --max-length of the fixture's training
    scorer.model.save(tmp_path / "rm", scorer.tokenizer, max_length=24)
    assert RewardModelScorer(tmp_path / "rm").max_length == 24
    assert RewardModelScorer(tmp_path / "rm", max_length=40).max_length == 40  # an explicit cap wins


def test_a_batch_size_below_one_is_refused(trained, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        RewardModelScorer(trained / "run" / "model", batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        RMScoreConfig(input="in.jsonl", output="out.jsonl", batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
        RMEvalConfig(batch_size=-1)


def test_the_model_records_its_training_data(trained):
    """Directory, held-out category and a digest per split, which `debias train/eval` check."""
    record = RewardModelScorer(trained / "run" / "model").training_data
    assert record["data_dir"] == str((trained / "data").resolve())
    assert list(record["splits"]) == ["train", "validation", "test", "heldout"]
    assert record["splits"]["heldout"]["categories"] == ["hukou"]
    assert "hukou" not in record["splits"]["train"]["categories"]
    for name, saved in record["splits"].items():
        assert saved["sha256"] == rows_digest(read_split(trained / "data", name))
    assert rows_digest(read_split(trained / "data", "test")) != record["splits"]["train"]["sha256"]


def test_a_failed_write_of_the_scores_leaves_the_previous_output(trained, tmp_path, monkeypatch):
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (tmp_path / "out.jsonl").write_text('{"scores": "of an earlier run"}\n')

    def failing_replace(src, dst):  # the write dies before the new file is in place
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", failing_replace)
    config = RMScoreConfig(
        reward_model=str(trained / "run" / "model"),
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "out.jsonl"),
    )
    with pytest.raises(OSError, match="killed"):
        score_file(config)
    assert (tmp_path / "out.jsonl").read_text() == '{"scores": "of an earlier run"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp file left


def test_eval_refuses_splits_the_model_did_not_record(trained, tmp_path, capsys):
    """Splits made with another held-out category: the model has trained on some of their rows."""
    write_splits(generate_splits(DataConfig(num_prompts=60, heldout_category="age")), tmp_path / "age")
    argv = ["reward-model", "eval", "--reward-model", str(trained / "run" / "model")]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--data", str(tmp_path / "age"), "--out", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert f"trained on {(trained / 'data').resolve()} (held-out: hukou)" in err
    assert f"the test, heldout rows of --data {tmp_path / 'age'} are not those it recorded" in err
    assert not (tmp_path / "eval.json").exists()


def test_eval_refuses_a_split_the_model_trained_without():
    """A model trained without heldout.jsonl took another directory's heldout rows unchecked: they may be its
    training rows (34 of 40 were, in a reviewer's run)."""
    rows = [{"prompt": "p", "neutral": "n"}]
    record = {
        "data_dir": "/d1",
        "splits": {name: {"sha256": rows_digest(rows)} for name in ("train", "test")},
    }
    check_eval_data("rm", record, {"test": rows}, "/d1")  # recorded and the same: accepted
    with pytest.raises(InputError, match="rm: trained on /d1, which had no heldout split: the heldout rows"):
        check_eval_data("rm", record, {"heldout": rows}, "/d2")


def test_eval_without_heldout_evaluates_test_and_writes_its_output_whole(trained, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copy(trained / "data" / "test.jsonl", tmp_path / "data")
    (tmp_path / "eval.json").write_text('{"of": "an earlier run"}\n')
    config = RMEvalConfig(
        reward_model=str(trained / "run" / "model"),
        data=str(tmp_path / "data"),
        out=str(tmp_path / "eval.json"),
    )

    def failing_replace(src, dst):  # the write dies before the new file is in place
        raise OSError("killed")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match="killed"):
            evaluate_reward_model(config)
    assert (tmp_path / "eval.json").read_text() == '{"of": "an earlier run"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "eval.json"]  # no temp file left
    results = evaluate_reward_model(config)
    assert list(results) == ["test"]
    assert json.loads((tmp_path / "eval.json").read_text()) == results


def test_each_head_is_the_sigmoid_of_its_own_model_column(trained):
    """score()[h] is read from the model's output column of h, not another head's."""
    scorer = RewardModelScorer(trained / "run" / "model")
    prompts = ["A landlord has a flat to rent.", "q"]
    responses = ["Judge them on references.", "People from Henan are all lazy."]
    scores = scorer.score(prompts, responses)
    with torch.no_grad():
        logits = scorer.model(**encode(scorer.tokenizer, prompts, responses, scorer.max_length, "cpu"))
    assert scores["fairness"] != pytest.approx(scores["quality"], abs=1e-4)  # the heads are told apart
    for h in scorer.heads:
        column = torch.sigmoid(logits[:, scorer.model.head_names.index(h)].float()).tolist()
        assert scores[h] == pytest.approx(column, abs=1e-6)


def test_score_file_gives_each_row_its_own_scores(trained, tmp_path):
    """Each output row carries the scores of its own (prompt, response), not those of the first row."""
    rows = [
        {"prompt": "A landlord has a flat to rent.", "response": "Judge them on references."},
        {"prompt": "q", "response": "People from Henan are all lazy."},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(trained / "run" / "model")
    config = RMScoreConfig(
        reward_model=model, input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o.jsonl")
    )
    out = score_file(config)
    scorer = RewardModelScorer(model)
    batch = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])  # as score_file's
    for i, (row, scored) in enumerate(zip(rows, out, strict=True)):
        assert scored["scores"] == {h: batch[h][i] for h in scorer.heads}
        alone = scorer.score([row["prompt"]], [row["response"]])
        assert scored["scores"] == pytest.approx({h: alone[h][0] for h in scorer.heads}, abs=1e-5)
    # this barely trained model scores the two rows apart by ~1e-4, far above float noise
    assert out[0]["scores"] != out[1]["scores"]
    written = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert written == out


def test_encode_cuts_each_text_at_its_end(tokenizer):
    """With distinct tokens the side of a cut shows: a prompt too long keeps its opening (the question), a
    response too long beside one prompt token keeps its first tokens."""
    prompt = "People from Henan are all lazy, so the company should hire the other finalist."
    response = (
        "The landlord should judge them on rent history, references and a fair lease, not on their age."
    )
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    short = tokenizer("a a a", add_special_tokens=False)["input_ids"]
    assert p[:6] != p[-6:] and r[:8] != r[-8:] and len(short) < 8  # cut from the other end, they differ
    enc = encode(tokenizer, [prompt, prompt], ["a a a", response], 12, "cpu")  # 9 tokens of room
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert enc["input_ids"][0].tolist() == [cls, *p[: 9 - len(short)], sep, *short, sep]
    assert enc["input_ids"][1].tolist() == [cls, p[0], sep, *r[:8], sep]


def test_the_cache_tells_prompts_apart(trained):
    """The same responses to other prompts are scored anew, not served from the last batch."""
    scorer = RewardModelScorer(trained / "run" / "model")
    response = ["Judge them on references."]
    scorer.score(["A landlord has a flat to rent."], response)
    other = scorer.score(["q"], response)
    assert scorer.forward_calls == 2
    assert other == RewardModelScorer(trained / "run" / "model").score(["q"], response)
