"""apps/math_reasoning algorithms: Scaf-GRPO's hint selection and row swap (with a scripted sampler),
GTPO's conflict weights in a real step, CoDistill's KD term and importance weights against a plain-loop
reference and hand values, and that each algorithm's own metric is computed in a few-step run."""

import math
import os
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apps.math_reasoning.codistill import CoDistillHooks, no_grad_logprobs, verifiable_advantages
from apps.math_reasoning.compare import arm_values
from apps.math_reasoning.data import offline_sets
from apps.math_reasoning.gtpo import GTPOHooks
from apps.math_reasoning.rewards import rubric_for
from apps.math_reasoning.scaf import _SCAF_SEED_KEY, ScafHooks, exemption_steps, hint_levels
from apps.math_reasoning.templates import get_template
from apps.math_reasoning.train import MathTrainConfig, make_hooks
from core import algos
from core.policy import load_policy, position_ids_from_mask
from core.rewards import Rubric
from core.rollout import Rollouts, derive_seed, left_pad
from core.runs import RunDir
from core.trainer import GRPOTrainer

TEMPLATE = get_template("r1_short")
SETS = offline_sets(1234, 20, 10, 20)  # the same as conftest.py's, which built the tokenizer


def examples(n: int) -> list[dict]:
    return [e | {"prompt": TEMPLATE.render(e["question"])} for e in SETS.train[:n]]


class ScriptedBackend:
    """A sampler that answers by a rule on the prompt text, so a test knows which rollouts are right."""

    def __init__(self, tokenizer, rule):
        self.tokenizer, self.rule = tokenizer, rule

    def generate(self, prompts, settings, seed):
        texts = [self.rule(p, i) for i, p in enumerate(prompts)]
        tok = self.tokenizer
        prompt_ids, prompt_mask = left_pad(
            tok(prompts, add_special_tokens=False)["input_ids"], tok.pad_token_id
        )
        rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return Rollouts(
            prompt_ids, prompt_mask, ids, mask, mask.float(), None, False, ["stop"] * len(rows), list(prompts),
            texts, [1] * len(rows), tok.pad_token_id,
        )  # fmt: skip

    def update_weights(self, model):
        pass


def config(tmp_path, **overrides) -> MathTrainConfig:
    base = dict(
        run_dir=str(tmp_path / "run"), max_steps=1, prompts_per_step=2, group_size=4, max_new_tokens=8,
        learning_rate=1e-2, micro_batch_size=4, eval_samples=0,
    )  # fmt: skip
    return MathTrainConfig(**(base | overrides))


def test_hint_levels_and_exemption():
    ex = {"hints": {"knowledge": ["k1", "k2"], "planning": ["p1", "p2"], "solution": ["s1"]}}
    assert hint_levels(ex, ("knowledge", "planning", "solution"), True) == [
        ["k1", "k1 k2"],
        ["p1", "p1 p2"],
        ["s1"],
    ]
    assert hint_levels(ex, ("solution",), True) == [["s1"]]
    assert hint_levels(ex, ("knowledge", "planning"), False) == [["k1 k2"], ["p1 p2"]]
    assert exemption_steps(0.15, 50) == 8 and exemption_steps(0.15, 1) == 1
    with pytest.raises(ValueError, match="no 'hints'"):
        hint_levels({"id": "x"}, ("knowledge",), True)


def _needs_two_planning_chunks(answers):
    """Right only when the prompt shows at least two planning chunks ('Start at' and an operation)."""

    def rule(prompt, i):
        question = prompt.split("User: ")[1].split(" Hint:")[0].split("\nAssistant")[0]
        hint = prompt.split(" Hint: ")[1] if " Hint: " in prompt else ""
        right = hint.startswith("Start at") and ("Add" in hint or "Subtract" in hint)
        return f"x</think><answer>{answers[question] if right else -1}</answer>"

    return rule


@pytest.mark.parametrize("progressive", [True, False])
def test_scaf_swaps_in_the_least_hint_success(small_dir, tmp_path, progressive):
    model, tokenizer = load_policy(small_dir)
    data = examples(2)
    backend = ScriptedBackend(
        tokenizer, _needs_two_planning_chunks({e["question"]: e["answer"] for e in data})
    )
    hooks = ScafHooks(TEMPLATE, ("knowledge", "planning", "solution"), progressive, exempt_steps=0)
    cfg = config(tmp_path)
    trainer = GRPOTrainer(
        cfg, model, tokenizer, data, rubric_for(TEMPLATE), app="t", hooks=hooks, backend=backend
    )
    before = [p.detach().clone() for p in model.parameters()]
    metrics = trainer.train()[0]
    assert metrics["scaf/all_fail_frac"] == 1.0 and metrics["scaf/rescued_frac"] == 1.0
    assert metrics["scaf/all_fail_frac_after"] == 0.0 and metrics["zero_spread_frac"] == 0.0
    levels = [len(e["hints"]["knowledge"]) + 2 if progressive else 2 for e in data]
    assert metrics["scaf/hint_level"] == pytest.approx(sum(levels) / 2)
    assert metrics["scaf/tier_planning_frac"] == 1.0
    rows = trainer.run.read_rollouts()
    for g, example in enumerate(data):
        group = rows[g * 4 : (g + 1) * 4]
        hint = " ".join(example["hints"]["planning"][: 2 if progressive else None])
        assert group[0]["prompt"] == TEMPLATE.render(example["question"], hint)
        assert group[0]["rewards"]["correct"] == 1.0 and group[0]["advantage"] > 0
        assert all(" Hint: " not in r["prompt"] and r["rewards"]["correct"] == 0.0 for r in group[1:])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _question(prompt: str) -> str:
    return prompt.split("User: ")[1].split(" Hint:")[0].split("\nAssistant")[0]


def test_scaf_searches_only_all_failed_groups_and_keeps_their_other_rows(small_dir, tmp_path):
    """Group 0 has one right answer (row 1): it is left alone, no hint searched. Group 1 all fail, and any
    hint is right: its first row is replaced by the least-hint success (one planning chunk, level 1), its
    rows 1..3 are its own sampled rows 1..3 (distinct wrong answers here)."""
    model, tokenizer = load_policy(small_dir)
    data = examples(2)
    answers = {e["question"]: e["answer"] for e in data}
    hinted = []

    def rule(prompt, i):
        question = _question(prompt)
        if " Hint: " in prompt:
            hinted.append(prompt)
            return f"x</think><answer>{answers[question]}</answer>"
        if question == data[0]["question"] and i == 1:
            return f"x</think><answer>{answers[question]}</answer>"
        return f"x</think><answer>{-1000 - i}</answer>"  # wrong, and one per row of its group

    hint_calls, batch_rows = [], []  # per hint search call: (completions, tokens of each); the batch's

    class CountingBackend(ScriptedBackend):
        def generate(self, prompts, settings, seed):
            out = super().generate(prompts, settings, seed)
            tokens = out.completion_mask.sum(1).tolist()
            if " Hint: " in prompts[0]:
                hint_calls.append((len(prompts), tokens))
            else:
                batch_rows.extend(tokens)
            return out

    hooks = ScafHooks(TEMPLATE, ("planning", "solution"), True, exempt_steps=0)
    trainer = GRPOTrainer(
        config(tmp_path), model, tokenizer, data, rubric_for(TEMPLATE), app="t", hooks=hooks,
        backend=CountingBackend(tokenizer, rule),
    )  # fmt: skip
    metrics = trainer.train()[0]
    # the search's generation is counted apart: one call of the planning tier's levels (2 chunks, 2 prompts)
    assert [n for n, _ in hint_calls] == [len(data[1]["hints"]["planning"])] == [2]
    # tokens the batch does not hold: the hinted completion not swapped in, and group 1's replaced row 0
    (_, hinted_tokens), replaced = hint_calls[0], batch_rows[4]
    assert metrics["scaf/hint_samples"] == 2.0 and metrics["scaf/hint_tokens"] == hinted_tokens[1] + replaced
    assert metrics["scaf/all_fail_frac"] == 0.5 and metrics["scaf/rescued_frac"] == 0.5
    assert metrics["scaf/all_fail_frac_after"] == 0.0 and metrics["scaf/hint_level"] == 1.0
    assert metrics["scaf/tier_planning_frac"] == 0.5 and metrics["scaf/tier_solution_frac"] == 0.0
    assert hinted and all(_question(p) == data[1]["question"] for p in hinted)  # group 0 not searched
    rows = trainer.run.read_rollouts()
    assert [r["prompt"] for r in rows[:4]] == [data[0]["prompt"]] * 4
    assert [r["rewards"]["correct"] for r in rows[:4]] == [0.0, 1.0, 0.0, 0.0]
    assert [r["completion"] for r in rows[:4]] == [
        "x</think><answer>-1000</answer>",
        f"x</think><answer>{answers[data[0]['question']]}</answer>",
        "x</think><answer>-1002</answer>",
        "x</think><answer>-1003</answer>",
    ]
    group = rows[4:8]
    assert group[0]["prompt"] == TEMPLATE.render(data[1]["question"], data[1]["hints"]["planning"][0])
    assert group[0]["rewards"]["correct"] == 1.0
    assert [r["prompt"] for r in group[1:]] == [data[1]["prompt"]] * 3
    assert [r["completion"] for r in group[1:]] == [
        f"x</think><answer>{-1000 - i}</answer>" for i in (1, 2, 3)
    ]


def test_scaf_samples_a_hinted_prompt_that_just_fits_the_context(small_dir, tmp_path):
    """The context is exactly the first hinted prompt's length + max_new_tokens: that hint fits, is sampled
    and (any hint being right) rescues the group; the longer two-chunk hint does not fit."""
    model, tokenizer = load_policy(small_dir)
    data = examples(1)
    example = data[0]
    first = TEMPLATE.render(example["question"], example["hints"]["planning"][0])
    model.config.max_position_embeddings = len(tokenizer(first, add_special_tokens=False)["input_ids"]) + 8
    sampled = []

    def rule(prompt, i):
        sampled.append(prompt)
        return f"x</think><answer>{example['answer'] if ' Hint: ' in prompt else -1}</answer>"

    hooks = ScafHooks(TEMPLATE, ("planning",), True, exempt_steps=0)
    trainer = GRPOTrainer(
        config(tmp_path, prompts_per_step=1), model, tokenizer, data, rubric_for(TEMPLATE), app="t",
        hooks=hooks, backend=ScriptedBackend(tokenizer, rule),
    )  # fmt: skip
    metrics = trainer.train()[0]
    assert [p for p in sampled if " Hint: " in p] == [first]
    assert metrics["scaf/rescued_frac"] == 1.0 and metrics["scaf/hint_level"] == 1.0
    assert trainer.run.read_rollouts()[0]["prompt"] == first


def test_scaf_metrics_count_every_sampling_round(small_dir, tmp_path):
    """Dynamic sampling: round 0 rescues group 0 and drops group 1, round 1's two groups find no hint.
    The metrics are over the 4 groups sampled, not only the last round's 2."""
    model, tokenizer = load_policy(small_dir)
    data = examples(4)
    answers = {e["question"]: e["answer"] for e in data}
    hinted = []

    def first_hint_wins(prompt, i):
        question = prompt.split("User: ")[1].split(" Hint:")[0].split("\nAssistant")[0]
        if " Hint: " in prompt:
            hinted.append(prompt)
        right = len(hinted) == 1 and " Hint: " in prompt
        return f"x</think><answer>{answers[question] if right else -1}</answer>"

    hooks = ScafHooks(TEMPLATE, ("planning",), False, exempt_steps=0)
    cfg = config(tmp_path, dynamic_sampling=True, max_sampling_rounds=2)
    hint_seeds = []

    class SeedRecordingBackend(ScriptedBackend):
        def generate(self, prompts, settings, seed):
            if " Hint: " in prompts[0]:
                hint_seeds.append(seed)
            return super().generate(prompts, settings, seed)

    backend = SeedRecordingBackend(tokenizer, first_hint_wins)
    trainer = GRPOTrainer(
        cfg, model, tokenizer, data, rubric_for(TEMPLATE), app="t", hooks=hooks, backend=backend
    )
    metrics = trainer.train()[0]
    assert metrics["sampling_rounds"] == 2.0 and len(hinted) == 4  # one hint call per failed group
    # round 0 seeds as without dynamic sampling; round 1's groups 0 and 1 are other prompts, other seeds
    assert hint_seeds[:2] == [derive_seed(cfg.seed, 0, _SCAF_SEED_KEY, g, 0) for g in range(2)]
    assert len(set(hint_seeds)) == 4
    assert metrics["scaf/all_fail_frac"] == 1.0 and metrics["scaf/rescued_frac"] == 0.25
    assert metrics["scaf/all_fail_frac_after"] == 0.75 and metrics["scaf/hint_level"] == 1.0
    assert metrics["scaf/tier_planning_frac"] == 0.25


def test_scaf_exemption_leaves_groups_alone(small_dir, tmp_path):
    model, tokenizer = load_policy(small_dir)
    data = examples(2)
    backend = ScriptedBackend(
        tokenizer, _needs_two_planning_chunks({e["question"]: e["answer"] for e in data})
    )
    hooks = ScafHooks(TEMPLATE, ("planning",), True, exempt_steps=1)
    trainer = GRPOTrainer(
        config(tmp_path), model, tokenizer, data, rubric_for(TEMPLATE), app="t", hooks=hooks, backend=backend
    )
    metrics = trainer.train()[0]
    assert (
        metrics["scaf/exempt"] == 1.0
        and metrics["scaf/rescued_frac"] == 0.0
        and metrics["zero_spread_frac"] == 1.0
    )


def test_gtpo_weights_conflict_tokens_and_needs_no_std(small_dir, tmp_path):
    """Conflict tokens weigh 2 / 0 in positive / negative completions; the logged conflict fraction is the
    plain-loop count of conflict tokens (both signs) over the valid tokens."""
    model, tokenizer = load_policy(small_dir)
    data = examples(1)
    answer = data[0]["answer"]
    backend = ScriptedBackend(tokenizer, lambda p, i: f"1</think><answer>{answer if i % 2 else -1}</answer>")
    hooks = GTPOHooks(max_entropy=100.0)  # keep every completion: a random model's entropy is high
    cfg = config(tmp_path, algo="gtpo", prompts_per_step=1)
    assert cfg.advantage_scale == "none" and cfg.beta == 0.0
    trainer = GRPOTrainer(
        cfg, model, tokenizer, data, rubric_for(TEMPLATE), app="t", hooks=hooks, backend=backend
    )
    batch = trainer.collect()
    assert batch.advantages.tolist() == [-0.5, 0.5, -0.5, 0.5]  # r - mean, no std division
    weights = hooks.token_weights(trainer, batch.rollouts, batch.advantages)
    ids = batch.rollouts.completion_ids
    shared = (ids == ids[0]).all(0) & (batch.rollouts.loss_mask > 0).all(0)  # positions equal in all four
    assert (weights[1][shared] == 2.0).all() and (weights[0][shared] == 0.0).all()
    assert (weights[:, ~shared][batch.rollouts.loss_mask[:, ~shared] > 0] == 1.0).all()
    metrics = trainer.update(batch) | hooks.after_update(trainer, batch)
    # plain loop: a valid token conflicts when a completion of opposite sign has the same id there
    valid, adv = batch.rollouts.loss_mask > 0, batch.advantages.tolist()
    conflicts = sum(
        any(adv[i] * adv[j] < 0 and valid[j, t] and ids[j, t] == ids[i, t] for j in range(4))
        for i in range(4)
        for t in range(ids.shape[1])
        if valid[i, t]
    )
    assert 0 < conflicts < int(valid.sum())
    assert metrics["gtpo/conflict_token_frac"] == pytest.approx(conflicts / int(valid.sum()))
    assert metrics["gtpo/entropy_dropped_frac"] == 0.0
    # the fraction counts conflict tokens whatever they weigh: with weights 1 / 1 they are still there
    unweighted = GTPOHooks(conflict_positive=1.0, conflict_negative=1.0, max_entropy=100.0)
    assert (unweighted.token_weights(trainer, batch.rollouts, batch.advantages)[valid] == 1.0).all()
    assert unweighted.after_update(trainer, batch)["gtpo/conflict_token_frac"] == pytest.approx(
        conflicts / int(valid.sum())
    )


def _plain_logprobs(model, rollouts: Rollouts) -> torch.Tensor:
    """Reference: one full forward, log_softmax, gather each completion token (no chunking)."""
    ids, mask = rollouts.input_ids(), rollouts.attention_mask()
    t = rollouts.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = torch.log_softmax(logits.float(), -1)[:, -t - 1 : -1]  # (N, T, V)
    return logp.gather(-1, ids[:, -t:, None]).squeeze(-1)  # (N, T)


def test_importance_weights_and_kd_hand_values():
    target = torch.tensor([[0.0, math.log(2.0), math.log(10.0)], [math.log(0.5), 0.0, 0.0]])
    behavior = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights, ess = algos.truncated_importance_weights(target, behavior, mask, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 0.0]]))
    # ESS = (sum w)^2 / (n sum w^2) = 7.5^2 / (5 * 15.25)
    assert float(ess) == pytest.approx(56.25 / 76.25)
    kd = algos.kd_reward(target, behavior, mask, alpha=0.5)
    assert kd.tolist() == pytest.approx([0.5 * (math.log(2) + math.log(10)) / 3, 0.5 * math.log(0.5) / 2])


def test_codistill_weight_metrics_count_weights_at_the_cap_as_capped():
    """Truncated weights min(ratio, cap) equal the cap exactly where they were cut: those are capped; padding
    (valid False) is not counted even at the cap. One process, hand values."""
    hooks = CoDistillHooks(torch.nn.Linear(2, 2), alpha=0.5, is_cap=2.0, learning_rate=1e-2)
    weights = torch.tensor([[0.5, 2.0, 1.0], [2.0, 0.3, 2.0]])  # (N, T)
    valid = torch.tensor([[True, True, True], [True, True, False]])  # (N, T)
    table = types.SimpleNamespace(components=torch.tensor([[1.0, 0.2], [0.0, 0.4]]), names=["correct", "kd"])
    metrics = hooks._weight_metrics(types.SimpleNamespace(table=table), weights, valid)
    assert metrics["codistill/capped_frac"] == pytest.approx(
        float(((weights >= 2.0) & valid).sum() / valid.sum())
    )
    assert metrics["codistill/capped_frac"] == pytest.approx(2 / 5)
    assert metrics["codistill/kd"] == pytest.approx(0.3)
    w_sum, w2_sum = float(weights.sum()), float((weights**2).sum())
    assert metrics["codistill/weight_mean"] == pytest.approx(w_sum / 5)
    assert metrics["codistill/ess"] == pytest.approx(w_sum**2 / (5 * w2_sum))


def large_loss_reference(large_ref, small_ref, advantages, mask, cfg):
    """CoDistill's L loss by hand: truncated weights w = min(pi_L / pi_S, 2) on the completion tokens, and the
    on-policy surrogate of `advantages` weighted by w. Returns (w, loss)."""
    w_ref = torch.exp(large_ref - small_ref).clamp(max=2.0) * mask
    loss_ref, _ = algos.policy_loss(
        large_ref, None, advantages, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
        aggregation=cfg.loss_aggregation, max_length=cfg.max_new_tokens, importance_weights=w_ref,
    )  # fmt: skip
    return w_ref, loss_ref


def test_codistill_kd_term_weights_and_large_update(small_dir, large_dir, tmp_path):
    """KD term and IS weights against plain logprobs; L's logged loss is `policy_loss` of the verifiable
    advantages weighted by min(pi_L / pi_S, cap), and L's update raises that weighted surrogate."""
    small, tokenizer = load_policy(small_dir)
    large, large_tokenizer = load_policy(large_dir)
    assert large_tokenizer.get_vocab() == tokenizer.get_vocab()
    hooks = CoDistillHooks(large, alpha=0.5, is_cap=2.0, learning_rate=1e-2)
    cfg = config(tmp_path, algo="codistill", max_new_tokens=6)
    data = examples(2)
    answers = {e["prompt"]: e["answer"] for e in data}
    backend = ScriptedBackend(
        tokenizer, lambda p, i: f"{i}</think><answer>{answers[p] if i % 2 else -1}</answer>"
    )
    trainer = GRPOTrainer(
        cfg, small, tokenizer, data, rubric_for(TEMPLATE), app="t", hooks=hooks, backend=backend
    )
    large_before = [p.detach().clone() for p in large.parameters()]
    batch = trainer.collect()
    rollouts = batch.rollouts
    small_ref, large_ref = _plain_logprobs(small, rollouts), _plain_logprobs(large, rollouts)
    mask = rollouts.loss_mask
    kd_ref = 0.5 * ((large_ref - small_ref) * mask).sum(1) / mask.sum(1)
    kd = batch.table.components[:, batch.table.names.index("kd")]
    torch.testing.assert_close(kd, kd_ref, atol=1e-5, rtol=0)
    # the KD term is part of the small model's advantages, but not of the large model's
    assert batch.table.names[-1] == "kd"
    plain = algos.group_advantages(batch.table.components[:, :-1] @ batch.table.weights[:-1], cfg.group_size)
    torch.testing.assert_close(verifiable_advantages(trainer, batch), plain)
    trainer.update(batch)
    metrics = hooks.after_update(trainer, batch)
    # L's loss: the on-policy surrogate of the verifiable advantages, each token weighted by w
    w_ref, loss_ref = large_loss_reference(large_ref, small_ref, plain, mask, cfg)
    assert abs(float(loss_ref)) > 1e-3  # the sign of the advantages shows
    assert metrics["codistill/large_loss"] == pytest.approx(float(loss_ref), abs=1e-5)
    # and L moved up that surrogate: sum_i A_i mean_t(w log pi_L) rose
    large_after = _plain_logprobs(large, rollouts)
    gain = (plain[:, None] * w_ref * (large_after - large_ref)).sum(1) / mask.sum(1)
    assert float(gain.sum()) > 0
    ess_ref = w_ref.sum() ** 2 / (mask.sum() * (w_ref**2).sum())
    assert metrics["codistill/ess"] == pytest.approx(float(ess_ref), abs=1e-5)
    assert metrics["codistill/kd"] == pytest.approx(float(kd_ref.mean()), abs=1e-5)
    assert metrics["codistill/large_time"] > 0 and "codistill/large_loss" in metrics
    assert plain.abs().sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(large_before, large.parameters(), strict=True))


def _codistill_run(small_dir, large_dir, tmp_path, run: str, max_steps: int, resume: bool = False):
    """A CoDistill run with real (HF) sampling; returns (S, L) after `trainer.train()`. The reward is the
    completion's length mod 5 (an untrained model earns no math reward, and L would never move)."""
    small, tokenizer = load_policy(small_dir)
    large, _ = load_policy(large_dir)
    hooks = CoDistillHooks(large, alpha=0.5, is_cap=2.0, learning_rate=1e-2)
    cfg = config(
        tmp_path, run_dir=str(tmp_path / run), algo="codistill", max_steps=max_steps, max_new_tokens=6,
        resume=resume,
    )  # fmt: skip
    rubric = Rubric({"length": lambda completion, example: len(completion) % 5 / 5})
    GRPOTrainer(cfg, small, tokenizer, examples(4), rubric, app="t", hooks=hooks).train()
    return small, large


def test_codistill_resume_is_bitwise_exact_for_both_models(small_dir, large_dir, tmp_path):
    whole = _codistill_run(small_dir, large_dir, tmp_path, "whole", 3)
    _codistill_run(small_dir, large_dir, tmp_path, "cut", 2)  # stops after step 2's checkpoint
    checkpoint = tmp_path / "cut" / "checkpoints" / "step-2"
    assert (checkpoint / "hooks.safetensors").is_file() and (checkpoint / "hooks.pt").is_file()
    resumed = _codistill_run(small_dir, large_dir, tmp_path, "cut", 3, resume=True)
    for expected, got, base_dir in zip(whole, resumed, (small_dir, large_dir), strict=True):
        expected, got = expected.state_dict(), got.state_dict()
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), name
        base = load_policy(base_dir)[0].state_dict()
        assert any(not torch.equal(expected[name], base[name]) for name in base)  # both models trained
    timing = {"step_time", "generate_time", "tokens_per_s", "codistill/large_time"}

    def metrics(run: str) -> list[dict]:
        rows = RunDir(tmp_path / run).read_metrics()
        return [{k: v for k, v in row.items() if k not in timing} for row in rows]

    assert metrics("cut") == metrics("whole") and len(metrics("whole")) == 3
    with pytest.raises(ValueError, match="no state of the large model"):
        CoDistillHooks(whole[1], alpha=0.5, is_cap=2.0, learning_rate=1e-2).load_state_dict({})


def test_codistill_runs_its_passes_at_the_runs_precision_and_weight_decay(small_dir, large_dir, tmp_path):
    """Under bf16 autocast the KD term's and L's update's forwards of both models run under it, as the
    trainer's own passes do; L's AdamW takes the run's weight decay."""
    small, tokenizer = load_policy(small_dir)
    cfg = config(
        tmp_path, algo="codistill", model=str(small_dir), large_model=str(large_dir), max_new_tokens=6,
        autocast="bfloat16", weight_decay=0.25,
    )  # fmt: skip
    hooks = make_hooks(cfg, tokenizer)
    assert hooks.optimizer.param_groups[0]["weight_decay"] == 0.25
    seen = {"small": [], "large": []}
    for name, model in (("small", small), ("large", hooks.large)):  # the logprob passes call the layers
        model.model.layers[0].register_forward_pre_hook(
            lambda module, args, name=name: seen[name].append(torch.is_autocast_enabled("cpu"))
        )
    data = examples(2)
    backend = ScriptedBackend(tokenizer, lambda p, i: f"{i}</think><answer>{i}</answer>")
    trainer = GRPOTrainer(
        cfg, small, tokenizer, data, rubric_for(TEMPLATE), app="t", hooks=hooks, backend=backend
    )
    batch = trainer.collect()
    trainer.update(batch)
    hooks.after_update(trainer, batch)
    assert seen["large"] and all(seen["large"]) and all(seen["small"])


def test_gtpo_refuses_a_kl_term(tmp_path):
    with pytest.raises(ValueError, match="gtpo has no reference model"):
        config(tmp_path, algo="gtpo", beta=0.04)
    assert config(tmp_path, algo="gtpo").advantage_scale == "none"
    # a compare's train config with beta gives it to the other arms only
    values = {"beta": 0.04, "max_steps": 3}
    assert arm_values(values, "gtpo") == {"max_steps": 3, "algo": "gtpo"}
    assert arm_values(values, "scaf") == {"beta": 0.04, "max_steps": 3, "algo": "scaf"}
    MathTrainConfig(**arm_values(values, "gtpo"))


def test_a_resumed_codistill_takes_this_runs_rate_and_decay_for_the_large_model(large_dir):
    """The optimizer state loaded on a resume carries the saved param groups: L's rate and decay must be
    this run's, as the trainer applies its own to S."""
    saved = CoDistillHooks(load_policy(large_dir)[0], alpha=0.5, is_cap=2.0, learning_rate=1e-5).state_dict()
    hooks = CoDistillHooks(
        load_policy(large_dir)[0], alpha=0.5, is_cap=2.0, learning_rate=3e-5, weight_decay=0.1
    )
    hooks.load_state_dict(saved)
    assert [(g["lr"], g["weight_decay"]) for g in hooks.optimizer.param_groups] == [(3e-5, 0.1)]


def test_scaf_skips_hinted_prompts_that_would_not_fit_the_context(small_dir, tmp_path):
    """Plain prompts fit the context exactly with max_new_tokens; every hint lengthens them past it, so no
    hinted prompt is sampled (the trainer refuses such prompts in the data) and no group is rescued."""
    model, tokenizer = load_policy(small_dir)
    data = examples(2)
    longest = max(len(tokenizer(e["prompt"], add_special_tokens=False)["input_ids"]) for e in data)
    model.config.max_position_embeddings = longest + 8  # config(): max_new_tokens 8
    sampled = []
    backend = ScriptedBackend(
        tokenizer, lambda prompt, i: sampled.append(prompt) or "x</think><answer>-1</answer>"
    )
    hooks = ScafHooks(TEMPLATE, ("knowledge", "planning", "solution"), True, exempt_steps=0)
    trainer = GRPOTrainer(
        config(tmp_path), model, tokenizer, data, rubric_for(TEMPLATE), app="t", hooks=hooks, backend=backend
    )
    metrics = trainer.train()[0]
    assert metrics["scaf/all_fail_frac"] == 1.0 and metrics["scaf/rescued_frac"] == 0.0
    assert len(sampled) == 8 and not any(" Hint: " in p for p in sampled)  # the 2 groups of 4 only


def test_codistill_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="dynamic_sampling"):
        config(tmp_path, algo="codistill", dynamic_sampling=True)
    with pytest.raises(ValueError, match="--large-model"):
        config(tmp_path, algo="codistill", model="x")
    assert replace(config(tmp_path), algo="grpo").advantage_scale == "group"


def test_gtpo_entropy_penalty_in_zero_spread_groups():
    advantages, entropy = torch.tensor([0.0, 0.0, 0.5, -0.5]), torch.tensor([0.5, 0.9, 0.3, 0.2])
    paper = GTPOHooks().adjust_advantages(advantages, entropy)
    torch.testing.assert_close(paper, torch.tensor([-0.05, 0.0, 0.47, -0.52]))  # 0.9 > ln 2: dropped
    skipping = GTPOHooks(skip_zero_advantage=True).adjust_advantages(advantages, entropy)
    torch.testing.assert_close(skipping, torch.tensor([0.0, 0.0, 0.47, -0.52]))


def _one_and_two_processes(algo: str, small_dir, large_dir, tmp_path) -> tuple[list[dict], list[dict]]:
    """algo_worker.py alone and under a 2-process launch; the metrics of each run."""
    worker = [str(Path(__file__).with_name("algo_worker.py")), algo, str(small_dir), str(large_dir)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    subprocess.run([sys.executable, *worker, str(tmp_path / "one")], check=True, capture_output=True, env=env)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run(
        [*launch, *worker, str(tmp_path / "two")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (RunDir(tmp_path / run / "run").read_metrics() for run in ("one", "two"))
    assert [m["processes"] for m in two] == [2.0, 2.0]
    return one, two


def test_gtpo_metrics_of_two_processes_are_the_global_batch(small_dir, large_dir, tmp_path):
    """Each process counts conflict tokens and dropped completions in its share; the logged fractions are
    the whole batch's, as in one process (the same completions: each group samples from its own seed)."""
    one, two = _one_and_two_processes("gtpo", small_dir, large_dir, tmp_path)
    # the core's token means too: each process's share has its own number of tokens
    for name in (
        "gtpo/conflict_token_frac",
        "gtpo/entropy_dropped_frac",
        "entropy",
        "ratio/mean",
        "clip/frac",
    ):
        assert [m[name] for m in two] == pytest.approx([m[name] for m in one], abs=1e-9), name
    assert 0 < one[0]["gtpo/conflict_token_frac"] < 1


def test_codistill_two_processes_give_the_one_process_update(small_dir, large_dir, tmp_path):
    """L is replicated on every process and trained on each process's share of S's rollouts: its loss
    must use the global token count and its gradients must be summed, as the policy's are."""
    one, two = _one_and_two_processes("codistill", small_dir, large_dir, tmp_path)
    # Adam hides a wrong gradient scale in the weights; the norms before clipping show it
    norms = [[m["codistill/large_grad_norm"] for m in log] for log in (one, two)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5) and max(norms[0]) > 0
    # the logged KD term and weight statistics are of the global batch, not of process 0's share
    for name in ("kd", "ess", "capped_frac", "weight_mean", "large_loss"):
        values = [[m[f"codistill/{name}"] for m in log] for log in (one, two)]
        assert values[1] == pytest.approx(values[0], rel=1e-5, abs=1e-7), name
    for name in ("small", "large"):
        expected, got = (load_file(tmp_path / run / f"{name}.safetensors") for run in ("one", "two"))
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    base = load_policy(large_dir)[0].state_dict()
    assert any(not torch.equal(expected[key], base[key]) for key in base)  # L was trained


def test_codistill_logprobs_are_taken_with_dropout_off(small_dir):
    """The IS weights' pi_S and pi_L come from no-grad passes; in the model's leftover (train) mode dropout
    made them depend on what ran before."""
    model, tokenizer = load_policy(small_dir)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    rollouts = ScriptedBackend(tokenizer, lambda prompt, i: "3</answer>" if i else "12</answer>").generate(
        ["1+2=", "1+2="], None, 0
    )
    model.eval()
    with torch.no_grad():
        expected = no_grad_logprobs(model, rollouts, 1.0, 2, 64)
    model.train()
    got = no_grad_logprobs(model, rollouts, 1.0, 1, 64)
    assert model.training
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def _scaf_trainer(tokenizer, rule, rank: int = 0):
    """A stand-in for the trainer that ScafHooks reads: group size 2, step 0, no context limit."""
    cfg = types.SimpleNamespace(group_size=2, seed=0, max_new_tokens=8, sampling=lambda: None)
    return types.SimpleNamespace(
        config=cfg, rank=rank, step=0, rubric=rubric_for(TEMPLATE), tokenizer=tokenizer, max_context=None,
        backend=ScriptedBackend(tokenizer, rule),
    )  # fmt: skip


def _all_wrong(trainer, data):
    """The plain rollouts (group size 2) of `data`, every answer wrong, and their rubric table."""
    prompts = [e["prompt"] for e in data for _ in range(2)]
    rollouts = ScriptedBackend(trainer.tokenizer, lambda p, i: "x</think><answer>-1</answer>").generate(
        prompts, None, 0
    )
    return rollouts, trainer.rubric.score(rollouts.completions, [e for e in data for _ in range(2)])


def test_scaf_level_counts_the_hints_of_a_tier_that_did_not_fit(small_dir, monkeypatch):
    """Knowledge's two hints do not fit the context, planning's one does and is right: its level is 3 (two
    hints of less help come before it), not 1."""
    import apps.math_reasoning.scaf as scaf

    _, tokenizer = load_policy(small_dir)
    monkeypatch.setattr(scaf, "_fits", lambda trainer, prompt: "k1" not in prompt)
    example = examples(1)[0] | {"hints": {"knowledge": ["k1", "k2"], "planning": ["p1"], "solution": []}}
    trainer = _scaf_trainer(tokenizer, lambda p, i: f"x</think><answer>{example['answer']}</answer>")
    hooks = ScafHooks(TEMPLATE, ("knowledge", "planning"), True, exempt_steps=0)
    rollouts, table = _all_wrong(trainer, [example])
    new_rollouts, _ = hooks.transform_rollouts(trainer, rollouts, [example], table, 0)
    assert new_rollouts.prompts[0] == TEMPLATE.render(example["question"], "p1")
    metrics = hooks.after_update(trainer, None)
    assert metrics["scaf/hint_level"] == 3.0 and metrics["scaf/tier_planning_frac"] == 1.0


def test_scaf_refuses_a_table_that_is_not_the_rubrics(small_dir):
    """transform_rollouts reads columns by the rubric's names: a table with other columns is an error."""
    _, tokenizer = load_policy(small_dir)
    data = examples(1)
    trainer = _scaf_trainer(tokenizer, lambda p, i: "x</think><answer>-1</answer>")
    rollouts, table = _all_wrong(trainer, data)
    other = replace(table, names=["correct", "think", "answer"])
    assert other.names != trainer.rubric.names
    hooks = ScafHooks(TEMPLATE, ("planning",), False, exempt_steps=0)
    with pytest.raises(ValueError, match="scaf needs the rubric's table"):
        hooks.transform_rollouts(trainer, rollouts, data, other, 0)


def test_hint_levels_keep_an_empty_tier_in_its_place():
    """An empty tier is an empty list in its place: the tier index `_search` reports stays the tier's."""
    ex = {"hints": {"knowledge": [], "planning": ["p1"], "solution": ["s1"]}}
    assert hint_levels(ex, ("knowledge", "planning", "solution"), True) == [[], ["p1"], ["s1"]]
    assert hint_levels(ex, ("knowledge", "solution"), False) == [[], ["s1"]]


def test_scaf_hint_seeds_use_the_groups_index_in_the_global_batch(small_dir):
    """Process 1 of a run with 2 groups per process holds global groups 2 and 3: its hint seeds are theirs
    (process 0's would repeat them otherwise)."""
    _, tokenizer = load_policy(small_dir)
    data = examples(2)
    seeds = []
    trainer = _scaf_trainer(tokenizer, lambda p, i: "x</think><answer>-1</answer>", rank=1)
    generate = trainer.backend.generate
    trainer.backend.generate = lambda prompts, settings, seed: (
        seeds.append(seed) or generate(prompts, settings, seed)
    )
    rollouts, table = _all_wrong(trainer, data)
    ScafHooks(TEMPLATE, ("planning",), False, exempt_steps=0).transform_rollouts(
        trainer, rollouts, data, table, 0
    )
    assert seeds == [derive_seed(0, 0, _SCAF_SEED_KEY, g, 0) for g in (2, 3)]


def _gtpo_group():
    """One group of 4, A = (+, -, +, -); lengths 3, 3, 3, 1 (10 valid tokens). Token 1 at position 0 is in
    rows 0 (+), 1 (-) and 3 (-): 3 conflict tokens; every other position differs."""
    ids = torch.tensor([[1, 2, 3], [1, 5, 6], [7, 8, 9], [1, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    trainer = types.SimpleNamespace(config=types.SimpleNamespace(group_size=4))
    return (
        trainer,
        types.SimpleNamespace(completion_ids=ids, loss_mask=mask),
        torch.tensor([0.5, -0.5, 0.5, -0.5]),
    )


def test_gtpo_step_fractions_by_hand():
    """Conflict fraction: 3 conflict tokens of the 10 valid ones (padding not counted). Dropped fraction over
    two micro-batches of 2 completions, mean entropies (0.9, 0.9) then (0.1, 0.1), cap ln 2: 2 of 4
    completions (summed over the micro-batches, divided by completions, not tokens)."""
    trainer, rollouts, advantages = _gtpo_group()
    hooks = GTPOHooks()
    hooks.token_weights(trainer, rollouts, advantages)
    hooks.adjust_advantages(advantages[:2], torch.tensor([0.9, 0.9]))
    hooks.adjust_advantages(advantages[2:], torch.tensor([0.1, 0.1]))
    metrics = hooks.after_update(trainer, None)
    assert metrics == {"gtpo/conflict_token_frac": pytest.approx(0.3), "gtpo/entropy_dropped_frac": 0.5}


def test_gtpo_fractions_start_again_each_step():
    """Step 1 has 3 conflict tokens and a dropped completion; step 2's completions share no token and none
    is dropped: step 2 logs 0 and 0, not the two steps' sums."""
    trainer, rollouts, advantages = _gtpo_group()
    hooks = GTPOHooks()
    hooks.token_weights(trainer, rollouts, advantages)
    hooks.adjust_advantages(advantages, torch.tensor([0.9, 0.1, 0.1, 0.1]))
    assert hooks.after_update(trainer, None) == {
        "gtpo/conflict_token_frac": pytest.approx(0.3),
        "gtpo/entropy_dropped_frac": 0.25,
    }
    distinct = types.SimpleNamespace(  # row i's ids shifted by 10 i: no id shared at any position
        completion_ids=rollouts.completion_ids + torch.arange(4)[:, None] * 10, loss_mask=rollouts.loss_mask
    )
    hooks.token_weights(trainer, distinct, advantages)
    hooks.adjust_advantages(advantages, torch.tensor([0.1, 0.1, 0.1, 0.1]))
    assert hooks.after_update(trainer, None) == {
        "gtpo/conflict_token_frac": 0.0,
        "gtpo/entropy_dropped_frac": 0.0,
    }


def _codistill_trainer(small_dir, large_dir, tmp_path, rule, train_large: bool = True, **overrides):
    """A CoDistill trainer on 2 groups of 4 answered by `rule(question index, row in its group)`."""
    small, tokenizer = load_policy(small_dir)
    large, _ = load_policy(large_dir)
    hooks = CoDistillHooks(large, alpha=0.5, is_cap=2.0, learning_rate=1e-2, train_large=train_large)
    data = examples(2)
    index = {e["prompt"]: q for q, e in enumerate(data)}
    backend = ScriptedBackend(
        tokenizer,
        lambda p, i: f"{i}</think><answer>{data[index[p]]['answer'] if rule(index[p], i) else -1}</answer>",
    )
    cfg = config(tmp_path, algo="codistill", **({"max_new_tokens": 6} | overrides))
    trainer = GRPOTrainer(
        cfg, small, tokenizer, data, rubric_for(TEMPLATE), app="t", hooks=hooks, backend=backend
    )
    return trainer, hooks, small, large


@pytest.mark.parametrize(("scale", "baseline"), [("batch", "mean"), ("none", "leave_one_out")])
def test_codistill_large_advantages_follow_the_runs_scale_and_baseline(
    small_dir, large_dir, tmp_path, scale, baseline
):
    """L's advantages are the run's, KD column left out: its advantage scale, baseline and eps too."""
    trainer, _, _, _ = _codistill_trainer(
        small_dir,
        large_dir,
        tmp_path,
        lambda q, i: (q + i) % 3 == 0,
        advantage_scale=scale,
        advantage_baseline=baseline,
        advantage_eps=0.5,
    )
    batch = trainer.collect()
    rewards = batch.table.components[:, :-1] @ batch.table.weights[:-1]  # (N,) without the KD column
    plain = algos.group_advantages(rewards, 4, scale=scale, baseline=baseline, eps=0.5)
    torch.testing.assert_close(verifiable_advantages(trainer, batch), plain)
    assert not torch.allclose(plain, algos.group_advantages(rewards, 4))  # the options change them


def test_codistill_after_update_takes_the_kd_terms_batch_once_and_times_the_kd_forward(
    small_dir, large_dir, tmp_path
):
    """L's update needs the logprobs of the batch the KD term was computed on: another batch is an error,
    and so is a second update on the same one (its cache is spent). large_time includes the KD forward."""
    trainer, hooks, _, _ = _codistill_trainer(
        small_dir, large_dir, tmp_path, lambda q, i: i % 2, train_large=False
    )
    first = trainer.collect()
    second = trainer.collect()  # the KD cache now holds this batch's
    with pytest.raises(RuntimeError, match="not the one its KD term was computed on"):
        hooks.after_update(trainer, first)
    hooks._kd_time = 100.0  # as if L's forward for the KD term had taken 100 s
    assert hooks.after_update(trainer, second)["codistill/large_time"] >= 100.0
    with pytest.raises(RuntimeError, match="not the one its KD term was computed on"):
        hooks.after_update(trainer, second)
    with pytest.raises(ValueError, match="codistill_is_cap must be > 0"):
        CoDistillHooks(torch.nn.Linear(2, 2), alpha=0.5, is_cap=0, learning_rate=1e-2)


def test_codistill_large_loss_over_every_micro_batch_at_max_length_and_clipped(
    small_dir, large_dir, tmp_path, monkeypatch
):
    """Micro-batches of 4 rows = the two groups, with different advantages (group 0 right on odd rows,
    group 1 on row 0 only): L's loss is `policy_loss` over all 8 rows with each row's own advantage, the
    Dr.GRPO aggregation dividing by the run's max_new_tokens (not the batch's width); L's gradients are
    clipped at max_grad_norm."""
    trainer, hooks, small, large = _codistill_trainer(
        small_dir, large_dir, tmp_path, lambda q, i: i % 2 if q == 0 else i == 0, max_new_tokens=64,
        loss_aggregation="seq-mean-token-sum-norm", max_grad_norm=0.5,
    )  # fmt: skip
    cfg = trainer.config
    batch = trainer.collect()
    rollouts, mask = batch.rollouts, batch.rollouts.loss_mask
    assert len(rollouts) == 8 and rollouts.completion_ids.shape[1] < cfg.max_new_tokens
    small_ref, large_ref = _plain_logprobs(small, rollouts), _plain_logprobs(large, rollouts)
    advantages = verifiable_advantages(trainer, batch)
    assert not torch.allclose(advantages[:4], advantages[4:])
    trainer.update(batch)
    clip, calls = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda params, norm: calls.append((params, norm)) or clip(params, norm),
    )
    metrics = hooks.after_update(trainer, batch)
    w_ref, loss_ref = large_loss_reference(large_ref, small_ref, advantages, mask, cfg)
    assert abs(float(loss_ref)) > 1e-4
    assert metrics["codistill/large_loss"] == pytest.approx(float(loss_ref), rel=1e-4, abs=1e-7)
    assert len(calls) == 1 and calls[0][1] == 0.5
    assert [id(p) for p in calls[0][0]] == [id(p) for p in large.parameters()]


def test_scaf_level_and_seeds_count_every_hint_of_the_earlier_tiers(small_dir):
    """Knowledge's two hints fit and fail, planning's first is right: level 3 (1 + both knowledge hints),
    and each tier's call draws from its own seed (the tier index in it)."""
    _, tokenizer = load_policy(small_dir)
    example = examples(1)[0] | {"hints": {"knowledge": ["k1", "k2"], "planning": ["p1"], "solution": []}}
    right = f"x</think><answer>{example['answer']}</answer>"
    trainer = _scaf_trainer(tokenizer, lambda p, i: right if "p1" in p else "x</think><answer>-1</answer>")
    seeds = []
    generate = trainer.backend.generate
    trainer.backend.generate = lambda prompts, settings, seed: (
        seeds.append(seed) or generate(prompts, settings, seed)
    )
    hooks = ScafHooks(TEMPLATE, ("knowledge", "planning"), True, exempt_steps=0)
    rollouts, table = _all_wrong(trainer, [example])
    seeds.clear()
    new_rollouts, _ = hooks.transform_rollouts(trainer, rollouts, [example], table, 0)
    assert new_rollouts.prompts[0] == TEMPLATE.render(example["question"], "p1")
    assert seeds == [derive_seed(0, 0, _SCAF_SEED_KEY, 0, t) for t in (0, 1)]
    metrics = hooks.after_update(trainer, None)
    assert metrics["scaf/hint_level"] == 3.0 and metrics["scaf/tier_planning_frac"] == 1.0


def test_scaf_keeps_the_table_rows_of_the_rows_it_keeps(small_dir):
    """A failed group of 2: row 0 well formatted, row 1 without tags. Row 0 is replaced by the hinted
    success; row 1 keeps its own rewards (all 0), not row 0's format rewards."""
    _, tokenizer = load_policy(small_dir)
    example = examples(1)[0]
    trainer = _scaf_trainer(tokenizer, lambda p, i: f"x</think><answer>{example['answer']}</answer>")
    rollouts = ScriptedBackend(
        tokenizer, lambda p, i: "-1" if i else "x</think><answer>-1</answer>"
    ).generate([example["prompt"]] * 2, None, 0)
    table = trainer.rubric.score(rollouts.completions, [example] * 2)
    assert table.components.tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    hooks = ScafHooks(TEMPLATE, ("planning",), False, exempt_steps=0)
    new_rollouts, new_table = hooks.transform_rollouts(trainer, rollouts, [example], table, 0)
    assert new_table.components.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert new_rollouts.completions[1] == "-1"


def test_scaf_metrics_start_again_each_step_and_exempt_follows_the_step(small_dir):
    """Step 0 (exempt_steps 1): exempt, its failed group counted, none rescued. Step 1: one group with a
    right answer: its own counts only (no failure), not the two steps' sums."""
    _, tokenizer = load_policy(small_dir)
    example = examples(1)[0]
    right = f"x</think><answer>{example['answer']}</answer>"
    trainer = _scaf_trainer(tokenizer, lambda p, i: right)
    hooks = ScafHooks(TEMPLATE, ("planning",), False, exempt_steps=1)
    rollouts, table = _all_wrong(trainer, [example])
    hooks.transform_rollouts(trainer, rollouts, [example], table, 0)
    first = hooks.after_update(trainer, None)
    assert first["scaf/exempt"] == 1.0 and first["scaf/all_fail_frac"] == 1.0
    assert first["scaf/rescued_frac"] == 0.0 and math.isnan(first["scaf/hint_level"])
    trainer.step = 1
    good = ScriptedBackend(tokenizer, lambda p, i: right if i else "x</think><answer>-1</answer>").generate(
        [example["prompt"]] * 2, None, 0
    )
    hooks.transform_rollouts(
        trainer, good, [example], trainer.rubric.score(good.completions, [example] * 2), 0
    )
    second = hooks.after_update(trainer, None)
    assert second["scaf/exempt"] == 0.0 and second["scaf/all_fail_frac"] == 0.0
    assert second["scaf/rescued_frac"] == 0.0 and second["scaf/all_fail_frac_after"] == 0.0
    # exempt_steps 0: step 0 is not exempt
    hooks = ScafHooks(TEMPLATE, ("planning",), False, exempt_steps=0)
    trainer.step = 0
    hooks.transform_rollouts(trainer, rollouts, [example], table, 0)
    third = hooks.after_update(trainer, None)
    assert third["scaf/exempt"] == 0.0 and third["scaf/rescued_frac"] == 1.0


def test_gtpo_dropped_count_is_the_filters():
    """A completion at exactly max_entropy is kept (A - gamma H) by the filter, so it is not counted as
    dropped; one above it is dropped (A = 0) and counted."""
    hooks = GTPOHooks(gamma=0.5, max_entropy=0.5)
    hooks._counts = torch.zeros(4, dtype=torch.float64)
    adjusted = hooks.adjust_advantages(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.6]))
    torch.testing.assert_close(adjusted, torch.tensor([0.75, 0.0]))
    assert hooks._counts[2:].tolist() == [1.0, 2.0]


def test_make_hooks_passes_each_algorithms_settings(small_dir, large_dir, tmp_path):
    """Every gtpo_*, scaf_* and codistill_* field reaches its hooks, each in its place."""
    _, tokenizer = load_policy(small_dir)
    scaf = make_hooks(
        config(tmp_path, algo="scaf", max_steps=20, scaf_exemption_fraction=0.1, scaf_progressive=False,
               scaf_tiers=("planning", "solution")),
        tokenizer,
    )  # fmt: skip
    assert (scaf.exempt_steps, scaf.progressive, scaf.tiers) == (2, False, ("planning", "solution"))
    gtpo = make_hooks(
        config(tmp_path, algo="gtpo", gtpo_conflict_positive=3.0, gtpo_conflict_negative=0.5, gtpo_gamma=0.2,
               gtpo_max_entropy=0.6, gtpo_skip_zero_advantage=True),
        tokenizer,
    )  # fmt: skip
    assert (gtpo.conflict_positive, gtpo.conflict_negative, gtpo.gamma, gtpo.max_entropy) == (
        3.0,
        0.5,
        0.2,
        0.6,
    )
    assert gtpo.skip_zero_advantage is True
    codistill = make_hooks(
        config(tmp_path, algo="codistill", model=str(small_dir), large_model=str(large_dir), codistill_alpha=0.2,
               codistill_is_cap=1.5, codistill_large_lr=3e-4, learning_rate=1e-2, codistill_train_large=False),
        tokenizer,
    )  # fmt: skip
    assert (codistill.alpha, codistill.is_cap, codistill.train_large) == (0.2, 1.5, False)
    assert codistill.optimizer.param_groups[0]["lr"] == 3e-4


def test_codistill_takes_logprobs_at_the_runs_temperature_and_a_frozen_l_stays(
    small_dir, large_dir, tmp_path
):
    """At temperature 0.5 the KD term and L's loss and gradient use log_softmax(logits / 0.5) of both models
    (the sampling distribution); with train_large off L's weights do not move and no L loss is logged."""
    trainer, hooks, small, large = _codistill_trainer(
        small_dir, large_dir, tmp_path, lambda q, i: i % 2, temperature=0.5
    )
    batch = trainer.collect()
    rollouts, mask = batch.rollouts, batch.rollouts.loss_mask

    def at_half(model, grad=False):
        ids, attention = rollouts.input_ids(), rollouts.attention_mask()
        t = rollouts.completion_ids.shape[1]
        with torch.set_grad_enabled(grad):
            out = model(
                input_ids=ids, attention_mask=attention, position_ids=position_ids_from_mask(attention)
            )
        logp = torch.log_softmax(out.logits.float() / 0.5, -1)[:, -t - 1 : -1]
        return logp.gather(-1, ids[:, -t:, None]).squeeze(-1)  # (N, T)

    small_ref, large_ref = at_half(small), at_half(large)
    kd_ref = 0.5 * ((large_ref - small_ref) * mask).sum(1) / mask.sum(1)
    kd = batch.table.components[:, batch.table.names.index("kd")]
    torch.testing.assert_close(kd, kd_ref, atol=1e-5, rtol=0)
    trainer.update(batch)
    advantages = verifiable_advantages(trainer, batch)
    # L's gradient by hand, at temperature 0.5, weights from the detached log-probs (its logged norm is it)
    w_ref, _ = large_loss_reference(large_ref, small_ref, advantages, mask, trainer.config)
    cfg = trainer.config
    surrogate, _ = algos.policy_loss(
        at_half(large, grad=True), None, advantages, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
        aggregation=cfg.loss_aggregation, max_length=cfg.max_new_tokens, importance_weights=w_ref,
    )  # fmt: skip
    grads = torch.autograd.grad(surrogate, [p for p in large.parameters() if p.requires_grad])
    grad_norm_ref = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    metrics = hooks.after_update(trainer, batch)
    _, loss_ref = large_loss_reference(large_ref, small_ref, advantages, mask, trainer.config)
    assert metrics["codistill/large_loss"] == pytest.approx(float(loss_ref), abs=1e-5)
    assert metrics["codistill/large_grad_norm"] == pytest.approx(grad_norm_ref, rel=1e-4)

    trainer, hooks, _, large = _codistill_trainer(
        small_dir, large_dir, tmp_path / "frozen", lambda q, i: i % 2, train_large=False
    )
    before = [p.detach().clone() for p in large.parameters()]
    batch = trainer.collect()
    trainer.update(batch)
    metrics = hooks.after_update(trainer, batch)
    assert "codistill/large_loss" not in metrics and "codistill/ess" in metrics
    assert all(torch.equal(a, b) for a, b in zip(before, large.parameters(), strict=True))
