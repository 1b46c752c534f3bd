"""Supervised fine-tuning of GR00T N1.5 on demonstrations: GR00T's flow-matching loss, one file.

    python train.py sft --dataset data/stack_cube_demos --num-iterations 2000 --batch-size 32
    python train.py ppo --policy runs/<sft run>/gr00t        # then RL from the fine-tuned model

Data: a LeRobot v2 dataset with GR00T's `meta/modality.json` (ours from `python -m envs.record_demos`, or the
same layout as RLinf/IsaacLab-Stack-Cube-Data). Every frame is a sample: its two views, its state, and the next
`action_horizon` actions (repeating the episode's last action past its end, as GR00T's loader does).

Loss (`Gr00tPolicy.sft_loss`): flow time t = (0.999 − Beta(1.5, 1)) / 0.999, noisy actions
x_t = t·a + (1 − t)·ε, the action head regresses the velocity a − ε. The backbone is frozen unless
`--tune-visual` / `--tune-llm`. Checkpoints are the RL format (so `--resume` and `eval.py` work on them); at the
end the whole model is also exported in GR00T's official layout to `<run>/gr00t`, which `--policy` loads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from algos import common
from envs.lerobot import LeRobotDataset

EXPORT_DIR = "gr00t"


@dataclass
class SFTConfig(common.RunConfig):
    dataset: str = "data/stack_cube_demos"
    """LeRobot v2 dataset directory (with meta/modality.json)."""
    num_iterations: int = 2
    """Gradient steps in total."""
    batch_size: int = 8
    """Frames per gradient step (per DDP rank)."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate (GR00T's default)."""
    weight_decay: float = 1e-5
    """AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Fraction of the steps with a linear warm-up; cosine decay after."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    tune_visual: bool = False
    """Train the SIGLIP vision tower too (random-init presets only; checkpoints keep their own flags)."""
    tune_llm: bool = False
    """Train the language model layers too (random-init presets only)."""
    log_every: int = 10
    """Log metrics every this many steps."""
    save_every: int = 500
    """Write a checkpoint every this many steps (and at the end)."""


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Demonstrations:
    """Every frame of a dataset in memory: views uint8 [F, V, H, W, 3], state [F, S], action [F, A], and for each
    frame the index of the frame `k` steps later in its episode (clamped to the episode's last frame)."""

    rgb: torch.Tensor
    state: torch.Tensor
    action: torch.Tensor
    episode_end: torch.Tensor  # index of the last frame of each frame's episode
    instruction: str

    @classmethod
    def load(cls, root: str | Path) -> Demonstrations:
        dataset = LeRobotDataset(root)
        if len(dataset) == 0:
            raise common.ConfigError(f"--dataset {root} has no episodes")
        if len(dataset.tasks) != 1:
            raise common.ConfigError(f"--dataset {root} has {len(dataset.tasks)} task strings; SFT here takes one "
                                     "instruction per dataset")
        rgb, state, action, end = [], [], [], []
        for i in range(len(dataset)):
            ep = dataset.episode(i)
            rgb.append(np.stack([ep.images[k] for k in dataset.modality["video"]], axis=1))
            state.append(ep.state)
            action.append(ep.action)
            end.append(np.full(len(ep.state), sum(map(len, state)) - 1))
        return cls(torch.from_numpy(np.concatenate(rgb)), torch.from_numpy(np.concatenate(state)),
                   torch.from_numpy(np.concatenate(action)), torch.from_numpy(np.concatenate(end)),
                   next(iter(dataset.tasks.values())))

    def __len__(self) -> int:
        return len(self.state)

    def batch(self, frames: torch.Tensor, horizon: int) -> dict:
        """Frames [B] → {"rgb", "state", "actions" [B, horizon, A], "instruction"}."""
        steps = (frames[:, None] + torch.arange(horizon)).minimum(self.episode_end[frames][:, None])
        return {"rgb": self.rgb[frames], "state": self.state[frames], "actions": self.action[steps],
                "instruction": self.instruction}


def metadata_from_demos(demos: Demonstrations, embodiment_tag: str) -> dict:
    """GR00T normalisation metadata from the demonstrations' statistics, in the env-vector layout of
    `common.env_metadata`."""
    height, width = demos.rgb.shape[2:4]
    return common.env_metadata(demos.state, demos.action, (width, height), demos.rgb.shape[1], embodiment_tag)


def learning_rate(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0 (GR00T's schedule)."""
    warmup = max(1, int(round(warmup_ratio * total)))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_policy(cfg: SFTConfig, demos: Demonstrations, device: torch.device, bf16: bool, base: dict | None):
    """A GR00T preset (random init, metadata from the demonstrations) or a checkpoint (its own metadata)."""
    from models.gr00t import PRESETS, Gr00tConfig, Gr00tPolicy

    dtype = torch.bfloat16 if bf16 else torch.float32
    if cfg.policy == "mlp":
        raise common.ConfigError("sft trains GR00T: --policy must be a GR00T preset or checkpoint, not mlp")
    if cfg.policy in PRESETS:
        gr00t_cfg = Gr00tConfig.preset(cfg.policy, num_views=demos.rgb.shape[1], tune_visual=cfg.tune_visual,
                                       tune_llm=cfg.tune_llm)
        metadata = (base or {}).get("metadata") or metadata_from_demos(demos, gr00t_cfg.embodiment_tag)
        policy = Gr00tPolicy(gr00t_cfg, device, metadata, compute_dtype=dtype)
        return policy, policy.init(cfg.seed), {"policy": cfg.policy, "init_seed": cfg.seed, "metadata": metadata,
                                               "tune_visual": cfg.tune_visual, "tune_llm": cfg.tune_llm}
    policy, params = Gr00tPolicy.from_pretrained(cfg.policy, device, compute_dtype=dtype)
    return policy, params, {"policy": "gr00t", "checkpoint": cfg.policy}


# ------------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------------
def check_config(cfg: SFTConfig) -> None:
    common.check_run_config(cfg)
    if cfg.batch_size < 1:
        raise common.ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not (0.0 <= cfg.warmup_ratio < 1.0):
        raise common.ConfigError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if not Path(cfg.dataset).is_dir():
        raise common.ConfigError(f"--dataset {cfg.dataset} is not a directory (record one with "
                                 "`python -m envs.record_demos --out {cfg.dataset}`)")


def train(cfg: SFTConfig) -> dict:
    check_config(cfg)
    run = common.start_run(cfg, "sft")
    demos = Demonstrations.load(cfg.dataset)
    height, width = demos.rgb.shape[2:4]
    if (height, width) != (cfg.env.image_size, cfg.env.image_size):  # eval.py and RL build the env from cfg.env
        raise common.ConfigError(f"--dataset {cfg.dataset} has {width}x{height} views but --env.image-size is "
                                 f"{cfg.env.image_size}; pass --env.image-size {height}")
    policy, params, base = make_policy(cfg, demos, run.device, run.bf16, common.checkpoint_base(cfg.resume))
    optimizer = common.make_optimizer(policy, params, cfg.learning_rate, None, cfg.weight_decay, include_value=False)
    start = 0
    if cfg.resume:
        meta, _ = common.load_checkpoint(run, cfg.resume, policy, params, optimizer)
        start = meta["iteration"]
    horizon = policy.cfg.action_horizon
    if run.is_main:
        print(f"sft: {len(demos)} frames, action horizon {horizon}, "
              f"{sum(p.numel() for n, p in params.items() if policy.is_trainable(n)) / 1e6:.1f} M trainable params")

    metrics: dict[str, float] = {}
    bar = common.progress(run, start, cfg.num_iterations)
    started, frames_seen = time.perf_counter(), 0
    for step in bar:
        lr = learning_rate(step, cfg.num_iterations, cfg.learning_rate, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        frames = torch.randint(0, len(demos), (cfg.batch_size,), generator=run.generator, device=run.device).cpu()
        batch = demos.batch(frames, horizon)
        loss = policy.sft_loss(params, batch, generator=run.generator)
        grad_norm = common.optimizer_step(optimizer, loss, cfg.max_grad_norm)
        frames_seen += cfg.batch_size * run.world_size
        stop = common.out_of_time(run, started)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.num_iterations or stop:
            metrics = {"sft/loss": float(common.all_reduce_sum(loss.detach()) / run.world_size),
                       "actor/grad_norm": float(grad_norm), "sft/learning_rate": lr,
                       "charts/SPS": frames_seen / (time.perf_counter() - started)}
            if run.logger is not None:
                run.logger.log(metrics, step + 1)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{metrics['sft/loss']:.4f}", refresh=False)
        if common.checkpoint_due(run, step + 1) or stop:
            common.save_checkpoint(run, step + 1, {"frames_seen": frames_seen}, policy, params, base, optimizer, {})
        if stop:
            break
    if run.is_main:
        export = run.run_dir / EXPORT_DIR
        policy.save(params, str(export))
        print(f"sft: exported the fine-tuned model to {export} (use it with --policy {export})")
    common.finish_run(run)
    return {**metrics, "run_dir": str(run.run_dir) if run.run_dir else None}
