"""core/trainer.py: a tiny GRPO run learns, LoRA trains only the adapter, the loop's options do what they
say (mu, beta, dynamic sampling, multi-turn masking), and bad input fails with a clear message."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import algos
from core.cli import _names_an_input
from core.data import InputError
from core.policy import LoraSettings, completion_logprobs, has_dropout, load_policy
from core.rewards import Rubric
from core.rollout import HFGenerateBackend, derive_seed
from core.runs import process_identity
from core.tiny import create_tiny_model_dir
from core.trainer import GRPOConfig, GRPOTrainer, OtherProcessFailed, TrainerHooks

EXAMPLES = [{"id": f"ex{i}", "prompt": f"go {i}"} for i in range(8)]


def a_fraction(completion: str, example: dict) -> float:
    """The fake task: share of the completion's characters that are 'a'."""
    return completion.count("a") / len(completion) if completion else 0.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    return create_tiny_model_dir(path, ["go 0123456789a"], hidden_size=32, num_layers=1, num_heads=2, seed=0)


def make_config(tmp_path, **overrides) -> GRPOConfig:
    base = dict(
        run_dir=str(tmp_path / "run"),
        max_steps=2,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=4,
        learning_rate=1e-2,
        micro_batch_size=8,
    )
    return GRPOConfig(**(base | overrides))


def varied(completion: str, example: dict) -> float:
    """A reward that spreads from the first step: the completion's characters hashed to [0, 1)."""
    return sum(map(ord, completion)) % 7 / 7


def make_trainer(model_dir, config, rubric=None, **kwargs) -> GRPOTrainer:
    lora = LoraSettings(r=4, alpha=8) if config.lora else None
    model, tokenizer = load_policy(model_dir, lora=lora)
    rubric = rubric or Rubric({"a": a_fraction})
    return GRPOTrainer(config, model, tokenizer, EXAMPLES, rubric, app="test", **kwargs)


def test_tiny_run_learns_and_logs(model_dir, tmp_path):
    trainer = make_trainer(model_dir, make_config(tmp_path, max_steps=40))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    history = trainer.train()
    first, last = history[0]["reward"], sum(m["reward"] for m in history[-3:]) / 3
    assert first < 0.05  # a random 270-token model rarely says 'a'
    assert last > 0.5, f"mean reward of the last 3 steps {last:.3f} did not rise above 0.5"
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)
    metrics = trainer.run.read_metrics()
    assert [m["step"] for m in metrics] == list(range(1, 41))
    for key in ("reward/a", "zero_spread_frac", "loss", "entropy", "clip/frac", "tokens_per_s", "grad_norm"):
        assert key in metrics[0], key
    rollouts = trainer.run.read_rollouts()
    assert len(rollouts) == 40 * 4 * 4
    assert rollouts[0]["rewards"]["a"] == pytest.approx(a_fraction(rollouts[0]["completion"], {}))
    assert trainer.run.read_status()["status"] == "finished"
    assert trainer.run.latest_checkpoint().name == "step-40"


def test_lora_changes_only_the_adapter(model_dir, tmp_path):
    trainer = make_trainer(model_dir, make_config(tmp_path, lora=True), Rubric({"varied": varied}))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:  # B starts at zero, so the first updates move it
            assert not torch.equal(p, before[name]), name
        elif "lora_" not in name:
            assert torch.equal(p, before[name]), name
    saved = load_file(trainer.run.latest_checkpoint() / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # a LoRA checkpoint holds only the adapter
    # final/ holds the adapter alone; loaded as a model, it is the base with the adapter merged in
    final = Path(trainer.save_final())
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").is_file()
    loaded, tokenizer = load_policy(final)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = trainer.model.eval()(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=0)
    assert tokenizer.padding_side == "left" and len(tokenizer) == len(trainer.tokenizer)


def test_mu_above_one_uses_old_logprobs_and_beta_loads_a_reference(model_dir, tmp_path):
    """mu = 2 sees ratios away from 1; beta loads a reference and its KL term is in the loss: under the
    token-mean aggregation loss = pg_loss + beta * kl, both means over the same tokens of each update."""
    config = make_config(tmp_path, max_steps=1, mu=2, beta=0.1, loss_aggregation="token-mean")
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    assert trainer.reference is not None
    (metrics,) = trainer.train()
    # the second epoch sees ratios away from 1 (the first update moved the policy) and a KL > 0
    assert metrics["ratio/max"] > 1.0 or metrics["ratio/min"] < 1.0
    assert metrics["kl"] > 0.0
    assert metrics["loss"] - metrics["pg_loss"] == pytest.approx(0.1 * metrics["kl"], rel=1e-5)
    assert make_trainer(model_dir, make_config(tmp_path / "b", max_steps=1)).reference is None


def test_update_metrics_are_token_means_of_the_step_whatever_the_micro_batches(model_dir, tmp_path):
    """kl, ratio/mean, clip fractions and entropy average over every token of the step's updates: the same
    for one micro-batch of 16 completions as for 16 of one (they were means of micro-batch means)."""
    for level in ("token", "sequence"):  # sequence level: the clip fractions count completions
        runs = []
        for size in (16, 1):
            config = make_config(
                tmp_path / f"{level}{size}", max_steps=1, mu=2, beta=0.1, max_new_tokens=16, ratio_level=level
            )
            trainer = make_trainer(model_dir, replace(config, micro_batch_size=size), Rubric({"v": varied}))
            runs.append(trainer.train()[0])
        whole, single = runs
        assert whole["loss"] == pytest.approx(single["loss"], rel=1e-5)
        for name in ("kl", "ratio/mean", "clip/frac", "entropy"):
            assert single[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-9), (level, name)
        assert whole["kl"] > 0 and whole["clip/frac"] > 0


def test_logged_lr_is_the_rate_the_step_applied(model_dir, tmp_path):
    config = make_config(tmp_path, max_steps=4, warmup_steps=2, lr_schedule="linear", learning_rate=1e-2)
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    assert_logs_applied_rates(trainer, [0.0, 0.005, 0.01, 0.005])
    # two updates a step (mu = 2): the mean of the two rates, not the first or the last
    config = replace(config, run_dir=str(tmp_path / "mu2"), max_steps=2, mu=2)
    assert_logs_applied_rates(
        make_trainer(model_dir, config, Rubric({"v": varied})), [0.0, 0.005, 0.01, 0.005]
    )


def assert_logs_applied_rates(trainer, expected_applied):
    applied, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        applied.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    logged = [m["lr"] for m in trainer.train()]
    assert applied == pytest.approx(expected_applied)
    per_step = len(applied) // len(logged)
    means = [sum(applied[i : i + per_step]) / per_step for i in range(0, len(applied), per_step)]
    assert logged == pytest.approx(means)


def test_dynamic_sampling_keeps_groups_with_spread(model_dir, tmp_path):
    # even-numbered prompts always score 1 (zero spread); odd ones score by the fake task
    def half_informative(completion, example):
        return (
            1.0 if int(example["id"][2:]) % 2 == 0 else a_fraction(completion, example) + len(completion) / 10
        )

    config = make_config(tmp_path, max_steps=1, dynamic_sampling=True, max_sampling_rounds=4)
    trainer = make_trainer(model_dir, config, Rubric({"r": half_informative}))
    batch = trainer.collect()
    assert all(int(example["id"][2:]) % 2 == 1 for example in batch.examples)
    assert batch.sampling_rounds >= 2
    grouped = batch.table.total.view(-1, 4)
    assert (grouped.amax(1) > grouped.amin(1)).all()


def test_dynamic_sampling_under_gdpo_keeps_groups_whose_advantages_are_not_zero(model_dir, tmp_path):
    """Under normalize_then_sum a group whose components' z-scores cancel has no signal although its
    weighted total spreads: even-numbered prompts score a = x, b = -2x (total -x, advantages 0), odd ones
    a = x, b = 0."""

    def x(completion, example):
        return varied(completion, example)

    def b(completion, example):
        return -2 * x(completion, example) if int(example["id"][2:]) % 2 == 0 else 0.0

    config = make_config(
        tmp_path, max_steps=1, dynamic_sampling=True, max_sampling_rounds=4,
        multi_reward="normalize_then_sum", advantage_scale="group",
    )  # fmt: skip
    trainer = make_trainer(model_dir, config, Rubric({"a": x, "b": b}))
    batch = trainer.collect()
    assert batch.sampling_rounds >= 2
    assert all(int(example["id"][2:]) % 2 == 1 for example in batch.examples)
    assert (batch.advantages.view(-1, 4) != 0).any(1).all()


class EchoEnvironment:
    """Appends the observation '=ok' after each turn; an episode lasts two turns."""

    def reset(self, prompt, example):
        return {"turns": 0}

    def step(self, state, turn_text):
        state["turns"] += 1
        return "=ok", state["turns"] >= 2


def test_multi_turn_observations_are_out_of_the_loss(model_dir, tmp_path, monkeypatch):
    seen = []
    original = algos.policy_loss

    def recording_policy_loss(logp, old_logp, advantages, mask, **kwargs):
        seen.append(mask.clone())
        budgets.append(kwargs["max_length"])
        return original(logp, old_logp, advantages, mask, **kwargs)

    budgets = []
    monkeypatch.setattr(algos, "policy_loss", recording_policy_loss)
    trainer = make_trainer(
        model_dir, make_config(tmp_path, max_steps=1, max_turns=2), environment=EchoEnvironment()
    )
    batch = trainer.collect()
    rollouts = batch.rollouts
    assert all(completion.count("=ok") == 2 for completion in rollouts.completions)
    observation_tokens = (rollouts.completion_mask.float() - rollouts.loss_mask).sum(-1)
    assert torch.equal(observation_tokens, torch.full((16,), 6.0))  # '=ok' is 3 tokens, twice
    trainer.update(batch)
    assert torch.equal(torch.cat(seen), rollouts.loss_mask)
    # Dr.GRPO's constant is the completion's token budget: 2 turns of max_new_tokens 4 (it was one turn's)
    assert set(budgets) == {8}


class LengthFields(TrainerHooks):
    """Adds each row's example id again and its completion length to rollouts.jsonl."""

    def rollout_fields(self, trainer, example, rollouts, index):
        return {"example": example["id"], "length": len(rollouts.completions[index])}


def test_rollouts_jsonl_has_turns_of_multi_turn_runs_and_the_hooks_fields(model_dir, tmp_path):
    config = make_config(tmp_path, max_steps=1, max_turns=2)
    trainer = make_trainer(model_dir, config, environment=EchoEnvironment(), hooks=LengthFields())
    trainer.train()
    rows = trainer.run.read_rollouts()
    assert len(rows) == 16
    for row in rows:
        assert [t["role"] for t in row["turns"]] == ["model", "observation", "model", "observation"]
        assert row["turns"][1]["text"] == row["turns"][3]["text"] == "=ok"
        assert "".join(t["text"] for t in row["turns"]) == row["completion"]
        assert row["example"] == row["example_id"] and row["length"] == len(row["completion"])
    single = make_trainer(model_dir, make_config(tmp_path / "single", max_steps=1))
    single.train()
    assert all("turns" not in row for row in single.run.read_rollouts())


def test_rollout_fields_may_not_replace_the_trainers_fields(model_dir, tmp_path):
    class Clash(TrainerHooks):
        def rollout_fields(self, trainer, example, rollouts, index):
            return {"reward": 1.0}

    trainer = make_trainer(model_dir, make_config(tmp_path, max_steps=1), hooks=Clash())
    with pytest.raises(ValueError, match=r"may not replace the trainer's fields \['reward'\]"):
        trainer.train()


def test_a_prompt_longer_than_the_context_names_the_example(tmp_path):
    model_dir = create_tiny_model_dir(
        tmp_path / "short",
        ["go 0123456789"],
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=8,
    )
    # refused before the run is created, not at the step whose batch holds the example
    with pytest.raises(InputError, match=r"example 'ex\d': prompt of 4 tokens \+ max_new_tokens 5 exceeds"):
        make_trainer(model_dir, make_config(tmp_path, max_new_tokens=5))
    assert not (tmp_path / "run").exists()


def test_prompts_are_checked_against_the_samplers_context(model_dir, tmp_path):
    """A sampler may hold fewer tokens than the model (vLLM's max_model_len): its limit is the one checked."""

    class ShortBackend(HFGenerateBackend):
        max_context = 8

    model, tokenizer = load_policy(model_dir)
    backend = ShortBackend(model, tokenizer)
    assert model.config.max_position_embeddings > 8
    with pytest.raises(InputError, match=r"prompt of 4 tokens \+ max_new_tokens 5 exceeds .* context of 8"):
        GRPOTrainer(
            make_config(tmp_path, max_new_tokens=5), model, tokenizer, EXAMPLES, Rubric({"a": a_fraction}),
            app="test", backend=backend,
        )  # fmt: skip


def test_an_empty_prompt_is_named(model_dir, tmp_path):
    trainer = make_trainer(model_dir, make_config(tmp_path))
    with pytest.raises(ValueError, match="example 'blank': the prompt has no tokens"):
        trainer.generate([EXAMPLES[0], {"id": "blank", "prompt": ""}], 0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("group_size", 0, "group_size must be >= 2"),
        ("group_size", 1, "group_size must be >= 2"),
        ("learning_rate", -1.0, "learning_rate must be > 0"),
        ("lora_alpha", 0, "lora_alpha must be > 0"),  # a LoRA scale of 0 trained nothing, silently
        ("top_p", 1.5, "top_p must be in"),
        ("beta", -0.1, "must be >= 0"),
        ("loss_aggregation", "mean", "unknown loss aggregation"),
        ("mini_batches", 3, "divisible by mini_batches=3"),
        ("compile_decode", True, "set generation_groups > 1 too"),
        ("max_sampling_rounds", 0, "max_sampling_rounds must be >= 1"),
        ("advantage_eps", -0.1, "advantage_eps must be >= 0"),
        ("eps_low", 1.5, "need 0 <= eps_low < 1"),
        ("dual_clip", 0.5, "dual_clip must be > 1"),
        # the bounds themselves: top_p 0 keeps no token, dual-clip at 1 bounds nothing, -1 is "all"
        ("top_p", 0.0, "top_p must be in"),
        ("dual_clip", 1.0, "dual_clip must be > 1"),
        ("rollouts_to_log", -2, "rollouts_to_log must be >= -1"),
        ("min_new_tokens", 5, r"min_new_tokens must be in \[0, max_new_tokens\]"),  # max_new_tokens 4
    ],
)
def test_config_values_out_of_range(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        replace(make_config(tmp_path), **{field: value})


def test_mu_above_one_takes_the_old_logprobs_from_the_first_epoch(model_dir, tmp_path, monkeypatch):
    """With one mini-batch the first epoch's forwards all run before its step: their log-probs are the old
    ones of the second epoch (no separate no-grad pass of the policy), equal to a forward of the model as
    it was before the update."""
    config = make_config(tmp_path, max_steps=1, mu=2, micro_batch_size=4)
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    before = copy.deepcopy(trainer.model)
    losses, batches, passes = [], [], []
    policy_loss, update, no_grad_pass = algos.policy_loss, trainer.update, trainer._no_grad_pass

    def spy_loss(logp, old_logp, *args, **kwargs):
        losses.append((logp.detach().clone(), old_logp))
        return policy_loss(logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(algos, "policy_loss", spy_loss)
    monkeypatch.setattr(trainer, "update", lambda batch: batches.append(batch) or update(batch))
    monkeypatch.setattr(
        trainer, "_no_grad_pass", lambda r, reference: passes.append(reference) or no_grad_pass(r, reference)
    )
    trainer.train()
    assert passes == []  # beta = 0: no reference pass, and no old-logprob pass
    assert len(losses) == 2 * 4  # 16 completions in micro-batches of 4, two epochs
    for (first, old), (second, old_then) in zip(losses[:4], losses[4:], strict=True):
        assert old is None and torch.equal(old_then[:, : first.shape[1]], first)
        assert not torch.equal(second, first)  # the first epoch's step moved the policy
    rollouts = batches[0].rollouts
    with torch.no_grad():
        expected, _ = completion_logprobs(
            before, rollouts.input_ids(), rollouts.attention_mask(), rollouts.completion_ids.shape[1]
        )
    got = torch.cat([old for _, old in losses[4:]])
    mask = rollouts.loss_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)


def test_with_dropout_mu_above_one_takes_the_old_logprobs_from_a_pass_without_it(
    model_dir, tmp_path, monkeypatch
):
    """The first epoch's forwards run with dropout; the rollouts were sampled without it. With dropout the
    old log-probs come from a no-grad pass in eval mode, one mini-batch or several (as without dropout
    several mini-batches do): before, the first epoch's log-probs were used, 0.06 off."""
    config = make_config(tmp_path, max_steps=1, mu=2, micro_batch_size=4)
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    assert not has_dropout(trainer.model)  # the tiny model has none: the first epoch's log-probs serve
    for module in trainer.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3
    assert has_dropout(trainer.model)
    before = copy.deepcopy(trainer.model)
    olds, batches = [], []
    policy_loss, update = algos.policy_loss, trainer.update

    def spy_loss(logp, old_logp, *args, **kwargs):
        olds.append(old_logp)
        return policy_loss(logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(algos, "policy_loss", spy_loss)
    monkeypatch.setattr(trainer, "update", lambda batch: batches.append(batch) or update(batch))
    trainer.train()
    rollouts = batches[0].rollouts
    before.eval()
    with torch.no_grad():
        expected, _ = completion_logprobs(
            before, rollouts.input_ids(), rollouts.attention_mask(), rollouts.completion_ids.shape[1]
        )
    mask = rollouts.loss_mask.bool()
    for got in (torch.cat(olds[:4]), torch.cat(olds[4:])):  # both epochs: the same old log-probs
        torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)


def test_dropout_draws_do_not_depend_on_what_ran_before_the_trainer(model_dir, tmp_path):
    """Dropout reads torch's global generator, which the trainer seeds from the run seed: a pipeline whose
    earlier stage drew from it (or was skipped on a resume) gave another update before."""
    params = []
    for prior_draws in (0, 1000):
        torch.rand(prior_draws)  # an earlier stage's use of the global generator
        config = make_config(tmp_path / str(prior_draws), max_steps=1)
        trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
        for module in trainer.model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.5
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=0, rtol=0)


def test_no_grad_passes_run_with_dropout_off_whatever_the_models_mode(model_dir, tmp_path):
    """The old log-probs of several mini-batches come from a no-grad pass; in the model's leftover mode
    (train after any update, eval after a resume) dropout made them differ between a run and its resume."""
    trainer = make_trainer(model_dir, make_config(tmp_path))
    for module in trainer.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    rollouts = trainer.generate(EXAMPLES[:2], 0)
    trainer.model.eval()
    with torch.no_grad():
        expected, _ = completion_logprobs(
            trainer.model, rollouts.input_ids(), rollouts.attention_mask(), rollouts.completion_ids.shape[1]
        )
    trainer.model.train()
    got = trainer._no_grad_pass(rollouts, reference=False)
    assert trainer.model.training  # the mode is given back
    mask = rollouts.loss_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-6, rtol=0)


def test_ratio_extremes_are_over_every_micro_batch_and_update(model_dir, tmp_path, monkeypatch):
    """ratio/max and ratio/min are the largest and smallest token ratio of the step's updates, not a mean
    of the micro-batches' extremes."""
    config = make_config(tmp_path, max_steps=1, mu=2, mini_batches=2, micro_batch_size=4, learning_rate=0.3)
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    seen = []
    policy_loss = algos.policy_loss

    def spy_loss(*args, **kwargs):
        loss, metrics = policy_loss(*args, **kwargs)
        seen.append((float(metrics["ratio/max"]), float(metrics["ratio/min"])))
        return loss, metrics

    monkeypatch.setattr(algos, "policy_loss", spy_loss)
    (metrics,) = trainer.train()
    highs, lows = zip(*seen, strict=True)
    assert len(seen) == 2 * 4 and max(highs) > min(highs)  # the extremes differ between micro-batches
    assert metrics["ratio/max"] == max(highs) and metrics["ratio/min"] == min(lows)


def test_ratio_extremes_of_a_step_without_trained_tokens_are_nan(model_dir, tmp_path, monkeypatch):
    config = make_config(tmp_path, max_steps=1, micro_batch_size=4)
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    policy_loss = algos.policy_loss

    def no_tokens(logp, old_logp, advantages, mask, **kwargs):
        return policy_loss(logp, old_logp, advantages, torch.zeros_like(mask), **kwargs)

    monkeypatch.setattr(algos, "policy_loss", no_tokens)
    (metrics,) = trainer.train()
    assert math.isnan(metrics["ratio/max"]) and math.isnan(metrics["ratio/min"])


def test_reward_failures_are_counted_over_the_batch(model_dir, tmp_path):
    def flaky(completion: str, example: dict) -> float:
        if int(example["id"][2:]) % 2:
            raise RuntimeError("judge down")
        return 1.0

    config = make_config(tmp_path, max_steps=1, on_reward_error="zero")
    trainer = make_trainer(model_dir, config, Rubric({"flaky": flaky, "a": a_fraction}, on_error="zero"))
    (metrics,) = trainer.train()
    assert metrics["reward/flaky/failures"] == 8.0  # 2 of the 4 prompts, 4 completions each
    assert metrics["reward/a/failures"] == 0.0


def test_resuming_a_finished_run_does_not_rewrite_its_checkpoint(model_dir, tmp_path):
    config = make_config(tmp_path, max_steps=1)
    make_trainer(model_dir, config).train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-1"
    inode = checkpoint.stat().st_ino  # a save writes a new directory and renames it into place
    assert make_trainer(model_dir, replace(config, resume=True)).train() == []
    assert checkpoint.stat().st_ino == inode


def test_status_follows_the_checkpoints_and_says_finished_once_the_app_is_done(model_dir, tmp_path):
    """While running, status.json's step is the newest checkpoint's (the step a kill resumes from); inside
    `until_finished` the run is finished when the block ends, and failed if the app's work after training
    (saving, evaluating) dies, not finished before it."""
    seen = []

    class StatusReader(TrainerHooks):
        def after_update(self, trainer, batch) -> dict:
            seen.append(trainer.run.read_status()["step"])
            return {}

    trainer = make_trainer(model_dir, make_config(tmp_path, max_steps=3, save_every=1), hooks=StatusReader())
    with trainer.until_finished():
        trainer.train()
        assert trainer.run.read_status()["status"] == "running"  # trained, not yet saved
        trainer.save_final()
    assert seen == [0, 1, 2] and trainer.run.read_status() | {"updated": None} == {
        "status": "finished",
        "step": 3,
        "updated": None,
        "error": None,
        **process_identity(os.getpid()),
    }
    failing = make_trainer(model_dir, make_config(tmp_path / "b", max_steps=1))
    with pytest.raises(RuntimeError, match="disk full"):
        with failing.until_finished():
            failing.train()
            raise RuntimeError("disk full")
    status = failing.run.read_status()
    assert (status["status"], status["step"], status["error"]) == ("failed", 1, "RuntimeError: disk full")


def test_a_resume_that_cannot_load_its_checkpoint_marks_the_run_failed(model_dir, tmp_path):
    config = make_config(tmp_path, max_steps=1)
    make_trainer(model_dir, config).train()
    (tmp_path / "run" / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"cut off")
    with pytest.raises(ValueError, match="step-1: the checkpoint is damaged: model.safetensors") as info:
        make_trainer(model_dir, replace(config, max_steps=2, resume=True))
    assert _names_an_input(info.value)  # a command-line error naming the checkpoint, not a traceback
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] == 1 and status["error"].startswith("resume: ")


def test_a_refused_resume_leaves_the_runs_settings_as_they_were(model_dir, tmp_path):
    """A resume refused while loading its checkpoint had recorded its settings in config.json, so every
    later --resume took them as the run's and was refused the same way."""
    config = make_config(tmp_path, max_steps=1)
    make_trainer(model_dir, config).train()
    before = json.loads((tmp_path / "run" / "config.json").read_text())
    resume = replace(config, max_steps=2, resume=True)
    model, tokenizer = load_policy(model_dir)
    with pytest.raises(ValueError, match="prompt order is over 8 examples, this run has 6") as info:
        GRPOTrainer(resume, model, tokenizer, EXAMPLES[:6], Rubric({"a": a_fraction}), app="test")
    assert _names_an_input(info.value) and str(info.value).startswith(str(tmp_path / "run" / "checkpoints"))
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == before
    with pytest.raises(ValueError, match="it holds weights this model lacks .*other --lora settings") as info:
        make_trainer(model_dir, replace(resume, lora=True))
    assert _names_an_input(info.value)
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == before
    # refused, the run is as it was: a finished run is not marked failed by a resume that never began
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"
    wider = create_tiny_model_dir(
        tmp_path / "wider", ["go 0123456789a"], hidden_size=64, num_layers=1, num_heads=2, seed=0
    )
    with pytest.raises(ValueError, match="its weights do not fit this model: ") as info:
        make_trainer(wider, resume)
    message = str(info.value)  # torch's error, one line per weight, cut to its first two and a count
    assert "\n" not in message and "size mismatch for" in message and message.endswith("more lines)")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"
    make_trainer(model_dir, resume).train()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"


def test_a_checkpoint_missing_part_of_its_state_marks_the_run_failed(model_dir, tmp_path, monkeypatch):
    """A damaged checkpoint is not a refusal of these settings: unlike one, it marks the run failed."""
    config = make_config(tmp_path, max_steps=1)
    make_trainer(model_dir, config).train()

    def missing(self, state):
        raise KeyError("counts")

    monkeypatch.setattr(Rubric, "load_state_dict", missing)
    with pytest.raises(ValueError, match="step-1: cannot resume from it: KeyError: 'counts'") as info:
        make_trainer(model_dir, replace(config, max_steps=2, resume=True))
    assert _names_an_input(info.value)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("resume: ")


def test_running_out_of_memory_in_a_resume_is_not_taken_for_bad_settings(model_dir, tmp_path, monkeypatch):
    """An OutOfMemoryError (a RuntimeError) was shown as "cannot resume from it with these settings"."""
    config = make_config(tmp_path, max_steps=1)
    make_trainer(model_dir, config).train()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as info:
        make_trainer(model_dir, replace(config, max_steps=2, resume=True))
    assert not isinstance(info.value, ValueError)


def test_ctrl_c_during_a_resume_marks_the_run_failed(model_dir, tmp_path, monkeypatch):
    config = make_config(tmp_path, max_steps=1)
    make_trainer(model_dir, config).train()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(GRPOTrainer, "_load_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(model_dir, replace(config, max_steps=2, resume=True))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert (status["status"], status["step"], status["error"]) == ("failed", 1, "resume: KeyboardInterrupt: ")


def run_failing_rank_worker(model_dir, run_dir, where: str) -> dict:
    """status.json of failing_rank_worker.py run on 2 processes, process 1 failing `where`."""
    worker = Path(__file__).with_name("failing_rank_worker.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run(
        [*launch, str(worker), str(model_dir), str(run_dir), where],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    return json.loads((run_dir / "status.json").read_text())


def test_a_reward_error_on_one_process_stops_every_process_and_is_recorded(model_dir, tmp_path):
    """Process 1's reward raises in step 2: process 0 must not wait in the next collective (or be killed
    mid-step and leave status.json "running"); it raises too, naming process 1's error."""
    status = run_failing_rank_worker(model_dir, tmp_path / "run", "reward")
    assert status["status"] == "failed" and status["step"] == 1
    assert status["error"].startswith(
        "OtherProcessFailed: process 1 failed: RewardError: reward 'flaky' failed"
    )
    assert "reward server unreachable" in status["error"]
    assert "process 0:" not in status["error"]  # named once
    # process 0's own error: process 1's relay of it is not a cause of its own
    status = run_failing_rank_worker(model_dir, tmp_path / "run0", "reward0")
    assert status["status"] == "failed" and status["step"] == 1
    assert (
        status["error"].startswith("RewardError: reward 'flaky' failed")
        and "process 1" not in status["error"]
    )
    assert not (tmp_path / "run0" / "process-1-error.txt").exists()


def test_a_run_is_not_finished_while_another_process_fails_after_training(model_dir, tmp_path):
    """Process 1 fails after training, inside until_finished (its share of an evaluation): process 0, done
    with its own part, had marked the run finished."""
    status = run_failing_rank_worker(model_dir, tmp_path / "run", "after")
    # process 0 itself sees only the lost connection to process 1 (or the launcher's SIGTERM): process 1's
    # error comes first, from the file it left
    assert status["status"] == "failed" and status["step"] == 2
    assert status["error"].startswith(
        "process 1 failed: RuntimeError: evaluation failed on process 1; process 0: "
    )


def test_process_0_names_the_errors_other_processes_left_in_this_attempt_only(model_dir, tmp_path):
    """An error file of an earlier attempt is removed when the trainer is built, and one older than this
    attempt is not named; those of this attempt come first, the first written first, unless process 0's error
    names them already."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "process-1-error.txt").write_text("OSError: an earlier attempt's")
    trainer = make_trainer(model_dir, make_config(tmp_path))
    assert not (run_dir / "process-1-error.txt").exists()
    trainer.world = 3  # as if launched on 3 processes
    (run_dir / "process-2-error.txt").write_text("ValueError: bad row")
    own = "RuntimeError: Connection closed by peer"
    assert (
        trainer._with_other_processes_errors(own)
        == f"process 2 failed: ValueError: bad row; process 0: {own}"
    )
    named = "OtherProcessFailed: process 2 failed: ValueError: bad row"
    assert trainer._with_other_processes_errors(named) == named
    (run_dir / "process-1-error.txt").write_text("OSError: connection lost")  # after process 2's
    later = trainer._started_at + 5
    os.utime(run_dir / "process-1-error.txt", (later, later))
    assert trainer._with_other_processes_errors(own) == (
        f"process 2 failed: ValueError: bad row; process 1 failed: OSError: connection lost; process 0: {own}"
    )
    for rank in (1, 2):
        os.utime(run_dir / f"process-{rank}-error.txt", (trainer._started_at - 60, trainer._started_at - 60))
    assert trainer._with_other_processes_errors(own) == own


def test_a_process_other_than_0_leaves_its_own_error_only_and_still_raises_without_a_run_dir(
    model_dir, tmp_path
):
    """Seen as process 1 of 2 (no collective runs on an error): its own error is written for process 0, a
    relayed one is not, and a run directory it cannot write to leaves its error raised as it was."""
    trainer = make_trainer(model_dir, make_config(tmp_path))
    trainer.rank, trainer.world = 1, 2
    error_file = tmp_path / "run" / "process-1-error.txt"
    with pytest.raises(OtherProcessFailed):
        with trainer.until_finished():
            raise OtherProcessFailed("process 0 failed: ValueError: bad row")
    assert not error_file.exists()
    with pytest.raises(ValueError, match="evaluation failed"):
        with trainer.until_finished():
            raise ValueError("evaluation failed")
    assert error_file.read_text() == "ValueError: evaluation failed"
    trainer.run_path = str(tmp_path / "elsewhere" / "run")  # not on this machine
    with pytest.raises(KeyError, match="lost"):
        with trainer.until_finished():
            raise KeyError("lost")


def test_a_step_that_fails_after_its_update_is_not_recorded_as_reached(model_dir, tmp_path, monkeypatch):
    """Step 2 fails in its metrics, after its update and count (where a collective meets a dead process):
    the run is failed at step 1, the last one completed."""
    trainer = make_trainer(model_dir, make_config(tmp_path, max_steps=3))
    reward_metrics = trainer._reward_metrics

    def failing(batch):
        if trainer.step == 2:
            raise RuntimeError("peer gone")
        return reward_metrics(batch)

    monkeypatch.setattr(trainer, "_reward_metrics", failing)
    with pytest.raises(RuntimeError, match="peer gone"):
        with trainer.until_finished():
            trainer.train()
    status = trainer.run.read_status()
    assert (status["status"], status["step"], status["error"]) == ("failed", 1, "RuntimeError: peer gone")


def test_gdpo_weights_leave_out_the_bootstrapped_scales(model_dir, tmp_path):
    """normalize_then_sum z-scores each component, which removes its scale: the fitted 1 / mean|r_k| must
    not weigh it again (weights 0.5 / 0.5 with scales 1 and 0.1 had become a 91:9 mix)."""
    rubric = Rubric({"small": a_fraction, "large": varied}, weights={"small": 0.5, "large": 0.5})
    rubric.fit_scales(torch.tensor([[1.0, 10.0], [1.0, 10.0]]))
    config = make_config(tmp_path, multi_reward="normalize_then_sum", advantage_scale="group")
    trainer = make_trainer(model_dir, config, rubric)
    table = rubric.score(["a", "b"], EXAMPLES[:2])
    assert table.effective_weights().tolist() == pytest.approx([0.5, 0.05])
    assert trainer.advantage_weights(table).tolist() == pytest.approx([0.5, 0.5])
    batch = trainer.collect()  # and collect's advantages are made with them
    expected = algos.normalize_then_sum(batch.global_components, torch.tensor([0.5, 0.5]), config.group_size)
    torch.testing.assert_close(batch.advantages, expected)
    assert batch.advantages.abs().sum() > 0
    plain = make_trainer(model_dir, make_config(tmp_path / "sum", advantage_scale="group"), rubric)
    assert plain.advantage_weights(table).tolist() == pytest.approx([0.5, 0.05])
    with pytest.raises(ValueError, match="needs advantage_scale group, got none"):
        make_config(tmp_path, multi_reward="normalize_then_sum", advantage_scale="none")


def test_gradient_accumulation_gives_the_full_batch_update(model_dir, tmp_path):
    """Micro-batches of 2 and one micro-batch of 16 log the same loss and make the same update."""
    runs = {}
    for micro in (2, 16):
        config = make_config(
            tmp_path / str(micro), max_steps=1, micro_batch_size=micro, loss_aggregation="token-mean"
        )
        trainer = make_trainer(model_dir, config, Rubric({"varied": varied}))
        (metrics,) = trainer.train()
        runs[micro] = (metrics, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    (small, small_weights), (full, full_weights) = runs[2], runs[16]
    assert full["grad_norm"] > 1e-3  # a real update, not two zeros compared
    for key in ("loss", "pg_loss", "grad_norm", "reward"):
        assert small[key] == pytest.approx(full[key], abs=1e-6), key
    # float32 sums in another order; Adam's step (1e-2 here) magnifies noise on near-zero gradients
    for name, weight in full_weights.items():
        torch.testing.assert_close(small_weights[name], weight, atol=2e-5, rtol=1e-5)


def test_tensorboard_logging_writes_event_files(model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    trainer = make_trainer(model_dir, make_config(tmp_path, max_steps=1, report_to="tensorboard"))
    trainer.train()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_resume_drops_the_tensorboard_points_logged_after_its_checkpoint(model_dir, tmp_path):
    """Cut off after logging step 3 but before its checkpoint, a run resumed from step-2 logs step 3 again:
    TensorBoard must show it once, as metrics.jsonl does, and keep steps 1 and 2."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(tmp_path, max_steps=3, save_every=1, report_to="tensorboard")
    make_trainer(model_dir, config).train()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-3")
    make_trainer(model_dir, replace(config, resume=True)).train()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [scalar.step for scalar in events.Scalars("loss")] == [1, 2, 3]


def test_fsdp_in_one_process_warns_and_trains_unsharded(model_dir, tmp_path):
    with pytest.warns(UserWarning, match="nothing to shard"):
        trainer = make_trainer(model_dir, make_config(tmp_path, fsdp=True, max_steps=1))
    assert not trainer.fsdp
    assert type(trainer.model).__name__ == "Qwen2ForCausalLM"  # not FSDP-wrapped


def test_deepspeed_in_one_process_warns_and_trains_without_it(model_dir, tmp_path):
    config_file = tmp_path / "ds.json"
    config_file.write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.warns(UserWarning, match="nothing to partition"):
        trainer = make_trainer(model_dir, make_config(tmp_path, deepspeed=str(config_file), max_steps=1))
    assert trainer.engine is None


def test_deepspeed_zero3_is_refused_with_a_pointer_to_fsdp(model_dir, tmp_path):
    config_file = tmp_path / "ds.json"
    config_file.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ValueError, match="ZeRO stage 3.*use --fsdp"):
        make_trainer(model_dir, make_config(tmp_path, deepspeed=str(config_file), max_steps=1))


def test_fsdp_refuses_a_compiled_decode_before_sharding(model_dir, tmp_path, monkeypatch):
    from core import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_world", lambda: (0, 2))  # as process 0 of 2, no process group
    config = make_config(tmp_path, fsdp=True, generation_groups=2, compile_decode=True)
    with pytest.raises(NotImplementedError, match="compile_decode under FSDP"):
        make_trainer(model_dir, config)


def test_summary_table_shows_the_first_and_the_last_step():
    from core.launch import summary_table

    def steps(n):
        history = [
            {"step": i, "reward": 0.0, "zero_spread_frac": 0.0, "entropy": 1.0, "step_time": 0.1}
            for i in range(1, n + 1)
        ]
        return [int(line.split()[0]) for line in summary_table(history).splitlines()[1:]]

    assert steps(2) == [1, 2] and steps(5) == [1, 2, 3, 4, 5]  # before: [1] and [1, 2, 3]
    assert steps(28)[0] == 1 and steps(28)[-1] == 28 and len(steps(28)) == 10
    assert steps(12) == [
        1,
        2,
        3,
        5,
        6,
        7,
        8,
        10,
        11,
        12,
    ]  # evenly spaced, rounded (floored: 4 and 9, not 6 and 11)


def test_a_resume_goes_on_with_the_configs_learning_rate_and_schedule(model_dir, tmp_path):
    """Resumed with another --learning-rate, --weight-decay and a longer --max-steps, a run updates at the
    rates a fresh run of the new config applies from that step on: the checkpoint's optimizer and scheduler
    states held the old rate (kept before), and the old linear schedule's last rate, 0, drove the first
    update after the resume."""
    first = make_config(tmp_path, max_steps=2, lr_schedule="linear")  # lr 1e-2, checkpoint at step 2
    first_metrics = make_trainer(model_dir, first, Rubric({"v": varied})).train()
    assert [m["lr"] for m in first_metrics] == pytest.approx([1e-2, 5e-3])  # 1e-2 * (1 - k / 2)
    resumed = replace(first, max_steps=4, learning_rate=4e-3, weight_decay=0.1, resume=True)
    trainer = make_trainer(model_dir, resumed, Rubric({"v": varied}))
    metrics = trainer.train()
    assert [m["step"] for m in metrics] == [3, 4]
    assert [m["lr"] for m in metrics] == pytest.approx([2e-3, 1e-3])  # 4e-3 * (1 - k / 4), k = 2, 3
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.1


def test_a_rubric_whose_on_error_differs_from_the_config_is_refused(model_dir, tmp_path):
    """The rubric applies on_error; a config saying `zero` beside a rubric that raises had been ignored."""
    config = make_config(tmp_path, on_reward_error="zero")
    with pytest.raises(ValueError, match="on_reward_error is 'zero' but the rubric's on_error is 'raise'"):
        make_trainer(model_dir, config, Rubric({"v": varied}))
    assert make_trainer(model_dir, config, Rubric({"v": varied}, on_error="zero")).rubric.on_error == "zero"


def test_an_example_whose_prompt_is_not_text_is_refused(model_dir, tmp_path):
    """A prompt given as a list of messages was joined into one string by the tokenizer without a word."""
    examples = [{"id": "m1", "prompt": [{"role": "user", "content": "hi"}]}, {"id": "ok", "prompt": "a"}]
    with pytest.raises(
        ValueError, match=r"needs a `prompt` string \(the templated text\); not for ids \['m1'\]"
    ):
        model, tokenizer = load_policy(model_dir)
        GRPOTrainer(make_config(tmp_path), model, tokenizer, examples, Rubric({"a": a_fraction}), app="test")


def test_a_resume_without_a_checkpoint_says_it_starts_over(model_dir, tmp_path, monkeypatch):
    """A run killed before its first checkpoint (--save-every 0): --resume trains from step 0 again and
    drops the steps it had logged, which it had done without a word."""
    config = make_config(tmp_path, max_steps=3)
    first = make_trainer(model_dir, config)
    monkeypatch.setattr(first, "save_checkpoint", lambda: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):  # the final checkpoint never written
        first.train()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.warns(
        UserWarning, match=r"no complete checkpoint .* starts over from step 0, and its 3 logged"
    ):
        resumed = make_trainer(model_dir, replace(config, resume=True))
    assert resumed.step == 0 and not (tmp_path / "run" / "metrics.jsonl").read_text()


def reference_updates(model, batches, config) -> tuple[list[float], list[float]]:
    """The update of `update` written as a plain loop over `batches` (one per step) from `model`: old
    log-probs of the model before each step, reference log-probs of the initial model, mu epochs of
    mini-batches (rows m, m + M, ...) with one forward, backward and AdamW step each (no accumulation), L2
    clipping, a linear schedule by hand. Returns the mean loss and mean gradient norm (before clipping) of
    each step."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    reference = copy.deepcopy(model).eval()
    total = config.max_steps * config.mu * config.mini_batches
    k, losses, norms = 0, [], []
    for batch in batches:
        rollouts = batch.rollouts
        ids, mask = rollouts.input_ids(), rollouts.attention_mask()
        width = rollouts.completion_ids.shape[1]
        model.eval()
        with torch.no_grad():
            old, _ = completion_logprobs(model, ids, mask, width)
            ref, _ = completion_logprobs(reference, ids, mask, width)
        model.train()
        step_losses, step_norms = [], []
        for _ in range(config.mu):
            for m in range(config.mini_batches):
                rows = torch.arange(m, len(rollouts.completions), config.mini_batches)
                part = rollouts.select(rows)
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate * (1 - k / total)
                logp, _ = completion_logprobs(model, part.input_ids(), part.attention_mask(), width)
                loss, _ = algos.policy_loss(
                    logp, old[rows], batch.advantages[rows], part.loss_mask,
                    eps_low=config.eps_low, aggregation=config.loss_aggregation,
                    max_length=config.max_new_tokens, ref_logp=ref[rows], beta=config.beta,
                )  # fmt: skip
                optimizer.zero_grad()
                loss.backward()
                step_norms.append(
                    float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
                )
                optimizer.step()
                step_losses.append(float(loss))
                k += 1
        losses.append(sum(step_losses) / len(step_losses))
        norms.append(sum(step_norms) / len(step_norms))
    return losses, norms


def trained_and_plain_loop(model_dir, config) -> tuple[list[dict], list[float], list[float]]:
    """The trainer's logged steps, and the losses and grad norms of `reference_updates` on its batches from
    the same initial model, after checking that both end with the same weights."""
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    model = copy.deepcopy(trainer.model)
    batches, update = [], trainer.update
    trainer.update = lambda batch: batches.append(batch) or update(batch)
    history = trainer.train()
    losses, norms = reference_updates(model, batches, config)
    for (name, got), expected in zip(trainer.model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-5, msg=name)
    return history, losses, norms


def test_two_steps_of_epochs_mini_batches_and_micro_batches_match_a_plain_loop(model_dir, tmp_path):
    """mu = 2 epochs of 2 mini-batches of 8 completions, accumulated over micro-batches of 3 (3 + 3 + 2),
    KL to the initial model, a linear schedule, weight decay and clipping: the weights after two steps, the
    logged loss and grad_norm are those of a plain loop that steps once per mini-batch on all its rows."""
    config = make_config(
        tmp_path, max_steps=2, mu=2, mini_batches=2, micro_batch_size=3, beta=0.1, lr_schedule="linear",
        learning_rate=3e-3, weight_decay=0.1, max_grad_norm=0.5, max_new_tokens=6,
    )  # fmt: skip
    history, losses, norms = trained_and_plain_loop(model_dir, config)
    assert max(norms) > 1e-3  # real updates, not zeros compared
    assert [m["loss"] for m in history] == pytest.approx(losses, rel=1e-4, abs=1e-7)
    assert [m["grad_norm"] for m in history] == pytest.approx(norms, rel=1e-4)


def with_dropout(trainer: GRPOTrainer, p: float = 0.3) -> GRPOTrainer:
    for module in trainer.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return trainer


def test_a_run_resumed_from_its_first_checkpoint_equals_the_uninterrupted_run(model_dir, tmp_path):
    """Cut back to step-1 (steps 2 and 3 logged, their checkpoints lost) and resumed, a run with dropout
    ends with the weights, metrics and rollouts of the run that was not cut: the data order goes on in the
    middle of its epoch (4 of 8 prompts taken), dropout draws where it left off, and the lines of steps 2
    and 3 are logged once."""
    config = make_config(tmp_path, max_steps=3, save_every=1, keep_checkpoints=3)
    whole = with_dropout(make_trainer(model_dir, config, Rubric({"v": varied})))
    whole.train()
    weights = {n: p.detach().clone() for n, p in whole.model.named_parameters()}
    timing = ("step_time", "generate_time", "tokens_per_s")
    metrics = [{k: v for k, v in m.items() if k not in timing} for m in whole.run.read_metrics()]
    rollouts = whole.run.read_rollouts()
    for step in (2, 3):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step-{step}")
    resumed = with_dropout(make_trainer(model_dir, replace(config, resume=True), Rubric({"v": varied})))
    assert resumed.step == 1
    resumed.train()
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, weights[name]), name
    assert [{k: v for k, v in m.items() if k not in timing} for m in resumed.run.read_metrics()] == metrics
    assert resumed.run.read_rollouts() == rollouts


def test_checkpoints_and_log_lines_carry_the_step_they_follow(model_dir, tmp_path):
    """save_every 2 over 3 steps saves step-2 and the final step-3; each step's metrics line and its
    (rollouts_to_log = 5) rollout lines carry its number."""
    config = make_config(tmp_path, max_steps=3, save_every=2, keep_checkpoints=5, rollouts_to_log=5)
    trainer = make_trainer(model_dir, config)
    trainer.train()
    assert [path.name for path in trainer.run.list_checkpoints()] == ["step-2", "step-3"]
    assert [m["step"] for m in trainer.run.read_metrics()] == [1, 2, 3]
    assert [r["step"] for r in trainer.run.read_rollouts()] == [s for s in (1, 2, 3) for _ in range(5)]


def test_reward_and_batch_metrics_are_those_of_the_logged_rollouts(model_dir, tmp_path):
    """reward, zero_spread_frac, advantage_abs_mean and completion_length recomputed by hand from the
    step's rollouts: even-numbered prompts always score 1 (no spread), so half the groups have none; the
    rollout's reward is the weighted sum of its components. 8 groups of 2: the groups are rows 2g, 2g + 1."""

    def even_is_one(completion, example):
        return 1.0 if int(example["id"][2:]) % 2 == 0 else varied(completion, example)

    rubric = Rubric({"e": even_is_one, "a": a_fraction}, weights={"e": 2.0, "a": 0.5})
    config = make_config(tmp_path, max_steps=1, prompts_per_step=8, group_size=2)
    trainer = make_trainer(model_dir, config, rubric)
    batches, update = [], trainer.update
    trainer.update = lambda batch: batches.append(batch) or update(batch)
    (metrics,) = trainer.train()
    rows = trainer.run.read_rollouts()
    assert len(rows) == 16
    for row in rows:
        assert row["reward"] == pytest.approx(2.0 * row["rewards"]["e"] + 0.5 * row["rewards"]["a"])
    groups = [[r["reward"] for r in rows if r["group"] == g] for g in range(8)]
    assert metrics["zero_spread_frac"] == 0.5 == sum(max(g) == min(g) for g in groups) / 8
    assert metrics["reward"] == pytest.approx(sum(r["reward"] for r in rows) / 16)
    assert metrics["advantage_abs_mean"] == pytest.approx(sum(abs(r["advantage"]) for r in rows) / 16)
    assert metrics["completion_length"] == float(batches[0].rollouts.completion_mask.sum()) / 16


def recorded_grad_norms(trainer) -> list[float]:
    """The L2 norm of the gradients each optimizer step applies, appended as the trainer steps."""
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def test_the_update_applies_gradients_clipped_to_max_grad_norm(model_dir, tmp_path):
    """Each optimizer step sees gradients of L2 norm max_grad_norm (their norm before clipping, logged as
    grad_norm, is far above it)."""
    config = make_config(tmp_path, max_steps=1, mini_batches=2, max_grad_norm=1e-3)
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    seen = recorded_grad_norms(trainer)
    (metrics,) = trainer.train()
    assert metrics["grad_norm"] > 1e-2  # both updates are clipped
    assert seen == pytest.approx([1e-3, 1e-3], rel=1e-4)


def test_rollouts_to_log_0_logs_no_rollout_and_n_logs_the_first_n(model_dir, tmp_path):
    """-1 is "all"; 0 writes no line (it had been taken as "all"); 3 writes the batch's first three rows,
    those of group 0, in order."""
    trainer = make_trainer(model_dir, make_config(tmp_path / "none", max_steps=1, rollouts_to_log=0))
    trainer.train()
    assert trainer.run.read_rollouts() == []
    trainer = make_trainer(model_dir, make_config(tmp_path / "three", max_steps=1, rollouts_to_log=3))
    batches, update = [], trainer.update
    trainer.update = lambda batch: batches.append(batch) or update(batch)
    trainer.train()
    rows = trainer.run.read_rollouts()
    assert [r["completion"] for r in rows] == batches[0].rollouts.completions[:3]
    assert [r["group"] for r in rows] == [0, 0, 0]


def test_logged_rollout_fields_and_reward_metrics_are_the_batchs_values(model_dir, tmp_path):
    """Each rollouts.jsonl row carries its own advantage (sign included) and finish reason; reward_std is the
    sample std of the rollouts' rewards, reward/<name> the unweighted mean of that component, tokens_per_s
    the step's completion tokens over its time, sampling_rounds the batch's."""
    rubric = Rubric({"v": varied, "a": a_fraction}, weights={"v": 2.0, "a": 0.5})
    config = make_config(tmp_path, max_steps=1, max_new_tokens=8)
    trainer = make_trainer(model_dir, config, rubric)
    batches, update = [], trainer.update
    trainer.update = lambda batch: batches.append(batch) or update(batch)
    (metrics,) = trainer.train()
    (batch,) = batches
    rows = trainer.run.read_rollouts()
    assert [r["advantage"] for r in rows] == pytest.approx(batch.advantages.tolist())
    assert any(r["advantage"] < 0 for r in rows) and any(r["advantage"] > 0 for r in rows)
    assert [r["finish_reason"] for r in rows] == batch.rollouts.finish_reason
    assert [r["example_id"] for r in rows] == [e["id"] for e in batch.examples for _ in range(4)]
    assert [r["prompt"] for r in rows] == [e["prompt"] for e in batch.examples for _ in range(4)]
    assert len(set(batch.rollouts.finish_reason)) == 2  # some stopped, some ran to max_new_tokens
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    assert metrics["reward_std"] == pytest.approx(float(rewards.std(correction=1)), rel=1e-5)
    assert metrics["reward/v"] == pytest.approx(sum(r["rewards"]["v"] for r in rows) / 16, rel=1e-6)
    assert metrics["reward/a"] == pytest.approx(sum(r["rewards"]["a"] for r in rows) / 16, abs=1e-7)
    tokens = float(batch.rollouts.completion_mask.sum())
    assert metrics["tokens_per_s"] * metrics["step_time"] == pytest.approx(tokens, rel=1e-6)
    assert metrics["sampling_rounds"] == 1.0


def test_dynamic_sampling_stops_at_a_full_batch_or_at_max_sampling_rounds(model_dir, tmp_path):
    """Every group spreads: one round, 4 prompts drawn. No group spreads: exactly max_sampling_rounds
    rounds, each drawing 4 more prompts, logged as sampling_rounds; the batch is made of the first groups."""
    config = make_config(tmp_path / "full", max_steps=1, dynamic_sampling=True, max_sampling_rounds=3)
    trainer = make_trainer(model_dir, config, Rubric({"v": lambda c, e: len(c) + varied(c, e)}))
    (metrics,) = trainer.train()
    assert metrics["sampling_rounds"] == 1.0 and trainer.sampler.state_dict()["index"] == 4

    trainer = make_trainer(
        model_dir, replace(config, run_dir=str(tmp_path / "flat")), Rubric({"one": lambda c, e: 1.0})
    )
    seeds = []
    generate = trainer.backend.generate
    trainer.backend.generate = lambda prompts, settings, seed: (
        seeds.append(seed) or generate(prompts, settings, seed)
    )
    batches, update = [], trainer.update
    trainer.update = lambda batch: batches.append(batch) or update(batch)
    (metrics,) = trainer.train()
    assert metrics["sampling_rounds"] == 3.0 and batches[0].sampling_rounds == 3
    assert trainer.sampler.state_dict() | {"examples": None} == {"epoch": 1, "index": 4, "examples": None}
    # each round's groups are sampled with seeds of (run seed, step, round, index in the round's draw)
    assert seeds == [derive_seed(0, 0, r, g) for r in range(3) for g in range(4)]
    assert [e["id"] for e in batches[0].examples] == [e["id"] for e in first_epoch_order(trainer)[:4]]


def first_epoch_order(trainer):
    """The first epoch's prompts in the order the trainer's sampler draws them."""
    from core.data import PromptSampler

    return PromptSampler(EXAMPLES, trainer.config.seed).take(len(EXAMPLES))


@pytest.mark.parametrize("generation_groups", [1, 2])
def test_each_group_of_a_batch_has_its_own_seed_whatever_the_split(model_dir, tmp_path, generation_groups):
    """Two groups of the same prompt sample different completions (their seeds differ, one call of k groups
    or one call each), and a group's completions do not depend on where the batch is cut (first_index)."""
    config = make_config(tmp_path, generation_groups=generation_groups, max_new_tokens=6)
    trainer = make_trainer(model_dir, config)
    twins = [{"id": "x", "prompt": "go 1"}, {"id": "y", "prompt": "go 1"}]
    rollouts = trainer.generate(twins, 0)
    assert rollouts.completions[:4] != rollouts.completions[4:]
    whole = trainer.generate(EXAMPLES[:4], 0)
    second_half = trainer.generate(EXAMPLES[2:4], 2)
    assert whole.completions[8:] == second_half.completions
    assert torch.equal(
        whole.completion_ids[8:, : second_half.completion_ids.shape[1]], second_half.completion_ids
    )


def test_token_mean_over_mini_batches_matches_a_plain_loop(model_dir, tmp_path):
    """token-mean divides each mini-batch's token sum by that mini-batch's token count (not the step's):
    2 mini-batches accumulated over micro-batches of 3, as a plain loop stepping once per mini-batch."""
    config = make_config(
        tmp_path, max_steps=1, mini_batches=2, micro_batch_size=3, loss_aggregation="token-mean",
        learning_rate=3e-3, max_grad_norm=100.0, max_new_tokens=6, lr_schedule="linear",
    )  # fmt: skip
    history, losses, norms = trained_and_plain_loop(model_dir, config)
    assert max(norms) > 1e-3
    assert [m["loss"] for m in history] == pytest.approx(losses, rel=1e-4, abs=1e-7)
    assert [m["grad_norm"] for m in history] == pytest.approx(norms, rel=1e-4)


def test_max_grad_norm_0_does_not_clip(model_dir, tmp_path):
    config = make_config(tmp_path, max_steps=1, max_grad_norm=0.0)
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    seen = recorded_grad_norms(trainer)
    (metrics,) = trainer.train()
    assert metrics["grad_norm"] > 1e-3
    assert seen == pytest.approx([metrics["grad_norm"]], rel=1e-4)


def test_a_constant_schedule_warms_up_first(model_dir, tmp_path):
    config = make_config(tmp_path, max_steps=4, warmup_steps=2, lr_schedule="constant", learning_rate=1e-2)
    trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
    assert_logs_applied_rates(trainer, [0.0, 0.005, 0.01, 0.01])


@pytest.mark.parametrize(("keep", "expected"), [(1, ["step-4"]), (2, ["step-3", "step-4"])])
def test_keep_checkpoints_keeps_the_newest(model_dir, tmp_path, keep, expected):
    config = make_config(tmp_path, max_steps=4, save_every=1, keep_checkpoints=keep)
    trainer = make_trainer(model_dir, config)
    trainer.train()
    assert [path.name for path in trainer.run.list_checkpoints()] == expected


class RecordingHooks(TrainerHooks):
    """Adds a model-free "bonus" term, records transform_rollouts' rounds (adding a "hint" term there) and
    adjust_advantages' mean entropies."""

    def __init__(self):
        self.rounds, self.entropies = [], []

    def extra_rewards(self, trainer, rollouts, examples):
        return {"bonus": torch.tensor([len(c) / 10 for c in rollouts.completions])}

    def transform_rollouts(self, trainer, rollouts, examples, table, round_):
        self.rounds.append(round_)
        return rollouts, table.with_components({"hint": torch.full((len(rollouts.completions),), 0.25)})

    def adjust_advantages(self, advantages, mean_entropy):
        self.entropies.append(mean_entropy.clone())
        return advantages


def test_hooks_reward_terms_and_transforms_reach_the_table_and_the_log(model_dir, tmp_path):
    hooks = RecordingHooks()
    trainer = make_trainer(model_dir, make_config(tmp_path, max_steps=1), hooks=hooks)
    (metrics,) = trainer.train()
    assert hooks.rounds == [0]
    rows = trainer.run.read_rollouts()
    for row in rows:
        assert row["rewards"]["bonus"] == pytest.approx(len(row["completion"]) / 10)
        assert row["rewards"]["hint"] == 0.25
        assert row["reward"] == pytest.approx(row["rewards"]["a"] + row["rewards"]["bonus"] + 0.25)
    assert metrics["reward/bonus"] == pytest.approx(sum(r["rewards"]["bonus"] for r in rows) / 16)
    # under dynamic sampling each round's rollouts are transformed, told their round
    hooks = RecordingHooks()
    config = make_config(tmp_path / "ds", max_steps=1, dynamic_sampling=True, max_sampling_rounds=2)
    trainer = make_trainer(model_dir, config, Rubric({"one": lambda c, e: 1.0}), hooks=hooks)
    trainer.collect()
    assert hooks.rounds == [0, 1]


def test_multi_turn_entropy_for_hooks_and_completion_length(model_dir, tmp_path):
    """adjust_advantages gets each completion's mean entropy over its model tokens (observations out);
    completion_length counts every completion token, observations in."""
    hooks = RecordingHooks()
    trainer = make_trainer(
        model_dir,
        make_config(tmp_path, max_steps=1, max_turns=2, max_new_tokens=8, micro_batch_size=3),
        environment=EchoEnvironment(),
        hooks=hooks,
    )
    before = copy.deepcopy(trainer.model)
    batches, update = [], trainer.update
    trainer.update = lambda batch: batches.append(batch) or update(batch)
    (metrics,) = trainer.train()
    rollouts = batches[0].rollouts
    with torch.no_grad():
        _, entropy = completion_logprobs(
            before, rollouts.input_ids(), rollouts.attention_mask(), rollouts.completion_ids.shape[1]
        )
    expected = algos.masked_mean(entropy, rollouts.loss_mask, dim=-1)
    torch.testing.assert_close(torch.cat(hooks.entropies), expected, atol=1e-5, rtol=1e-5)
    tokens = float(rollouts.completion_mask.sum())
    assert tokens > float(rollouts.loss_mask.sum())
    assert len(set(rollouts.loss_mask.sum(-1).tolist())) > 1  # model turns of several lengths
    assert metrics["completion_length"] == pytest.approx(tokens / 16)
    # the logged entropy is the mean over every model token of the step (observations out)
    assert metrics["entropy"] == pytest.approx(
        float(algos.masked_mean(entropy, rollouts.loss_mask)), rel=1e-5
    )


def test_autocast_bfloat16_runs_the_update_and_reference_passes_under_autocast(model_dir, tmp_path):
    """--autocast bfloat16: the update's forwards, its old-logprob pass (2 mini-batches) and the reference's
    pass run under torch.autocast; off: none does."""
    for mode in ("bfloat16", "off"):
        config = make_config(tmp_path / mode, max_steps=1, mini_batches=2, beta=0.1, autocast=mode)
        trainer = make_trainer(model_dir, config, Rubric({"v": varied}))
        seen = []

        def record(*_, seen=seen):
            seen.append(torch.is_autocast_enabled("cpu"))

        models = [trainer.model] + ([] if trainer.reference.shares_policy else [trainer.reference.model])
        # a decoder layer: the logprob pass calls the inner model, not the causal LM's forward
        layers = [
            next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")) for model in models
        ]
        hooks = [layer.register_forward_hook(record) for layer in layers]
        batch = trainer.collect()
        seen.clear()  # generation's own autocast is tested in test_rollout.py
        trainer.update(batch)
        for hook in hooks:
            hook.remove()
        assert len(seen) >= 3 and set(seen) == {mode == "bfloat16"}, mode


def test_multi_turn_update_metrics_weigh_micro_batches_by_their_model_tokens(model_dir, tmp_path):
    """kl and entropy of a multi-turn step are means over its model tokens: the same for micro-batches of 3
    as for one of 16 (weighing a micro-batch by all its completion tokens, observations in, shifts them)."""
    runs = []
    for size in (16, 3):
        config = make_config(
            tmp_path / str(size), max_steps=1, max_turns=2, max_new_tokens=8, micro_batch_size=size,
            mu=2, beta=0.1, learning_rate=0.05,
        )  # fmt: skip
        trainer = make_trainer(model_dir, config, Rubric({"v": varied}), environment=EchoEnvironment())
        runs.append(trainer.train()[0])
    whole, small = runs
    assert whole["kl"] > 1e-4
    for name in ("kl", "entropy", "ratio/mean"):
        assert small[name] == pytest.approx(whole[name], rel=1e-5), name


def test_one_epoch_with_dropout_stays_on_policy(model_dir, tmp_path, monkeypatch):
    """mu = 1 and one mini-batch: no old-logprob pass even with dropout; the ratio is exactly 1 (an eval-mode
    pass would set the train-mode forwards' ratios off 1 and clip some of them)."""
    trainer = with_dropout(make_trainer(model_dir, make_config(tmp_path, max_steps=1), Rubric({"v": varied})))
    olds, policy_loss = [], algos.policy_loss

    def spy_loss(logp, old_logp, *args, **kwargs):
        olds.append(old_logp)
        return policy_loss(logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(algos, "policy_loss", spy_loss)
    (metrics,) = trainer.train()
    assert olds == [None, None]  # two micro-batches of 8
    assert metrics["ratio/min"] == metrics["ratio/max"] == 1.0 and metrics["clip/frac"] == 0.0


def test_dynamic_sampling_with_fewer_completions_per_group_than_prompts(model_dir, tmp_path):
    """4 prompts of 2 completions: the has-signal flags are one per group of 2 rows (not rows cut in 2)."""

    def half_informative(completion, example):
        return 1.0 if int(example["id"][2:]) % 2 == 0 else varied(completion, example) + len(completion) / 10

    config = make_config(tmp_path, max_steps=1, group_size=2, dynamic_sampling=True, max_sampling_rounds=6)
    trainer = make_trainer(model_dir, config, Rubric({"r": half_informative}))
    batch = trainer.collect()
    assert len(batch.examples) == 4 and len(batch.rollouts.completions) == 8
    assert all(int(example["id"][2:]) % 2 == 1 for example in batch.examples)
    assert (batch.advantages.view(-1, 2) != 0).any(1).all()
