"""The scripted expert stacks on the kit-less env; any Isaac Lab state task runs through the same adapter."""

import json
import math
import types

import numpy as np
import pytest
import torch

from envs import EnvConfig, make_env, record_demos
from envs.assets import FRANKA_ARM_GAINS, FRANKA_FINGER_GAINS, ensure_offline_assets
from envs.expert import APPROACH, CLOSE, DONE, StackExpert
from envs.lerobot import LeRobotDataset
from envs.tasks import (LIFT_BLUE_INSTRUCTION, LIFT_CUBE, LIFT_HEIGHT, LIFT_INSTRUCTION, LIFT_RED_OR_BLUE,
                         STACK_INSTRUCTION, axis_angle, pick_progress, set_episode_steps)


def test_offline_franka_has_real_drives():
    from pxr import Usd, UsdPhysics

    root = ensure_offline_assets()
    stage = Usd.Stage.Open(str(root / "Isaac/IsaacLab/Robots/FrankaEmika/franka_panda.usda"))
    drives = {}
    for prim in stage.Traverse():
        for kind in ("angular", "linear"):
            if prim.HasAPI(UsdPhysics.DriveAPI, kind):
                drive = UsdPhysics.DriveAPI(prim, kind)
                drives[prim.GetName()] = (drive.GetStiffnessAttr().Get(), drive.GetDampingAttr().Get())
    assert sorted(drives) == [f"panda_finger_joint{i}" for i in (1, 2)] + [f"panda_joint{i}" for i in range(1, 8)]
    assert drives["panda_finger_joint2"] == pytest.approx(FRANKA_FINGER_GAINS)
    deg = 3.141592653589793 / 180  # USD stores angular gains per degree
    assert drives["panda_joint4"] == pytest.approx((FRANKA_ARM_GAINS[0] * deg, FRANKA_ARM_GAINS[1] * deg))
    # textures travel with the folder: referenced relative to their layer
    assert (root / "Isaac/IsaacLab/Robots/FrankaEmika/Payload/Textures/colors.png").exists()


def test_expert_stacks_all_three_cubes_and_records_a_lerobot_dataset(tmp_path):
    # one episode, fixed seed: with max_attempts=1 recording fails unless the expert's first episode succeeds
    args = record_demos.Args(out=tmp_path / "demos", episodes=1, max_attempts=1, seed=0,
                             env=EnvConfig(num_envs=1, device="cpu", image_size=16))
    root = record_demos.record(args)
    dataset = LeRobotDataset(root)
    assert len(dataset) == 1 and dataset.fps == 20
    episode = dataset.episode(0)
    length = len(episode.state)
    assert 100 < length < 448
    assert episode.state.shape == (length, 8) and episode.action.shape == (length, 7)
    assert episode.images["image"].shape == (length, 16, 16, 3) and episode.images["wrist_image"].dtype == np.uint8
    assert set(np.unique(episode.action[:, 6])) == {-1.0, 1.0}  # the gripper closed and opened
    # the tool orientation (axis-angle, the hand pointing down: a half turn) moves smoothly, no +-pi n jumps
    assert np.abs(np.diff(episode.state[:, 3:6], axis=0)).max() < 0.1
    assert np.linalg.norm(episode.state[:, 3:6], axis=1) == pytest.approx(np.pi, abs=0.1)
    assert episode.task == STACK_INSTRUCTION
    # each frame's label is the expert phase its action was taken in: the phases run in order, round by round
    rounds, phases = episode.labels["leanvla.expert_round"], episode.labels["leanvla.expert_phase"]
    assert rounds.dtype == np.int64 and rounds.shape == phases.shape == (length,)
    order = rounds * 100 + phases
    assert (np.diff(order) >= 0).all() and order[0] == 0
    assert set(phases[rounds == 0]) == set(range(8)) and set(range(6)) <= set(phases[rounds == 1])
    assert (episode.action[phases == CLOSE, 6] == -1.0).all() and (episode.action[phases == APPROACH, 6] == 1.0).all()
    assert dataset.labels(0).keys() == episode.labels.keys()
    modality = json.loads((root / "meta" / "modality.json").read_text())
    assert modality["state"]["gripper"] == {"start": 6, "end": 8}
    assert modality["video"]["wrist_image"] == {"original_key": "observation.images.wrist_image"}
    import pyarrow.parquet as pq

    table = pq.read_table(root / "data/chunk-000/episode_000000.parquet")
    assert table.column("next.reward").to_pylist()[-1] == 1.0 and sum(table.column("next.reward").to_pylist()) == 1.0
    assert json.loads((root / "meta" / "recording.json").read_text()) == {
        "recorder": "envs.record_demos", "task": "IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor", "seed": 0,
        "action_noise": 0.0, "num_envs": 1, "episodes": 1, "attempts": 1, "expert_success_rate": 1.0}


def test_lift_task_succeeds_when_the_expert_lifts_the_red_block(tmp_path):
    # the expert starts stack-cube's first round; the lift task ends with success once the red block is up
    args = record_demos.Args(out=tmp_path / "demos", episodes=1, max_attempts=1, seed=0,
                             env=EnvConfig(task=LIFT_CUBE, num_envs=1, device="cpu", image_size=16))
    root = record_demos.record(args)
    episode = LeRobotDataset(root).episode(0)
    assert episode.task == LIFT_INSTRUCTION and 40 < len(episode.state) < 160
    assert episode.action[-1, 6] == -1.0  # the gripper holds the block at the end (the expert: -1 closes)
    # success came from the lift: the tool centre point (state 0:3) rose while the gripper held the block
    assert episode.state[-1, 2] - episode.state[:, 2].min() > LIFT_HEIGHT / 2


def test_noisy_execution_records_the_experts_own_actions(tmp_path):
    """DART: with --action-noise the env executes perturbed actions (another trajectory than without noise), and the
    dataset holds the expert's own, whose translation never exceeds its 2 cm step (0.04 in action units)."""
    episodes = {}
    for noise in (0.0, 0.05):
        args = record_demos.Args(out=tmp_path / f"noise{noise}", episodes=1, max_attempts=3, seed=0, action_noise=noise,
                                 env=EnvConfig(task=LIFT_CUBE, num_envs=1, device="cpu", image_size=16))
        episodes[noise] = LeRobotDataset(record_demos.record(args)).episode(0)
    assert json.loads((tmp_path / "noise0.05" / "meta" / "recording.json").read_text())["action_noise"] == 0.05
    clean, noisy = episodes[0.0], episodes[0.05]
    length = min(len(clean.state), len(noisy.state))
    assert not np.allclose(clean.state[:length], noisy.state[:length], atol=1e-3)
    assert np.linalg.norm(noisy.action[:, :3], axis=1).max() <= 0.04 + 1e-6
    assert set(np.unique(noisy.action[:, 6])) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="--action-noise must be >= 0"):
        record_demos.record(record_demos.Args(out=tmp_path / "bad", action_noise=-0.1))
    with pytest.raises(ValueError, match="--episodes must be >= 1, got 0"):
        record_demos.record(record_demos.Args(out=tmp_path / "bad", episodes=0))


def test_the_idle_action_holds_the_robot_still_after_a_reset():
    env = make_env(EnvConfig(task=LIFT_CUBE, num_envs=2, device="cpu", image_size=16))
    try:
        start = env.reset(seed=3)["state"]
        assert env.idle_action.tolist() == [0.0] * 6 + [1.0]
        for _ in range(8):
            obs, *_ = env.step(env.idle_action.expand(2, -1).contiguous())
        moved = (obs["state"] - start).abs()
        assert moved[:, :3].max() < 2e-3  # the tool centre point stays within 2 mm
        assert moved[:, 6:].max() < 2e-3  # and the fingers stay open
    finally:
        env.close()


def test_two_instructions_in_one_env_each_succeed_on_their_own_block():
    """Even envs are told to lift the red block, odd envs the blue one; a block raised in each env ends the episode
    with success only where it is the instructed one."""
    env = make_env(EnvConfig(task=LIFT_RED_OR_BLUE, num_envs=2, device="cpu", image_size=16))
    try:
        assert env.instruction == [LIFT_INSTRUCTION, LIFT_BLUE_INSTRUCTION]
        scene = env.unwrapped.scene

        def raise_block(cube: str, env_id: int) -> None:
            ids = torch.tensor([env_id])
            pose = torch.cat([scene[cube].data.root_pos_w.torch[ids], scene[cube].data.root_quat_w.torch[ids]], -1)
            pose[:, 2] += 0.10  # well below the hand (about 0.25 m up at the start)
            scene[cube].write_root_pose_to_sim_index(root_pose=pose, env_ids=ids)
            scene[cube].write_root_velocity_to_sim_index(root_velocity=torch.zeros(1, 6), env_ids=ids)

        def step():
            _, reward, terminated, _, info = env.step(env.idle_action.expand(2, -1).contiguous())
            return reward.tolist(), terminated.tolist(), info["success"].tolist(), info["milestones"].tolist()

        env.reset(seed=0)
        raise_block("cube_1", 0)            # the blue block, in the env told to lift the red one
        raise_block("cube_2", 1)            # the red block, in the env told to lift the blue one
        assert env.milestones == ("reach", "grasp", "lift")
        assert step() == ([0.0, 0.0], [False, False], [False, False], [[False] * 3] * 2)
        env.reset(seed=0)
        raise_block("cube_2", 0)
        raise_block("cube_1", 1)
        # each episode reached "lift" (its success), and neither reached nor grasped the block with the hand
        assert step() == ([1.0, 1.0], [True, True], [True, True], [[False, False, True]] * 2)
        assert not env.milestones_reached.any()  # the next episodes start with none
    finally:
        env.close()


def test_pick_progress_hand_computed():
    rest = 0.0203  # a block's centre at rest
    block = torch.tensor([[0.5, 0.0, rest], [0.5, 0.0, rest + 0.02], [0.5, 0.0, rest + 0.02],
                          [0.5, 0.0, rest + 0.06], [0.5, 0.0, rest + 0.06]])
    tcp = block + torch.tensor([[0.0, 0.02, 0.0],    # 2 cm from the resting block: reached
                                [0.0, 0.0, 0.0],     # at the block, 2 cm up, fingers on it: grasped
                                [0.0, 0.0, 0.0],     # the same with the gripper open: not grasped
                                [0.0, 0.0, 0.0],     # held 6 cm up: grasped and lifted
                                [0.0, 0.0, 0.04]])   # 6 cm up, the hand 4 cm away (on another block): lifted only
    gap = torch.tensor([0.08, 0.0406, 0.08, 0.0406, 0.08])
    assert pick_progress(tcp, gap, block).tolist() == [[True, False, False], [True, True, False],
                                                       [True, False, False], [True, True, True],
                                                       [False, False, True]]


def test_episode_steps_survive_isaac_labs_conversion_to_seconds_and_back():
    # Isaac Lab's max_episode_length: ceil(episode_length_s / (dt x decimation)); the plain product overshoots
    assert math.ceil(53 * 0.01 * 5 / (0.01 * 5)) == 54
    for dt, decimation in [(0.01, 5), (1 / 120, 2), (1 / 60, 2), (0.005, 4)]:  # stack/lift, cartpole, reach, other
        cfg = types.SimpleNamespace(sim=types.SimpleNamespace(dt=dt), decimation=decimation)
        for steps in range(1, 3001):
            set_episode_steps(cfg, steps)
            assert math.ceil(cfg.episode_length_s / (dt * decimation)) == steps, (dt, decimation, steps)


def test_an_expert_stack_episode_reaches_every_milestone_in_order():
    env = make_env(EnvConfig(num_envs=1, device="cpu", image_size=16))
    try:
        expert = StackExpert(1, env.device)
        env.reset(seed=0)
        expert.reset()
        first_reached = {}  # milestone -> the step it was first reached
        for t in range(env.max_episode_steps):
            _, _, terminated, truncated, info = env.step(expert.act(env.privileged_state()))
            for name, reached in zip(env.milestones, info["milestones"][0].tolist()):
                if reached:
                    first_reached.setdefault(name, t)
            if terminated | truncated:
                break
        assert bool(terminated) and bool(info["success"])
        assert env.milestones == ("reach_red", "grasp_red", "lift_red", "place_red", "grasp_green", "place_green")
        assert info["milestones"].tolist() == [[True] * 6]
        steps = [first_reached[name] for name in env.milestones]
        assert steps == sorted(steps) and steps[-1] == t and len(set(steps)) == 6, first_reached
    finally:
        env.close()


def test_solver_overflows_are_counted_and_reported_once_instead_of_printed(capfd):
    """With Isaac Lab's line-search budget (15) the expert's grasp overflows it: the env counts those sub-env steps
    and reports them once when it closes, and the solver's kernels print nothing. leanvla's default (50) does not
    overflow in the same steps."""
    counts = {}
    for ls_iterations in (15, None):
        env = make_env(EnvConfig(num_envs=1, device="cpu", image_size=16, ls_iterations=ls_iterations))
        expert = StackExpert(1, env.device)
        env.reset(seed=0)
        expert.reset()
        for _ in range(120):
            env.step(expert.act(env.privileged_state()))
        counts[ls_iterations] = env.solver_overflows.counts()
        assert env.solver_overflows.sub_env_steps == 120 and env.solver_overflows.opt.ls_iterations == (ls_iterations or 50)
        env.close()
    assert counts[15].get("LS_ITERATIONS", 0) > 0 and counts[None] == {}
    out = capfd.readouterr().out
    assert "linesearch iterations limit" not in out
    assert out.count("the physics solver overflowed (ls_iterations 15, iterations 100) in LS_ITERATIONS "
                     f"{counts[15]['LS_ITERATIONS']} of 120 sub-env steps") == 1


def test_a_state_task_through_the_same_adapter():
    env = make_env(EnvConfig(task="Isaac-Cartpole", num_envs=3, device="cpu"))
    try:
        assert env.num_views == 0 and env.instruction == "" and env.action_dim == 1
        obs = env.reset(seed=0)
        assert set(obs) == {"state"} and obs["state"].shape == (3, env.state_dim) and obs["state"].dtype == torch.float32
        obs, reward, terminated, truncated, info = env.step(torch.zeros(3, 1))
        assert reward.shape == (3,) and (reward > 0).all()  # cartpole pays for staying alive
        assert not info["success"].any()
        with pytest.raises(ValueError, match="does not support keyed"):
            env.reset(reset_keys=torch.zeros(3, dtype=torch.long))
    finally:
        env.close()


def test_expert_state_machine_finishes_in_done():
    # DONE is the terminal phase: an expert told the episode is over stays there until reset
    expert = StackExpert(2)
    expert.phase[:] = DONE
    expert.reset(torch.tensor([1]))
    assert expert.phase.tolist() == [DONE, 0]


def test_axis_angle_keeps_the_quaternion_sign_as_libero_does():
    """LIBERO's quat2axisangle (numpy, written out here as the reference): angle 2 acos(w), axis (x, y, z) / |.|."""
    def libero(q):
        den = np.sqrt(1.0 - q[3] ** 2)
        return np.zeros(3) if np.isclose(den, 0.0) else q[:3] * 2.0 * np.arccos(q[3]) / den

    rng = np.random.default_rng(0)
    quats = rng.normal(size=(64, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)  # both signs of w
    quats = np.concatenate([quats, [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, -1.0]]])
    ours = axis_angle(torch.tensor(quats, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, np.stack([libero(q) for q in quats]), atol=1e-9)
    # a half turn about x, tilted a little either way: the vector stays near (pi, 0, 0) on both sides of w = 0,
    # where Isaac Lab's sign-canonical axis_angle_from_quat jumps to (-pi, 0, 0)
    from isaaclab.utils.math import axis_angle_from_quat

    tilts = torch.tensor([np.pi - 0.01, np.pi + 0.01], dtype=torch.float64)
    half_turns = torch.stack([torch.sin(tilts / 2), 0 * tilts, 0 * tilts, torch.cos(tilts / 2)], dim=-1)
    torch.testing.assert_close(axis_angle(half_turns)[:, 0], tilts)
    assert axis_angle_from_quat(half_turns)[:, 0].tolist() == pytest.approx([np.pi - 0.01, -(np.pi - 0.01)])
