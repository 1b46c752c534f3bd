"""The env contract: what the rollout, the algorithms and eval.py use of an environment, and nothing more.

`envs.isaaclab_env.IsaacLabEnv` satisfies it for any Isaac Lab task (its docstring gives the tensors' meaning in
full); the tests' pure-torch envs satisfy it too.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Env(Protocol):
    task: str
    """The task's id."""
    num_envs: int
    """N: sub-environments stepped together."""
    num_views: int
    """Camera views in obs['rgb'] (0: a state task, no 'rgb')."""
    image_size: int
    """Height and width of each view (camera tasks)."""
    state_dim: int
    action_dim: int
    instruction: str | list[str]
    """The task's language instruction ('' for state tasks): one for every sub-env, or one per sub-env."""
    max_episode_steps: int
    """The time limit, in env steps."""
    milestones: tuple[str, ...]
    """The task's milestones (stack-cube: reach_red ... place_green), in the order an expert reaches them; the
    last is the task's success. () for tasks without."""
    idle_action: torch.Tensor | None
    """[A] an action that holds the robot still (None: the task has none). Rollouts play it for the rest of an
    action chunk after a sub-env's episode ended mid-chunk."""

    def reset(self, seed: int | None = None, reset_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Start every sub-env anew. Sub-envs given the same reset key start from identical states."""
        ...

    def step(self, actions: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                                                    torch.Tensor, dict[str, Any]]:
        """actions [N, A] -> obs, reward [N], terminated [N], truncated [N], info ("success", "episode_return",
        "episode_length", "milestones" [N, len(milestones)]: those the episode reached). Finished sub-envs are
        reset inside `step`."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the coming steps depend on, as flat tensors (for an exact resume); {} if the env cannot
        capture its state (a resumed run then starts fresh episodes)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ...

    def close(self) -> None:
        ...
