"""The scripted expert stacks on the kit-less env; any Isaac Lab state task runs through the same adapter."""

import pytest
import torch

from envs import EnvConfig, make_env
from envs.assets import FRANKA_ARM_GAINS, FRANKA_FINGER_GAINS, ensure_offline_assets
from envs.expert import DONE, StackExpert


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


def test_expert_stacks_all_three_cubes():
    env = make_env(EnvConfig(num_envs=1, device="cpu", image_size=16))
    try:
        expert = StackExpert(1)
        env.reset(seed=0)
        expert.reset()
        for _ in range(env.max_episode_steps):
            _, reward, terminated, truncated, info = env.step(expert.act(env.privileged_state()))
            if terminated.any() or truncated.any():
                break
        assert info["success"].item() and terminated.item() and not truncated.item()
        assert reward.item() == 1.0 and info["episode_return"].item() == 1.0
        assert info["episode_length"].item() < env.max_episode_steps
    finally:
        env.close()


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
