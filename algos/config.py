"""The flags every job takes (`RunConfig`), the ones RL adds (`RLConfig`), their checks, and their JSON form.

Each algorithm's own hyperparameters live in its config, which subclasses one of these: `PPOConfig` and
`GRPOConfig` subclass `RLConfig`, `SFTConfig` subclasses `RunConfig` (SFT has no env to step and no RL head,
so it takes none of those flags).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from algos.distributed import launched_world_size
from envs.config import EnvConfig
from models.mlp import MLPConfig


class ConfigError(ValueError):
    """A bad flag or input, reported to the user as one line (train.py / eval.py exit with it)."""


@dataclass
class RunConfig:
    exp_name: str = "leanvla"
    """Name of the experiment; part of the run directory's name."""
    seed: int = 1
    """Seed of the policy's initialisation, the env resets and all sampling."""
    policy: str = "gr00t-tiny"
    """`mlp` (RL on state tasks), a GR00T preset (gr00t-tiny, gr00t-small, gr00t-n1.5-3b: random init), or a GR00T
    checkpoint in the official layout (a directory or a Hugging Face id such as RLinf/RLinf-Gr00t-SFT-Stack-cube)."""
    gr00t_tokenizer: str | None = None
    """Tokenizer of a random-init GR00T preset: a local directory with the Qwen/Eagle tokenizer files, `builtin`
    (the project's offline one), or None (the preset's own: the hub's Qwen/Qwen3-1.7B for gr00t-n1.5-3b)."""
    gr00t_image_size: int | None = None
    """Input resolution (px) of a random-init GR00T preset: each view is resized to it and cut into 14 px patches,
    one image token each. None: the preset's (224 px: 256 tokens per view). 126 keeps a 128 px camera at about its
    own resolution with 81 tokens. A checkpoint keeps the size it was trained at."""
    num_iterations: int = 2
    """Iterations in total (RL: rollout + update; SFT: gradient steps). A resumed run continues up to this number."""
    max_minutes: float | None = None
    """Stop early after the first iteration that ends this many minutes into training (a checkpoint is written
    there): a fixed compute budget. None: run all --num-iterations."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision; master weights stay fp32. `auto`: bf16 autocast on GPU, fp32 on CPU."""
    torch_deterministic: bool = True
    """Ask cuDNN for deterministic kernels."""
    run_dir: str | None = None
    """Where logs and checkpoints go. Default: `runs/<exp_name>__<algo>__<seed>__<time>`; with --resume, the
    checkpoint's run."""
    track: bool = False
    """Also log to Weights & Biases (TensorBoard is always on)."""
    wandb_project: str = "leanvla"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team); default: your user."""
    wandb_mode: Literal["online", "offline"] = "online"
    """`offline` writes the W&B run locally (no network); `wandb sync` uploads it later."""
    save_every: int = 50
    """Write a checkpoint every this many iterations (and always at the end)."""
    keep_last: int = 3
    """Keep only the newest this many checkpoints."""
    resume: str | None = None
    """Continue from a checkpoint directory, or from the newest checkpoint of a run directory."""


@dataclass
class RLConfig(RunConfig):
    env: EnvConfig = field(default_factory=EnvConfig)
    """The environment (`--env.task`, `--env.num-envs` is the total over all DDP ranks, ...)."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The MLP actor-critic (used when `--policy mlp`)."""
    gr00t_noise_level: float | None = None
    """Flow-SDE noise level a of GR00T's stochastic denoising steps: the exploration of RL (sigma_t = a sqrt((1-t)/t)).
    None: the checkpoint's or preset's (0.5)."""
    gr00t_sde_steps: Literal["one", "all"] | None = None
    """Which of GR00T's denoising steps are stochastic in RL: `one` random step per `sample` call (RLinf) or `all`.
    A chunk's log-prob is the sum over its stochastic steps, so with `all` (4 steps) a policy ratio moves about 4
    times as far as with `one` for the same change (RLinf averages over the steps instead). None: the checkpoint's
    or preset's (`one`)."""
    pipeline_stages: int = 1
    """S > 1: split each rank's envs into S stages, each an env in a worker process of its own, and pipeline the
    rollout: while the policy samples one stage's next action chunk, the other stages play theirs (envs/workers.py,
    algos/rollout.py). Each stage is an env of its own: a task with one instruction per sub-env (Lift-Red-Or-Blue)
    splits them within each stage. 1: one env in the training process, policy and env taking turns. On one GPU,
    2 stages measured slower than 1 (the GPU time-slices between the processes' CUDA contexts;
    benchmarks/results/loop_throughput/)."""
    compile: bool = False
    """GR00T's GPU fast path with regional torch.compile of its repeated transformer blocks (each block class
    compiles once; about 25 s for the 3B model on an H100; faster `sample` and `evaluate`). See models/gr00t_fast.py."""
    cuda_graphs: bool = False
    """GR00T's GPU fast path with `sample` replayed from CUDA graphs (GPU only; a graph per input signature: batch
    size, prompt length, the params' tensors; the 8 newest kept)."""


def check_positive(cfg: Any, *names: str) -> None:
    """Each named integer flag is >= 1."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")


def check_range(cfg: Any, name: str, low: float, high: float = math.inf, closed: bool = False) -> None:
    """The named flag lies in the open interval (low, high), or in [low, high] with `closed`."""
    value = getattr(cfg, name)
    if not (low <= value <= high if closed else low < value < high):
        if high == math.inf:
            wanted = f"{'>=' if closed else '>'} {low:g}"
        else:
            wanted = f"in {'[' if closed else '('}{low:g}, {high:g}{']' if closed else ')'}"
        raise ConfigError(f"--{name.replace('_', '-')} must be {wanted}, got {value}")


def check_run_config(cfg: RunConfig) -> None:
    from algos.checkpoint import find_checkpoint, later_checkpoints

    check_positive(cfg, "num_iterations", "save_every", "keep_last")
    if cfg.gr00t_image_size is not None and (cfg.gr00t_image_size < 14 or cfg.gr00t_image_size % 14):
        raise ConfigError(f"--gr00t-image-size must be a positive multiple of 14 (GR00T's patch size), "
                          f"got {cfg.gr00t_image_size}")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise ConfigError(f"--max-minutes must be > 0, got {cfg.max_minutes}")
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else ckpt.parent.parent
        later = later_checkpoints(run_dir, ckpt)
        if later:
            raise ConfigError(f"--resume {ckpt}: {run_dir} holds later checkpoints ({', '.join(later)}), which a "
                              "continuation from there would mix with its own: resume from the newest, or pass "
                              "--run-dir with a new directory")


def check_rl_config(cfg: RLConfig) -> None:
    check_run_config(cfg)
    if cfg.gr00t_noise_level is not None and not cfg.gr00t_noise_level > 0:
        raise ConfigError(f"--gr00t-noise-level must be > 0, got {cfg.gr00t_noise_level}")
    if cfg.policy == "mlp" and (cfg.gr00t_noise_level is not None or cfg.gr00t_sde_steps is not None):
        raise ConfigError("--gr00t-noise-level / --gr00t-sde-steps set GR00T's Flow-SDE; --policy mlp has none")
    if cfg.policy == "mlp" and (cfg.compile or cfg.cuda_graphs):
        raise ConfigError("--compile / --cuda-graphs speed up GR00T; --policy mlp has no fast path")
    if cfg.env.num_envs < 1:
        raise ConfigError(f"--env.num-envs must be >= 1, got {cfg.env.num_envs}")
    world_size = launched_world_size()
    if cfg.env.num_envs % world_size:
        raise ConfigError(f"--env.num-envs {cfg.env.num_envs} is not divisible by the {world_size} DDP ranks")
    check_positive(cfg, "pipeline_stages")
    if (cfg.env.num_envs // world_size) % cfg.pipeline_stages:
        raise ConfigError(f"--pipeline-stages {cfg.pipeline_stages} does not divide the {cfg.env.num_envs // world_size} "
                          f"envs of each of the {world_size} DDP rank(s) (--env.num-envs {cfg.env.num_envs})")


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as JSON-ready values (paths as strings)."""
    as_json = lambda o: str(o) if isinstance(o, Path) else o.__dict__  # noqa: E731
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=as_json))


def config_from_dict(cls, values: dict[str, Any]):
    """Rebuild a (nested) config dataclass from its JSON dict (lists become tuples; unknown keys are ignored)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, kind = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = config_from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
