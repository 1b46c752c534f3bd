"""Evaluate a checkpoint: success rate, the share of episodes reaching each of the task's milestones, returns over N
episodes, MP4 videos and a JSON summary.

    python eval.py --checkpoint runs/<run>                     # the run's newest checkpoint, 10 episodes
    python eval.py --checkpoint runs/<run>/checkpoints/iter_000100 --num-episodes 100 --no-deterministic

Videos show the table camera (view 0) of the first `--num-videos` envs' first episode, framed green once the
episode has succeeded and red until then (camera tasks only). Everything goes to `--output`
(default `<run>/eval/<checkpoint name>/`): `summary.json` and `episode_<env>.mp4`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from algos import grpo, ppo, sft
from algos.checkpoint import find_checkpoint, load_params_into
from algos.config import ConfigError, RLConfig, config_from_dict
from algos.distributed import setup_distributed
from algos.run import Spaces, make_rl_policy, uses_bf16
from envs.config import EnvConfig

CONFIGS = {"ppo": ppo.PPOConfig, "grpo": grpo.GRPOConfig, "sft": sft.SFTConfig}


@dataclass
class EvalConfig:
    checkpoint: str
    """Checkpoint directory, or a run directory (then its newest checkpoint)."""
    num_episodes: int = 10
    """Episodes to evaluate (spread evenly over the envs)."""
    num_envs: int | None = None
    """Parallel envs. None: min(--num-episodes, the training run's envs per rank; 2 for an SFT run)."""
    deterministic: bool = True
    """Act with the policy's deterministic action (e.g. the Gaussian mean) instead of sampling."""
    seed: int = 12345
    """Seed of the env resets and of sampling (keep it apart from training seeds)."""
    device: str = "auto"
    """`cpu`, `cuda`, `cuda:N`, or `auto` (a GPU if there is one)."""
    max_episode_steps: int | None = None
    """Override the env's time limit. None: the training run's."""
    action_exec_horizon: int | None = None
    """Play only the first K actions of each chunk, then sample a new chunk (receding horizon). None: all of
    them (GR00T: 16), as training rollouts do."""
    num_videos: int = 2
    """Record the first episode of this many envs (camera tasks; 0: none)."""
    video_fps: int = 20
    """Frames per second of the MP4s (stack-cube runs at 20 Hz)."""
    output: str | None = None
    """Output directory. None: `<run>/eval/<checkpoint name>/`."""


def overlay(frame: np.ndarray, succeeded: bool, step: int) -> np.ndarray:
    """A border (green once the episode has succeeded, red until then) and a caption."""
    from PIL import Image, ImageDraw

    color = (0, 200, 0) if succeeded else (220, 0, 0)
    out = frame.copy()
    b = max(2, frame.shape[0] // 50)
    out[:b], out[-b:], out[:, :b], out[:, -b:] = color, color, color, color
    image = Image.fromarray(out)
    ImageDraw.Draw(image).text((2 * b, 2 * b), f"{'success' if succeeded else 'running'}  t={step}", fill=color)
    return np.asarray(image)


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import imageio.v2 as imageio

    try:
        imageio.mimwrite(path, frames, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1)
    except (ImportError, ValueError) as e:  # imageio without its ffmpeg plugin
        raise ConfigError(f"cannot write {path}: {e} (pip install imageio-ffmpeg, or --num-videos 0)") from e


@torch.no_grad()
def evaluate(cfg: EvalConfig, make_env=None) -> dict:
    if cfg.num_episodes < 1:
        raise ConfigError(f"--num-episodes must be >= 1, got {cfg.num_episodes}")
    if cfg.action_exec_horizon is not None and cfg.action_exec_horizon < 1:
        raise ConfigError(f"--action-exec-horizon must be >= 1, got {cfg.action_exec_horizon}")
    ckpt = find_checkpoint(cfg.checkpoint)
    state = json.loads((ckpt / "state.json").read_text())
    train_cfg = config_from_dict(CONFIGS[state["algo"]], state["config"])
    _, _, device = setup_distributed(cfg.device)
    # an RL run's envs per rank; an SFT run stepped none (its --env names the task of its demonstrations)
    rl = isinstance(train_cfg, RLConfig)
    train_envs = train_cfg.env.num_envs // state["world_size"] if rl else EnvConfig.num_envs
    num_envs = cfg.num_envs or min(cfg.num_episodes, train_envs)
    env_cfg = EnvConfig(**dataclasses.asdict(train_cfg.env))  # an SFT run's TaskConfig, or an RL run's EnvConfig
    env_cfg = dataclasses.replace(env_cfg, num_envs=num_envs, device=str(device))
    if cfg.max_episode_steps is not None:
        env_cfg = dataclasses.replace(env_cfg, max_episode_steps=cfg.max_episode_steps)
    if make_env is None:
        from envs import make_env
    env = make_env(env_cfg)
    bf16 = uses_bf16(train_cfg.precision, device)
    base = state["policy"]["base"]
    if rl:
        policy, params, _ = make_rl_policy(train_cfg, env, device, bf16, base)
    else:
        policy, params, _ = sft.make_sft_policy(train_cfg, Spaces.of(env), device, bf16, base)
    load_params_into(ckpt, policy, params)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out_dir = Path(cfg.output) if cfg.output else ckpt.parent.parent / "eval" / ckpt.name
    out_dir.mkdir(parents=True, exist_ok=True)

    quota = [cfg.num_episodes // num_envs + (i < cfg.num_episodes % num_envs) for i in range(num_envs)]
    finished = [0] * num_envs
    episodes: list[dict] = []
    recording = {i: [] for i in range(min(cfg.num_videos, num_envs))} if env.num_views > 0 else {}
    videos: list[str] = []
    last_frame: dict[int, np.ndarray] = {}
    success_seen = torch.zeros(num_envs, dtype=torch.bool, device=device)
    step_in_episode = torch.zeros(num_envs, dtype=torch.long)
    obs = env.reset(seed=cfg.seed)
    try:  # the env closes also when a chunk is refused (--action-exec-horizon) or the policy fails
        while any(f < q for f, q in zip(finished, quota)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                actions = policy.sample(params, obs, env.instruction, generator,
                                        deterministic=cfg.deterministic)["actions"]
            if cfg.action_exec_horizon is not None:
                if cfg.action_exec_horizon > actions.shape[1]:
                    raise ConfigError(f"--action-exec-horizon {cfg.action_exec_horizon} exceeds the policy's chunk of "
                                      f"{actions.shape[1]} actions")
                actions = actions[:, :cfg.action_exec_horizon]
            ended = torch.zeros(num_envs, dtype=torch.bool, device=device)  # an episode ended within this chunk
            for k in range(actions.shape[1]):
                for i, frames in recording.items():
                    last_frame[i] = obs["rgb"][i, 0].cpu().numpy()
                    frames.append(overlay(last_frame[i], bool(success_seen[i]), int(step_in_episode[i])))
                action = actions[:, k].float()
                if env.idle_action is not None:  # as in training rollouts: the chunk's rest was planned for the
                    action = torch.where(ended.unsqueeze(-1), env.idle_action, action)  # episode that ended
                obs, _, term, trunc, info = env.step(action.contiguous())
                ended |= term | trunc
                success_seen |= info["success"]
                step_in_episode += 1
                done = (term | trunc).cpu()
                for i in done.nonzero().flatten().tolist():
                    if finished[i] < quota[i]:
                        reached = [name for name, r in zip(env.milestones, info["milestones"][i].tolist()) if r] \
                            if env.milestones else []
                        episodes.append({"env": i, "return": float(info["episode_return"][i]),
                                         "length": int(info["episode_length"][i]), "success": bool(success_seen[i]),
                                         "milestones": reached})
                        finished[i] += 1
                    if i in recording:
                        frames = recording.pop(i)  # the env has reset: show the last frame with the final verdict
                        frames.append(overlay(last_frame[i], bool(success_seen[i]), int(step_in_episode[i])))
                        path = out_dir / f"episode_{i}.mp4"
                        write_video(path, frames, cfg.video_fps)
                        videos.append(str(path))
                success_seen[done.to(device)] = False
                step_in_episode[done] = 0
    finally:
        env.close()

    returns = np.array([e["return"] for e in episodes])
    summary = {
        "checkpoint": str(ckpt), "iteration": state["iteration"], "task": env_cfg.task, "policy": train_cfg.policy,
        "image_size": env_cfg.image_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "deterministic": cfg.deterministic, "seed": cfg.seed, "action_exec_horizon": cfg.action_exec_horizon,
        "num_episodes": len(episodes),
        "success_rate": float(np.mean([e["success"] for e in episodes])),
        "return_mean": float(returns.mean()), "return_std": float(returns.std()),
        "episode_length_mean": float(np.mean([e["length"] for e in episodes])),
        # the share of episodes that reached each of the task's milestones (stack-cube: reach_red ... place_green)
        "milestone_rates": {name: float(np.mean([name in e["milestones"] for e in episodes]))
                            for name in env.milestones},
        "episodes": episodes, "videos": videos,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(episodes)} episodes: success {summary['success_rate']:.3f}, return {summary['return_mean']:.3f} "
          f"+- {summary['return_std']:.3f}, length {summary['episode_length_mean']:.1f} -> {out_dir / 'summary.json'}")
    if summary["milestone_rates"]:
        print("reached: " + ", ".join(f"{name} {rate:.3f}" for name, rate in summary["milestone_rates"].items()))
    return summary


def main(argv: list[str] | None = None) -> dict:
    cfg = tyro.cli(EvalConfig, args=sys.argv[1:] if argv is None else argv, description=__doc__)
    try:
        return evaluate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
