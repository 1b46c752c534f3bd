"""One adapter for any Isaac Lab task: batched torch tensors in, batched torch tensors out.

Contract (shared by every algorithm in `algos/`; `envs/env.py` states it as a Protocol):

    env = make_env(EnvConfig(...))
    obs = env.reset(seed=0, reset_keys=None)
    obs, reward, terminated, truncated, info = env.step(actions)
    state = env.state_dict()      # flat {name: tensor}: everything the coming steps depend on (for exact resume)
    env.load_state_dict(state)    # into an env built with the same config: continue exactly from there

    obs         {"state": float32 [N, S]} and, for camera tasks, "rgb": uint8 [N, V, H, W, 3]
    actions     float32 [N, A] on any device; checked for shape, dtype and finiteness
    reward      float32 [N]
    terminated  bool [N]   the episode ended inside the MDP (success, a cube fell): do not bootstrap
    truncated   bool [N]   the time limit ended it: bootstrap
    info        "success" bool [N] (the task's success test held this step);
                "episode_return" float32 [N] and "episode_length" int64 [N], valid where terminated | truncated;
                "milestones" bool [N, M]: which of the task's `milestones` (names, in order; M may be 0) the
                episode has reached so far, valid where terminated | truncated

Finished sub-envs are reset inside `step`; the obs returned for them is the first of the next episode.
Initial states are drawn from *reset keys*: for tasks that support it (stack-cube), sub-envs that reset with
the same key start from identical states (cube poses, robot joints). `reset(seed, reset_keys=k)` sets every
env's key; later automatic resets draw fresh keys from a generator seeded by `seed`.

Kit-less by default: Newton physics (MuJoCo-Warp solver), Warp ray-traced cameras, no Isaac Sim.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from typing import Any

import torch

from envs import assets, sim_state, tasks
from envs.config import EnvConfig

# Isaac Lab 2.x ids (with Isaac Sim) → Isaac Lab 3.0 ids.
TASK_ALIASES = {
    "Isaac-Stack-Cube-Franka-IK-Rel-Visuomotor-Cosmos-v0": "IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor-Cosmos",
    "Isaac-Stack-Cube-Franka-IK-Rel-Visuomotor-v0": "IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor",
    "Isaac-Cartpole-v0": "Isaac-Cartpole",
    "Isaac-Ant-v0": "Isaac-Ant",
    "Isaac-Reach-Franka-v0": "Isaac-Reach-Franka",
    "Isaac-Lift-Cube-Franka-v0": "Isaac-Lift-Franka",
}


def registered_tasks() -> list[str]:
    """Every task id Isaac Lab registers with gymnasium (imports isaaclab_tasks)."""
    import gymnasium as gym
    import isaaclab_tasks  # noqa: F401  (registers the tasks)

    return sorted(k for k in gym.registry if k.startswith("Isaac"))


def resolve_task(name: str) -> str:
    """Map a 2.x alias to its 3.0 id; an unknown id raises with the closest registered names."""
    name = TASK_ALIASES.get(name, name)
    known = registered_tasks() + list(tasks.LEANVLA_TASKS)
    if name not in known:
        close = difflib.get_close_matches(name, known + list(TASK_ALIASES), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown Isaac Lab task {name!r}.{hint} ({len(known)} tasks are registered.)")
    return name


def resolve_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--env.device {device} asked for a GPU, but torch sees none. Use cpu or auto.")
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def make_env(cfg: EnvConfig) -> IsaacLabEnv:
    return IsaacLabEnv(cfg)


class IsaacLabEnv:
    def __init__(self, cfg: EnvConfig):
        if cfg.num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {cfg.num_envs}")
        if cfg.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {cfg.image_size}")
        self.cfg = cfg
        # The asset root must be set before the first isaaclab import (Isaac Lab reads it once).
        if cfg.assets == "offline":
            assets.use_asset_root(assets.ensure_offline_assets())
        self.task = resolve_task(cfg.task)
        self.isaaclab_task = tasks.LEANVLA_TASKS.get(self.task, self.task)  # the Isaac Lab task it is built from
        self.device = resolve_device(cfg.device)
        self.num_envs = cfg.num_envs
        self.spec = tasks.spec_for(self.task)

        env_cfg = self._build_cfg()
        self._launch = contextlib.ExitStack()
        self._env = self._launch_env(env_cfg)
        self.spec.bind(self._env, self)
        solver = sim_state.mujoco_warp_solver() if cfg.sim == "kitless" else None
        self.solver_overflows = SolverOverflows(solver, self.device) if solver is not None else None
        """Overflows of the MuJoCo-Warp solver's limits, counted (None with another physics backend)."""

        self.step_dt = float(self._env.step_dt)
        self.max_episode_steps = int(self._env.max_episode_length)
        self.action_dim = int(self._env.action_manager.total_action_dim)
        self.instruction = self.spec.instructions(self.num_envs)
        idle = self.spec.idle_action
        if idle is not None and len(idle) != self.action_dim:
            raise ValueError(f"{self.task}: the task's idle action has {len(idle)} dims, its actions {self.action_dim}")
        self.idle_action = None if idle is None else torch.tensor(idle, dtype=torch.float32, device=self.device)
        self.num_views = len(self.spec.camera_names)
        self.image_size = cfg.image_size
        self.milestones = self.spec.milestones

        n, dev = self.num_envs, self.device
        self.episode_return = torch.zeros(n, device=dev)
        self.episode_length = torch.zeros(n, dtype=torch.long, device=dev)
        self.milestones_reached = torch.zeros(n, len(self.milestones), dtype=torch.bool, device=dev)
        self.reset_keys = torch.zeros(n, dtype=torch.long, device="cpu")  # the key each env last started from
        self._next_keys = torch.zeros(n, dtype=torch.long, device="cpu")
        self._key_generator = torch.Generator().manual_seed(0)
        self._started = False  # reset() has run
        dims = self._env.observation_manager.group_obs_term_dim["policy"]
        names = self._env.observation_manager.active_terms["policy"]
        self.state_dim = int(dims[names.index("state")][0]) if "state" in names else int(sum(d[0] for d in dims))

    # ----------------------------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------------------------

    def _build_cfg(self):
        from isaaclab_tasks.utils.hydra import resolve_presets
        from isaaclab_tasks.utils.parse_cfg import load_cfg_from_registry

        env_cfg = load_cfg_from_registry(self.isaaclab_task, "env_cfg_entry_point")
        presets = ("newton_mjwarp", "newton_renderer") if self.cfg.sim == "kitless" else ()
        env_cfg = resolve_presets(env_cfg, selected=presets)
        env_cfg.sim.device = self.device
        env_cfg.scene.num_envs = self.num_envs
        if self.cfg.sim == "kitless":
            env_cfg.scene.replicate_physics = True  # Newton builds one prototype world and clones it
        tasks.patch_robot(env_cfg, kitless=self.cfg.sim == "kitless")
        self.spec.patch(env_cfg, self.cfg)
        solver = getattr(env_cfg.sim.physics, "solver_cfg", None) if self.cfg.sim == "kitless" else None
        if self.cfg.ls_iterations is not None and not hasattr(solver, "ls_iterations"):
            raise ValueError(f"--env.ls-iterations {self.cfg.ls_iterations}: the physics of {self.task!r} "
                             f"({type(solver).__name__ if solver else self.cfg.sim}) has no MuJoCo-Warp line search")
        ls_iterations = self.cfg.ls_iterations or self.spec.ls_iterations
        if ls_iterations is not None and hasattr(solver, "ls_iterations"):
            solver.ls_iterations = ls_iterations
        if self.cfg.max_episode_steps is not None:
            if self.cfg.max_episode_steps < 1:
                raise ValueError(f"max_episode_steps must be >= 1, got {self.cfg.max_episode_steps}")
            tasks.set_episode_steps(env_cfg, self.cfg.max_episode_steps)
        return env_cfg

    def _launch_env(self, env_cfg):
        import gymnasium as gym
        from isaaclab.app import launch_simulation
        from isaaclab.app.sim_launcher import validate_launch

        launcher_args: dict[str, Any] = {"device": self.device}
        _, kit_sources = validate_launch(env_cfg, dict(launcher_args))
        if self.cfg.sim == "kitless" and kit_sources:
            raise RuntimeError(
                f"Task {self.task!r} as configured needs Isaac Sim (Kit) for: {'; '.join(kit_sources)}. "
                "leanvla runs it kit-less only if every part has a Newton/Warp equivalent; "
                "install Isaac Sim and pass --env.sim kit to use Kit."
            )
        if self.cfg.sim == "kit":
            try:
                import isaacsim  # noqa: F401
            except ImportError as e:
                raise RuntimeError(
                    "--env.sim kit needs Isaac Sim (pip install isaacsim, with Isaac Lab 2.x/3.0 and a GPU with RTX); "
                    "it is not installed here. Use --env.sim kitless (Newton physics, Warp cameras)."
                ) from e
            launcher_args["require_kit"] = True
            launcher_args["enable_cameras"] = bool(self.spec.camera_names)
        self._launch.enter_context(launch_simulation(env_cfg, launcher_args))
        try:
            env = gym.make(self.isaaclab_task, cfg=env_cfg).unwrapped
        except BaseException:
            self._launch.close()
            raise
        return env

    # ----------------------------------------------------------------------------------------------------------
    # the contract
    # ----------------------------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None, reset_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reset every sub-env. `reset_keys` (int64 [N]): envs that share a key start identically."""
        if seed is not None:
            self._key_generator.manual_seed(seed)
        if reset_keys is None:
            reset_keys = self._draw_keys(self.num_envs)
        else:
            reset_keys = torch.as_tensor(reset_keys)
            if reset_keys.shape != (self.num_envs,) or reset_keys.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"reset_keys must be an integer tensor of shape ({self.num_envs},), "
                    f"got {tuple(reset_keys.shape)} {reset_keys.dtype}"
                )
            if not self.spec.keyed_resets:
                raise ValueError(f"Task {self.task!r} does not support keyed (group) resets; pass reset_keys=None.")
        self._next_keys[:] = reset_keys.to("cpu", torch.long)
        obs, _ = self._env.reset(seed=seed)
        self._started = True
        self.episode_return.zero_()
        self.episode_length.zero_()
        self.milestones_reached.zero_()
        return self.spec.observe(obs)

    def step(self, actions: torch.Tensor):
        actions = self._check_actions(actions)
        obs, env_reward, terminated, truncated, _ = self._env.step(actions)
        if self.solver_overflows is not None:
            self.solver_overflows.count()
        success = self.spec.success(self._env)
        reward = self.spec.reward(self._env, env_reward, success).to(torch.float32)
        self.episode_return += reward
        self.episode_length += 1
        if self.milestones:
            self.milestones_reached |= self.spec.reached(self._env, success)
        done = terminated | truncated
        info = {
            "success": success,
            "episode_return": self.episode_return.clone(),
            "episode_length": self.episode_length.clone(),
            "milestones": self.milestones_reached.clone(),
        }
        self.episode_return.masked_fill_(done, 0.0)
        self.episode_length.masked_fill_(done, 0)
        self.milestones_reached.masked_fill_(done[:, None], False)
        return self._check_observations(self.spec.observe(obs)), reward, terminated.clone(), truncated.clone(), info

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that decides this env's future observations and rewards, as a flat dict of tensors: the
        simulator (bodies, joints, actuator targets, solver warm start), Isaac Lab's managers and counters, torch's
        global RNG (Isaac Lab's reset events draw from it), and this adapter's episode counters and reset keys.
        `load_state_dict` on an env built with the same config continues from here (see `envs/sim_state.py`)."""
        adapter = {
            "episode_return": self.episode_return,
            "episode_length": self.episode_length,
            "milestones_reached": self.milestones_reached,
            "reset_keys": self.reset_keys,
            "next_keys": self._next_keys,
            "key_generator": self._key_generator.get_state(),
        }
        return {**{f"adapter.{k}": v.clone() for k, v in adapter.items()},
                **{f"isaaclab.{k}": v for k, v in sim_state.capture(self._env).items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`'s output: the next `step` returns what the saved env's next `step` would have."""
        if not self._started:  # Isaac Lab allocates some buffers (observation histories) on the first reset
            self._env.reset()
            self._started = True
        sim_state.check_compatible(self.state_dict(), state)
        prefix = "isaaclab."
        sim_state.restore(self._env, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                          check=False)
        self.episode_return.copy_(state["adapter.episode_return"])
        self.episode_length.copy_(state["adapter.episode_length"])
        self.milestones_reached.copy_(state["adapter.milestones_reached"])
        self.reset_keys.copy_(state["adapter.reset_keys"])
        self._next_keys.copy_(state["adapter.next_keys"])
        self._key_generator.set_state(state["adapter.key_generator"].cpu())

    def close(self) -> None:
        if getattr(self, "_env", None) is not None:
            if self.solver_overflows is not None:
                self.solver_overflows.report(self.task)
            self._env.close()
            self._env = None
        if getattr(self, "_launch", None) is not None:
            self._launch.close()
            self._launch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------------------------------------------------
    # helpers
    # ----------------------------------------------------------------------------------------------------------

    @property
    def unwrapped(self):
        """The Isaac Lab env underneath (scene, managers), for privileged access by experts and tests."""
        return self._env

    def privileged_state(self) -> dict[str, torch.Tensor]:
        """Simulator ground truth the policy never sees (object poses, joints), for scripted experts."""
        return self.spec.privileged(self._env)

    def _draw_keys(self, n: int) -> torch.Tensor:
        return torch.randint(0, 2**62, (n,), generator=self._key_generator, dtype=torch.long)

    def take_reset_keys(self, env_ids: torch.Tensor) -> torch.Tensor:
        """Keys for the envs Isaac Lab is resetting now; called from the task's reset event. Draws the next ones."""
        ids = env_ids.to("cpu", torch.long)
        keys = self._next_keys[ids].clone()
        self.reset_keys[ids] = keys
        self._next_keys[ids] = self._draw_keys(len(ids))
        return keys

    def _check_observations(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Refuse non-finite observations: where the physics diverged, NaN would reach the policy and, through the
        rollout's values, the update; and the action check would then blame the policy."""
        for key, value in obs.items():
            if value.is_floating_point() and (bad := _non_finite_rows(value)):
                raise FloatingPointError(f"the simulation returned non-finite observations ({key!r}) for envs "
                                         f"{bad}: its physics diverged there")
        return obs

    def _check_actions(self, actions: torch.Tensor) -> torch.Tensor:
        if not isinstance(actions, torch.Tensor):
            raise TypeError(f"actions must be a torch.Tensor of shape ({self.num_envs}, {self.action_dim}) float32")
        if actions.shape != (self.num_envs, self.action_dim):
            raise ValueError(
                f"actions must have shape ({self.num_envs}, {self.action_dim}) (num_envs, action_dim) for "
                f"{self.task!r}, got {tuple(actions.shape)}"
            )
        if actions.dtype != torch.float32:
            raise TypeError(f"actions must be float32, got {actions.dtype}")
        actions = actions.to(self.device)
        if bad := _non_finite_rows(actions):
            raise ValueError(f"actions contain NaN or inf (envs {bad})")
        return actions


class SolverOverflows:
    """Counts, per kind, the sub-env steps in which the MuJoCo-Warp solver overflowed a limit (its line-search or
    solver iterations, constraint or contact buffers), and reports them once, when the env closes. The solver would
    otherwise print a warning from inside its kernels at every overflow: with Isaac Lab's stack-cube settings, many
    times a second."""

    def __init__(self, solver, device: str):
        from mujoco_warp._src.types import OverflowType

        self.data, self.opt = solver.mjw_data, solver.mjw_model.opt
        self.opt.warn_overflow = False  # read when the solver's kernels are built: no printf in them from here on
        self.kinds = list(OverflowType)
        self.bits = torch.tensor([int(kind) for kind in self.kinds], dtype=torch.int32, device=device)
        self.steps = torch.zeros(len(self.kinds), dtype=torch.long, device=device)
        self.sub_env_steps = 0

    def count(self) -> None:
        """Fold the overflow flags of the last env step into the counts and clear them (no host sync)."""
        import warp as wp

        flags = wp.to_torch(self.data.overflow)  # [worlds] bitmask; the solver only ever sets bits
        self.steps += ((flags[:, None] & self.bits) != 0).sum(0)
        self.sub_env_steps += flags.shape[0]
        flags.zero_()

    def counts(self) -> dict[str, int]:
        """{overflow kind: sub-env steps in which it happened}, the kinds that happened."""
        return {kind.name: n for kind, n in zip(self.kinds, self.steps.tolist()) if n}

    def report(self, task: str) -> None:
        counts = self.counts()
        if counts:
            limits = f"ls_iterations {self.opt.ls_iterations}, iterations {self.opt.iterations}"
            print(f"[leanvla] {task}: the physics solver overflowed ({limits}) in "
                  + ", ".join(f"{kind} {n} of {self.sub_env_steps}" for kind, n in counts.items())
                  + " sub-env steps; raise --env.ls-iterations if LS_ITERATIONS is frequent", flush=True)


def _non_finite_rows(x: torch.Tensor) -> list[int]:
    """The first 8 rows (envs) of x that hold a NaN or inf; empty when x is finite (one device sync then)."""
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    return bad.nonzero().flatten()[:8].tolist() if bad.any() else []
