"""TCM QA with GRPO (Ladder-base recipe): data, prompts, rewards, training and evaluation."""
