"""`core.algos.policy_loss` against TRL's own `GRPOTrainer._compute_loss`, called on the same tensors.

TRL's method reads a handful of trainer attributes; a stand-in object provides them, and the model
forward is replaced by returning our per-token logprobs, so both sides see identical inputs.
"""

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from core import algos

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

# TRL loss_type -> our aggregation (dapo equals token-mean over the batch on one process, no accumulation)
TRL_TO_OURS = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}


class _OneProcess:
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_compute_loss(loss_type, logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high, level):
    n, t = logp.shape
    trainer = SimpleNamespace(
        beta=beta,
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        max_completion_length=t,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=_OneProcess(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, torch.zeros_like(logp), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "num_items_in_batch": mask.sum(),
    }
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    return trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


def _random_inputs(seed, n=6, t=9):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=gen) * 3
    old_logp = logp + 0.3 * torch.randn(n, t, generator=gen)  # ratios well outside [0.8, 1.2] too
    ref_logp = logp + 0.2 * torch.randn(n, t, generator=gen)
    advantages = torch.randn(n, generator=gen)
    mask = torch.ones(n, t)
    for i, length in enumerate(torch.randint(1, t + 1, (n,), generator=gen).tolist()):
        mask[i, length:] = 0  # right padding of varied lengths
    return logp, old_logp, ref_logp, advantages, mask


@pytest.mark.parametrize("loss_type", list(TRL_TO_OURS))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_and_gradient_match_trl(loss_type, beta, eps_low, eps_high, level):
    logp, old_logp, ref_logp, advantages, mask = _random_inputs(
        seed=zlib.crc32(f"{loss_type}{beta}{eps_high}{level}".encode())
    )
    logp_trl = logp.clone().requires_grad_(True)
    logp_ours = logp.clone().requires_grad_(True)

    expected, trl_metrics = trl_compute_loss(
        loss_type,
        logp_trl,
        old_logp,
        advantages,
        mask,
        ref_logp if beta else None,
        beta,
        eps_low,
        eps_high,
        level,
    )
    got, metrics = algos.policy_loss(
        logp_ours,
        old_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        ratio_level=level,
        aggregation=TRL_TO_OURS[loss_type],
        max_length=logp.shape[1],
        ref_logp=ref_logp if beta else None,
        beta=beta,
        kl_estimator="k3",
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    (grad_trl,) = torch.autograd.grad(expected, logp_trl)
    (grad_ours,) = torch.autograd.grad(got, logp_ours)
    torch.testing.assert_close(grad_ours, grad_trl, atol=1e-6, rtol=1e-6)
    # the clip fractions are the same definition as TRL's
    assert metrics["clip/low_frac"].item() == pytest.approx(trl_metrics["clip_ratio/low_mean"][0], abs=1e-6)
    assert metrics["clip/high_frac"].item() == pytest.approx(trl_metrics["clip_ratio/high_mean"][0], abs=1e-6)
    if beta:
        assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][0], abs=1e-6)
