"""The toy app: the smallest GRPO task, to see the core train end to end offline in a minute."""
