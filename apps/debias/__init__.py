"""De-biasing with a DeBERTa multi-reward model and multi-reward GRPO (PAPERS.md sec. 8)."""
