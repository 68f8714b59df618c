"""The merge methods a cycle's outer step can use: one module each, registered in one table.

As in mergekit, a method is a module under ``merging/methods/`` with a function
``merge(current, adapter_config, candidates, weights, cfg, momentum_state) -> MergeStep``;
adding one is one file plus one row in :data:`METHODS`. The commission spec's ``merge.space``
choices are this table's names (:data:`MethodName`), so a spec can only name a registered method.

The table holds module paths, not modules: the spec (and ``taas commission validate``) reads the
names without importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

    from merging.cycle_merge import MergeConfig

    Adapter = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MethodInfo:
    module: str
    momentum: bool  # whether the method keeps a Nesterov momentum state between cycles
    summary: str


#: name -> (module, whether it supports Nesterov momentum, one line)
METHODS: dict[str, MethodInfo] = {
    "delta": MethodInfo(
        "merging.methods.delta", False, "effective LoRA deltas, exact at the stacked rank"
    ),
    "factors": MethodInfo(
        "merging.methods.factors", True, "A and B averaged separately, optional Nesterov momentum"
    ),
}

#: the registered names, as the type the spec and MergeConfig validate ``space`` against
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class MergeStep:
    """A method's result: the merged adapter, the config it is evaluated under, its momentum."""

    adapter: Adapter
    adapter_config: dict
    momentum_state: Adapter | None


class MergeMethod(Protocol):
    def merge(
        self,
        current: Adapter | None,
        adapter_config: dict,
        candidates: list[Adapter],
        weights: list[float],
        cfg: MergeConfig,
        momentum_state: Adapter | None,
    ) -> MergeStep: ...


def get_method(name: str) -> MergeMethod:
    """The registered method module; ValueError naming ``merge.space`` for an unknown name."""
    info = METHODS.get(name)
    if info is None:
        raise ValueError(f"merge.space: {name!r} is not a merge method; use one of {list(METHODS)}")
    return importlib.import_module(info.module)  # type: ignore[return-value]
