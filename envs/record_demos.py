"""Record the scripted expert's successful stack-cube episodes as a LeRobot v2 dataset.

    python -m envs.record_demos --episodes 50 --num-envs 16 --out data/stack_cube_demos

Every env runs the expert; an episode is kept only if it ends in success. Frames hold what the policy sees
(table and wrist RGB, 8-d state) and the expert's 7-d IK-relative action. With `--action-noise`, the env executes
noisy actions while the frames keep the expert's own (DART), so the demonstrations show recoveries from small
deviations: states a policy's own errors lead to. Each frame is labelled with the expert's round (0: red onto blue,
1: green onto red) and phase (an index into `envs.expert.PHASE_NAMES`) when it acted, in the parquet columns
`leanvla.expert_round` and `leanvla.expert_phase`, so that a model's errors can be told apart by phase
(benchmarks/sft_open_loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro
from tqdm import tqdm

from envs.config import EnvConfig
from envs.expert import StackExpert
from envs.isaaclab_env import make_env
from envs.lerobot import LeRobotWriter


@dataclass
class Args:
    out: Path = Path("data/stack_cube_demos")
    """Dataset folder to write."""
    episodes: int = 50
    """Successful episodes to record."""
    env: EnvConfig = field(default_factory=lambda: EnvConfig(num_envs=8))
    """The environment (stack-cube)."""
    seed: int = 0
    """Seed of the first reset (later resets draw keys from it)."""
    max_attempts: int | None = None
    """Give up after this many episodes (default: 3 x episodes)."""
    overwrite: bool = False
    """Replace an existing dataset at --out."""
    action_noise: float = 0.0
    """Std of Gaussian noise added to the six arm dims (IK-relative translation and rotation, not the gripper) of
    the actions the env executes, in action units (1 = 0.5 m or 0.5 rad per step; the expert moves at most 0.04,
    2 cm, per step); the dataset records the expert's action without it (DART). 0: none."""


def record(args: Args) -> Path:
    if args.action_noise < 0:
        raise ValueError(f"--action-noise must be >= 0, got {args.action_noise}")
    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    env = make_env(args.env)
    if env.num_views != 2:
        raise ValueError(f"record_demos needs the stack-cube camera task, got {env.task!r}")
    writer = LeRobotWriter(args.out, fps=round(1 / env.step_dt), image_size=args.env.image_size, overwrite=args.overwrite)
    expert = StackExpert(env.num_envs, env.device)
    max_attempts = args.max_attempts or 3 * args.episodes
    keys = ("image", "wrist_image", "state", "action", "round", "phase")
    buffers: list[dict[str, list]] = [{k: [] for k in keys} for _ in range(env.num_envs)]
    kept = attempts = 0
    noise_generator = torch.Generator(device=env.device).manual_seed(args.seed)
    arm = torch.arange(env.action_dim, device=env.device) < 6  # the gripper (dim 6) stays the expert's
    bar = tqdm(total=args.episodes, desc="demos", unit="ep")
    try:
        obs = env.reset(seed=args.seed)
        expert.reset()
        while kept < args.episodes:
            if attempts >= max_attempts:
                raise RuntimeError(f"only {kept} of {attempts} expert episodes succeeded; wanted {args.episodes}")
            rounds, phases = expert.round.tolist(), expert.phase.tolist()  # the phase the action below is taken in
            actions = expert.act(env.privileged_state())
            rgb, state, act = obs["rgb"].cpu().numpy(), obs["state"].cpu().numpy(), actions.cpu().numpy()
            for i, buf in enumerate(buffers):
                buf["image"].append(rgb[i, 0])
                buf["wrist_image"].append(rgb[i, 1])
                buf["state"].append(state[i])
                buf["action"].append(act[i])
                buf["round"].append(rounds[i])
                buf["phase"].append(phases[i])
            executed = actions
            if args.action_noise > 0:
                noise = torch.randn(actions.shape, generator=noise_generator, device=env.device)
                executed = actions + args.action_noise * noise * arm
            obs, _, terminated, truncated, info = env.step(executed)
            done = (terminated | truncated).nonzero().flatten().tolist()
            for i in done:
                attempts += 1
                buf = buffers[i]
                if info["success"][i] and kept < args.episodes:
                    reward = np.zeros(len(buf["state"]), np.float32)
                    reward[-1] = 1.0
                    images = {k: np.stack(buf[k]) for k in ("image", "wrist_image")}
                    task = env.instruction if isinstance(env.instruction, str) else env.instruction[i]
                    labels = {"leanvla.expert_round": np.array(buf["round"]),
                              "leanvla.expert_phase": np.array(buf["phase"])}
                    writer.add_episode(images, np.stack(buf["state"]), np.stack(buf["action"]), task, reward, labels)
                    kept += 1
                    bar.update(1)
                buffers[i] = {k: [] for k in buf}
            if done:
                expert.reset(torch.tensor(done))
            bar.set_postfix(attempts=attempts, success_rate=f"{kept / max(attempts, 1):.2f}")
    finally:
        bar.close()
        env.close()
    return writer.close(recording={"recorder": "envs.record_demos", "task": env.task, "seed": args.seed,
                                   "action_noise": args.action_noise, "num_envs": env.num_envs,
                                   "episodes": kept, "attempts": attempts, "expert_success_rate": kept / attempts})


if __name__ == "__main__":
    print(record(tyro.cli(Args)))
