"""Math reasoning: GRPO, GTPO, Scaf-GRPO and CoDistill-GRPO on math word problems and benchmark files."""
