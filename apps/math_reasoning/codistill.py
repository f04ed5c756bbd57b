"""CoDistill-GRPO (PAPERS.md sec. 1) as trainer hooks: a small policy S (the trainer's model) and a large
policy L trained together, L generating nothing.

- S: GRPO on its own rollouts with reward = verifiable reward + `alpha * mean_t(log pi_L - log pi_S)`, the
  KD term (`core.algos.kd_reward`), added before group normalization (`extra_rewards`, component "kd").
- L: after S's update (`after_update`), one GRPO step on the same rollouts, each token's policy-gradient
  term multiplied by `w_t = min(pi_L / pi_S, cap)` (`core.algos.truncated_importance_weights`; both taken
  without gradient before either model moved). L's advantages use the verifiable reward only [choice: the
  KD term is about S; paper is silent]. L has its own AdamW optimizer and learning rate, the run's weight
  decay, and a constant rate [choice: no warm-up or schedule for L; paper is silent].
Both models' passes here run under the run's `autocast`, as the trainer's own do.
S and L must share a tokenizer: the weights compare them token by token.
Metrics: codistill/kd (mean KD term), codistill/ess (effective sample size of the weights, a fraction),
codistill/capped_frac and codistill/large_time (L's forward for the KD term plus its update, seconds; the
rest of the logged step_time is S's: generation, scoring and update).
Resume: the hooks' state (L's weights, as safetensors, and its optimizer's state) is saved in every
checkpoint of the trainer and restored with it, so a resumed run continues bitwise as an uninterrupted one.
"""

import math
import time

import torch

from core import algos
from core.policy import completion_logprobs, eval_mode
from core.rollout import Rollouts
from core.trainer import TrainerHooks, all_reduce_sum


def no_grad_logprobs(
    model, rollouts: Rollouts, temperature: float, micro_batch: int, chunk: int
) -> torch.Tensor:
    """Per-token logprobs (N, T) of the rollouts' completions under `model`, in micro-batches, no gradient,
    dropout off (the model's leftover train/eval mode would make them depend on what ran before)."""
    parts = []
    t = rollouts.completion_ids.shape[1]
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(rollouts), micro_batch):
            micro = rollouts.select(range(start, min(start + micro_batch, len(rollouts))))
            logp, _ = completion_logprobs(
                model,
                micro.input_ids(),
                micro.attention_mask(),
                t,
                temperature=temperature,
                chunk_size=chunk,
                with_entropy=False,
                vocab_mask=micro.vocab_mask,
            )
            parts.append(logp)
    return torch.cat(parts)  # (N, T)


class CoDistillHooks(TrainerHooks):
    """Holds L and its optimizer; see the module docstring."""

    def __init__(
        self,
        large_model,
        *,
        alpha: float,
        is_cap: float,
        learning_rate: float,
        weight_decay: float = 0.0,
        train_large: bool = True,
    ):
        if is_cap <= 0:
            raise ValueError(f"codistill_is_cap must be > 0, got {is_cap}")
        self.large = large_model
        self.alpha = alpha
        self.is_cap = is_cap
        self.train_large = train_large
        params = [p for p in large_model.parameters() if p.requires_grad]
        self._learning_rate, self._weight_decay = learning_rate, weight_decay
        self.optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
        self._cache: tuple[Rollouts, torch.Tensor, torch.Tensor] | None = None
        self._kd_time = 0.0

    def state_dict(self) -> dict:
        """L's weights and its optimizer's state (the KD cache is empty between steps)."""
        return {"large_model": self.large.state_dict(), "large_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not {"large_model", "large_optimizer"} <= state.keys():
            raise ValueError(
                "codistill: the checkpoint holds no state of the large model (saved by another algorithm?); "
                "it cannot be resumed as codistill"
            )
        self.large.load_state_dict(state["large_model"])
        self.optimizer.load_state_dict(state["large_optimizer"])
        for group in self.optimizer.param_groups:  # the saved groups' rate and decay: this run's instead
            group["lr"], group["weight_decay"] = self._learning_rate, self._weight_decay

    def extra_rewards(self, trainer, rollouts: Rollouts, examples: list[dict]) -> dict:
        cfg = trainer.config
        args = (cfg.temperature, cfg.micro_batch_size, cfg.logprob_chunk_size)
        with cfg.autocast_context():  # the precision the trainer's own passes run at
            small_logp = no_grad_logprobs(trainer.model, rollouts, *args)  # (N, T)
            start = time.perf_counter()
            self.large.eval()
            large_logp = no_grad_logprobs(self.large, rollouts, *args)  # (N, T)
        self._kd_time = time.perf_counter() - start
        kd = algos.kd_reward(large_logp, small_logp, rollouts.loss_mask, self.alpha)  # (N,)
        self._cache = (rollouts, small_logp, large_logp)
        return {"kd": kd}

    def after_update(self, trainer, batch) -> dict:
        if self._cache is None or self._cache[0] is not batch.rollouts:
            raise RuntimeError(
                "codistill: the batch is not the one its KD term was computed on (dynamic sampling?)"
            )
        rollouts, small_logp, large_logp = self._cache
        self._cache = None
        start = time.perf_counter()
        weights, _ = algos.truncated_importance_weights(
            large_logp, small_logp, rollouts.loss_mask, self.is_cap
        )  # (N, T), this share's ESS
        advantages = verifiable_advantages(trainer, batch)  # (N,)
        metrics = self._weight_metrics(batch, weights, rollouts.loss_mask > 0)
        if self.train_large:
            metrics.update(self._update_large(trainer, rollouts, advantages, weights))
        large_time = self._kd_time + time.perf_counter() - start
        metrics["codistill/large_time"] = large_time
        return metrics

    def _weight_metrics(self, batch, weights: torch.Tensor, valid: torch.Tensor) -> dict:
        """KD term and weight statistics of the global batch, from sums over every process's share (the
        ESS fraction (sum w)^2 / (n sum w^2) of `algos.truncated_importance_weights`, over all tokens).
        weights: (N, T), valid: (N, T) bool."""
        kd = batch.table.components[:, batch.table.names.index("kd")]  # (N,)
        sums = torch.stack(
            [kd.sum(), torch.tensor(len(kd)), weights.sum(), (weights**2).sum(), valid.sum(),
             ((weights >= self.is_cap) & valid).sum()]
        ).double()  # fmt: skip
        kd_sum, rows, w_sum, w2_sum, tokens, capped = all_reduce_sum(sums).tolist()
        return {
            "codistill/kd": kd_sum / rows,
            "codistill/ess": w_sum**2 / (tokens * w2_sum) if tokens and w2_sum else 1.0,
            "codistill/capped_frac": capped / max(tokens, 1),
            "codistill/weight_mean": w_sum / max(tokens, 1),
        }

    def _update_large(self, trainer, rollouts: Rollouts, advantages, weights) -> dict:
        cfg = trainer.config
        self.large.train()
        t = rollouts.completion_ids.shape[1]
        # the losses of every process's share add up to the global batch's loss, as for the policy
        counts = torch.stack([rollouts.loss_mask.sum(), torch.tensor(float(len(rollouts)))])
        total_tokens, total_seqs = all_reduce_sum(counts)
        loss_sum = 0.0
        for start in range(0, len(rollouts), cfg.micro_batch_size):
            idx = range(start, min(start + cfg.micro_batch_size, len(rollouts)))
            micro = rollouts.select(idx)
            with cfg.autocast_context():
                logp, _ = completion_logprobs(
                    self.large,
                    micro.input_ids(),
                    micro.attention_mask(),
                    t,
                    temperature=cfg.temperature,
                    chunk_size=cfg.logprob_chunk_size,
                    with_entropy=False,
                    vocab_mask=micro.vocab_mask,
                )  # (n, T)
            loss, _ = algos.policy_loss(
                logp,
                None,
                advantages[idx.start : idx.stop],
                micro.loss_mask,
                eps_low=cfg.eps_low,
                eps_high=cfg.eps_high,
                aggregation=cfg.loss_aggregation,
                max_length=cfg.max_new_tokens,
                total_tokens=total_tokens,
                total_seqs=total_seqs,
                importance_weights=weights[idx.start : idx.stop],
            )
            loss.backward()
            loss_sum += float(loss.detach())
        params = [p for p in self.large.parameters() if p.requires_grad]
        for p in params:  # L is replicated, never sharded: its gradients are summed like DDP's
            if p.grad is not None:
                all_reduce_sum(p.grad)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.large.eval()
        # each process's loss is its share of the global batch's loss: they add up
        loss = float(all_reduce_sum(torch.tensor(loss_sum, dtype=torch.float64)))
        return {"codistill/large_loss": loss, "codistill/large_grad_norm": float(norm)}


def verifiable_advantages(trainer, batch) -> torch.Tensor:
    """Group advantages (N_local,) of the rubric's components only (the KD column dropped), as the trainer's
    config computes them: over the global batch (batch-level scales and normalisations see every
    process's rows), then this process's rows."""
    cfg = trainer.config
    names = batch.table.names
    keep = [k for k, name in enumerate(names) if name != "kd"]
    components = batch.global_components[:, keep]  # (N, K-1)
    weights = trainer.advantage_weights(batch.table)[keep]  # (K-1,)
    aggregate = algos.MULTI_REWARD.get(cfg.multi_reward)
    n_local = len(batch.rollouts)
    advantages = aggregate(
        components,
        weights,
        cfg.group_size,
        scale=cfg.advantage_scale,
        baseline=cfg.advantage_baseline,
        eps=cfg.advantage_eps,
    )
    return advantages[trainer.rank * n_local : (trainer.rank + 1) * n_local]  # (N_local,)
