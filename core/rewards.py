"""A reward rubric: named reward functions, explicit weights, bootstrapped scales, and a (N, K) table of
reward components with their weighted total and per-component metrics.

A reward function is pure, `fn(completion: str, example: dict) -> float`. A function object that scores a
whole batch at once (a reward model) sets the attribute `batched = True` and is called as
`fn(completions, examples) -> list[float]` (a 1-D tensor is accepted too). No model or tokenizer lives here.
Every value must be a finite real number; anything else (an exception, NaN, inf, None, a string...) is
reported with the function's name and the example's id, and either raised (`on_error="raise"`) or scored
0.0 and counted (`on_error="zero"`): never a silent wrong value.

    total_n = sum_k weight_k * scale_k * component_nk

Shape letters as in core/algos.py: N completions, K reward components.
Pattern: verifiers `Rubric(funcs, weights)`; TRL `GRPOTrainer(reward_funcs=..., reward_weights=...)`.
"""

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

ON_ERROR = ("raise", "zero")
_FLOAT32_MAX = torch.finfo(torch.float32).max
_MAX_REPR = 200  # characters of a bad value or an error shown in a message


class RewardError(ValueError):
    """A reward function failed or returned something that is not a finite real number."""


@dataclass(eq=False)  # tensors have no single truth value to compare
class RewardTable:
    """The rubric's verdict on a batch of N completions; `metrics()` summarises it for logging.
    `select`, `concat` and `with_components` keep rows, weights and failures together (the trainer's
    dynamic sampling and model-based reward terms)."""

    names: list[str]  # the K reward components, in column order
    components: Tensor  # (N, K) float32, raw values (0.0 where a call failed under on_error="zero")
    weights: Tensor  # (K,) float32, weight_k * scale_k at scoring time
    failed: Tensor  # (N, K) bool, True where the entry was scored 0.0 because its call failed
    errors: list[str]  # one message per failed entry, in row-major order of `failed`

    @property
    def total(self) -> Tensor:
        """sum_k weight_k * scale_k * components[:, k], (N,)."""
        return self.components @ self.weights  # (N,)

    @property
    def failures(self) -> dict[str, int]:
        """Per component: how many entries were scored 0.0 because the call failed."""
        return dict(zip(self.names, self.failed.sum(dim=0).tolist(), strict=True))

    def effective_weights(self) -> Tensor:
        return self.weights  # (K,)

    def metrics(self) -> dict[str, float]:
        """Mean and std of each component and of the total, and failure counts, as `reward/<name>/<stat>`.
        The std is the population std (no Bessel correction), so a batch of one logs 0, not NaN."""
        out: dict[str, float] = {}
        columns = [*zip(self.names, self.components.unbind(dim=1), strict=True), ("total", self.total)]
        for name, values in columns:  # values: (N,)
            out[f"reward/{name}/mean"] = values.mean().item()
            out[f"reward/{name}/std"] = values.std(correction=0).item()
        for name, count in self.failures.items():
            out[f"reward/{name}/failures"] = float(count)
        return out

    def select(self, rows: Sequence[int]) -> "RewardTable":
        """The table of the given rows, in that order."""
        index = torch.as_tensor(list(rows), dtype=torch.long)  # (M,)
        ends = self.failed.sum(dim=1).cumsum(dim=0).tolist()  # (N,) errors up to and including each row
        starts = [0, *ends[:-1]]
        errors = [message for i in index.tolist() for message in self.errors[starts[i] : ends[i]]]
        return RewardTable(list(self.names), self.components[index], self.weights, self.failed[index], errors)

    @classmethod
    def concat(cls, tables: Sequence["RewardTable"]) -> "RewardTable":
        """The rows of `tables` one after the other; they must have the same components and weights."""
        if not tables:
            raise ValueError("no reward tables to concatenate")
        first = tables[0]
        for table in tables[1:]:
            if table.names != first.names or not torch.equal(table.weights, first.weights):
                raise ValueError(
                    f"cannot concatenate reward tables with different components or weights: {first.names} "
                    f"{first.weights.tolist()} vs {table.names} {table.weights.tolist()}"
                )
        return cls(
            list(first.names),
            torch.cat([t.components for t in tables]),  # (sum N, K)
            first.weights,
            torch.cat([t.failed for t in tables]),  # (sum N, K)
            [message for t in tables for message in t.errors],
        )

    def with_components(self, extra: Mapping[str, Tensor]) -> "RewardTable":
        """This table with more components, each (N,) with weight 1: terms computed outside the rubric
        because they need a model (CoDistill's KD reward)."""
        if not extra:
            return self
        n = self.components.shape[0]
        for name, values in extra.items():
            if name in self.names or name == "total":
                raise ValueError(f"extra reward component {name!r} clashes with {[*self.names, 'total']}")
            if tuple(values.shape) != (n,) or not torch.isfinite(values).all():
                raise ValueError(f"extra reward component {name!r} must be {n} finite values, got {values}")
        added = torch.stack([values.detach().float().cpu() for values in extra.values()], dim=1)  # (N, E)
        return RewardTable(
            [*self.names, *extra],
            torch.cat([self.components, added], dim=1),  # (N, K + E)
            torch.cat([self.weights, torch.ones(len(extra))]),  # (K + E,)
            torch.cat([self.failed, torch.zeros(added.shape, dtype=torch.bool)], dim=1),  # (N, K + E)
            list(self.errors),
        )


class Rubric:
    """Named reward functions combined with explicit weights (default 1.0 each).

    Bootstrapped scaling (PAPERS.md sec. 6, our choice): `fit_scales` freezes `scale_k = 1 / mean_n |r_nk|`
    from a first batch of rollouts, so components of different magnitudes weigh what their weights say.
    Before fitting every scale is 1. `state_dict()` / `load_state_dict()` carry the scales across a resume.
    """

    def __init__(
        self,
        funcs: Mapping[str, Callable[..., Any]],
        weights: Mapping[str, float] | None = None,
        on_error: str = "raise",
    ):
        if not funcs:
            raise ValueError("a Rubric needs at least one reward function")
        for name, fn in funcs.items():
            if not isinstance(name, str) or not name or name == "total":
                raise ValueError(f"reward names must be non-empty strings other than 'total', got {name!r}")
            if not callable(fn):
                raise ValueError(f"reward function {name!r} is not callable: {fn!r}")
            if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
                raise ValueError(f"reward function {name!r} is async; rewards are called synchronously")
        if on_error not in ON_ERROR:
            raise ValueError(f"unknown on_error {on_error!r}; valid: {', '.join(ON_ERROR)}")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(funcs))
        if unknown:
            raise ValueError(f"weights for unknown reward functions {unknown}; valid: {', '.join(funcs)}")
        for name, weight in weights.items():
            if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(f"the weight of reward {name!r} must be a finite number, got {weight!r}")
        self.funcs = dict(funcs)
        self.names = list(funcs)
        self.on_error = on_error
        self._weights = {name: float(weights.get(name, 1.0)) for name in self.names}
        self._scales = {name: 1.0 for name in self.names}
        self._fitted = False

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def scales(self) -> dict[str, float]:
        return dict(self._scales)

    @property
    def fitted(self) -> bool:
        """Whether `fit_scales` (or a loaded state) has frozen the scales."""
        return self._fitted

    def effective_weights(self) -> Tensor:
        """weight_k * scale_k, (K,) float32: `components @ rubric.effective_weights()` is the total."""
        return torch.tensor([self._weights[n] * self._scales[n] for n in self.names], dtype=torch.float32)

    # -----------------------------------------------------------------------------------------------
    # Scoring
    # -----------------------------------------------------------------------------------------------

    def score(
        self, completions: Sequence[str], examples: Sequence[Mapping], ids: Sequence[Any] | None = None
    ) -> RewardTable:
        """Score N completions, completion i answering `examples[i]`. `ids` name the examples in error
        messages (default: `example.get("id", i)`)."""
        n = len(completions)
        if n == 0:
            raise ValueError("no completions to score")
        if len(examples) != n:
            raise ValueError(f"{n} completions but {len(examples)} examples")
        ids = [ex.get("id", i) for i, ex in enumerate(examples)] if ids is None else list(ids)
        if len(ids) != n:
            raise ValueError(f"{n} completions but {len(ids)} ids")

        columns: list[list[float]] = []
        failures: list[tuple[int, int, str]] = []  # (row, column, message)
        for k, name in enumerate(self.names):
            outcomes = self._call(name, completions, examples, ids)  # N floats or RewardErrors
            column = []
            for i, outcome in enumerate(outcomes):
                if isinstance(outcome, float):
                    column.append(outcome)
                    continue
                if self.on_error == "raise":
                    raise outcome
                failures.append((i, k, str(outcome)))
                column.append(0.0)
            columns.append(column)
        components = torch.tensor(columns, dtype=torch.float32).T  # (N, K)
        failed = torch.zeros(components.shape, dtype=torch.bool)  # (N, K)
        for i, k, _ in failures:
            failed[i, k] = True
        errors = [message for _, _, message in sorted(failures)]  # row-major, as `failed` is read
        return RewardTable(list(self.names), components, self.effective_weights(), failed, errors)

    def _call(
        self, name: str, completions: Sequence[str], examples: Sequence[Mapping], ids: list[Any]
    ) -> list[float | RewardError]:
        """Run one reward function on the batch: a float or a RewardError (with its cause) per completion."""
        fn = self.funcs[name]
        if not getattr(fn, "batched", False):
            rows = zip(completions, examples, ids, strict=True)
            return [_call_one(name, fn, completion, example, id_) for completion, example, id_ in rows]
        # A batched call fails or succeeds as a whole; it is user code, so any Exception is attributed to it.
        try:
            values = fn(list(completions), list(examples))
        except Exception as e:
            error = RewardError(f"reward {name!r} failed on examples {_short(ids)}: {_describe(e)}")
            error.__cause__ = e
            return [error] * len(completions)
        _refuse_awaitable(name, values)
        if getattr(values, "ndim", 1) != 1:  # a tensor or array of another shape than (N,): (N, 1), 0-d
            raise RewardError(
                f"batched reward {name!r} returned an array of shape {tuple(values.shape)} for "
                f"{len(completions)} completions; expected ({len(completions)},)"
            )
        if hasattr(values, "tolist"):  # a tensor or numpy array of scores
            values = values.tolist()
        if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, Sequence) else _short(values)
            # A broken contract, not a bad sample: raised whatever on_error says.
            raise RewardError(f"batched reward {name!r} returned {got} for {len(completions)} completions")
        return [_checked(name, value, id_) for value, id_ in zip(values, ids, strict=True)]

    # -----------------------------------------------------------------------------------------------
    # Bootstrapped scales
    # -----------------------------------------------------------------------------------------------

    def fit_scales(self, table_or_components: RewardTable | Tensor) -> dict[str, float]:
        """Freeze `scale_k = 1 / mean_n |component_nk|` from a first batch, (N, K) raw components; returns
        the scales. A table scored before the fit keeps the weights it was scored with."""
        if self._fitted:
            raise ValueError("the reward scales are already fitted (or loaded); they are frozen for the run")
        components, counted = table_or_components, None
        if isinstance(table_or_components, RewardTable):
            if table_or_components.names != self.names:
                raise ValueError(f"table columns {table_or_components.names} != the rubric's {self.names}")
            components = table_or_components.components
            counted = ~table_or_components.failed  # (N, K): a failed call's placeholder 0 is no reward
        if components.dim() != 2 or components.shape[0] == 0 or components.shape[1] != len(self.names):
            raise ValueError(
                f"components must have shape (N >= 1, {len(self.names)}), got {tuple(components.shape)}"
            )
        if not torch.isfinite(components).all():
            raise ValueError("components contain NaN or inf; cannot fit reward scales on them")
        if counted is None:
            counted = torch.ones(components.shape, dtype=torch.bool)
        scored = counted.sum(dim=0)  # (K,)
        magnitude = (components.double().abs() * counted).sum(dim=0) / scored.clamp(min=1)  # (K,)
        zero = [name for name, m in zip(self.names, magnitude.tolist(), strict=True) if m == 0.0]
        if zero:
            raise ValueError(
                f"cannot fit scales: mean |reward| is 0 (or every call failed) on this batch for {zero}; fit on "
                "a batch where every "
                "component is non-zero somewhere, or leave the scales at 1"
            )
        self._scales = {name: 1.0 / m for name, m in zip(self.names, magnitude.tolist(), strict=True)}
        self._fitted = True
        return self.scales

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state (plain floats): the scales and whether they are fitted."""
        return {"scales": self.scales, "fitted": self._fitted}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"scales", "fitted"}:
            raise ValueError(f"a Rubric state has keys ['fitted', 'scales'], got {sorted(state)}")
        scales = state["scales"]
        if set(scales) != set(self.names):
            raise ValueError(f"saved scales are for rewards {sorted(scales)}, not {sorted(self.names)}")
        for name, scale in scales.items():
            if not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"saved scale of reward {name!r} must be a finite number > 0, got {scale!r}")
        if not isinstance(state["fitted"], bool):
            raise ValueError(f"saved 'fitted' must be true or false, got {state['fitted']!r}")
        self._scales = {name: float(scales[name]) for name in self.names}
        self._fitted = state["fitted"]


def _call_one(
    name: str, fn: Callable[[str, Mapping], Any], completion: str, example: Mapping, id_: Any
) -> float | RewardError:
    # The reward function is user code: any Exception it raises is attributed to it and to the example.
    try:
        value = fn(completion, example)
    except Exception as e:
        error = RewardError(f"reward {name!r} failed on example {id_!r}: {_describe(e)}")
        error.__cause__ = e
        return error
    _refuse_awaitable(name, value)
    return _checked(name, value, id_)


def _refuse_awaitable(name: str, value: Any) -> None:
    """A reward that returned a coroutine (an async function behind a wrapper) breaks the contract for
    every example: raised whatever on_error says, not scored as a failed call."""
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: closed, so Python does not warn about it
        raise RewardError(f"reward {name!r} returned an awaitable; rewards are called synchronously")


def _checked(name: str, value: Any, id_: Any) -> float | RewardError:
    """`value` as a float if it is a real number (a 0-d tensor or numpy scalar included), finite in float32;
    otherwise a RewardError saying so."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    elif isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        value = value.item()  # np.float32, np.bool_, a 0-d array
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float (and maybe for repr)
            return RewardError(f"reward {name!r} returned an int too large for a float on example {id_!r}")
        if math.isfinite(number) and abs(number) <= _FLOAT32_MAX:
            return number
    return RewardError(f"reward {name!r} returned {_short(value)} on example {id_!r}: not a finite real")


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {_short(str(error), use_repr=False)}"


def _short(value: Any, use_repr: bool = True) -> str:
    text = repr(value) if use_repr else value
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."
