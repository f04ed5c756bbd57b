"""Multi-turn rollouts: episodes of model turns and `Environment` observations, as one `Rollouts` whose
`loss_mask` leaves the observation tokens out of the loss. Works with any rollout backend.
Tests: `pytest tests/core/test_rollout.py`.
"""

from typing import Any, Protocol

import torch

from core.rollout import (
    RolloutBackend,
    Rollouts,
    SamplingSettings,
    context_limit,
    derive_seed,
    left_pad,
    prompt_list,
    right_pad,
)


class Environment(Protocol):
    """A multi-turn task. `reset` makes an episode's (mutable) state; `step` takes the model's turn text
    and returns an observation to append to the context (or None) and whether the episode is done."""

    def reset(self, prompt: str, example: dict) -> Any: ...

    def step(self, state: Any, turn_text: str) -> tuple[str | None, bool]: ...


def multi_turn_rollouts(
    backend: RolloutBackend,
    prompts: list[str],
    examples: list[dict],
    env: Environment,
    settings: SamplingSettings,
    seed: int,
    max_turns: int,
) -> Rollouts:
    """Episodes of alternating model turns and environment observations, as one Rollouts.

    Each turn generates (up to `settings.max_new_tokens` tokens) for the episodes still running, with
    seed `derive_seed(seed, turn)`, from the token context prompt + everything so far; then the
    observation's tokens (tokenized alone, `add_special_tokens=False`) are appended, also after the last
    turn. The completion is the whole transcript after the prompt; `loss_mask` and `sampling_logp` are 0 on
    observation tokens; `turns` lists each row's model turns and observations as texts. `finish_reason` is
    the last turn's ("stop"/"length") when the environment ended the episode, "turn_cap" when `max_turns`
    did, "context" when the next turn would not fit the backend's context (`core.rollout.context_limit`,
    where there is one: context + `max_new_tokens` must fit) or an observation did not (it is cut at the
    context's end).
    """
    prompts = prompt_list(prompts)
    if len(prompts) != len(examples):
        raise ValueError(f"got {len(prompts)} prompts but {len(examples)} examples")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    tokenizer = backend.tokenizer
    max_context = context_limit(backend)
    prompt_rows = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    states = [env.reset(p, ex) for p, ex in zip(prompts, examples, strict=True)]
    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]  # transcript after the prompt
    trained: list[list[float]] = [[] for _ in range(n)]  # 1 on generated tokens, 0 on observations
    logps: list[list[float]] = [[] for _ in range(n)]
    turns, reasons = [0] * n, ["turn_cap"] * n
    transcript: list[list[dict[str, str]]] = [[] for _ in range(n)]  # the turns' texts, for the logs
    with_logp, exact = True, True
    active = list(range(n))
    for turn in range(max_turns):
        if max_context is not None:
            full = [
                i
                for i in active
                if len(prompt_rows[i]) + len(tokens[i]) + settings.max_new_tokens > max_context
            ]
            for i in full:
                reasons[i] = "context"
            active = [i for i in active if i not in full]
        if not active:
            break
        ids, mask = left_pad([prompt_rows[i] + tokens[i] for i in active], tokenizer.pad_token_id)
        out = backend.generate_from_ids(ids, mask, settings, derive_seed(seed, turn))
        if out.vocab_mask is not None:  # the transcript below is rebuilt from tokens and would drop it
            raise NotImplementedError("multi-turn rollouts do not carry a vocabulary mask (VocabConstraint)")
        with_logp = with_logp and out.sampling_logp is not None
        exact = exact and out.sampling_logp_exact
        still_active = []
        for r, i in enumerate(active):
            length = int(out.completion_mask[r].sum())
            tokens[i] += out.completion_ids[r, :length].tolist()
            trained[i] += [1.0] * length
            logps[i] += out.sampling_logp[r, :length].tolist() if with_logp else [0.0] * length
            turns[i] += 1
            transcript[i].append({"role": "model", "text": out.completions[r]})
            observation, done = env.step(states[i], out.completions[r])
            cut = False
            if observation:
                obs_ids = tokenizer(observation, add_special_tokens=False)["input_ids"]
                # room >= 0: the turn's max_new_tokens fitted
                room = None if max_context is None else max_context - len(prompt_rows[i]) - len(tokens[i])
                if room is not None and len(obs_ids) > room:  # cut to the context, and the episode ends
                    obs_ids, cut = obs_ids[:room], True
                    observation = tokenizer.decode(obs_ids, skip_special_tokens=True)
                if obs_ids:
                    transcript[i].append({"role": "observation", "text": observation})
                    tokens[i] += obs_ids
                    trained[i] += [0.0] * len(obs_ids)
                    logps[i] += [0.0] * len(obs_ids)
            if done:  # the environment's end stands, cut or not
                reasons[i] = out.finish_reason[r]
            elif cut:
                reasons[i] = "context"
            else:
                still_active.append(i)
        active = still_active

    prompt_ids, prompt_mask = left_pad(prompt_rows, tokenizer.pad_token_id)
    completion_mask = right_pad([[1] * len(t) for t in tokens], 0, torch.long)  # (N, T)
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=right_pad(tokens, tokenizer.pad_token_id, torch.long),
        completion_mask=completion_mask,
        loss_mask=right_pad(trained, 0.0, torch.float32),
        sampling_logp=right_pad(logps, 0.0, torch.float32) if with_logp else None,
        sampling_logp_exact=with_logp and exact,
        finish_reason=reasons,
        prompts=list(prompts),
        completions=[tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
        num_turns=turns,
        pad_token_id=tokenizer.pad_token_id,
        turns=transcript,
    )
