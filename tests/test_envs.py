"""The Isaac Lab adapter on CPU, kit-less, with offline assets: contract, reward, terminations, group resets."""

import math

import pytest
import torch

from envs import EnvConfig, make_env
from envs.isaaclab_env import resolve_task
from envs.tasks import CUBE_MIN_SEPARATION, CUBE_POSE_RANGE, STACK_INSTRUCTION, sample_stack_layout

IMAGE = 48
LIMIT = 12  # a short time limit so truncation is cheap to reach


@pytest.fixture(scope="module")
def env():
    env = make_env(EnvConfig(num_envs=2, device="cpu", image_size=IMAGE, max_episode_steps=LIMIT))
    yield env
    env.close()


def _hold(env) -> torch.Tensor:
    """Zero motion with the gripper open."""
    actions = torch.zeros(env.num_envs, env.action_dim)
    actions[:, 6] = 1.0
    return actions


def _place_cubes(env, positions: list[tuple[float, float, float]]) -> None:
    """Teleport the three cubes (blue, red, green) to env-frame positions in every env, at rest."""
    scene = env.unwrapped.scene
    ids = torch.arange(env.num_envs)
    for name, pos in zip(("cube_1", "cube_2", "cube_3"), positions):
        position = torch.tensor(pos).expand(env.num_envs, 3) + scene.env_origins
        pose = torch.cat([position, torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(env.num_envs, 4)], dim=-1)
        scene[name].write_root_pose_to_sim_index(root_pose=pose, env_ids=ids)
        scene[name].write_root_velocity_to_sim_index(root_velocity=torch.zeros(env.num_envs, 6), env_ids=ids)


def test_contract_shapes_dtypes_ranges(env):
    assert (env.action_dim, env.state_dim, env.num_views) == (7, 8, 2)
    assert env.instruction == STACK_INSTRUCTION
    assert env.max_episode_steps == LIMIT and env.step_dt == pytest.approx(0.05)
    obs = env.reset(seed=0)
    assert obs["rgb"].shape == (2, 2, IMAGE, IMAGE, 3) and obs["rgb"].dtype == torch.uint8
    assert obs["state"].shape == (2, 8) and obs["state"].dtype == torch.float32
    obs, reward, terminated, truncated, info = env.step(_hold(env))
    assert reward.shape == (2,) and reward.dtype == torch.float32
    assert terminated.dtype == torch.bool and truncated.dtype == torch.bool and info["success"].dtype == torch.bool
    # images are not blank: each view has real contrast
    for view in range(2):
        assert obs["rgb"][:, view].float().std() > 10.0


def test_state_is_consistent_with_the_robot(env):
    env.reset(seed=1)
    obs, *_ = env.step(_hold(env))
    priv = env.privileged_state()
    state = obs["state"]
    torch.testing.assert_close(state[:, :3], priv["tcp_pos"])
    # a hand pointing down is a half turn about a horizontal axis
    assert torch.allclose(state[:, 3:6].norm(dim=-1), torch.full((2,), math.pi), atol=0.25)
    torch.testing.assert_close(state[:, 6:8], priv["joint_pos"][:, 7:9])
    assert ((state[:, 6:8] > 0.035) & (state[:, 6:8] <= 0.0401)).all()  # open fingers
    # the tool centre point sits above the table, in front of the robot
    assert (state[:, 2] > 0.1).all() and (state[:, 0] > 0.3).all()


def test_reward_and_termination_on_a_constructed_stack(env):
    env.reset(seed=2)
    _, reward, terminated, _, info = env.step(_hold(env))
    assert (reward == 0).all() and not terminated.any() and not info["success"].any()
    s = 0.0406  # block size
    _place_cubes(env, [(0.62, 0.15, 0.0203), (0.62, 0.15, 0.0203 + s), (0.62, 0.15, 0.0203 + 2 * s)])
    for _ in range(3):  # settle: success needs the cubes at rest
        _, reward, terminated, truncated, info = env.step(_hold(env))
        if terminated.all():
            break
    assert info["success"].all() and terminated.all() and not truncated.any()
    assert (reward == 1.0).all()
    assert (info["episode_return"] == 1.0).all()


def test_terminates_when_a_cube_falls_off_the_table(env):
    env.reset(seed=3)
    _place_cubes(env, [(1.3, 0.0, 0.05), (0.5, 0.05, 0.0203), (0.6, -0.1, 0.0203)])  # blue beyond the table edge
    for _ in range(10):
        _, reward, terminated, truncated, info = env.step(_hold(env))
        if terminated.all():
            break
    assert terminated.all() and not info["success"].any() and (reward == 0).all()


def test_truncates_at_the_time_limit(env):
    env.reset(seed=4)
    for t in range(LIMIT):
        obs, _, terminated, truncated, info = env.step(_hold(env))
        if t < LIMIT - 1:
            assert not truncated.any()
    assert truncated.all() and not terminated.any()
    assert (info["episode_length"] == LIMIT).all()
    # the returned obs already belongs to the next episode, whose counters restarted
    obs, *_ = env.step(_hold(env))
    assert (env.episode_length == 1).all()


def test_group_resets(env):
    obs = env.reset(seed=5, reset_keys=torch.tensor([11, 11]))
    priv = env.privileged_state()
    torch.testing.assert_close(priv["cube_pos"][0], priv["cube_pos"][1])
    torch.testing.assert_close(priv["cube_quat"][0], priv["cube_quat"][1])
    torch.testing.assert_close(priv["joint_pos"][0], priv["joint_pos"][1])
    torch.testing.assert_close(obs["state"][0], obs["state"][1])
    first = priv["cube_pos"][0].clone()

    env.reset(seed=5, reset_keys=torch.tensor([11, 12]))
    priv = env.privileged_state()
    torch.testing.assert_close(priv["cube_pos"][0], first)  # the same key gives the same start, in any reset
    assert (priv["cube_pos"][0] - priv["cube_pos"][1]).abs().max() > 1e-3
    assert (env.reset_keys == torch.tensor([11, 12])).all()


def test_fresh_keys_follow_the_seed(env):
    env.reset(seed=6)
    a = env.privileged_state()["cube_pos"].clone()
    env.reset(seed=6)
    torch.testing.assert_close(env.privileged_state()["cube_pos"], a)
    env.reset(seed=7)
    assert (env.privileged_state()["cube_pos"] - a).abs().max() > 1e-3


def test_layout_sampling_is_keyed_and_separated():
    cubes, joints = sample_stack_layout(123, 7)
    cubes2, joints2 = sample_stack_layout(123, 7)
    assert torch.equal(cubes, cubes2) and torch.equal(joints, joints2)
    assert not torch.equal(cubes, sample_stack_layout(124, 7)[0])
    for key in range(50):
        cubes, _ = sample_stack_layout(key, 7)
        for axis, name in enumerate(("x", "y", "z", "yaw")):
            lo, hi = CUBE_POSE_RANGE[name]
            assert (cubes[:, axis] >= lo - 1e-6).all() and (cubes[:, axis] <= hi + 1e-6).all()
        distances = torch.cdist(cubes[:, :3], cubes[:, :3]) + torch.eye(3)
        assert (distances > CUBE_MIN_SEPARATION).all()


def test_bad_actions_are_rejected(env):
    env.reset(seed=8)
    with pytest.raises(ValueError, match=r"shape \(2, 7\)"):
        env.step(torch.zeros(2, 6))
    with pytest.raises(TypeError, match="float32"):
        env.step(torch.zeros(2, 7, dtype=torch.float64))
    bad = torch.zeros(2, 7)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf \(envs \[1\]\)"):
        env.step(bad)
    with pytest.raises(ValueError, match="reset_keys"):
        env.reset(reset_keys=torch.tensor([1, 2, 3]))


def test_non_finite_observations_are_an_error_naming_the_envs(env, monkeypatch):
    observe = env.spec.observe

    def diverged(obs):
        out = observe(obs)
        out["state"][1, 3] = float("inf")
        return out

    env.reset(seed=8)
    monkeypatch.setattr(env.spec, "observe", diverged)
    with pytest.raises(FloatingPointError, match=r"non-finite observations \('state'\) for envs \[1\]"):
        env.step(torch.zeros(2, 7))


def test_unknown_task_names_close_matches():
    with pytest.raises(ValueError, match="Did you mean: .*IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor"):
        resolve_task("IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotr")
    assert resolve_task("Isaac-Stack-Cube-Franka-IK-Rel-Visuomotor-Cosmos-v0") == (
        "IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor-Cosmos"
    )


def test_kit_path_without_isaac_sim_says_so():
    try:
        import isaacsim  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("Isaac Sim is installed here")
    with pytest.raises(RuntimeError, match="needs Isaac Sim"):
        make_env(EnvConfig(task="Isaac-Cartpole", num_envs=1, device="cpu", sim="kit"))
