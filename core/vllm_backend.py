"""Rollouts from vLLM's offline engine on a CUDA GPU: the `vllm` extra, behind the same backend protocol as
`HFGenerateBackend`. vLLM is imported only when a `VLLMBackend` is constructed, never on the CPU path.
Tests: `pytest tests/core/test_rollout.py` (the vLLM test is marked `gpu`).
"""

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from core.lora_merge import merged_state_dict
from core.policy import load_tokenizer
from core.rollout import (
    Rollouts,
    SamplingSettings,
    TextBackend,
    check_special_tokens,
    derive_seed,
    eos_token_ids,
    finalize_rollouts,
    left_pad,
    prompt_list,
)

VLLM_INSTALL_HINT = "pip install '.[vllm]' (vLLM needs a CUDA GPU; it does not run on CPU)"


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> None:
    """Runs inside each vLLM worker (via `LLM.collective_rpc`): the model's own HF-name-aware loader."""
    worker.model_runner.model.load_weights(weights=weights)


VLLM_GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature is greedy decoding


class VLLMBackend(TextBackend):
    """Rollouts from vLLM's offline engine (`vllm.LLM`), on a CUDA GPU next to the trainer.

    Requires vllm>=0.10.2 (`logprobs_mode`, `LLM.collective_rpc` with a callable). vLLM is imported here,
    never at module level: the CPU path must not need it. The engine runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set, as in TRL's colocate mode), so `update_weights` hands
    the tensors to the worker by reference; with a multiprocess engine they would be serialized, and a
    callable needs VLLM_ALLOW_INSECURE_SERIALIZATION=1.

    Sampling log-probs: vLLM reports either the raw distribution (temperature 1) or, with
    `logprobs_mode="processed_logprobs"` (used here), the distribution it sampled from, after eos
    suppression, temperature, top-k and top-p. That equals our definition only without truncation;
    with top_k, top_p < 1, min_new_tokens, or greedy decoding at temperature != 1, `sampling_logp` is None.
    Each row gets its own seed `derive_seed(seed, row)`, so a row's sample does not depend on the batch
    (vLLM then samples with per-request generators, somewhat slower than its batched sampler);
    `generate_groups` (the trainer's `generation_groups`) sends many groups in one call, row r of group g
    seeded `derive_seed(seeds[g], r)`.

    Token ids are decoded, and stop strings cut, with `tokenizer` (the trainer's, from `load_policy`;
    default: the directory's, loaded the same way), not with the one vLLM loads for itself, which
    transformers 5 may rebuild as another class (core/policy.py `_load_tokenizer`); vLLM's own stop-string
    check only ends a row early.
    """

    def __init__(
        self,
        model_path: str,
        *,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "bfloat16",
        seed: int = 0,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **llm_kwargs: Any,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM, SamplingParams  # optional, CUDA only: never at module level
        except ImportError as err:
            raise ImportError(f"VLLMBackend needs vLLM: {VLLM_INSTALL_HINT}") from err

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        check_special_tokens(self.tokenizer)
        # the engine ignores generation_config.json (below); its eos ids are passed as stop tokens, taken as
        # transformers takes them (from config.json without one) and within the vocabulary, as for HF
        model_config = AutoConfig.from_pretrained(model_path)
        generation = (
            GenerationConfig.from_pretrained(model_path)
            if (Path(model_path) / "generation_config.json").is_file()
            else GenerationConfig.from_model_config(model_config)
        )
        vocab_size = model_config.get_text_config().vocab_size
        self.eos_ids = eos_token_ids(self.tokenizer, generation, vocab_size)
        self._sampling_params = SamplingParams
        self.llm = LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # ignore the model's generation_config.json, as HFGenerateBackend does
            **llm_kwargs,
        )

    @property
    def max_context(self) -> int:
        """The engine's `max_model_len` (at most the model's `max_position_embeddings`; `max_model_len=`
        in `llm_kwargs` lowers it)."""
        return self.llm.llm_engine.model_config.max_model_len

    def update_weights(self, model: nn.Module) -> None:
        """Copy the trained weights (LoRA merged) into the engine and drop its prefix cache (stale KV)."""
        weights = list(merged_state_dict(model).items())
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        self.llm.reset_prefix_cache()

    def generate_from_ids(
        self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int
    ) -> Rollouts:
        seeds = [derive_seed(seed, i) for i in range(len(prompt_ids))]
        return self._generate(prompt_ids, prompt_mask, settings, seeds)

    def generate_groups(
        self, prompts: list[str], settings: SamplingSettings, seeds: Sequence[int], group_size: int
    ) -> Rollouts:
        """Completions of `prompts` in one engine call; row r of group g (rows [g * group_size, (g + 1) *
        group_size)) is seeded `derive_seed(seeds[g], r)`, so each group's rows are those `generate` gives
        the group alone with seed `seeds[g]`."""
        prompts = prompt_list(prompts)
        if len(prompts) != len(seeds) * group_size:
            raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds x group_size {group_size}")
        rows = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        prompt_ids, prompt_mask = left_pad(rows, self.tokenizer.pad_token_id)
        row_seeds = [derive_seed(group_seed, r) for group_seed in seeds for r in range(group_size)]
        return replace(self._generate(prompt_ids, prompt_mask, settings, row_seeds), prompts=prompts)

    def _generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seeds: list[int]
    ) -> Rollouts:
        if not settings.greedy and settings.temperature < VLLM_GREEDY_BELOW:
            raise ValueError(
                f"temperature {settings.temperature} is below {VLLM_GREEDY_BELOW}, where vLLM decodes greedily "
                "and its log-probs are not those of the sampling: sample greedily (greedy=True) or above it"
            )
        truncated = settings.top_k > 0 or settings.top_p < 1.0 or settings.min_new_tokens > 0
        with_logp = not truncated and not (settings.greedy and settings.temperature != 1.0)
        requests = [
            {"prompt_token_ids": ids[m.bool()].tolist()}
            for ids, m in zip(prompt_ids, prompt_mask, strict=True)
        ]
        params = [
            self._sampling_params(
                n=1,
                temperature=0.0 if settings.greedy else settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k if settings.top_k > 0 else -1,
                max_tokens=settings.max_new_tokens,
                min_tokens=settings.min_new_tokens,
                stop=list(settings.stop_strings) or None,
                stop_token_ids=list(self.eos_ids[1:]) or None,  # the tokenizer's eos stops it anyway
                include_stop_str_in_output=True,
                logprobs=0 if with_logp else None,
                seed=row_seed,
            )
            for row_seed in seeds
        ]
        outputs = [o.outputs[0] for o in self.llm.generate(requests, params, use_tqdm=False)]
        rows = [list(o.token_ids) for o in outputs]
        logps = None
        if with_logp:
            logps = [[lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)] for o in outputs]
        return finalize_rollouts(prompt_ids, prompt_mask, rows, logps, settings, self.tokenizer, self.eos_ids)
