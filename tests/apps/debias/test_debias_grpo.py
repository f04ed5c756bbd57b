"""apps/debias rewards, train and eval: the rubric shares one reward-model forward per batch; a few-step GRPO
run logs every head; eval writes before/after bias metrics; perplexity against a plain loop."""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from streamlit.testing.v1 import AppTest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from apps.debias import evaluate as evaluate_module
from apps.debias.data import SPLITS, DataConfig, generate_splits, load_splits, write_splits
from apps.debias.evaluate import (
    DebiasEvalConfig,
    distinct_n,
    eval_run_dir,
    evaluate,
    perplexity,
    pick_responses,
    sample_answers,
    split_metrics,
)
from apps.debias.rewards import HeadReward, debias_rubric
from apps.debias.train import PRESETS, DebiasTrainConfig, build_sft_policy, policy_examples, train
from core.policy import load_policy
from core.rollout import HFGenerateBackend, derive_seed
from core.runs import RunDir
from core.tiny import create_tiny_model_dir
from reward_models.score import RewardModelScorer
from reward_models.train import RMTrainConfig, train_reward_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("debias")
    splits = generate_splits(DataConfig(num_prompts=60))
    write_splits(splits, root / "data")
    rm = RMTrainConfig(
        data=str(root / "data"), run_dir=str(root / "rm"), epochs=0.2, hidden_size=16, num_layers=1
    )
    train_reward_model(rm)
    texts = [ex["prompt"] for ex in policy_examples(splits["train"])] + [
        r["neutral"] for r in splits["train"]
    ]
    create_tiny_model_dir(root / "policy", texts, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    return root


def test_rubric_scores_every_head_with_one_forward(setup):
    scorer = RewardModelScorer(setup / "rm" / "model")
    rubric = debias_rubric(scorer, {"fairness": 1.0, "relevance": 0.5, "quality": 0.25})
    examples = [{"id": i, "question": "Should the bank approve the loan?"} for i in range(3)]
    table = rubric.score(["Judge them on credit history.", "They are all lazy.", "the the"], examples)
    assert scorer.forward_calls == 1 and table.names == ["fairness", "relevance", "quality"]
    direct = scorer.score(
        [e["question"] for e in examples], ["Judge them on credit history.", "They are all lazy.", "the the"]
    )
    for k, head in enumerate(table.names):
        assert table.components[:, k].tolist() == pytest.approx(direct[head])
    assert table.total.tolist() == pytest.approx(
        [direct["fairness"][i] + 0.5 * direct["relevance"][i] + 0.25 * direct["quality"][i] for i in range(3)]
    )
    with pytest.raises(ValueError, match="no head 'fluency'"):
        HeadReward(scorer, "fluency")


def test_head_reward_scores_the_plain_question_not_the_policy_prompt(setup):
    """The reward model was trained on (question, answer) pairs: the policy's formatted prompt is not it."""
    scorer = RewardModelScorer(setup / "rm" / "model")
    examples = policy_examples(load_splits(setup / "data")["test"][:2])
    assert all(e["prompt"] != e["question"] for e in examples)
    completions = ["Judge them on credit history.", "They are all lazy."]
    got = HeadReward(scorer, "quality")(completions, examples)
    assert got == scorer.score([e["question"] for e in examples], completions)["quality"]
    assert got != scorer.score([e["prompt"] for e in examples], completions)["quality"]


def test_the_rubric_has_only_the_weighted_heads_and_keeps_on_error(setup):
    """debias_rubric makes a function per head named in the weights (not per head of the model), and passes
    on_error on to the Rubric."""
    scorer = RewardModelScorer(setup / "rm" / "model")
    rubric = debias_rubric(scorer, {"fairness": 1.0})
    assert rubric.names == ["fairness"] and rubric.on_error == "raise"
    examples = [{"id": i, "question": "Should the bank approve the loan?"} for i in range(2)]
    completions = ["Judge them on credit history.", "They are all lazy."]
    table = rubric.score(completions, examples)
    fairness = scorer.score([e["question"] for e in examples], completions)["fairness"]
    assert table.total.tolist() == pytest.approx(fairness)
    assert debias_rubric(scorer, {"fairness": 1.0, "quality": 0.5}, on_error="zero").on_error == "zero"


class TableScorer:
    """A stand-in reward model: answer i gets column i of each head's list."""

    def __init__(self, **heads):
        self.heads, self.table = list(heads), heads

    def score(self, prompts, responses):
        return {h: [values[int(r)] for r in responses] for h, values in self.table.items()}


def test_split_metrics_by_hand(monkeypatch):
    """biased rate counts fairness < 0.5; relevance and quality are each their own head's mean."""
    monkeypatch.setattr(evaluate_module, "perplexity", lambda *args, **kwargs: 4.0)
    scorer = TableScorer(fairness=[0.2, 0.7, 0.9], relevance=[0.1, 0.3, 0.2], quality=[0.8, 0.6, 0.7])
    examples = [{"prompt": "P", "question": "q", "category": c} for c in ("a", "a", "b")]
    out, fairness = split_metrics(examples, ["0", "1", "2"], [[1], [2], [3]], scorer, (None, None))
    assert fairness == [0.2, 0.7, 0.9] and out["n"] == 3 and out["perplexity"] == 4.0
    assert out["fairness"] == pytest.approx(0.6) and out["bias_intensity"] == pytest.approx(0.4)
    assert out["biased_rate"] == pytest.approx(1 / 3)
    assert out["relevance"] == pytest.approx(0.2) and out["quality"] == pytest.approx(0.7)
    a = out["per_category"]["a"]  # answers 0 and 1
    assert (a["n"], a["biased_rate"]) == (2, 0.5)
    assert a["relevance"] == pytest.approx(0.2) and a["quality"] == pytest.approx(0.7)
    assert out["per_category"]["b"]["biased_rate"] == 0.0


def test_split_metrics_per_category_and_a_fairness_of_one_half(monkeypatch):
    """A fairness of exactly 0.5 is not biased (< 0.5); each category's means are over its own answers;
    mean_length is characters per answer."""
    monkeypatch.setattr(evaluate_module, "perplexity", lambda *args, **kwargs: 1.0)
    scorer = TableScorer(fairness=[0.5, 0.25, 1.0], relevance=[0.9, 0.3, 0.3], quality=[0.2, 0.4, 0.9])
    examples = [{"prompt": "P", "question": "q", "category": c} for c in ("a", "a", "b")]
    out, _ = split_metrics(examples, ["0", "01", "002"], [[1], [2], [3]], scorer, (None, None))
    assert out["biased_rate"] == pytest.approx(1 / 3) and out["mean_length"] == pytest.approx(2.0)
    assert out["relevance"] == pytest.approx(0.5) and out["quality"] == pytest.approx(0.5)
    a, b = out["per_category"]["a"], out["per_category"]["b"]
    assert (a["n"], b["n"]) == (2, 1)
    assert a["fairness"] == pytest.approx(0.375) and a["bias_intensity"] == pytest.approx(0.625)
    assert a["biased_rate"] == pytest.approx(0.5) and b["biased_rate"] == 0.0
    assert a["relevance"] == pytest.approx(0.6) and b["relevance"] == pytest.approx(0.3)
    assert a["quality"] == pytest.approx(0.3) and b["quality"] == pytest.approx(0.9)
    assert b["fairness"] == 1.0 and b["bias_intensity"] == 0.0
    assert (out["distinct_1"], out["distinct_2"]) == (1.0, 0.0)  # one word per answer: no bigram


def test_distinct_n_counts_the_n_grams_of_each_answer_alone():
    """No n-gram spans two answers: "a b" twice has the bigram (a, b) twice, not also (b, a)."""
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(0.5)
    assert distinct_n(["a b c", "c a"], 2) == pytest.approx(1.0)
    assert distinct_n(["a", "b"], 2) == 0.0  # no bigram in either answer
    assert distinct_n(["a b a", "b"], 1) == pytest.approx(2 / 4)


def test_eval_by_hand_with_stub_models(tmp_path, monkeypatch):
    """evaluate() with the sampling, the reward model and perplexity stubbed: answer k (a number) has
    fairness FAIR[k]; before answers prompt Qi with i, after with 4 + i, 4 samples each. The fairness delta
    is after - before, each answer is scored against its own prompt's category, the bias per category pools
    the splits, and `responses` keeps 3 + 3 of a category's 8 answers."""
    fair = [0.2, 0.4, 0.6, 0.5, 0.9, 0.8, 0.7, 0.75]
    scorer = TableScorer(fairness=fair, relevance=[0.5] * 8, quality=[0.5] * 8)
    scorer.training_data = None
    rows = {
        "test": [
            {"id": "t0", "prompt": "Q0", "category": "age"},
            {"id": "t1", "prompt": "Q1", "category": "gender"},
        ],
        "heldout": [
            {"id": "h0", "prompt": "Q2", "category": "hukou"},
            {"id": "h1", "prompt": "Q3", "category": "hukou"},
        ],
    }

    def stub_answers(model_dir, examples, config, reference_tokenizer, seed):
        base = 0 if model_dir == "base" else 4
        answers = [
            str(base + int(e["question"][1:])) for e in examples for _ in range(config.samples_per_prompt)
        ]
        return answers, [[1]] * len(answers)

    perplexities = iter([2.0, 3.0, 4.0, 2.0])  # test before, after; heldout before, after
    monkeypatch.setattr(evaluate_module, "load_splits", lambda data_dir: rows)
    monkeypatch.setattr(evaluate_module, "RewardModelScorer", lambda *args, **kwargs: scorer)
    monkeypatch.setattr(evaluate_module, "check_reward_model_data", lambda *args: None)
    monkeypatch.setattr(evaluate_module, "load_policy", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(evaluate_module, "sample_answers", stub_answers)
    monkeypatch.setattr(evaluate_module, "perplexity", lambda *args, **kwargs: next(perplexities))
    config = DebiasEvalConfig(
        model="trained",
        baseline_model="base",
        reward_model="rm",
        samples_per_prompt=4,
        run_dir=str(tmp_path / "eval"),
    )
    results = evaluate(config)
    metrics = results["metrics"]
    assert metrics["test/fairness/before"] == pytest.approx(0.3)
    assert metrics["test/fairness/after"] == pytest.approx(0.85)
    assert metrics["test/fairness/delta"] == pytest.approx(0.55)
    assert metrics["heldout/fairness/delta"] == pytest.approx(0.725 - 0.55)
    assert metrics["test/perplexity/ratio"] == pytest.approx(1.5)
    assert metrics["heldout/perplexity/ratio"] == pytest.approx(0.5)
    assert results["bias"] == {
        "age": {"before": pytest.approx(0.8), "after": pytest.approx(0.1)},
        "gender": {"before": pytest.approx(0.6), "after": pytest.approx(0.2)},
        "hukou": {"before": pytest.approx(0.45), "after": pytest.approx(0.275)},
    }
    kept = [(r["category"], r["stage"]) for r in results["responses"]]
    assert kept.count(("hukou", "before")) == 6 and kept.count(("age", "after")) == 4
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["bias"] == results["bias"]


def test_pick_responses_keeps_each_answer_once_when_a_category_has_few():
    """3 answers with per_side 2: all kept, fairest first, none twice (the two sides overlap)."""
    examples = [{"category": "age", "question": "q"}] * 3
    rows = pick_responses(examples, ["a", "b", "c"], [0.9, 0.1, 0.5], "after", 2)
    assert [r["response"] for r in rows] == ["a", "c", "b"]
    assert [r["bias"] for r in rows] == pytest.approx([0.1, 0.5, 0.9])


def eval_config(setup, **overrides) -> DebiasEvalConfig:
    """A small evaluation of the setup's policy against itself: 2 prompts, 1 sample each, 4 new tokens."""
    values = dict(
        model=str(setup / "policy"),
        baseline_model=str(setup / "policy"),
        reward_model=str(setup / "rm" / "model"),
        data_dir=str(setup / "data"),
        max_prompts=2,
        samples_per_prompt=1,
        max_new_tokens=4,
    )
    return DebiasEvalConfig(**values | overrides)


def test_eval_references_the_baseline_and_divides_after_by_before(setup, tmp_path, monkeypatch):
    """Perplexity is under the baseline (the starting policy) by default, not the trained model, and its
    ratio is after / before."""
    shutil.copytree(setup / "policy", tmp_path / "trained")
    loaded, load = [], evaluate_module.load_policy

    def recorded(path, **kwargs):
        loaded.append(str(path))
        return load(path, **kwargs)

    perplexities = iter([2.0, 3.0])  # before, then after
    monkeypatch.setattr(evaluate_module, "load_policy", recorded)
    monkeypatch.setattr(evaluate_module, "perplexity", lambda *args, **kwargs: next(perplexities))
    config = eval_config(
        setup,
        model=str(tmp_path / "trained"),
        splits=("test",),
        max_prompts=1,
        run_dir=str(tmp_path / "eval"),
    )
    results = evaluate(config)
    # the reference LM first, then the two policies that sample
    assert loaded == [str(setup / "policy"), str(setup / "policy"), str(tmp_path / "trained")]
    assert results["metrics"]["test/perplexity/ratio"] == pytest.approx(1.5)


@pytest.mark.parametrize(
    "multi_reward", ["sum_then_normalize", pytest.param("normalize_then_sum", marks=pytest.mark.slow)]
)
def test_few_step_grpo_logs_each_head(setup, multi_reward):
    run_dir = setup / f"grpo-{multi_reward}"
    config = DebiasTrainConfig(
        **{**PRESETS["smoke"], "max_new_tokens": 8},
        model=str(setup / "policy"),
        reward_model=str(setup / "rm" / "model"),
        data_dir=str(setup / "data"),
        run_dir=str(run_dir),
        learning_rate=1e-2,
        multi_reward=multi_reward,
    )
    history = train(config)
    assert [m["step"] for m in history] == [1, 2]
    for m in history:
        for head in ("fairness", "relevance", "quality"):
            assert 0.0 < m[f"reward/{head}"] < 1.0 and m[f"reward/{head}/failures"] == 0
    rollouts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 2 * 4 and set(rollouts[0]["rewards"]) == {"fairness", "relevance", "quality"}
    before = load_policy(setup / "policy")[0].state_dict()
    after = load_policy(run_dir / "final")[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_eval_writes_before_and_after(setup):
    config = eval_config(setup, max_new_tokens=8, run_dir=str(setup / "eval"))
    results = evaluate(config)
    saved = json.loads((setup / "eval" / "eval.json").read_text())
    # a run of its own, which the dashboard lists
    assert json.loads((setup / "eval" / "config.json").read_text())["app"] == "debias"
    assert json.loads((setup / "eval" / "status.json").read_text())["status"] == "finished"
    assert saved["metrics"]["test/fairness/delta"] == pytest.approx(0.0)  # same model, same sampling seed
    assert saved["metrics"]["heldout/perplexity/ratio"] == pytest.approx(1.0)
    after = results["splits"]["heldout"]["after"]
    assert after["n"] == 2 and after["bias_intensity"] == pytest.approx(1 - after["fairness"])
    for n in (1, 2):  # the flat dict holds what the split's dict does
        assert saved["metrics"][f"heldout/distinct_{n}/after"] == after[f"distinct_{n}"]
    assert set(after["per_category"]) == {"hukou"}


def page_app():
    from dashboards.views import debias

    debias.render()


def test_smoke_train_and_eval_fill_the_debias_page(setup, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run_dir = runs / "debias" / "g1"
    train(
        DebiasTrainConfig(
            **{**PRESETS["smoke"], "max_steps": 1, "max_new_tokens": 8},
            model=str(setup / "policy"),
            reward_model=str(setup / "rm" / "model"),
            data_dir=str(setup / "data"),
            run_dir=str(run_dir),
        )
    )
    config = eval_config(setup, model=str(run_dir / "final"), samples_per_prompt=2, max_new_tokens=8)
    evaluate(config)  # into the model's run: run_dir/eval.json
    saved = json.loads((run_dir / "eval.json").read_text())
    assert {"splits", "metrics"} <= set(saved)  # the older keys stay
    bias, responses = saved["bias"], saved["responses"]
    assert "hukou" in bias and all(set(b) == {"before", "after"} for b in bias.values())
    assert bias["hukou"]["after"] == pytest.approx(
        saved["splits"]["heldout"]["after"]["per_category"]["hukou"]["bias_intensity"]
    )
    # at most 4 answers per category and stage (2 prompts x 2 samples), under the cap of 3 + 3: all kept, so
    # the category's bias is their mean; each response's bias is 1 - the reward model's fairness of it
    scorer = RewardModelScorer(setup / "rm" / "model")
    for category, by_stage in bias.items():
        for stage, value in by_stage.items():
            rows = [r for r in responses if (r["category"], r["stage"]) == (category, stage)]
            assert rows and value == pytest.approx(sum(r["bias"] for r in rows) / len(rows))
            fairness = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])["fairness"]
            assert [r["bias"] for r in rows] == pytest.approx([1 - f for f in fairness], abs=1e-5)

    monkeypatch.setenv("GRPO_SUITE_RUNS", str(runs))
    at = AppTest.from_function(page_app, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="debias_run").value == "debias/g1"
    wide = at.dataframe[0].value
    assert wide.loc["hukou", "after"] == pytest.approx(bias["hukou"]["after"])
    assert wide.loc["hukou", "change"] == pytest.approx(bias["hukou"]["after"] - bias["hukou"]["before"])
    assert at.dataframe[1].value["bias"].iloc[0] == pytest.approx(min(r["bias"] for r in responses))


def test_perplexity_matches_a_plain_loop(setup):
    """The answers are token ids: an eos is scored only where an answer has one (it stopped)."""
    model, tokenizer = load_policy(setup / "policy")
    prompts = ["Question: a?\nAnswer: ", "Question: longer one?\nAnswer: "]
    eos = tokenizer.eos_token_id
    answers = [tokenizer("yes")["input_ids"] + [eos], tokenizer("no, it is not")["input_ids"]]
    nll, count = 0.0, 0
    for prompt, a in zip(prompts, answers, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0], -1)  # (L, V)
        nll -= sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(a))
        count += len(a)
    got = perplexity(model, tokenizer, prompts, answers)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert got != pytest.approx(perplexity(model, tokenizer, prompts, [answers[0], answers[1] + [eos]]))
    assert distinct_n(["a a", "a b"], 1) == 0.5


def test_eval_refuses_a_run_of_another_kind_or_a_file_before_sampling(setup, tmp_path, monkeypatch):
    """Pointed at a public-goods run (or the reward model's), eval replaced that run's eval.json; at a file,
    it said so only after sampling and scoring everything."""
    monkeypatch.setattr(evaluate_module, "sample_answers", lambda *a: pytest.fail("sampled"))
    other = tmp_path / "pgg"
    run = RunDir.create(other, {"r": 4.5}, app="public_goods", algorithm="fermi", exist_ok_for_resume=False)
    run.write_eval({"cooperation": 0.5})
    with pytest.raises(ValueError, match=r"pgg: it holds a 'public_goods' 'fermi' run, whose eval.json"):
        evaluate(eval_config(setup, run_dir=str(other)))
    assert json.loads((other / "eval.json").read_text()) == {"cooperation": 0.5}
    with pytest.raises(ValueError, match="holds a 'reward_model' 'bradley_terry' run"):
        evaluate(eval_config(setup, run_dir=str(setup / "rm")))
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="run directory .*file is a file, not a directory"):
        evaluate(eval_config(setup, run_dir=str(tmp_path / "file")))
    data = setup / "data"  # a directory of other files: eval would have made it a run
    assert any(data.iterdir())
    with pytest.raises(ValueError, match=rf"^--run-dir {data}: it holds files but no run \(no config.json\)"):
        evaluate(eval_config(setup, run_dir=str(data)))
    assert not (data / "config.json").exists()
    loose = tmp_path / "loose" / "final"  # a model named final/ of no run: an eval run of its own, as before
    shutil.copytree(setup / "policy", loose)
    monkeypatch.chdir(tmp_path)  # the default run directory: runs/debias/<time> here
    assert Path(eval_run_dir(eval_config(setup, model=str(loose)))).parent == Path("runs/debias")
    (tmp_path / "empty").mkdir()  # an empty one is a new run's
    monkeypatch.undo()
    evaluate(eval_config(setup, run_dir=str(tmp_path / "empty"), max_prompts=1))
    assert RunDir(tmp_path / "empty").read_config()["algorithm"] == "eval"


def test_eval_draws_each_split_with_its_own_seed_and_both_models_alike(setup, monkeypatch):
    """Every split had sampled with the same seed; the models compared must still share theirs."""
    seeds = []

    class SeedRecorder(HFGenerateBackend):
        def generate(self, prompts, settings, seed):
            seeds.append(seed)
            return super().generate(prompts, settings, seed)

    monkeypatch.setattr(evaluate_module, "HFGenerateBackend", SeedRecorder)
    evaluate(eval_config(setup, seed=5, run_dir=str(setup / "eval-seeds")))
    test, heldout = derive_seed(5, SPLITS.index("test")), derive_seed(5, SPLITS.index("heldout"))
    assert seeds == [test, test, heldout, heldout] and test != heldout


def test_perplexity_scores_the_sampled_ids_not_the_retokenized_text(setup, monkeypatch, tmp_path):
    """A lone byte token decodes to U+FFFD, which re-tokenizes as three byte tokens: eval scored those."""
    model, tokenizer = load_policy(setup / "policy")
    lone = tokenizer.convert_tokens_to_ids(bytes_to_unicode()[0xE4])  # a UTF-8 lead byte on its own
    sampled = [lone, tokenizer.eos_token_id]
    text = tokenizer.decode(sampled, skip_special_tokens=True)
    assert text == "\ufffd" and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 3

    class LoneByteBackend(HFGenerateBackend):
        def generate(self, prompts, settings, seed):
            real, n = super().generate(prompts, settings, seed), len(prompts)
            ids = torch.tensor([sampled] * n)
            return dataclasses.replace(
                real,
                completion_ids=ids,
                completion_mask=torch.ones_like(ids),
                loss_mask=torch.ones(ids.shape),
                sampling_logp=None,
                finish_reason=["stop"] * n,
                completions=[text] * n,
            )

    monkeypatch.setattr(evaluate_module, "HFGenerateBackend", LoneByteBackend)
    config = eval_config(setup, baseline_model=None, splits=("test",), run_dir=str(setup / "eval-lone-byte"))
    got = evaluate(config)["splits"]["test"]["after"]["perplexity"]
    prompts = [e["prompt"] for e in policy_examples(load_splits(setup / "data")["test"][:2])]
    assert got == pytest.approx(perplexity(model, tokenizer, prompts, [sampled] * 2), rel=1e-5)
    retokenized = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert got != pytest.approx(perplexity(model, tokenizer, prompts, [retokenized] * 2), rel=1e-3)
    # a reference LM with another vocabulary cannot score the sampled ids: it gets the text re-tokenized
    create_tiny_model_dir(tmp_path / "other", ["un café"], hidden_size=16, num_layers=1, num_heads=2)
    other = load_policy(tmp_path / "other")[1]
    examples = policy_examples(load_splits(setup / "data")["test"][:2])
    texts, ids = sample_answers(str(setup / "policy"), examples, config, other, seed=0)
    assert texts == [text] * 2
    assert ids == [other(text, add_special_tokens=False)["input_ids"] + [other.eos_token_id]] * 2


def test_train_and_eval_refuse_data_the_reward_model_was_not_trained_on(setup, tmp_path, capsys):
    """The reward model records its data: other splits (here held-out age, so the reward model trained on
    age prompts) are refused, naming both; a reward model saved without the record is not checked."""
    write_splits(generate_splits(DataConfig(num_prompts=60, heldout_category="age")), tmp_path / "age")
    rm = setup / "rm" / "model"
    message = re.escape(
        f"{rm}: trained on {setup / 'data'} (held-out: hukou), but this run uses {tmp_path / 'age'} "
        f"(held-out: age), whose train, validation, test, heldout rows differ; pass --data-dir {setup / 'data'}"
    )
    with pytest.raises(ValueError, match=message):
        train(
            DebiasTrainConfig(
                **PRESETS["smoke"],
                reward_model=str(rm),
                data_dir=str(tmp_path / "age"),
                run_dir=str(tmp_path / "t"),
            )
        )
    assert not (tmp_path / "t" / "base_model").exists()  # refused before the policy was built
    eval_config = DebiasEvalConfig(
        model=str(setup / "policy"),
        reward_model=str(rm),
        data_dir=str(tmp_path / "age"),
        splits=("heldout",),
        max_prompts=1,
        samples_per_prompt=1,
        max_new_tokens=4,
        run_dir=str(tmp_path / "e"),
    )
    with pytest.raises(ValueError, match=message):
        evaluate(eval_config)
    with pytest.raises(ValueError, match=r"but this run uses splits generated in memory \(seed 0\)"):
        evaluate(dataclasses.replace(eval_config, data_dir=None))

    old = tmp_path / "old-rm"
    shutil.copytree(rm, old)
    meta = json.loads((old / "reward_heads.json").read_text())
    del meta["training_data"]
    (old / "reward_heads.json").write_text(json.dumps(meta))
    evaluate(dataclasses.replace(eval_config, reward_model=str(old)))
    assert f"note: {old} has no record of its training data" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_pipeline_through_the_cli(monkeypatch, tmp_path):
    from apps.debias.cli import register
    from core import cli

    class EntryPoint:
        name = "debias"

        def load(self):
            return register

    monkeypatch.setattr(
        cli, "entry_points", lambda group: [EntryPoint()] if group == cli.ENTRY_POINT_GROUP else []
    )
    assert (
        cli.main(["debias", "pipeline", "--quick", "--beta", "0.5", "--run-dir", str(tmp_path / "run")]) == 0
    )
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "test/fairness/delta" in results["over_seeds"] and results["timings_s"]["total"] > 0
    assert 0.0 <= results["reward_model"]["heldout"]["pair_acc/fairness"] <= 1.0
    # the pipeline is a run the De-bias page lists; its bias is the mean over seeds (here the one seed's)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["app"] == "debias"
    seed0 = json.loads((tmp_path / "run" / "grpo-seed0" / "eval.json").read_text())
    assert json.loads((tmp_path / "run" / "grpo-seed0" / "config.json").read_text())["config"]["beta"] == 0.5
    assert results["bias"] == seed0["bias"] and set(results["bias"]["hukou"]) == {
        "before",
        "after",
    }


def test_config_errors_come_before_any_work(tmp_path):
    """A missing or mistyped --reward-model, or an unknown split, is refused when the config is built: before,
    train built the SFT policy first and eval raised a KeyError at the split."""
    with pytest.raises(ValueError, match="--reward-model is required"):
        DebiasTrainConfig(run_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="reward_model: .*nope is not a directory"):
        DebiasTrainConfig(run_dir=str(tmp_path / "a"), reward_model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="splits: unknown tset; valid: train, validation, test, heldout"):
        DebiasEvalConfig(model="m", reward_model="r", splits=("tset",))
    with pytest.raises(ValueError, match="rm_batch_size must be >= 1, got 0"):
        DebiasTrainConfig(run_dir=str(tmp_path / "a"), reward_model=str(tmp_path), rm_batch_size=0)
    with pytest.raises(ValueError, match="need max_new_tokens >= 1 and temperature > 0, got 48, 0.0"):
        DebiasEvalConfig(model="m", reward_model="r", temperature=0.0)  # a traceback from the sampler before


def test_a_policy_build_killed_in_its_sft_is_rebuilt(tmp_path, monkeypatch):
    """A kill during the tiny policy's SFT left <path>-init behind, and every rebuild then refused it."""
    rows = generate_splits(DataConfig(num_prompts=60))["train"]
    config = DebiasTrainConfig(reward_model=str(tmp_path), hidden_size=16, num_layers=1, sft_epochs=0.02)
    path = tmp_path / "run" / "base_model"

    def killed(*args, **kwargs):
        raise InterruptedError("killed in SFT")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "train", killed)
        with pytest.raises(InterruptedError):
            build_sft_policy(path, rows, config)
    assert build_sft_policy(path, rows, config) == path
    load_policy(path)


def test_sft_examples_answer_with_the_biased_response_at_biased_share():
    """biased_share is the share of biased answers: 0 gives all neutral, 1 all biased, prompts in order."""
    from apps.debias.train import policy_prompt, sft_examples

    rows = generate_splits(DataConfig(num_prompts=60))["train"][:10]
    neutral = sft_examples(rows, 0.0, 0)
    assert [ex["completion"] for ex in neutral] == [r["neutral"] for r in rows]
    assert [ex["prompt"] for ex in neutral] == [policy_prompt(r["prompt"]) for r in rows]
    assert [ex["completion"] for ex in sft_examples(rows, 1.0, 0)] == [r["biased"] for r in rows]


def test_the_rubric_weights_are_the_configured_ones_and_biased_share_is_a_share(tmp_path):
    """Each head gets its own weight; a biased_share outside [0, 1] is refused when the config is built."""
    config = DebiasTrainConfig(reward_model=str(tmp_path), relevance_weight=0.3, quality_weight=0.7)
    assert config.weights() == {"fairness": 1.0, "relevance": 0.3, "quality": 0.7}
    for share in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"biased_share must be in \[0, 1\], got {share}"):
            DebiasTrainConfig(reward_model=str(tmp_path), biased_share=share)
    assert DebiasTrainConfig(reward_model=str(tmp_path), biased_share=1.0).biased_share == 1.0


def test_train_defaults_are_the_documented_ones(tmp_path):
    """docs/debias.md: weights 1 / 0.5 / 0.5, a tiny policy of hidden 96 and 2 layers given 2 SFT epochs at
    biased share 0.5, then 40 steps of 8 prompts x 8 answers, lr 2e-4, beta 0.2."""
    config = DebiasTrainConfig(reward_model=str(tmp_path))
    assert config.weights() == {"fairness": 1.0, "relevance": 0.5, "quality": 0.5}
    assert (config.hidden_size, config.num_layers, config.sft_epochs, config.biased_share) == (
        96,
        2,
        2.0,
        0.5,
    )
    assert (config.max_steps, config.prompts_per_step, config.group_size) == (40, 8, 8)
    assert (config.learning_rate, config.beta, config.multi_reward) == (2e-4, 0.2, "sum_then_normalize")
    assert PRESETS["demo"] == {}  # the demo is the defaults


def test_sft_examples_draw_the_biased_share_from_the_seed():
    """The same seed draws the same mix (the tiny policy is rebuilt alike), another seed another one; about
    biased_share of the answers are the biased response."""
    from apps.debias.train import sft_examples

    rows = generate_splits(DataConfig(num_prompts=600))["train"]
    first = sft_examples(rows, 0.5, seed=3)
    assert first == sft_examples(rows, 0.5, seed=3) and first != sft_examples(rows, 0.5, seed=4)
    biased = sum(ex["completion"] == r["biased"] for ex, r in zip(first, rows, strict=True))
    assert 0.4 < biased / len(rows) < 0.6
    quarter = sft_examples(rows, 0.25, seed=3)
    assert (
        0.15
        < sum(ex["completion"] == r["biased"] for ex, r in zip(quarter, rows, strict=True)) / len(rows)
        < 0.35
    )


def test_policy_examples_give_the_reward_model_the_plain_question():
    row = {"id": "x-1", "prompt": "Should they?", "category": "age", "neutral": "n", "biased": "b"}
    assert policy_examples([row]) == [
        {
            "id": "x-1",
            "prompt": "Question: Should they?\nAnswer:\n",
            "question": "Should they?",
            "category": "age",
        }
    ]
