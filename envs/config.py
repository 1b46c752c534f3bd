"""The environment's settings as dataclasses that tyro turns into `--env.*` flags: `TaskConfig` says which task and
how it is simulated (what SFT records for evaluation); `EnvConfig` adds how many sub-envs and on which device (what
RL and eval.py step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STACK_CUBE = "IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor"


@dataclass
class TaskConfig:
    task: str = STACK_CUBE
    """Isaac Lab task id (Isaac Lab 2.x names `Isaac-...-v0` are accepted), or one of leanvla's own tasks built on
    one: `Leanvla-Lift-Red-Cube-Franka-IK-Rel-Visuomotor` (stack-cube's first pick: lift the red block, 160 steps),
    `Leanvla-Lift-Red-Or-Blue-Cube-Franka-IK-Rel-Visuomotor` (the same, the first half of the envs told to lift the
    red block, the second half the blue one: two instructions in one vectorised env)."""
    image_size: int = 224
    """Height and width of every camera image, in pixels (camera tasks only)."""
    max_episode_steps: int | None = None
    """Time limit in env steps; `None` keeps the task's own (stack-cube: 448 steps at 20 Hz, as RLinf)."""
    assets: Literal["offline", "official"] = "offline"
    """`offline`: USD assets built locally from PyPI sources (no network). `official`: NVIDIA's asset server."""
    sim: Literal["kitless", "kit"] = "kitless"
    """`kitless`: Newton physics + Warp ray-traced cameras (no Isaac Sim). `kit`: Isaac Sim with PhysX and RTX
    cameras through AppLauncher (needs Isaac Sim installed; not run by this project's CI)."""
    ls_iterations: int | None = None
    """Line-search iterations of the MuJoCo-Warp solver (kit-less). None: the task's; leanvla's stack-cube and lift
    tasks use 50 (Isaac Lab's stack config asks for 15, which the line search exceeds many times a second)."""


@dataclass
class EnvConfig(TaskConfig):
    num_envs: int = 2
    """Parallel sub-environments. `make_env` builds this many on one device; train.py treats it as the total over
    all DDP ranks and gives each rank num_envs / world_size."""
    device: str = "auto"
    """Simulation device: `cpu`, `cuda`, `cuda:N`, or `auto` (this rank's GPU if there is one, else CPU)."""
