"""Save and restore an Isaac Lab ManagerBasedRLEnv mid-episode, as a flat dict of tensors (for exact resume).

What decides an Isaac Lab env's future, and where this module finds it:

    physics          `InteractiveScene.get_state()` / `reset_to()` (Isaac Lab's own scene-state API): root pose and
                     velocity of every articulation and rigid object, joint positions and velocities
    actuator targets `Articulation.actuators.target_command` (position / velocity / effort), plus the tensors of
                     Lab-executed actuator models (`scene.reset_to` would set the targets to the joint positions)
    solver           MuJoCo-Warp's buffers that persist between steps (`qacc_warmstart`, `act`, `ctrl`,
                     `qfrc_applied`, `xfrc_applied`: the ones `SolverMuJoCo.reset` clears) — the warm start
                     changes the contact solution, so without it a restored run drifts by float rounding
    asset caches     finite-difference state (previous joint / body velocities, accelerations) and the data
                     timestamp that the accelerations are differenced over
    managers         action terms (raw / processed actions, IK controller targets), the action manager's last two
                     actions, command terms, event-manager bookkeeping, observation history buffers,
                     reward / termination buffers
    counters         `episode_length_buf`, `common_step_counter`, `_sim_step_counter`
    RNG              torch's global generator on the env's device: Isaac Lab's reset events draw from it

Restoring writes the scene state through Isaac Lab's write APIs, runs forward kinematics (which clears the solver's
buffers for the written worlds), and only then puts the solver buffers back.
"""

from __future__ import annotations

from typing import Any

import torch

SOLVER_BUFFERS = ("qacc_warmstart", "act", "ctrl", "qfrc_applied", "xfrc_applied")
ACC_BUFFERS = ("_joint_acc", "_body_com_acc_w")
PREVIOUS = ("_previous_joint_vel", "_previous_body_com_vel")


def capture(env) -> dict[str, torch.Tensor]:
    """The state of an Isaac Lab env (`ManagerBasedRLEnv`), flat and cloned."""
    out: dict[str, torch.Tensor] = {}
    for kind, assets in env.scene.get_state(is_relative=False).items():
        for name, fields in assets.items():
            if isinstance(fields, torch.Tensor):
                out[f"scene.{kind}.{name}"] = fields
            else:
                out.update({f"scene.{kind}.{name}.{f}": t for f, t in fields.items()})
    for name, art in env.scene.articulations.items():
        cmd = art.actuators.target_command
        out.update({f"actuators.{name}.position": cmd.position.torch, f"actuators.{name}.velocity": cmd.velocity.torch,
                    f"actuators.{name}.effort": cmd.effort.torch})
        for group, model in _lab_actuator_models(art):
            out.update(_prefixed(f"actuators.{name}.{group}", _tensors(model)))
    for name, asset in _assets(env):
        data = asset.data
        out.update(_prefixed(f"data.{name}", _asset_caches(data)))
        out[f"data.{name}.sim_timestamp"] = torch.tensor(data._sim_timestamp, dtype=torch.float64)
        for acc in ACC_BUFFERS:
            if getattr(data, acc, None) is not None:
                out[f"data.{name}.{acc}.timestamp"] = torch.tensor(getattr(data, acc).timestamp, dtype=torch.float64)
    out.update(_prefixed("solver", _solver_buffers()))
    out.update(_prefixed("managers", _manager_tensors(env)))
    out["env.episode_length_buf"] = env.episode_length_buf
    out["env.common_step_counter"] = torch.tensor(env.common_step_counter, dtype=torch.long)
    out["env.sim_step_counter"] = torch.tensor(env._sim_step_counter, dtype=torch.long)
    out.update(_prefixed("rng", _rng_state(env.device)))
    return {k: v.detach().clone() for k, v in out.items()}


def restore(env, state: dict[str, torch.Tensor], check: bool = True) -> None:
    """Put `capture(env)`'s dict back, into an env built with the same config (any history)."""
    if check:
        check_compatible(capture(env), state)
    # 1. physics, through Isaac Lab's scene-state API, then the real actuator targets (reset_to sets them to the pose)
    scene_state: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if key.startswith("scene."):
            _, kind, name, *field = key.split(".")
            entry = scene_state.setdefault(kind, {})
            if field:
                entry.setdefault(name, {})[field[0]] = value.to(env.device)
            else:
                entry[name] = value.to(env.device)
    for kind in ("articulation", "rigid_object", "cable_object", "deformable_object", "gripper"):
        scene_state.setdefault(kind, {})
    env.scene.reset_to(scene_state, env_ids=None, is_relative=False)
    for name, art in env.scene.articulations.items():
        cmd = art.actuators.target_command
        cmd.set_position_index(value=state[f"actuators.{name}.position"].to(env.device))
        cmd.set_velocity_index(value=state[f"actuators.{name}.velocity"].to(env.device))
        cmd.set_effort_index(value=state[f"actuators.{name}.effort"].to(env.device))
        for group, model in _lab_actuator_models(art):
            _copy_into(_tensors(model), state, f"actuators.{name}.{group}")
    env.scene.write_data_to_sim()
    # 2. forward kinematics; this consumes the reset flags the writes raised, which clears the solver buffers...
    env.sim.forward()
    # 3. ...so they go back afterwards
    _copy_into(_solver_buffers(), state, "solver")
    # 4. asset data: the finite-difference state and the clock it is differenced over; every other cached quantity
    #    is stale in the restored timeline
    from isaaclab.utils.buffers import TimestampedBuffer

    for name, asset in _assets(env):
        data = asset.data
        data._sim_timestamp = float(state[f"data.{name}.sim_timestamp"])
        for buffer in vars(data).values():
            if isinstance(buffer, TimestampedBuffer):
                buffer.timestamp = -1.0
        _copy_into(_asset_caches(data), state, f"data.{name}")
        for acc in ACC_BUFFERS:
            if getattr(data, acc, None) is not None:
                getattr(data, acc).timestamp = float(state[f"data.{name}.{acc}.timestamp"])
    # 5. managers, counters, RNG
    _copy_into(_manager_tensors(env), state, "managers")
    env.episode_length_buf.copy_(state["env.episode_length_buf"])
    env.common_step_counter = int(state["env.common_step_counter"])
    env._sim_step_counter = int(state["env.sim_step_counter"])
    _set_rng_state(env.device, {k[4:]: v for k, v in state.items() if k.startswith("rng.")})


def check_compatible(ours: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Raise unless `saved` has exactly this env's entries, with the same shapes (same task, num_envs, config)."""
    # RNG entries depend on the device (a CUDA generator only on GPU), so they may differ
    required = lambda keys: {k for k in keys if ".rng." not in f".{k}"}  # noqa: E731
    missing, extra = sorted(required(ours) - set(saved)), sorted(required(saved) - set(ours))
    if missing or extra:
        more = lambda keys: " ..." if len(keys) > 4 else ""  # noqa: E731
        raise KeyError(f"the saved env state does not fit this env (another task or config, or saved by another "
                       f"version of leanvla?): "
                       f"missing {missing[:4]}{more(missing)}, unexpected {extra[:4]}{more(extra)}")
    for key, value in ours.items():
        if key in saved and saved[key].shape != value.shape:
            raise ValueError(f"the saved env state's {key!r} has shape {tuple(saved[key].shape)}, this env's is "
                             f"{tuple(value.shape)} (another num_envs or config?)")


# ---------------------------------------------------------------------------------------------------------------------
# where the state lives
# ---------------------------------------------------------------------------------------------------------------------


def _assets(env):
    return [*env.scene.articulations.items(), *env.scene.rigid_objects.items()]


def _asset_caches(data) -> dict[str, torch.Tensor]:
    """Views of an asset's finite-difference buffers: previous velocities and the accelerations taken from them."""
    out = {name: _torch(getattr(data, name)) for name in PREVIOUS if getattr(data, name, None) is not None}
    for name in ACC_BUFFERS:
        buffer = getattr(data, name, None)
        if buffer is not None and buffer.data is not None:
            out[name] = _torch(buffer.data)
    return out


def _lab_actuator_models(art):
    from isaaclab.actuators import ActuatorBase

    for group in art.actuators:
        model = art.actuators[group]
        if isinstance(model, ActuatorBase):
            yield group, model


def mujoco_warp_solver():
    """The running MuJoCo-Warp solver of a kit-less env, or None (another physics backend, or MuJoCo on the CPU)."""
    try:
        from isaaclab_newton.physics import NewtonManager
    except ImportError:
        return None
    solver = NewtonManager._solver
    if getattr(solver, "mjw_data", None) is None or getattr(solver, "use_mujoco_cpu", False):
        return None
    return solver


def _solver_buffers() -> dict[str, torch.Tensor]:
    """MuJoCo-Warp's per-world buffers that carry over between steps (empty for other physics backends)."""
    solver = mujoco_warp_solver()
    if solver is None:
        return {}
    return {name: _torch(getattr(solver.mjw_data, name)) for name in SOLVER_BUFFERS}


def _manager_tensors(env) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    am = env.action_manager
    out["action._action"], out["action._prev_action"] = am._action, am._prev_action
    for name, term in am._terms.items():
        out.update(_prefixed(f"action.{name}", _tensors(term, depth=1)))
    for name, term in getattr(env.command_manager, "_terms", {}).items():
        out.update(_prefixed(f"command.{name}", _tensors(term, depth=1)))
    em = env.event_manager
    for attr in ("_interval_term_time_left", "_reset_term_last_triggered_step_id", "_reset_term_last_triggered_once"):
        for i, t in enumerate(getattr(em, attr, [])):
            out[f"event.{attr}.{i}"] = t
    for mode, cfgs in getattr(em, "_mode_class_term_cfgs", {}).items():
        for i, cfg in enumerate(cfgs):  # class-based event terms keep state of their own
            out.update(_prefixed(f"event.{mode}.{i}", _tensors(cfg.func)))
    om = env.observation_manager
    for group, buffers in om._group_obs_term_history_buffer.items():
        for term, buffer in buffers.items():
            out.update(_prefixed(f"obs_history.{group}.{term}", _tensors(buffer)))
    out["reward._episode_sum_buf"] = env.reward_manager._episode_sum_buf
    tm = env.termination_manager
    out["termination._term_dones"] = tm._term_dones
    out["termination._last_episode_dones"] = tm._last_episode_dones
    return out


def _rng_state(device) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    device = torch.device(device)
    if device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_state(device, state: dict[str, torch.Tensor]) -> None:
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].cpu())
    device = torch.device(device)
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"].cpu(), device)


# ---------------------------------------------------------------------------------------------------------------------
# generic plumbing
# ---------------------------------------------------------------------------------------------------------------------


def _torch(array) -> torch.Tensor:
    """A torch view of a warp array (shares memory, so writing it writes the simulator), or the tensor itself."""
    if isinstance(array, torch.Tensor):
        return array
    import warp as wp

    return wp.to_torch(array)


def _tensors(obj, depth: int = 0) -> dict[str, torch.Tensor]:
    """Tensor (torch or warp) attributes of `obj`, including lists/dicts of them; `depth` levels into plain helper
    objects (e.g. an action term's IK controller), never into envs, scenes, assets, sensors or managers."""
    import warp as wp
    from isaaclab.assets import AssetBase
    from isaaclab.envs import ManagerBasedEnv
    from isaaclab.managers import ManagerBase
    from isaaclab.scene import InteractiveScene
    from isaaclab.sensors import SensorBase

    shared = (ManagerBasedEnv, InteractiveScene, AssetBase, SensorBase, ManagerBase)
    out: dict[str, torch.Tensor] = {}
    for name, value in vars(obj).items():
        if isinstance(value, (torch.Tensor, wp.array)):
            out[name] = _torch(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            out.update({f"{name}.{i}": v for i, v in enumerate(value)})
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        elif (depth > 0 and hasattr(value, "__dict__") and not isinstance(value, shared)
              and not hasattr(value, "__dataclass_fields__") and not isinstance(value, type)):
            out.update(_prefixed(name, _tensors(value, depth - 1)))
    return out


def _prefixed(prefix: str, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in d.items()}


def _copy_into(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], prefix: str) -> None:
    for name, target in targets.items():
        key = f"{prefix}.{name}"
        if key not in state:
            continue
        value = state[key]
        if value.shape != target.shape:
            raise ValueError(f"env state {key!r} has shape {tuple(value.shape)}, this env's is {tuple(target.shape)}")
        target.copy_(value.to(target.device, target.dtype))
