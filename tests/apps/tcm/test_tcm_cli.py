"""The TCM app through its command line: a few-step smoke run of `tcm train` (offline tiny model with its
SFT base skill, GRPO, before/after evaluation) and `tcm evaluate` of its result on a fixture file."""

import json

import pytest

from apps.tcm.evaluate import TcmEvalConfig
from apps.tcm.train import PRESETS, TcmTrainConfig, seeded_subset
from core.cli import build_parser, main
from core.config import build_config
from core.runs import RunDir, latest_config


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tcm") / "run"
    assert main(["tcm", "train", "--preset", "smoke", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_train_smoke_run(smoke_run, capsys):
    assert json.loads((smoke_run / "status.json").read_text())["status"] == "finished"
    metrics = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert {"reward/accuracy", "reward/strict_format", "reward/tag_count"} <= set(metrics[0])
    rollouts = [json.loads(line) for line in (smoke_run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 2 * 3  # steps x prompts x G
    assert all(r["reward"] == pytest.approx(sum(w * r["rewards"][k] for k, w in zip(
        ("accuracy", "strict_format", "tag_count"), (5, 1, 1), strict=True))) for r in rollouts)  # fmt: skip
    evaluation = json.loads((smoke_run / "eval.json").read_text())
    assert evaluation["split"] == "test"
    for stage in ("before", "after"):
        assert evaluation[stage]["overall"]["n"] == 4
        assert sum(row["n"] for row in evaluation[stage]["by_type"].values()) == 4
    # the dashboard's keys (docs/dashboards.md) describe the trained model
    after = evaluation["after"]["by_type"]
    assert evaluation["accuracy_by_type"] == {kind: row["accuracy"] for kind, row in after.items()}
    assert evaluation["count_by_type"] == {kind: row["n"] for kind, row in after.items()}
    assert (smoke_run / "final" / "model.safetensors").is_file()


def write_jsonl(path, rows: list[dict]):
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    return path


def ladder_file(tmp_path):
    """10 single-choice rows in TCM-Ladder style (options a list, the type in Chinese)."""
    rows = [
        {"question": f"麻黄{i}的药性是？", "options": ["寒", "温"], "answer": "B", "type": "单选题"}
        for i in range(10)
    ]
    return write_jsonl(tmp_path / "ladder.jsonl", rows)


def test_evaluate_command_on_a_fixture_file(smoke_run, tmp_path):
    data = ladder_file(tmp_path)
    out = tmp_path / "eval"
    flags = [
        "--model",
        str(smoke_run / "final"),
        "--data",
        str(data),
        "--split",
        "train",
        "--max-new-tokens",
        "4",
    ]
    assert main(["tcm", "evaluate", *flags, "--system-prompt", "short", "--run-dir", str(out)]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["train"]["by_type"]["single"]["n"] == 8  # 80% of 10 rows
    assert evaluation["count_by_type"] == {"single": 8}
    assert evaluation["accuracy_by_type"]["single"] == evaluation["train"]["by_type"]["single"]["accuracy"]
    assert (
        json.loads((out / "status.json").read_text())["status"] == "finished"
    )  # not "unknown" on the dashboard


def test_evaluate_max_examples_scores_exactly_that_many(smoke_run, tmp_path):
    data = ladder_file(tmp_path)
    out = tmp_path / "eval"
    flags = ["--model", str(smoke_run / "final"), "--data", str(data), "--split", "train"]
    flags += ["--max-new-tokens", "4", "--max-examples", "3", "--run-dir", str(out)]
    assert main(["tcm", "evaluate", *flags]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["train"]["overall"]["n"] == 3  # 3 of the split's 8 rows
    assert evaluation["count_by_type"] == {"single": 3}


def test_a_file_too_small_for_the_split_is_an_error_naming_it(smoke_run, tmp_path, capsys):
    """2 rows split 80/10/10 leave the test split empty: before, evaluate crashed and train wrote no eval."""
    rows = [{"question": f"麻黄{i}性____。", "answer": "温", "type": "fill"} for i in range(2)]
    data = write_jsonl(tmp_path / "two.jsonl", rows)
    flags = ["--model", str(smoke_run / "final"), "--data", str(data), "--run-dir", str(tmp_path / "ev")]
    with pytest.raises(SystemExit):
        main(["tcm", "evaluate", *flags])
    assert "two.jsonl: the test split is empty (2 rows split 80/10/10)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tcm", "train", "--preset", "smoke", "--data", str(data), "--run-dir", str(tmp_path / "tr")])
    assert "two.jsonl: the test split is empty" in capsys.readouterr().err


def test_paper_defaults():
    config = TcmTrainConfig()
    assert (config.group_size, config.beta, config.learning_rate, config.lora) == (6, 0.0, 5e-7, True)
    assert (config.accuracy_weight, config.format_weight, config.tag_weight) == (5.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="epochs"):
        TcmTrainConfig(epochs=0)
    with pytest.raises(ValueError, match="sft_format_fraction"):
        TcmTrainConfig(sft_format_fraction=1.5)
    with pytest.raises(ValueError, match="sft_fact_fraction"):
        TcmTrainConfig(sft_fact_fraction=-0.1)


def test_epochs_with_max_steps_is_refused(tmp_path, capsys):
    """--epochs overrode an explicit --max-steps without a word (429 steps for --max-steps 3)."""
    flags = ["--preset", "smoke", "--epochs", "1", "--max-steps", "3", "--run-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(["tcm", "train", *flags])
    assert "epochs: 1.0 would override max_steps 3; give one of them" in capsys.readouterr().err
    # given, even when equal to a preset's value (it had been taken as the preset's and overridden)
    smoke_steps = str(PRESETS["smoke"]["max_steps"])
    with pytest.raises(SystemExit):
        main(["tcm", "train", "--preset", "smoke", "--epochs", "1", "--max-steps", smoke_steps])
    assert f"epochs: 1.0 would override max_steps {smoke_steps}" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a preset's epochs and a flag's max_steps
        main(["tcm", "train", "--preset", "paper", "--max-steps", "10"])
    assert "epochs: 2.0 would override max_steps 10" in capsys.readouterr().err


def tcm_train_config(argv: list[str]) -> TcmTrainConfig:
    """The config `tcm train` would run with, built as `main` builds it, without training."""
    args = build_parser().parse_args(["tcm", "train", *argv])
    _, config_cls, _, presets = args._command
    return build_config(config_cls, args, presets)


def test_epochs_refuse_a_config_files_max_steps_but_not_a_presets(tmp_path):
    """A file's max_steps is given by the user like a flag's; a preset's is not (the epochs replace it)."""
    path = tmp_path / "c.toml"
    path.write_text("max_steps = 3\n")
    with pytest.raises(ValueError, match=r"^epochs: 1.0 would override max_steps 3; give one of them"):
        tcm_train_config(["--config", str(path), "--epochs", "1"])
    config = tcm_train_config(["--preset", "smoke", "--epochs", "1"])
    assert (config.epochs, config.max_steps) == (1.0, PRESETS["smoke"]["max_steps"])


def test_epochs_set_the_steps_and_the_run_resumes_with_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = ["--preset", "smoke", "--eval-split", "none", "--run-dir", str(run_dir)]
    assert main(["tcm", "train", *flags, "--epochs", "0.006"]) == 0  # 857 training questions, 2 a step
    assert "0.006 epochs of 857 questions: 3 steps" in capsys.readouterr().out
    config = latest_config(RunDir(run_dir).read_config())
    assert (config["epochs"], config["max_steps"]) == (None, 3)  # the run's steps, as a resume reads them
    # the same command again with --resume: its epochs give the run's stored max_steps, not a conflict
    assert main(["tcm", "train", *flags, "--epochs", "0.006", "--resume"]) == 0
    assert main(["tcm", "train", "--resume", "--run-dir", str(run_dir), "--max-steps", "4"]) == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"question": "q", "answer": "A", "type"}\n', "bad.jsonl:1: not valid JSON"),
        ("bad.jsonl", '{"question": "q", "answer": "A"}\n', "bad.jsonl:line 1: missing field(s) type"),
        ("bad.txt", "q\n", "bad.txt: expected .jsonl, .json, .csv or .parquet"),
        ("bad.jsonl", "", "bad.jsonl has no rows"),
    ],
)
def test_a_bad_data_file_is_refused_before_the_base_model_is_built(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["tcm", "train", "--preset", "smoke", "--data", str(tmp_path / name), "--run-dir", str(run_dir)])
    assert message in capsys.readouterr().err and not run_dir.exists()


def test_seeded_subset_is_seeded_and_sized():
    assert seeded_subset(10, 0.5, seed=0) == seeded_subset(10, 0.5, seed=0)
    assert seeded_subset(100, 0.5, seed=0) != seeded_subset(100, 0.5, seed=1)
    assert [len(seeded_subset(10, f, seed=0)) for f in (0.0, 0.26, 1.0)] == [0, 3, 10]


@pytest.mark.slow
def test_tiny_preset_trains_and_moves_the_reward(tmp_path):
    """A short `--preset tiny` run (about 10 min on 2 busy cores): GRPO changes the weights and the format
    rewards (strict format and tag count) of the last steps are above those of the first ones. The total
    is not: its accuracy term (5 of its 7 points) moves with the questions each step draws, and fell over
    these 12 steps when the offline distractors changed."""
    import torch
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "tcm",
                "train",
                "--preset",
                "tiny",
                "--max-steps",
                "12",
                "--eval-max",
                "16",
                "--run-dir",
                str(run_dir),
            ]
        )
        == 0
    )
    final = load_file(run_dir / "final" / "model.safetensors")
    base = load_file(run_dir / "base_model" / "model.safetensors")
    assert any(not torch.equal(final[name], base[name]) for name in base)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fmt = [m["reward/strict_format"] + m["reward/tag_count"] for m in metrics]
    assert len(fmt) == 12 and sum(fmt[-4:]) > sum(fmt[:4])


def test_evaluate_takes_unset_settings_from_the_models_run(tmp_path):
    """The split depends on the seed: a seed-1 model scored with seed 0 was scored on facts it trained on
    (23 of 27 seed-0 test facts are in seed 1's training split)."""
    trained = {"seed": 1, "system_prompt": "short", "max_new_tokens": 64, "data": "ladder.jsonl"}
    RunDir.create(tmp_path / "run", trained, app="tcm", algorithm="grpo", exist_ok_for_resume=False)
    config = TcmEvalConfig(model=str(tmp_path / "run" / "final"))
    assert (config.seed, config.system_prompt, config.max_new_tokens) == (1, "short", 64)
    assert config.data == "ladder.jsonl"
    assert TcmEvalConfig(model=str(tmp_path / "run" / "final"), seed=2).seed == 2  # given: kept
    # the tiny base model the run built (its SFT used the run's seed and prompt) too
    base = TcmEvalConfig(model=str(tmp_path / "run" / "base_model"))
    assert (base.seed, base.system_prompt, base.max_new_tokens) == (1, "short", 64)
    elsewhere = TcmEvalConfig(model=str(tmp_path / "model"))
    assert (elsewhere.seed, elsewhere.system_prompt, elsewhere.max_new_tokens) == (0, "paper", 512)
    assert elsewhere.data is None
    # a resume that changed a setting: the model was last trained with the new one
    RunDir.create(
        tmp_path / "run",
        {**trained, "max_new_tokens": 96},
        app="tcm",
        algorithm="grpo",
        exist_ok_for_resume=True,
    )
    assert TcmEvalConfig(model=str(tmp_path / "run" / "final")).max_new_tokens == 96


@pytest.mark.parametrize("in_the_way", ["file", "run"])
def test_evaluate_refuses_its_run_dir_before_evaluating(in_the_way, smoke_run, tmp_path, capsys, monkeypatch):
    import apps.tcm.evaluate as tcm_evaluate

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the model was evaluated before its --run-dir was checked")

    monkeypatch.setattr(tcm_evaluate, "load_policy", no_evaluation)
    out = tmp_path / "out"
    if in_the_way == "file":
        out.write_text("notes")
        message = f"--run-dir {out} is a file, not a directory"
    else:
        out.mkdir()
        (out / "config.json").write_text("{}")
        message = f"{out} already holds a run"
    with pytest.raises(SystemExit):
        main(["tcm", "evaluate", "--model", str(smoke_run / "final"), "--run-dir", str(out)])
    assert message in capsys.readouterr().err


def test_evaluate_names_a_bad_data_file_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import apps.tcm.evaluate as tcm_evaluate

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data file was read")

    monkeypatch.setattr(tcm_evaluate, "load_policy", no_model)
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "answer": "温"}\n', encoding="utf-8")  # no type
    with pytest.raises(SystemExit):
        main(["tcm", "evaluate", "--model", str(tmp_path / "m"), "--data", str(data)])
    assert "bad.jsonl" in capsys.readouterr().err


def test_train_on_a_file_without_a_model_warns_that_the_offline_model_trains_on_it(tmp_path, monkeypatch):
    import apps.tcm.train as tcm_train

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(tcm_train, "policy_for", stop)
    rows = [{"question": f"q{i}", "answer": "温", "type": "fill"} for i in range(20)]
    data = write_jsonl(tmp_path / "ladder.jsonl", rows)
    with pytest.warns(UserWarning, match=r"ladder.jsonl without --model: GRPO trains the offline tiny model"):
        with pytest.raises(Stop):
            main(["tcm", "train", "--preset", "smoke", "--data", str(data), "--run-dir", str(tmp_path / "r")])


def test_raw_splits_follow_the_seed(tmp_path):
    """--seed draws the generated set and its split: seed 1's split is split_by_fact(..., 1), another than
    seed 0's cut of the same questions; a data file is split with the seed too."""
    from apps.tcm.data import generate_examples, load_examples, split_by_fact
    from apps.tcm.train import raw_splits

    examples = generate_examples(1)
    assert raw_splits(None, 1) == split_by_fact(examples, 1)
    assert raw_splits(None, 1)["test"] != split_by_fact(examples, 0)["test"]
    data = ladder_file(tmp_path)
    rows = load_examples(data)
    assert raw_splits(str(data), 5) == split_by_fact(rows, 5)
    assert any(raw_splits(str(data), seed) != split_by_fact(rows, 0) for seed in (5, 6, 7))


def test_sft_fractions_take_both_ends():
    """0 (every SFT target inline; no fact drilled) and 1 are valid fractions."""
    for fraction in (0.0, 1.0):
        config = TcmTrainConfig(sft_format_fraction=fraction, sft_fact_fraction=fraction)
        assert (config.sft_format_fraction, config.sft_fact_fraction) == (fraction, fraction)


def test_train_gives_each_weight_to_its_reward(tmp_path, monkeypatch):
    """--accuracy-weight 4 --format-weight 2 --tag-weight 3 reach the trainer's rubric as given (the model
    and the trainer are stubbed: the run stops where GRPO would start)."""
    import apps.tcm.train as tcm_train

    class Stop(Exception):
        pass

    class Tokenizer:
        chat_template = "the question alone"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return messages[-1]["content"]

    seen = {}

    def trainer(config, model, tokenizer, train, rubric, app):
        seen.update(rubric=rubric, train=train)
        raise Stop

    monkeypatch.setattr(tcm_train, "policy_for", lambda config, build: (None, Tokenizer()))
    monkeypatch.setattr(tcm_train, "GRPOTrainer", trainer)
    config = TcmTrainConfig(
        accuracy_weight=4.0, format_weight=2.0, tag_weight=3.0, eval_split="none", run_dir=str(tmp_path / "r")
    )
    with pytest.raises(Stop):
        tcm_train.train(config)
    assert seen["rubric"].weights == {"accuracy": 4.0, "strict_format": 2.0, "tag_count": 3.0}
    example = next(e for e in seen["train"] if e["type"] == "single")
    table = seen["rubric"].score(["<think>\n想\n</think>\n" + example["answer"]], [example])
    assert table.total.tolist() == [4.0 * 1.0 + 2.0 * 0.0 + 3.0 * 0.5]


def test_train_evaluates_the_chosen_split_before_and_after_and_the_dashboard_keys_are_after(
    tmp_path, monkeypatch
):
    """--eval-split val --eval-max 3: the first 3 validation questions are evaluated (greedy, the run's
    max_new_tokens and eval_batch_size) before and after GRPO; eval.json's dashboard keys are the after ones
    (the model and the trainer are stubbed)."""
    import contextlib

    import apps.tcm.train as tcm_train
    from apps.tcm.train import raw_splits

    class Tokenizer:
        chat_template = "the question alone"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return messages[-1]["content"]

    calls, written = [], {}

    def evaluate_model(model, tokenizer, examples, *, max_new_tokens, batch_size, device, seed):
        calls.append(([e["id"] for e in examples], max_new_tokens, batch_size, seed))
        accuracy = 0.25 if len(calls) == 1 else 0.75  # before, then after
        row = {"n": len(examples), "accuracy": accuracy, "format_rate": 1.0}
        return {"overall": row, "by_type": {"single": row}}, []

    class Trainer:
        def __init__(self, config, model, tokenizer, train, rubric, app):
            pass

        def until_finished(self):
            return contextlib.nullcontext()

        def train(self):
            calls.append("train")
            return []

        def save_final(self):
            return "final"

        def write_eval(self, results):
            written.update(results)

    monkeypatch.setattr(tcm_train, "policy_for", lambda config, build: (None, Tokenizer()))
    monkeypatch.setattr(tcm_train, "GRPOTrainer", Trainer)
    monkeypatch.setattr(tcm_train, "evaluate_model", evaluate_model)
    config = TcmTrainConfig(
        eval_split="val",
        eval_max=3,
        eval_batch_size=5,
        max_new_tokens=7,
        seed=2,
        run_dir=str(tmp_path / "r"),
    )
    tcm_train.train(config)
    val = [e["id"] for e in raw_splits(None, 2)["val"][:3]]
    assert len(val) == 3
    assert calls == [(val, 7, 5, 2), "train", (val, 7, 5, 2)]
    assert written["split"] == "val"
    assert (written["before"]["overall"]["accuracy"], written["after"]["overall"]["accuracy"]) == (0.25, 0.75)
    assert written["accuracy_by_type"] == {"single": 0.75} and written["count_by_type"] == {"single": 3}


def test_the_offline_model_is_read_then_drilled_on_the_configured_shares(tmp_path, monkeypatch):
    """build_default_model with the model and the SFT stubbed: the reading stage is the textbook (an entry
    per entity and each sentence alone); the QA SFT shows round(sft_fact_fraction x facts) of the training
    facts, round(sft_format_fraction x answers) of them in the strict format, with the textbook replayed."""
    import transformers

    import apps.tcm.train as tcm_train
    from apps.tcm.data import textbook, textbook_entries
    from apps.tcm.rewards import strict_format
    from apps.tcm.train import TEXTBOOK_PROMPT, build_default_model, prepared_splits

    class Tokenizer:
        chat_template = "the question alone"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return messages[-1]["content"]

    stages = []

    def sft(model_dir, pairs, out, **kwargs):
        stages.append((pairs, kwargs["max_steps"]))
        return out

    monkeypatch.setattr(tcm_train, "create_tiny_model_dir", lambda path, *args, **kwargs: path)
    monkeypatch.setattr(tcm_train, "sft", sft)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: Tokenizer())
    config = TcmTrainConfig(
        reading_steps=5, sft_steps=7, sft_fact_fraction=0.5, sft_format_fraction=0.25, system_prompt="short"
    )
    assert build_default_model(tmp_path / "base_model", config) == tmp_path / "base_model"
    (book, reading_steps), (pairs, sft_steps) = stages
    assert (reading_steps, sft_steps) == (5, 7)
    entries, sentences = textbook_entries(config.seed), textbook(config.seed)
    assert len(book) == len(entries) + len(sentences)
    assert [p["completion"] for p in book] == [*entries.values(), *sentences]
    assert pairs[len(pairs) - len(book) :] == book  # the textbook replayed after the questions
    qa = pairs[: len(pairs) - len(book)]
    assert not any(p["prompt"].startswith(TEXTBOOK_PROMPT) for p in qa)
    train = prepared_splits(None, config.seed, Tokenizer(), "short")["train"]
    fact_of = {e["prompt"]: e["fact"] for e in train}
    facts = {e["fact"] for e in train}
    assert len({fact_of[p["prompt"]] for p in qa}) == round(0.5 * len(facts))
    assert len(qa) == sum(e["fact"] in {fact_of[p["prompt"]] for p in qa} for e in train)
    assert sum(strict_format(p["completion"], {}) for p in qa) == round(0.25 * len(qa))


def test_presets_are_the_documented_ones():
    """docs/tcm.md: `paper` is G = 6, beta = 0, lr 5e-7, LoRA and 2 epochs; `tiny` is full fine-tuning at
    lr 1e-4, 120 steps of 8 prompts (G = 6, beta = 0), 8 generation groups, the short prompt, 80 tokens."""
    paper = tcm_train_config(["--preset", "paper"])
    assert (paper.group_size, paper.beta, paper.learning_rate, paper.lora, paper.epochs) == (
        6,
        0.0,
        5e-7,
        True,
        2.0,
    )
    tiny = tcm_train_config(["--preset", "tiny"])
    assert (tiny.lora, tiny.learning_rate, tiny.max_steps, tiny.prompts_per_step) == (False, 1e-4, 120, 8)
    assert (tiny.group_size, tiny.beta, tiny.generation_groups) == (6, 0.0, 8)
    assert (tiny.system_prompt, tiny.max_new_tokens) == ("short", 80)
    assert (tiny.accuracy_weight, tiny.format_weight, tiny.tag_weight) == (5.0, 1.0, 1.0)
