"""Learning baselines and GRPO-GCC on the lattice (PAPERS.md sec. 7): per-site Q-learning, PPO with a shared
actor-critic, GRPO and GRPO-GCC with one shared critic-free policy.

One step = one round: every site sees (own strategy, fraction of C among its 4 neighbours, global
cooperation g) of the previous lattice, all sites pick C or D at once, the new lattice pays out, and the
learner updates. Rewards are payoffs divided by 5c (a site's largest cost), so they are O(r).
- GRPO: advantages from `core.algos.group_advantages` over groups = each site's 5-site neighbourhood
  (the site's own reward against its group's mean and std) or all sites; `core.algos.policy_loss` with
  the clipped surrogate and a k3 KL to a reference policy copied every `ref_refresh` updates.
- GRPO-GCC: GRPO whose cooperators get the global bonus `gcc_bonus(g)` (model.py; our reading of the
  paper), with g the cooperation of the new lattice.
- PPO: the same loss with TD(0) advantages `r + gamma V(s') - V(s)` (batch-normalized) and a critic.
- Q-learning: a Q table per site over (own previous strategy) x (action), epsilon-greedy.
- `action="keep_switch"` (our option, not the paper's): the shared MLP's action keeps (0) or switches (1) the
  site's current strategy. Own strategy is an input, so the policy class is the same as with `strategy`;
  what changes is the fresh policy: its output bias makes it switch with probability about `switch_init`,
  so the first rounds inherit the initial lattice instead of a coin flip per site.
The reward components are kept in a `core.rewards.RewardTable` and logged through its metrics.
"""

import copy
import math

import numpy as np
import torch
from torch import nn

from apps.public_goods.model import GROUP_SIZE, GameConfig, gcc_bonus, neighbour_sum, payoffs
from core.algos import group_advantages, policy_loss
from core.rewards import RewardTable


def observations(strategy: np.ndarray) -> torch.Tensor:
    """(L, L) lattice -> (N, 3) float32: own strategy, fraction of C among the 4 neighbours, global g."""
    s = strategy.astype(np.float32)
    neighbours = neighbour_sum(s) / 4.0
    g = np.full_like(s, s.mean())
    return torch.from_numpy(np.stack([s.ravel(), neighbours.ravel(), g.ravel()], axis=1))  # (N, 3)


def neighbourhood_index(size: int) -> np.ndarray:
    """(N, 5) flat indices of each site and its 4 torus neighbours, the site first."""
    i, j = np.indices((size, size))
    members = [(i, j), ((i - 1) % size, j), ((i + 1) % size, j), (i, (j - 1) % size), (i, (j + 1) % size)]
    return np.stack([(a * size + b).ravel() for a, b in members], axis=1)


def neighbourhood_advantages(rewards: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each site's group-normalized advantage within its own 5-site neighbourhood: (N,) -> (N,).
    The groups overlap, so each site's neighbourhood is laid out as its own group of 5 for
    `group_advantages`, and the site's own entry (column 0) is kept."""
    grouped = rewards[index]  # (N, 5)
    return group_advantages(grouped.reshape(-1), GROUP_SIZE).reshape(-1, GROUP_SIZE)[:, 0]  # (N,)


def apply_action(strategy: np.ndarray, actions: np.ndarray, action: str) -> np.ndarray:
    """The new (L, L) int8 lattice from the sampled (L, L) 0/1 actions: the actions themselves (1 = C) for
    `strategy`, the current strategy flipped where the action is 1 for `keep_switch`.

    >>> s, a = np.array([[1, 0], [0, 1]], np.int8), np.array([[1, 1], [0, 0]], np.int8)
    >>> apply_action(s, a, "strategy").tolist(), apply_action(s, a, "keep_switch").tolist()
    ([[1, 1], [0, 0]], [[0, 1], [0, 1]])
    """
    if action == "strategy":
        return actions.astype(np.int8)
    if action == "keep_switch":
        return (strategy ^ actions).astype(np.int8)
    raise ValueError(f"unknown action {action!r}; valid: strategy, keep_switch")


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, outputs)
    )


def reward_table(strategy: np.ndarray, config: GameConfig, bonus: float) -> RewardTable:
    """Payoff (scaled by 1 / 5c) and the GCC bonus for cooperators as two components, weights 1."""
    c = config.cost_per_group
    payoff = payoffs(strategy, config.r, c).ravel() / (GROUP_SIZE * c)  # (N,)
    gcc = bonus * strategy.ravel().astype(np.float64)  # (N,)
    components = torch.from_numpy(np.stack([payoff, gcc], axis=1)).float()  # (N, 2)
    return RewardTable(
        ["payoff", "gcc_bonus"],
        components,
        torch.ones(2),
        torch.zeros(components.shape, dtype=torch.bool),
        [],
    )


class PolicyLearner:
    """The shared-MLP learners (PPO, GRPO, GRPO-GCC); the torch seed is drawn from the model's rng."""

    def __init__(self, config: GameConfig):
        self.config = config
        self.policy: nn.Module | None = None
        self.updates = 0

    def _setup(self, model) -> None:
        cfg = self.config
        self.generator = torch.Generator().manual_seed(int(model.rng.integers(2**62)))
        # nn.Linear's initialisation reads the global generator: seeded here, and restored afterwards
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(model.rng.integers(2**62)))
            self.policy = mlp(3, cfg.hidden, 2)
            self.critic = mlp(3, cfg.hidden, 1) if cfg.method == "ppo" else None
        if cfg.action == "keep_switch":  # a fresh policy keeps its strategy: logit(switch) - logit(keep)
            with torch.no_grad():
                self.policy[-1].bias.copy_(
                    torch.tensor([0.0, math.log(cfg.switch_init / (1 - cfg.switch_init))])
                )
        params = list(self.policy.parameters()) + (list(self.critic.parameters()) if self.critic else [])
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        self.index = torch.from_numpy(neighbourhood_index(cfg.size))

    def state_dict(self) -> dict:
        """What a resumed run needs ({} before the first round, when nothing is built yet): the networks,
        Adam's moments, the sampling generator and the update count (the reference refresh counts on it)."""
        if self.policy is None:
            return {}
        state = {
            "policy": self.policy.state_dict(),
            "reference": self.reference.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": {"state": self.generator.get_state()},
            "counters": {"updates": self.updates},
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
        return state

    def load_state_dict(self, state: dict, model) -> None:
        """Restore `state_dict()`'s state; `_setup` builds the networks first, drawing from `model.rng`, whose
        own state the caller restores afterwards."""
        if not state:
            return
        self._setup(model)
        self.policy.load_state_dict(state["policy"])
        self.reference.load_state_dict(state["reference"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"]["state"])
        self.updates = state["counters"]["updates"]

    def step(self, model) -> dict[str, float]:
        if self.policy is None:
            self._setup(model)
        cfg = self.config
        obs = observations(model.strategy)  # (N, 3)
        with torch.no_grad():
            old_logits = self.policy(obs)  # (N, 2), column 1 = C (strategy) or switch (keep_switch)
            actions = torch.multinomial(old_logits.softmax(-1), 1, generator=self.generator).squeeze(
                1
            )  # (N,)
            old_logp = old_logits.log_softmax(-1).gather(1, actions[:, None])  # (N, 1)
        sampled = actions.numpy().astype(np.int8).reshape(model.strategy.shape)  # (L, L)
        new = apply_action(model.strategy, sampled, cfg.action)  # (L, L)
        g = float(new.mean())
        bonus = gcc_bonus(g, cfg.gcc_lambda, cfg.gcc_shape) if cfg.method == "grpo-gcc" else 0.0
        table = reward_table(new, cfg, bonus)
        rewards = table.total  # (N,)
        if cfg.method == "ppo":
            with torch.no_grad():
                target = rewards + cfg.gamma * self.critic(observations(new)).squeeze(1)  # (N,)
                adv = target - self.critic(obs).squeeze(1)  # (N,)
                adv = (adv - adv.mean()) / (adv.std() + 1e-6)
        elif cfg.advantage_groups == "neighbourhood":
            adv = neighbourhood_advantages(rewards, self.index)  # (N,)
        else:
            adv = group_advantages(rewards, rewards.numel())  # (N,)
        with torch.no_grad():
            ref_logp = self.reference(obs).log_softmax(-1).gather(1, actions[:, None])  # (N, 1)
        mask = torch.ones_like(old_logp)  # (N, 1): one "token" per site
        beta = cfg.beta if cfg.method != "ppo" else 0.0
        for _ in range(cfg.epochs):
            logp = self.policy(obs).log_softmax(-1).gather(1, actions[:, None])  # (N, 1)
            loss, metrics = policy_loss(
                logp, old_logp, adv, mask, eps_low=cfg.clip_eps, ref_logp=ref_logp, beta=beta
            )
            if self.critic is not None:
                loss = loss + 0.5 * (self.critic(obs).squeeze(1) - target).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.updates += 1
            if self.updates % cfg.ref_refresh == 0:
                self.reference.load_state_dict(self.policy.state_dict())
        switch_frac = float((new != model.strategy).mean())  # sites that changed strategy this round
        model.strategy[...] = new
        return {
            "loss": loss.item(),
            "kl": metrics["kl"].item(),
            "gcc_bonus": bonus,
            "switch_frac": switch_frac,
            **{k: v for k, v in table.metrics().items() if k.endswith("/mean")},
        }


class QLearning:
    """Independent tabular Q-learning per site: state = own previous strategy, actions D (0) / C (1)."""

    def __init__(self, config: GameConfig):
        self.config = config
        self.q = np.full((config.size * config.size, 2, 2), config.q_init)  # (N, state, action)

    def state_dict(self) -> dict:
        return {"q": {"table": torch.from_numpy(self.q.copy())}}

    def load_state_dict(self, state: dict, model) -> None:
        table = state["q"]["table"].numpy()
        if table.shape != self.q.shape:
            raise ValueError(f"a Q table of shape {table.shape}, not {self.q.shape} (L = {self.config.size})")
        self.q = table.astype(np.float64)

    def step(self, model) -> dict[str, float]:
        cfg = self.config
        n = self.q.shape[0]
        rows = np.arange(n)
        state = model.strategy.ravel().astype(np.int64)  # (N,)
        values = self.q[rows, state]  # (N, 2)
        # a tie keeps the site's strategy: a zero table starts from the initial lattice (ties to D made every
        # site defect in round 1, whatever the start)
        greedy = np.where(values[:, 0] == values[:, 1], state, values.argmax(axis=1))  # (N,)
        explore = model.rng.random(n) < cfg.q_epsilon
        actions = np.where(explore, model.rng.integers(2, size=n), greedy)  # (N,)
        new = actions.astype(np.int8).reshape(model.strategy.shape)
        reward = payoffs(new, cfg.r, cfg.cost_per_group).ravel() / (GROUP_SIZE * cfg.cost_per_group)  # (N,)
        target = reward + cfg.gamma * self.q[rows, actions].max(axis=1)  # next state = the action taken
        self.q[rows, state, actions] += cfg.q_alpha * (target - self.q[rows, state, actions])
        model.strategy[...] = new
        return {"explore_frac": float(explore.mean()), "reward/payoff/mean": float(reward.mean())}


def build_learner(config: GameConfig):
    if config.method == "qlearning":
        return QLearning(config)
    if config.method in ("ppo", "grpo", "grpo-gcc"):
        return PolicyLearner(config)
    raise ValueError(f"method {config.method!r} is not a learner; learners: qlearning, ppo, grpo, grpo-gcc")
