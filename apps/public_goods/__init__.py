"""Spatial public goods games on mesa: Fermi baselines, Q-learning, PPO, GRPO and GRPO-GCC."""
