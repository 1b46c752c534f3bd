"""The policy contract: what the algorithms, the rollout and eval.py call, and nothing more.

Both policies here satisfy it: `models.mlp.MLPPolicy` (state tasks) and `models.gr00t.Gr00tPolicy`. A policy is
stateless: the weights live in a params dict (`torch.func.functional_call` over a shape-only module), so the
same policy object serves any number of param sets (the current params, a frozen copy, a checkpoint's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

Params = dict[str, torch.Tensor]


@runtime_checkable
class Policy(Protocol):
    normalizer_names: tuple[str, ...]
    """Params that are running statistics: updated by `update_normalizer`, not by the optimizer, and saved in
    checkpoints beside the trainable params. Empty for a policy whose normalisation is fixed (GR00T's metadata)."""

    def init(self, seed: int) -> Params:
        """Fresh params, a pure function of the seed."""
        ...

    def is_trainable(self, name: str) -> bool:
        """Does the optimizer update this param?"""
        ...

    def is_value_param(self, name: str) -> bool:
        """Is this param the critic's (it gets the value learning rate and its own gradient clipping)?"""
        ...

    def sample(self, params: Params, obs: dict[str, torch.Tensor], instruction: str | Sequence[str] = "",
               generator: torch.Generator | None = None, deterministic: bool = False) -> dict[str, torch.Tensor]:
        """Act on a batch of N observations, given one instruction for the batch or one per row (the env's
        `instruction`). Returns at least `actions` [N, T, A] (T env steps per decision),
        `logprob` [N], `value` [N] and `state` [N, S] (the observed state), plus whatever `evaluate` needs to
        recompute the log-prob of the same actions. Draws its randomness from `generator` alone."""
        ...

    def evaluate(self, params: Params,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Differentiable log-prob [N] and value [N] of rows of `sample`'s output under `params`, and the entropy
        [N] (None where it does not depend on the params)."""
        ...

    def value(self, params: Params, obs: dict[str, torch.Tensor], instruction: str | Sequence[str] = "",
              ) -> torch.Tensor:
        """V(obs) [N], for bootstrapping at the end of a rollout."""
        ...

    def update_normalizer(self, params: Params, states: torch.Tensor,
                          all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Fold observed states [..., S] into the running statistics of `normalizer_names`, in place
        (`all_reduce_sum` pools DDP ranks). A policy with fixed normalisation does nothing."""
        ...
