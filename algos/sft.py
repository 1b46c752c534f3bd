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

import itertools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from algos import checkpoint
from algos.config import ConfigError, RunConfig, check_positive, check_run_config
from algos.distributed import all_reduce_sum
from algos.run import (Spaces, checkpoint_due, env_metadata, finish_run, make_optimizer, make_policy, optimizer_step,
                       out_of_time, progress, show, start_run)
from envs.config import TaskConfig
from envs.lerobot import LeRobotDataset
from models.policy import Params, Policy

EXPORT_DIR = "gr00t"


@dataclass
class SFTConfig(RunConfig):
    dataset: str = "data/stack_cube_demos"
    """LeRobot v2 dataset directory (with meta/modality.json)."""
    num_episodes: int | None = None
    """Train on the first this many episodes of --dataset (None: all of them)."""
    env: TaskConfig = field(default_factory=TaskConfig)
    """The task the demonstrations are of, which eval.py evaluates the model on (`--env.image-size` must be the
    dataset's)."""
    device: str = "auto"
    """`cpu`, `cuda`, `cuda:N`, or `auto` (this rank's GPU if there is one, else CPU)."""
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
    """Also train the SigLIP vision tower (without it: a preset's stays frozen; a leanvla export keeps the flag it
    was saved with, an official checkpoint the default, frozen)."""
    tune_llm: bool = False
    """Also train the language model layers (without it: as --tune-visual)."""
    random_crop: bool = False
    """Augment the views as GR00T's training transforms do (VideoCrop in train mode): each view of each frame is
    cropped at a uniformly random offset instead of the centre, with the same crop size (--crop-scale of the
    model, 0.95) that eval's centre crop uses."""
    color_jitter: bool = False
    """Augment the views with GR00T's training VideoColorJitter (brightness 0.3, contrast 0.4, saturation 0.5,
    hue 0.08), drawn anew for each view of each frame. torchvision jitters one image at a time, on the model's
    device (on 2 CPU cores: about 0.23 s per batch of 64 frames x 2 views at 128 px)."""
    compile: bool = False
    """Regional torch.compile of GR00T's repeated transformer blocks, their backward included (models/gr00t_fast.py;
    GPU or CPU; a one-off compile at the first steps)."""
    log_every: int = 10
    """Log metrics every this many steps."""
    save_every: int = 500
    """Write a checkpoint every this many steps (and at the end)."""


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Demonstrations:
    """Every frame of a dataset in memory: views uint8 [F, V, H, W, 3], state [F, S], action [F, A], the index of
    the last frame of each frame's episode, and each frame's instruction (an index into `instructions`: a dataset
    may hold several tasks)."""

    rgb: torch.Tensor
    state: torch.Tensor
    action: torch.Tensor
    episode_end: torch.Tensor
    task: torch.Tensor
    instructions: tuple[str, ...]

    @classmethod
    def load(cls, root: str | Path, workers: int | None = None, progress: bool = False,
             num_episodes: int | None = None, first_episode: int = 0) -> Demonstrations:
        """Decode every episode (in `workers` threads; None: one per CPU core) straight into one preallocated
        uint8 tensor, so that the peak memory is the frames' own size (thousands of episodes at 224 px are tens
        of GB). `progress`: a progress bar over the episodes; `num_episodes` episodes from `first_episode` on
        (None: to the last)."""
        dataset = LeRobotDataset(root)
        if len(dataset) == 0:
            raise ConfigError(f"--dataset {root} has no episodes")
        stop = len(dataset) if num_episodes is None else first_episode + num_episodes
        if not 0 <= first_episode < stop <= len(dataset):
            raise ConfigError(f"--dataset {root} has episodes 0 to {len(dataset) - 1}; asked for episodes "
                              f"{first_episode} to {stop - 1}")
        instructions = tuple(dataset.tasks.values())
        lengths = [int(ep["length"]) for ep in dataset.episodes[first_episode:stop]]
        starts = np.cumsum([0, *lengths])
        first, keys = dataset.episode(first_episode), list(dataset.modality["video"])
        rgb = torch.empty((starts[-1], len(keys), *first.images[keys[0]].shape[1:]), dtype=torch.uint8)
        state = torch.empty((starts[-1], first.state.shape[1]), dtype=torch.float32)
        action = torch.empty((starts[-1], first.action.shape[1]), dtype=torch.float32)
        end, task = torch.empty(starts[-1], dtype=torch.long), torch.empty(starts[-1], dtype=torch.long)
        pool = ThreadPoolExecutor(workers or os.cpu_count())  # ffmpeg decodes outside the GIL
        try:
            episodes = itertools.chain([first], pool.map(dataset.episode, range(first_episode + 1, stop)))
            for i, ep in enumerate(tqdm(episodes, total=len(lengths), desc="loading demos", unit="ep",
                                        disable=not progress)):
                rows = slice(starts[i], starts[i + 1])
                if len(ep.state) != lengths[i]:
                    raise ValueError(f"--dataset {root}: episode {first_episode + i} has {len(ep.state)} frames, "
                                     f"its entry in meta/episodes.jsonl says {lengths[i]}")
                for v, key in enumerate(keys):
                    rgb[rows, v] = torch.from_numpy(ep.images[key])
                state[rows], action[rows] = torch.from_numpy(ep.state), torch.from_numpy(ep.action)
                end[rows], task[rows] = starts[i + 1] - 1, instructions.index(ep.task)
        finally:  # on an error, the episodes not yet decoding are dropped
            pool.shutdown(cancel_futures=True)
        return cls(rgb, state, action, end, task, instructions)

    def __len__(self) -> int:
        return len(self.state)

    def spaces(self, task: str) -> Spaces:
        """What a policy trained on these frames acts on (`task`: the env they were recorded in)."""
        return Spaces(task, self.state.shape[1], self.action.shape[1], self.rgb.shape[1], self.rgb.shape[2])

    def batch(self, frames: torch.Tensor, horizon: int, pin: bool = False) -> dict:
        """Frames [B] → {"rgb", "state", "actions" [B, horizon, A], "instruction": one per frame}. `pin`: the views
        in page-locked memory, so that copying them to a GPU can overlap with its work."""
        steps = (frames[:, None] + torch.arange(horizon)).minimum(self.episode_end[frames][:, None])
        rgb = self.rgb[frames]
        return {"rgb": rgb.pin_memory() if pin else rgb, "state": self.state[frames], "actions": self.action[steps],
                "instruction": [self.instructions[t] for t in self.task[frames].tolist()]}


def step_frames(num_frames: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The frames of one SFT step, uniform over the dataset: a function of (seed, step) alone, so that a step's
    batch can be gathered before the step before it has finished, and a resumed run draws what a straight run
    does. `seed`: the run's seed plus the DDP rank (as the run's generator)."""
    rng = np.random.default_rng([seed, step])
    return torch.from_numpy(rng.integers(0, num_frames, batch_size))


def random_crop_shift(rgb: torch.Tensor, crop_scale: float, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, V, H, W, 3] -> the same, each view shifted so that the processor's centre crop
    (models/gr00t_processor.pixel_values: int(crop_scale * size) pixels at offset round((size - crop) / 2)) cuts it
    at a uniformly random offset: GR00T's train-mode random crop, done before the model's own eval-mode crop. The
    rows and columns rolled in from the far edge all fall outside that crop."""
    b, v, h, w, _ = rgb.shape
    crop_h, crop_w = int(h * crop_scale), int(w * crop_scale)
    # the offsets stay on the generator's device: no GPU -> CPU copy, which would wait for the GPU every step
    on = generator.device
    draw = lambda n: torch.randint(0, n, (b, v), generator=generator, device=on)  # noqa: E731
    dy = draw(h - crop_h + 1) - round((h - crop_h) / 2)  # random crop origin - centre crop origin
    dx = draw(w - crop_w + 1) - round((w - crop_w) / 2)
    rows = ((torch.arange(h, device=on) + dy[..., None]) % h).to(rgb.device)  # [B, V, H]: row y shows row y + dy
    cols = ((torch.arange(w, device=on) + dx[..., None]) % w).to(rgb.device)
    frame = torch.arange(b, device=rgb.device)[:, None, None, None]
    view = torch.arange(v, device=rgb.device)[None, :, None, None]
    return rgb[frame, view, rows[..., :, None], cols[..., None, :]]


GR00T_COLOR_JITTER = {"brightness": 0.3, "contrast": 0.4, "saturation": 0.5, "hue": 0.08}
"""GR00T's VideoColorJitter in its training data configs."""


def color_jitter(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 [B, V, H, W, 3] -> the same, each view of each frame through torchvision's ColorJitter with GR00T's
    ranges (its factors and their order drawn from torch's global RNG, which checkpoints save)."""
    from torchvision.transforms import v2

    jitter = v2.ColorJitter(**GR00T_COLOR_JITTER)
    b, v, h, w, _ = rgb.shape
    images = rgb.permute(0, 1, 4, 2, 3).reshape(b * v, 3, h, w)
    return torch.stack([jitter(image) for image in images]).view(b, v, 3, h, w).permute(0, 1, 3, 4, 2).contiguous()


def metadata_from_demos(demos: Demonstrations, embodiment_tag: str = "new_embodiment") -> dict:
    """GR00T normalisation metadata from the demonstrations' statistics, in the env-vector layout of
    `algos.run.env_metadata`."""
    height, width = demos.rgb.shape[2:4]
    return env_metadata(demos.state, demos.action, (width, height), demos.rgb.shape[1], embodiment_tag)


def learning_rate(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0 over the remaining steps: the shape of GR00T's schedule
    (transformers' cosine with warm-up). The warm-up lasts round(warmup_ratio x total) steps, at least 1, and its
    last step is at `peak`; transformers' lasts ceil(warmup_ratio x total) steps and starts at 0."""
    warmup = max(1, int(round(warmup_ratio * total)))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_sft_policy(cfg: SFTConfig, spaces: Spaces, device: torch.device, bf16: bool, base: dict | None = None,
                    metadata: dict | None = None) -> tuple[Policy, Params, dict]:
    """A GR00T preset (random init; `metadata` from the demonstrations) or checkpoint (its own metadata), with the
    parts that --tune-visual / --tune-llm add to the trained ones."""
    also_trained = {name: True for name, on in (("tune_visual", cfg.tune_visual), ("tune_llm", cfg.tune_llm)) if on}
    return make_policy(cfg, spaces, device, bf16, base, metadata=metadata, gr00t_overrides=also_trained,
                       compile=cfg.compile)


# ------------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------------
def check_config(cfg: SFTConfig) -> None:
    check_run_config(cfg)
    check_positive(cfg, "batch_size", "log_every")
    if cfg.num_episodes is not None and cfg.num_episodes < 1:
        raise ConfigError(f"--num-episodes must be >= 1, got {cfg.num_episodes}")
    if not (0.0 <= cfg.warmup_ratio < 1.0):
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if not Path(cfg.dataset).is_dir():
        raise ConfigError(f"--dataset {cfg.dataset} is not a directory (record one with "
                          f"`python -m envs.record_demos --out {cfg.dataset}`)")


def train(cfg: SFTConfig) -> dict:
    check_config(cfg)
    run = start_run(cfg, "sft", cfg.device)
    demos = Demonstrations.load(cfg.dataset, progress=run.is_main, num_episodes=cfg.num_episodes)
    height, width = demos.rgb.shape[2:4]
    if (height, width) != (cfg.env.image_size, cfg.env.image_size):  # eval.py and RL build the env from cfg.env
        raise ConfigError(f"--dataset {cfg.dataset} has {width}x{height} views but --env.image-size is "
                          f"{cfg.env.image_size}; pass --env.image-size {height}")
    policy, params, base = make_sft_policy(cfg, demos.spaces(cfg.env.task), run.device, run.bf16,
                                           checkpoint.checkpoint_base(cfg.resume), metadata_from_demos(demos))
    optimizer = make_optimizer(policy, params, cfg.learning_rate, None, cfg.weight_decay, include_value=False)
    start, frames_seen = 0, 0
    if cfg.resume:
        meta, _ = checkpoint.load_checkpoint(run, cfg.resume, policy, params, optimizer)
        start, frames_seen = meta["iteration"], meta["frames_seen"]
    horizon = policy.cfg.action_horizon
    if run.is_main:
        print(f"sft: {len(demos)} frames, action horizon {horizon}, "
              f"{sum(p.numel() for n, p in params.items() if policy.is_trainable(n)) / 1e6:.1f} M trainable params")

    # a loader thread gathers the next step's batch on the CPU while the GPU runs this one (the gather of 256
    # frames takes tens of ms; done in the loop, the GPU would wait for it every step)
    def gather(step: int) -> dict:
        frames = step_frames(len(demos), cfg.batch_size, cfg.seed + run.rank, step)
        return demos.batch(frames, horizon, pin=run.device.type == "cuda")

    loader = ThreadPoolExecutor(1)
    next_batch = loader.submit(gather, start)
    metrics: dict[str, float] = {}
    bar = progress(run, start, cfg.num_iterations)
    started, frames_here = time.perf_counter(), 0  # frames since this process started (for the rate)
    for step in bar:
        lr = learning_rate(step, cfg.num_iterations, cfg.learning_rate, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next_batch.result()
        if step + 1 < cfg.num_iterations:
            next_batch = loader.submit(gather, step + 1)
        # augment on the model's device: the crop's gather alone takes about 26 ms a batch of 64 on 2 CPU cores
        batch["rgb"] = batch["rgb"].to(run.device, non_blocking=True)
        if cfg.random_crop:
            batch["rgb"] = random_crop_shift(batch["rgb"], policy.cfg.crop_scale, run.generator)
        if cfg.color_jitter:
            batch["rgb"] = color_jitter(batch["rgb"])
        loss = policy.sft_loss(params, batch, generator=run.generator)
        grad_norm = optimizer_step(optimizer, loss, cfg.max_grad_norm)
        frames_seen += cfg.batch_size * run.world_size
        frames_here += cfg.batch_size * run.world_size
        stop = out_of_time(run, started)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.num_iterations or stop:
            metrics = {"sft/loss": float(all_reduce_sum(loss.detach()) / run.world_size),
                       "actor/grad_norm": float(grad_norm), "sft/learning_rate": lr,
                       "charts/SPS": frames_here / (time.perf_counter() - started)}
            if run.logger is not None:
                run.logger.log(metrics, step + 1)
            show(run, bar, metrics, {"loss": "sft/loss"})
        if checkpoint_due(run, step + 1) or stop:
            checkpoint.save_checkpoint(run, step + 1, {"frames_seen": frames_seen}, policy, params, base, optimizer,
                                       {})
        if stop:
            break
    loader.shutdown(cancel_futures=True)
    if run.is_main:
        export = run.run_dir / EXPORT_DIR
        policy.save(params, str(export))
        print(f"sft: exported the fine-tuned model to {export} (use it with --policy {export})")
    finish_run(run)
    return {**metrics, "run_dir": str(run.run_dir) if run.run_dir else None}
