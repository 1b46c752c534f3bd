"""What leanvla adds to Isaac Lab's task configs: kit-less fixes, the stack-cube reward, observations, keyed resets.

A `TaskSpec` says how to turn one task's Isaac Lab observations into leanvla's `{"rgb", "state"}` and what its
reward and success are. `GenericSpec` serves any state task (obs group "policy" concatenated into `state`,
the task's own reward). `StackCubeSpec` turns the (reward-less) stack-cube visuomotor task into an RL task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from envs.config import STACK_CUBE, EnvConfig

STACK_INSTRUCTION = "Stack the red block on the blue block, then stack the green block on the red block."
STACK_TASKS = (STACK_CUBE, f"{STACK_CUBE}-Cosmos")
# leanvla's own tasks, each built from an Isaac Lab task: id -> the Isaac Lab id it starts from.
LIFT_CUBE = "Leanvla-Lift-Red-Cube-Franka-IK-Rel-Visuomotor"
LIFT_RED_OR_BLUE = "Leanvla-Lift-Red-Or-Blue-Cube-Franka-IK-Rel-Visuomotor"
LEANVLA_TASKS = {LIFT_CUBE: STACK_CUBE, LIFT_RED_OR_BLUE: STACK_CUBE}
LIFT_INSTRUCTION = "Pick up the red block."
LIFT_BLUE_INSTRUCTION = "Pick up the blue block."

# Franka finger drives [N/m, N·s/m]. Isaac Lab's Franka config leaves them `None` (read from the USD) and drives
# only finger 1, relying on a mimic constraint for finger 2; kit-less, both fingers are driven directly.
FINGER_STIFFNESS, FINGER_DAMPING = 2.0e3, 1.0e2
# Tool centre point: 10.34 cm along the hand's z axis (Isaac Lab's stack ee_frame offset).
TCP_OFFSET = 0.1034


def spec_for(task: str) -> TaskSpec:
    if task == LIFT_CUBE:
        return LiftCubeSpec()
    if task == LIFT_RED_OR_BLUE:
        return LiftRedOrBlueSpec()
    return StackCubeSpec() if task in STACK_TASKS else GenericSpec()


def set_episode_steps(env_cfg, steps: int) -> None:
    """Set the time limit to `steps` env steps. Isaac Lab counts ceil(episode_length_s / (dt x decimation)) steps,
    and steps x dt x decimation can round up past a whole number (53 x 0.01 x 5 / 0.05 = 53.00000000000001 -> 54),
    so the length is half a step short of it."""
    env_cfg.episode_length_s = (steps - 0.5) * env_cfg.sim.dt * env_cfg.decimation


def patch_robot(env_cfg, kitless: bool) -> None:
    """Kit-less fixes for a Franka robot in any task (Newton ignores `disable_gravity` and reads no finger gains)."""
    robot = getattr(env_cfg.scene, "robot", None)
    usd_path = getattr(getattr(robot, "spawn", None), "usd_path", "") or ""
    if not kitless or "FrankaEmika" not in usd_path:
        return
    from isaaclab.actuators import ImplicitActuatorCfg
    from isaaclab_newton.sim.schemas import MujocoRigidBodyCfg

    fingers = [name for name, a in robot.actuators.items() if any("finger" in j for j in a.joint_names_expr)]
    for name in fingers:
        del robot.actuators[name]
    robot.actuators["panda_fingers"] = ImplicitActuatorCfg(
        joint_names_expr=["panda_finger_joint.*"],
        effort_limit_sim=200.0,
        stiffness=FINGER_STIFFNESS,
        damping=FINGER_DAMPING,
    )
    props = robot.spawn.rigid_props
    props = list(props) if isinstance(props, (list, tuple)) else ([props] if props is not None else [])
    if any(getattr(p, "disable_gravity", False) for p in props):
        # The task wants a gravity-free arm (task-space control); Newton needs it authored as gravity compensation.
        props.append(MujocoRigidBodyCfg(gravcomp=1.0))
    robot.spawn.rigid_props = props


class GenericSpec:
    """Any Isaac Lab state task: `state` = the concatenated "policy" observation group; the task's own reward."""

    camera_names: tuple[str, ...] = ()
    instruction = ""
    keyed_resets = False
    ls_iterations: int | None = None
    """MuJoCo-Warp line-search iterations to use (None: the Isaac Lab config's)."""
    idle_action: tuple[float, ...] | None = None
    """An action that holds the robot still, or None. A chunked policy's actions left over when an episode ends
    mid-chunk are replaced by it, so the next episode does not start with the last one's moves."""
    milestones: tuple[str, ...] = ()
    """The task's milestones, in the order an expert reaches them; the last one is the task's success."""

    def patch(self, env_cfg, cfg: EnvConfig) -> None:
        policy = getattr(env_cfg.observations, "policy", None)
        if policy is not None and hasattr(policy, "concatenate_terms"):
            policy.concatenate_terms = True

    def bind(self, env, adapter) -> None:
        pass

    def instructions(self, num_envs: int) -> str | list[str]:
        """The language instruction: one for every sub-env, or one per sub-env (a multi-task env)."""
        return self.instruction

    def observe(self, obs: dict) -> dict[str, torch.Tensor]:
        policy = obs["policy"]
        if isinstance(policy, dict):
            raise ValueError(f"The task's 'policy' observation group is not a flat tensor: {sorted(policy)}")
        return {"state": policy.to(torch.float32)}

    def success(self, env) -> torch.Tensor:
        terms = env.termination_manager.active_terms
        if "success" in terms:
            return env.termination_manager.get_term("success").clone()
        return torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)

    def reward(self, env, env_reward: torch.Tensor, success: torch.Tensor) -> torch.Tensor:
        return env_reward

    def reached(self, env, success: torch.Tensor) -> torch.Tensor:
        """[N, len(milestones)] bool: the milestones that held in the step just taken."""
        return torch.zeros(env.num_envs, 0, dtype=torch.bool, device=env.device)

    def privileged(self, env) -> dict[str, torch.Tensor]:
        return {}


# ------------------------------------------------------------------------------------------------------------------
# stack-cube
# ------------------------------------------------------------------------------------------------------------------

CUBES = ("cube_1", "cube_2", "cube_3")  # blue (bottom), red (middle), green (top)
CUBE_POSE_RANGE = {"x": (0.4, 0.6), "y": (-0.10, 0.10), "z": (0.0203, 0.0203), "yaw": (-1.0, 1.0)}
CUBE_MIN_SEPARATION = 0.1
JOINT_NOISE_STD = 0.02
DEFAULT_STACK_STEPS = 448  # 22.4 s at 20 Hz, as RLinf
DEFAULT_LIFT_STEPS = 160  # 8 s; the expert lifts the red block after about 100 steps
LIFT_HEIGHT = 0.05  # lift success: the block's centre this far above its resting height [m]
REACH_DISTANCE = 0.03  # milestone "reach": the tool centre point this close to the block's centre [m]
GRASP_HEIGHT = 0.01  # milestone "grasp": a reached block held this far above its resting height [m]
GRASP_GAP = 0.05  # ... with the fingers closed this far (sum of the two finger joints) or less [m]


@dataclass(frozen=True)
class FrankaIndices:
    hand: int  # body index of panda_hand
    fingers: list[int]  # joint indices of the two finger joints
    arm: list[int]  # the other joint indices
    tcp_offset: torch.Tensor  # [3] on the env's device


def franka_indices(env) -> FrankaIndices:
    """Body and joint indices of the scene's Franka, looked up once per env (observations need them every step)."""
    cached = getattr(env, "_leanvla_franka", None)
    if cached is None:
        robot = env.scene["robot"]
        fingers = robot.find_joints("panda_finger_joint.*")[0]
        cached = FrankaIndices(hand=robot.find_bodies("panda_hand")[0][0], fingers=fingers,
                               arm=[i for i in range(robot.num_joints) if i not in fingers],
                               tcp_offset=torch.tensor([0.0, 0.0, TCP_OFFSET], device=env.device))
        env._leanvla_franka = cached
    return cached


def tcp_pose(env) -> tuple[torch.Tensor, torch.Tensor]:
    """Tool-centre-point position (env frame) and xyzw orientation, from the hand body (valid right after reset)."""
    from isaaclab.utils.math import quat_apply

    ids = franka_indices(env)
    robot = env.scene["robot"]
    pos_w = robot.data.body_pos_w.torch[:, ids.hand]
    quat_w = robot.data.body_quat_w.torch[:, ids.hand]
    return pos_w + quat_apply(quat_w, ids.tcp_offset.expand_as(pos_w)) - env.scene.env_origins, quat_w


def axis_angle(quat: torch.Tensor) -> torch.Tensor:
    """xyzw quaternion -> axis-angle vector, as LIBERO's quat2axisangle (which RLinf's Isaac Lab stack-cube state
    uses) computes it: angle 2 acos(w) in [0, 2 pi], axis the direction of (x, y, z); zero where that is undefined.
    The quaternion's sign is kept. Isaac Lab's axis_angle_from_quat first flips it to w >= 0 (angle <= pi): for a hand
    pointing down, a half turn about a horizontal axis, w is near 0, and that vector jumps between +pi n and -pi n
    from one step to the next."""
    w = quat[..., 3].clamp(-1.0, 1.0)
    sin_half = torch.sqrt(1.0 - w * w)
    scale = torch.where(sin_half > 0, 2.0 * torch.acos(w) / sin_half.clamp_min(1e-12), torch.zeros_like(w))
    return quat[..., :3] * scale.unsqueeze(-1)


def stack_state(env) -> torch.Tensor:
    """The 8-d policy state: tcp position (3), tcp orientation as axis-angle (3, `axis_angle`), two finger positions
    (2)."""
    pos, quat = tcp_pose(env)
    fingers = env.scene["robot"].data.joint_pos.torch[:, franka_indices(env).fingers]
    return torch.cat([pos, axis_angle(quat), fingers], dim=-1)


def cube_positions(env) -> torch.Tensor:
    """[N, 3, 3] the centres of the blue, red and green blocks (env frame)."""
    return torch.stack([env.scene[c].data.root_pos_w.torch - env.scene.env_origins for c in CUBES], dim=1)


def finger_gap(env) -> torch.Tensor:
    """[N] the distance between the Franka's fingers: the sum of the two finger joints [m]."""
    return env.scene["robot"].data.joint_pos.torch[:, franka_indices(env).fingers].sum(-1)


def above_rest(block_pos: torch.Tensor, height: float) -> torch.Tensor:
    """[...] bool: the block centres [..., 3] (env frame) are more than `height` above a block's resting height."""
    return block_pos[..., 2] > CUBE_POSE_RANGE["z"][0] + height


def pick_progress(tcp_pos: torch.Tensor, finger_gap: torch.Tensor, block_pos: torch.Tensor) -> torch.Tensor:
    """[N, 3] bool: reach, grasp, lift of one block per env. Reach: the tool centre point within REACH_DISTANCE of
    the block's centre. Grasp: reached, the fingers closed to GRASP_GAP or less, the block GRASP_HEIGHT above
    its resting height (held, not pushed). Lift: the block LIFT_HEIGHT above its resting height."""
    reach = torch.linalg.vector_norm(tcp_pos - block_pos, dim=-1) < REACH_DISTANCE
    grasp = reach & (finger_gap <= GRASP_GAP) & above_rest(block_pos, GRASP_HEIGHT)
    return torch.stack([reach, grasp, above_rest(block_pos, LIFT_HEIGHT)], dim=-1)


def sample_stack_layout(key: int, num_arm_joints: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial state one reset key names: cube poses [3, 4] (x, y, z, yaw) and arm joint offsets [num_arm_joints].

    Cube positions are drawn uniformly in CUBE_POSE_RANGE with rejection until every pair is more than
    CUBE_MIN_SEPARATION apart (as Isaac Lab's `randomize_object_pose`); joint offsets are Gaussian.
    """
    g = torch.Generator().manual_seed(int(key) % (2**63))
    lo = torch.tensor([CUBE_POSE_RANGE[k][0] for k in ("x", "y", "z", "yaw")], dtype=torch.float64)
    hi = torch.tensor([CUBE_POSE_RANGE[k][1] for k in ("x", "y", "z", "yaw")], dtype=torch.float64)
    poses: list[torch.Tensor] = []
    for _ in range(len(CUBES)):
        for attempt in range(5000):
            pose = lo + (hi - lo) * torch.rand(4, generator=g, dtype=torch.float64)
            if all(torch.dist(pose[:3], p[:3]) > CUBE_MIN_SEPARATION for p in poses) or attempt == 4999:
                poses.append(pose)
                break
    joint_offsets = JOINT_NOISE_STD * torch.randn(num_arm_joints, generator=g, dtype=torch.float64)
    return torch.stack(poses).float(), joint_offsets.float()


def keyed_stack_reset(env, env_ids: torch.Tensor) -> None:
    """Reset event: place cubes and robot joints from each env's reset key (equal keys → identical states)."""
    from isaaclab.utils.math import quat_from_euler_xyz

    if isinstance(env_ids, slice) or env_ids is None:  # Isaac Lab passes slice(None) for "all envs"
        env_ids = torch.arange(env.num_envs, device=env.device)[env_ids if env_ids is not None else slice(None)]
    env_ids = torch.as_tensor(env_ids, device=env.device).flatten()
    if env_ids.numel() == 0:
        return
    take_keys = getattr(env, "leanvla_take_reset_keys", None)
    keys = take_keys(env_ids) if take_keys is not None else torch.randint(0, 2**62, (len(env_ids),))
    robot = env.scene["robot"]
    arm = franka_indices(env).arm
    layouts = [sample_stack_layout(int(k), len(arm)) for k in keys.tolist()]
    cube_poses = torch.stack([c for c, _ in layouts]).to(env.device)  # [n, 3, 4]
    offsets = torch.stack([j for _, j in layouts]).to(env.device)  # [n, arm]

    joint_pos = robot.data.default_joint_pos.torch[env_ids].clone()
    joint_pos[:, arm] += offsets
    limits = robot.data.soft_joint_pos_limits.torch[env_ids]
    joint_pos = joint_pos.clamp(limits[..., 0], limits[..., 1])
    joint_vel = torch.zeros_like(joint_pos)
    robot.actuators.target_command.set_position_index(value=joint_pos, env_ids=env_ids)
    robot.actuators.target_command.set_velocity_index(value=joint_vel, env_ids=env_ids)
    robot.write_joint_position_to_sim_index(position=joint_pos, env_ids=env_ids)
    robot.write_joint_velocity_to_sim_index(velocity=joint_vel, env_ids=env_ids)

    zeros = torch.zeros(len(env_ids), device=env.device)
    for i, name in enumerate(CUBES):
        pose = cube_poses[:, i]
        position = pose[:, :3] + env.scene.env_origins[env_ids]
        orientation = quat_from_euler_xyz(zeros, zeros, pose[:, 3])
        cube = env.scene[name]
        cube.write_root_pose_to_sim_index(root_pose=torch.cat([position, orientation], dim=-1), env_ids=env_ids)
        cube.write_root_velocity_to_sim_index(root_velocity=torch.zeros(len(env_ids), 6, device=env.device), env_ids=env_ids)


class StackCubeSpec(GenericSpec):
    """Franka stack-cube, visuomotor: table + wrist RGB, 8-d state, reward 1.0 on the step the stack succeeds."""

    camera_names = ("table_cam", "wrist_cam")
    instruction = STACK_INSTRUCTION
    keyed_resets = True
    ls_iterations = 50  # Isaac Lab's stack config: 15, which the expert's grasps exceed in most steps (CPU probe)
    idle_action = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # no IK-relative motion, gripper open (as reset leaves it)
    episode_steps = DEFAULT_STACK_STEPS
    milestones = ("reach_red", "grasp_red", "lift_red", "place_red", "grasp_green", "place_green")

    def patch(self, env_cfg, cfg: EnvConfig) -> None:
        from isaaclab.managers import EventTermCfg, ObservationGroupCfg, ObservationTermCfg, TerminationTermCfg

        kitless = cfg.sim == "kitless"
        for name in self.camera_names:
            camera = getattr(env_cfg.scene, name)
            camera.height = camera.width = cfg.image_size
            camera.data_types = ["rgb"]
            if kitless:
                from isaaclab_newton.renderers import NewtonWarpRendererCfg

                camera.renderer_cfg = NewtonWarpRendererCfg()
                # Warp cameras read their pose from the physics state; a camera riding on the hand must be
                # told to refresh it (Kit moves the USD prim instead).
                camera.update_latest_camera_pose = "/Robot/" in camera.prim_path
                camera.prim_path = _resolve_robot_subpath(env_cfg.scene.robot.spawn.usd_path, camera.prim_path)

        # Observations: exactly what the policy sees (no privileged terms computed every step).
        policy = ObservationGroupCfg(concatenate_terms=False, enable_corruption=False)
        policy.state = ObservationTermCfg(func=stack_state)
        for name in self.camera_names:
            setattr(policy, name, ObservationTermCfg(func=_camera_rgb, params={"name": name}))
        env_cfg.observations.policy = policy
        env_cfg.observations.subtask_terms = None

        # Resets from keys; no Kit-only visual randomisation (lights, textures from NVIDIA's server).
        env_cfg.events = type(env_cfg.events)() if env_cfg.events is not None else None
        for name in list(vars(env_cfg.events)):
            setattr(env_cfg.events, name, None)
        env_cfg.events.keyed_reset = EventTermCfg(func=keyed_stack_reset, mode="reset")
        env_cfg.terminations.leanvla_progress = TerminationTermCfg(func=self.record_progress)

        set_episode_steps(env_cfg, self.episode_steps)

    def bind(self, env, adapter) -> None:
        env.leanvla_take_reset_keys = adapter.take_reset_keys

    def observe(self, obs: dict) -> dict[str, torch.Tensor]:
        policy = obs["policy"]
        rgb = torch.stack([policy[name] for name in self.camera_names], dim=1)
        return {"rgb": rgb, "state": policy["state"]}

    def success(self, env) -> torch.Tensor:
        return env.termination_manager.get_term("success").clone()

    def reward(self, env, env_reward: torch.Tensor, success: torch.Tensor) -> torch.Tensor:
        return success.to(torch.float32)

    def record_progress(self, env) -> torch.Tensor:
        """A termination term that never terminates: it stores `progress` on the env. Isaac Lab evaluates its
        terminations before it resets the envs that finished, so an episode's last step is judged on its own state
        (an observation term would see the next episode's first)."""
        env.leanvla_progress = self.progress(env)
        return torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)

    def progress(self, env) -> torch.Tensor:
        """[N, 5] bool: the milestones before success that hold now (reach, grasp and lift the red block, red on
        blue and released, grasp the green block)."""
        from isaaclab.managers import SceneEntityCfg
        from isaaclab_tasks.contrib.stack.mdp import cubes_stacked

        tcp, cubes, gap = tcp_pose(env)[0], cube_positions(env), finger_gap(env)
        red, green = pick_progress(tcp, gap, cubes[:, 1]), pick_progress(tcp, gap, cubes[:, 2])
        # Isaac Lab's own stacking test (positions, gripper open, cubes at rest), for the first pair only
        red_on_blue = cubes_stacked(env, cube_1_cfg=SceneEntityCfg(CUBES[0]), cube_2_cfg=SceneEntityCfg(CUBES[1]),
                                    cube_3_cfg=None)
        return torch.cat([red, red_on_blue[:, None], green[:, 1:2]], dim=-1)

    def reached(self, env, success: torch.Tensor) -> torch.Tensor:
        return torch.cat([env.leanvla_progress, success[:, None]], dim=-1)

    def privileged(self, env) -> dict[str, torch.Tensor]:
        robot = env.scene["robot"]
        tcp_pos, tcp_quat = tcp_pose(env)
        cube_pos = cube_positions(env)
        cube_quat = torch.stack([env.scene[c].data.root_quat_w.torch for c in CUBES], dim=1)
        return {
            "tcp_pos": tcp_pos,
            "tcp_quat": tcp_quat,
            "cube_pos": cube_pos,
            "cube_quat": cube_quat,
            "joint_pos": robot.data.joint_pos.torch.clone(),
        }


def cube_lifted(env, height: float, cube: str = CUBES[1]) -> torch.Tensor:
    """[N] bool: the block's centre (by default the red one's) is `height` above its resting height."""
    return above_rest(env.scene[cube].data.root_pos_w.torch - env.scene.env_origins, height)


def told_blue(num_envs: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N] bool: the sub-envs of LiftRedOrBlueSpec told to lift the blue block (the second half; the first: red)."""
    return torch.arange(num_envs, device=device) >= (num_envs + 1) // 2


def instructed_block(env) -> torch.Tensor:
    """[N, 3] the centre of the block each sub-env of LiftRedOrBlueSpec is told to lift (env frame)."""
    cubes = cube_positions(env)
    return torch.where(told_blue(env.num_envs, env.device)[:, None], cubes[:, 0], cubes[:, 1])


def instructed_cube_lifted(env, height: float) -> torch.Tensor:
    """[N] bool: the block each sub-env of LiftRedOrBlueSpec is told to lift is up."""
    return above_rest(instructed_block(env), height)


class LiftCubeSpec(StackCubeSpec):
    """The first pick of stack-cube as a task of its own: same scene, cameras, state, actions and keyed resets;
    success (reward 1.0, episode ends) once the red block is lifted LIFT_HEIGHT; 160 steps. The scripted expert
    solves it by starting stack-cube's first round."""

    instruction = LIFT_INSTRUCTION
    episode_steps = DEFAULT_LIFT_STEPS
    milestones = ("reach", "grasp", "lift")

    def patch(self, env_cfg, cfg: EnvConfig) -> None:
        from isaaclab.managers import TerminationTermCfg

        super().patch(env_cfg, cfg)
        env_cfg.terminations.success = TerminationTermCfg(func=self.success_test, params={"height": LIFT_HEIGHT})

    success_test = staticmethod(cube_lifted)

    def target_block(self, env) -> torch.Tensor:
        """[N, 3] the centre of the block each sub-env is told to lift."""
        return cube_positions(env)[:, 1]

    def progress(self, env) -> torch.Tensor:
        """[N, 2] bool: reach and grasp the block to lift (the last milestone, lift, is the success)."""
        return pick_progress(tcp_pose(env)[0], finger_gap(env), self.target_block(env))[:, :2]


class LiftRedOrBlueSpec(LiftCubeSpec):
    """Two tasks in one vectorised env, told apart only by the instruction: the first half of the sub-envs are told
    to pick up the red block, the second half the blue block, and each succeeds once its own block is lifted
    LIFT_HEIGHT. (In halves, so that GRPO's groups of consecutive sub-envs hold one task each.)"""

    success_test = staticmethod(instructed_cube_lifted)

    def target_block(self, env) -> torch.Tensor:
        return instructed_block(env)

    def instructions(self, num_envs: int) -> list[str]:
        return [LIFT_BLUE_INSTRUCTION if blue else LIFT_INSTRUCTION for blue in told_blue(num_envs).tolist()]


def _camera_rgb(env, name: str) -> torch.Tensor:
    return env.scene[name].data.output["rgb"]


def _resolve_robot_subpath(robot_usd: str, prim_path: str) -> str:
    """Replace a regex under `/Robot/` (e.g. `(Geometry/.*/)?panda_hand`) with the concrete path in the robot USD.

    The Warp renderer's camera view needs a concrete prim path; Isaac Lab's configs use a regex so that one
    config serves several Franka USD layouts.
    """
    import re

    from pxr import Usd

    head, sep, tail = prim_path.partition("/Robot/")
    if not sep or not any(c in tail for c in "()*?[]|"):
        return prim_path
    parent, _, leaf = tail.rpartition("/")
    stage = Usd.Stage.Open(robot_usd)
    root = stage.GetDefaultPrim().GetPath().pathString
    pattern = re.compile(parent)
    for prim in stage.Traverse():
        relative = prim.GetPath().pathString[len(root) + 1 :]
        if pattern.fullmatch(relative):
            return f"{head}/Robot/{relative}/{leaf}"
    raise ValueError(f"Camera parent {parent!r} matches no prim in {robot_usd}")
