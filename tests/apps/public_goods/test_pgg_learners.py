"""The learners: observations, neighbourhood-group advantages against a plain loop, and 5 steps of every
method (seeds repeat; the learners' parameters change)."""

import copy

import numpy as np
import pytest
import torch

from apps.public_goods.experiments import make_model
from apps.public_goods.learners import (
    neighbourhood_advantages,
    neighbourhood_index,
    observations,
    reward_table,
)
from apps.public_goods.model import GameConfig, gcc_bonus, payoffs
from core.algos import policy_loss


def test_observations():
    s = np.zeros((3, 3), dtype=np.int8)
    s[0, 0] = 1
    obs = observations(s)  # (9, 3)
    assert obs.shape == (9, 3)
    assert obs[0].tolist() == pytest.approx([1.0, 0.0, 1 / 9])
    assert obs[1].tolist() == pytest.approx([0.0, 0.25, 1 / 9])  # (0, 1) has (0, 0) as a neighbour
    assert obs[4].tolist() == pytest.approx([0.0, 0.0, 1 / 9])  # (1, 1) does not


def test_neighbourhood_advantages_match_a_plain_loop():
    n = 4
    rewards = torch.from_numpy(np.random.default_rng(0).normal(size=n * n)).float()
    index = torch.from_numpy(neighbourhood_index(n))
    assert sorted(index[0].tolist()) == [0, 1, 3, 4, 12]  # (0,0): itself, (3,0), (1,0), (0,3), (0,1)
    adv = neighbourhood_advantages(rewards, index)
    for site in range(n * n):
        group = rewards[index[site]]
        expected = (rewards[site] - group.mean()) / (group.std() + 1e-6)
        assert adv[site].item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("method", ["fermi", "fermi-sync", "qlearning", "ppo", "grpo", "grpo-gcc"])
def test_five_steps_of_each_method(method):
    config = GameConfig(size=8, r=4.5, method=method, init="half")
    model = make_model(config, seed=1)
    model.run(5)
    again = make_model(config, seed=1)
    again.run(5)
    np.testing.assert_array_equal(model.strategy, again.strategy)
    frame = model.datacollector.get_model_vars_dataframe()
    assert len(frame) == 6 and frame["cooperation"].between(0, 1).all()
    if method == "qlearning":
        assert np.abs(model.dynamics.q).sum() > 0  # the values: test_q_learning_first_step_by_hand
    elif method.startswith("grpo") or method == "ppo":
        fresh = make_model(config, seed=1)
        fresh.step()  # builds the same initial weights, then one round of updates
        assert model.dynamics.updates == 5 * config.epochs
        moved = [
            not torch.equal(a, b)
            for a, b in zip(
                model.dynamics.policy.parameters(), fresh.dynamics.policy.parameters(), strict=True
            )
        ]
        assert any(moved)
    if method == "grpo-gcc":
        assert model.last_metrics["gcc_bonus"] > 0


def test_q_learning_two_steps_by_a_plain_loop():
    """Every site explores (epsilon 1), so actions are random and rewards nonzero; two steps replayed with
    the model's draws, site by site: Q[s, a] += alpha (r + gamma max_a' Q[a, a'] - Q[s, a]), the next
    state being the action taken."""
    config = GameConfig(size=6, r=4.4, method="qlearning", init="half", q_epsilon=1.0)
    model = make_model(config, seed=3)
    q = np.zeros((36, 2, 2))
    for _ in range(2):
        state = model.strategy.ravel().astype(np.int64).copy()
        rng = np.random.default_rng()
        rng.bit_generator.state = model.rng.bit_generator.state  # replay the model's draws
        rng.random(36)  # the exploration draw: all explore
        actions = rng.integers(2, size=36)
        model.step()
        np.testing.assert_array_equal(model.strategy.ravel(), actions)
        reward = payoffs(actions.reshape(6, 6).astype(np.int8), config.r, config.cost_per_group).ravel()
        reward = reward / (5 * config.cost_per_group)
        for i in range(36):
            s, a = state[i], actions[i]
            q[i, s, a] += config.q_alpha * (reward[i] + config.gamma * q[i, a].max() - q[i, s, a])
        np.testing.assert_allclose(model.dynamics.q, q, rtol=1e-12)
    assert np.count_nonzero(q) > 20 and len(set(q.ravel().round(9))) > 5


def test_gcc_bonus_goes_to_cooperators_and_payoffs_are_scaled():
    strategy = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.int8)
    config = GameConfig(size=3, r=4.0, method="grpo-gcc")
    table = reward_table(strategy, config, 0.5)
    assert table.names == ["payoff", "gcc_bonus"]
    assert table.components[:, 1].tolist() == [0.5, 0, 0, 0, 0.5, 0, 0.5, 0.5, 0]
    scaled = payoffs(strategy, 4.0, config.cost_per_group).ravel() / (5 * config.cost_per_group)
    np.testing.assert_allclose(table.components[:, 0].numpy(), scaled, rtol=1e-6)


@pytest.mark.parametrize("shape", ["parabola", "tent"])
@pytest.mark.parametrize("groups", ["neighbourhood", "all"])
@pytest.mark.parametrize("method", ["grpo", "grpo-gcc"])
def test_grpo_update_matches_a_hand_replay(method, groups, shape):
    """One GRPO round replayed by hand: rewards from `payoffs` (+ the GCC bonus for cooperators),
    advantages (r - mean) / (std + 1e-6) by a plain loop over each site's group, `policy_loss` and one
    Adam step from the same initial MLP give the learner's loss and weights; the step raises the
    log-probability of positive-advantage actions against negative ones."""
    config = GameConfig(
        size=6, r=4.5, method=method, init="half", epochs=1, advantage_groups=groups, gcc_shape=shape
    )
    model = make_model(config, seed=3)  # the new lattice's g (15/36) is not the old one's (1/2)
    learner = model.dynamics
    learner._setup(model)  # the initial MLP, as step() would build it
    policy = copy.deepcopy(learner.policy)
    obs = observations(model.strategy)  # (36, 3)
    model.step()
    new = model.strategy.copy()
    actions = torch.from_numpy(new.ravel().astype(np.int64))[:, None]  # action="strategy": the new lattice
    c = config.cost_per_group
    assert new.mean() != 0.5
    bonus = gcc_bonus(float(new.mean()), config.gcc_lambda, shape) if method == "grpo-gcc" else 0.0
    assert (bonus > 0) == (method == "grpo-gcc") and model.last_metrics["gcc_bonus"] == bonus
    rewards = payoffs(new, config.r, c).ravel() / (5 * c) + bonus * new.ravel()  # (36,) float64
    index = neighbourhood_index(6) if groups == "neighbourhood" else np.tile(np.arange(36), (36, 1))
    adv = torch.tensor(
        [(rewards[i] - rewards[index[i]].mean()) / (rewards[index[i]].std(ddof=1) + 1e-6) for i in range(36)]
    ).float()
    assert adv.max() > 0.5 and adv.min() < -0.5

    before = policy(obs).log_softmax(-1).gather(1, actions)  # (36, 1)
    loss, _ = policy_loss(
        before, before.detach(), adv, torch.ones_like(before), eps_low=config.clip_eps,
        ref_logp=before.detach(), beta=config.beta,
    )  # fmt: skip
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    loss.backward()
    optimizer.step()
    assert model.last_metrics["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for expected, got in zip(policy.parameters(), learner.policy.parameters(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # Adam moves each weight by ~lr (3e-3)
    with torch.no_grad():
        after = learner.policy(obs).log_softmax(-1).gather(1, actions)  # (36, 1)
    assert float((adv * (after - before.detach()).squeeze(1)).sum()) > 0


def test_q_learning_exploits_its_table_greedily():
    """epsilon 0: every site takes the action of its larger Q value in its state, and keeps its strategy on
    a tie (ties went to D: a zero table made every site defect in round 1 whatever the start)."""
    config = GameConfig(size=6, r=4.4, method="qlearning", init="half", q_epsilon=0.0)
    model = make_model(config, seed=3)
    q = np.random.default_rng(0).normal(size=(36, 2, 2))
    state = model.strategy.ravel().astype(np.int64).copy()
    tied = [i for i in range(36) if state[i] == 1][:2] + [i for i in range(36) if state[i] == 0][:2]
    q[tied] = 0.0
    model.dynamics.q = q.copy()
    model.step()
    expected = q[np.arange(36), state].argmax(axis=1)
    expected[tied] = state[tied]  # C, C, D, D
    np.testing.assert_array_equal(model.strategy.ravel(), expected)
    assert state[tied].tolist() == [1, 1, 0, 0] and 5 < expected.sum() < 31  # both actions taken
    fresh = make_model(config, seed=3)  # a zero table: round 1 is the initial lattice
    start = fresh.strategy.copy()
    fresh.step()
    np.testing.assert_array_equal(fresh.strategy, start)


def test_q_learning_starts_from_its_q_init_and_updates_the_action_taken():
    """--q-init 30: every value starts at 30; round 1 ties, so each site keeps its strategy, and only that
    (state, action) entry moves: 30 + alpha (reward + gamma 30 - 30)."""
    config = GameConfig(size=6, r=4.4, method="qlearning", init="half", q_epsilon=0.0, q_init=30.0)
    model = make_model(config, seed=3)
    assert (model.dynamics.q == 30.0).all()
    start = model.strategy.ravel().astype(np.int64).copy()
    model.step()
    np.testing.assert_array_equal(model.strategy.ravel(), start)
    reward = payoffs(model.strategy, 4.4, config.cost_per_group).ravel() / (5 * config.cost_per_group)
    expected = np.full((36, 2, 2), 30.0)
    expected[np.arange(36), start, start] = 30.0 + 0.1 * (reward + 0.9 * 30.0 - 30.0)
    np.testing.assert_allclose(model.dynamics.q, expected)
    with pytest.raises(ValueError, match="q_init must be finite"):
        GameConfig(method="qlearning", q_init=float("inf"))


def _ppo_round(config: GameConfig):
    """One PPO round of the learner and its inputs by hand, from copies of its initial MLPs: (model, learner,
    policy, critic, obs, actions, TD(0) targets r + gamma V(s'), raw advantages target - V(s))."""
    model = make_model(config, seed=3)
    learner = model.dynamics
    learner._setup(model)
    policy, critic = copy.deepcopy(learner.policy), copy.deepcopy(learner.critic)
    obs = observations(model.strategy)  # (36, 3)
    model.step()
    new = model.strategy.copy()
    actions = torch.from_numpy(new.ravel().astype(np.int64))[:, None]
    c = config.cost_per_group
    rewards = torch.from_numpy(payoffs(new, config.r, c).ravel() / (5 * c)).float()  # (36,)
    with torch.no_grad():
        target = rewards + config.gamma * critic(observations(new)).squeeze(1)
        raw = target - critic(obs).squeeze(1)
    return model, learner, policy, critic, obs, actions, target, raw


def test_ppo_update_matches_a_hand_replay():
    """One PPO round by hand: TD(0) targets r + gamma V(s') from the critic, advantages target - V(s)
    normalised over the lattice, the clipped surrogate without KL plus 0.5 x the critic's MSE, one Adam
    step over policy and critic from the same initial MLPs: the learner's loss and both networks' weights."""
    config = GameConfig(size=6, r=4.5, method="ppo", init="half", epochs=1)
    model, learner, policy, critic, obs, actions, target, raw = _ppo_round(config)
    adv = (raw - raw.mean()) / (raw.std() + 1e-6)
    before = policy(obs).log_softmax(-1).gather(1, actions)  # (36, 1)
    surrogate, _ = policy_loss(before, before.detach(), adv, torch.ones_like(before), eps_low=config.clip_eps)
    loss = surrogate + 0.5 * (critic(obs).squeeze(1) - target).pow(2).mean()
    optimizer = torch.optim.Adam([*policy.parameters(), *critic.parameters()], lr=config.lr)
    loss.backward()
    optimizer.step()
    assert model.last_metrics["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for mine, theirs in ((policy, learner.policy), (critic, learner.critic)):
        for expected, got in zip(mine.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(
                got, expected, atol=1e-5, rtol=0
            )  # Adam moves each weight by ~lr (3e-3)
    fresh = copy.deepcopy(learner.critic)
    learner._setup(make_model(config, seed=3))
    assert any(
        not torch.equal(a, b) for a, b in zip(fresh.parameters(), learner.critic.parameters(), strict=True)
    )


def test_ppo_second_epoch_loss_uses_normalised_advantages():
    """At the first epoch the surrogate of centred advantages is 0 whatever their scale, and Adam's first
    step is scale-free: the second epoch's loss (ratio != 1) is where the normalisation to unit std shows."""
    config = GameConfig(size=6, r=4.5, method="ppo", init="half", epochs=2)
    model, _, policy, critic, obs, actions, target, raw = _ppo_round(config)
    adv = (raw - raw.mean()) / (raw.std() + 1e-6)
    with torch.no_grad():
        old = policy(obs).log_softmax(-1).gather(1, actions)  # (36, 1)
    assert abs(raw.std().item() - 1) > 0.1  # else normalising would not change the loss
    optimizer = torch.optim.Adam([*policy.parameters(), *critic.parameters()], lr=config.lr)
    for _ in range(2):
        logp = policy(obs).log_softmax(-1).gather(1, actions)
        surrogate, _ = policy_loss(logp, old, adv, torch.ones_like(logp), eps_low=config.clip_eps)
        loss = surrogate + 0.5 * (critic(obs).squeeze(1) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.last_metrics["loss"] == pytest.approx(loss.item(), abs=1e-6)


def test_the_reference_policy_is_refreshed_every_k_updates():
    config = GameConfig(size=6, r=4.5, method="grpo", init="half", epochs=1, ref_refresh=2, beta=0.1)
    model = make_model(config, seed=1)
    model.step()
    learner = model.dynamics
    policy, reference = learner.policy.state_dict(), learner.reference.state_dict()
    assert any(not torch.equal(policy[k], reference[k]) for k in policy)  # 1 update: still the first
    model.step()
    policy, reference = learner.policy.state_dict(), learner.reference.state_dict()
    assert all(torch.equal(policy[k], reference[k]) for k in policy)  # 2 updates: refreshed


@pytest.mark.parametrize(("method", "beta"), [("ppo", 0.0), ("grpo", 0.04), ("grpo-gcc", 0.04)])
def test_ppo_takes_no_kl_term_and_grpo_takes_beta(monkeypatch, method, beta):
    """At the first round the reference is the policy, so a KL term cannot show in a replay: the loss is
    checked to be called with PPO's beta 0 and GRPO's config beta."""
    from apps.public_goods import learners

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["beta"])
        return policy_loss(*args, **kwargs)

    monkeypatch.setattr(learners, "policy_loss", recording)
    make_model(GameConfig(size=6, r=4.5, method=method, init="half", beta=0.04), seed=1).run(2)
    assert seen and set(seen) == {beta}


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_building_a_learner_leaves_torchs_global_generator_alone(method):
    """Its weights come from the model's rng: torch.manual_seed reset the global generator for everyone."""
    state = torch.get_rng_state()
    model = make_model(GameConfig(size=6, r=4.5, method=method, init="half"), seed=1)
    model.step()  # the first step builds the MLPs
    assert model.dynamics.policy is not None
    assert torch.equal(torch.get_rng_state(), state)


def test_each_round_starts_from_the_current_policy_and_the_kl_is_to_the_reference(monkeypatch):
    """From round two on the policy has moved away from the reference: old_logp must be the current
    policy's (ratio 1 at each round's first epoch) and ref_logp the reference's (the initial MLP until
    `ref_refresh` updates), both on the round's observations and sampled actions, and the KL is then > 0."""
    from apps.public_goods import learners

    seen = []

    def recording(logp, old_logp, adv, mask, **kwargs):
        seen.append((logp.detach().clone(), old_logp.clone(), kwargs["ref_logp"].clone()))
        return policy_loss(logp, old_logp, adv, mask, **kwargs)

    monkeypatch.setattr(learners, "policy_loss", recording)
    config = GameConfig(size=6, r=4.5, method="grpo", init="half", epochs=1, ref_refresh=100, lr=0.05)
    model = make_model(config, seed=1)
    learner = model.dynamics
    learner._setup(model)
    initial = copy.deepcopy(learner.policy)
    for round_ in range(3):
        obs = observations(model.strategy)  # (36, 3)
        with torch.no_grad():
            current = learner.policy(obs).log_softmax(-1)  # (36, 2) before this round's update
            reference = initial(obs).log_softmax(-1)
        model.step()
        actions = torch.from_numpy(model.strategy.ravel().astype(np.int64))[:, None]  # (36, 1)
        logp, old_logp, ref_logp = seen[-1]
        torch.testing.assert_close(old_logp, current.gather(1, actions))
        torch.testing.assert_close(logp, old_logp)  # epoch 1: ratio 1
        torch.testing.assert_close(ref_logp, reference.gather(1, actions))
        if round_ > 0:
            assert (old_logp - ref_logp).abs().max() > 1e-3  # the policy has moved from the reference
            assert model.last_metrics["kl"] > 0
    assert len(seen) == 3


def test_q_learning_rewards_are_payoffs_over_5c_whatever_the_cost():
    """The reward is payoffs / 5c with c the cost per group, so c cancels: the same values at any cost and
    either convention. One step from a zero table: Q[s, a] = alpha * reward."""
    values = []
    for cost, convention in [(1.0, "per_group"), (2.5, "per_group"), (2.5, "per_site")]:
        settings = {"cost": cost, "cost_convention": convention, "q_epsilon": 1.0}
        config = GameConfig(size=6, r=4.4, method="qlearning", init="half", **settings)
        model = make_model(config, seed=3)
        state = model.strategy.ravel().astype(np.int64).copy()
        model.step()
        actions = model.strategy.ravel().astype(np.int64)
        reward = payoffs(model.strategy, 4.4, 1.0).ravel() / 5  # (36,) at c = 1
        assert model.last_metrics["reward/payoff/mean"] == pytest.approx(reward.mean())
        assert reward.mean() == pytest.approx(3.4 * model.cooperation)  # (r - 1) g, the mean identity
        np.testing.assert_allclose(model.dynamics.q[np.arange(36), state, actions], 0.1 * reward)
        values.append(model.dynamics.q.copy())
    np.testing.assert_allclose(values[1], values[0])
    np.testing.assert_allclose(values[2], values[0])


@pytest.mark.parametrize(("cost", "convention"), [(2.5, "per_group"), (2.5, "per_site"), (0.2, "per_site")])
def test_reward_table_payoffs_do_not_depend_on_the_cost(cost, convention):
    """payoff / 5c: the lone cooperator of a 3x3 lattice at r = 4 gets (5 * 4/5 - 5) / 5 = -0.2, its 4
    neighbours 3 * 4/5 / 5 = 0.48 and the 4 diagonal sites 2 * 4/5 / 5 = 0.32, whatever c."""
    strategy = np.zeros((3, 3), dtype=np.int8)
    strategy[0, 0] = 1
    config = GameConfig(size=3, r=4.0, method="grpo", cost=cost, cost_convention=convention)
    table = reward_table(strategy, config, 0.0)
    expected = [-0.2, 0.48, 0.48, 0.48, 0.32, 0.32, 0.48, 0.32, 0.32]
    np.testing.assert_allclose(table.components[:, 0].numpy(), expected, rtol=1e-6)
