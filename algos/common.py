"""Plumbing that PPO and GRPO share, so that `ppo.py` and `grpo.py` read as the algorithm and nothing else:
run flags, distributed setup, seeding and RNG capture, policy and optimizer construction, rollout collection,
checkpoint I/O and logging. Everything here is side effects; the algorithm's maths lives in the algorithm files.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from envs.config import EnvConfig
from models.mlp import MLPConfig, MLPPolicy

CHECKPOINT_PREFIX = "iter_"


# ------------------------------------------------------------------------------------------------------------------
# Flags both algorithms take (the algorithm's own hyperparameters live in its Config, which subclasses this).
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    exp_name: str = "leanvla"
    """Name of the experiment; part of the run directory's name."""
    seed: int = 1
    """Seed of the policy's initialisation, the env resets and all sampling."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The environment (`--env.task`, `--env.num-envs` is the total over all DDP ranks, ...)."""
    policy: str = "gr00t-tiny"
    """`mlp` (state tasks), a GR00T preset (gr00t-tiny, gr00t-small, gr00t-n1.5-3b: random init), or a GR00T
    checkpoint in the official layout (a directory or a Hugging Face id such as RLinf/RLinf-Gr00t-SFT-Stack-cube)."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The MLP actor-critic (used when `--policy mlp`)."""
    gr00t_tokenizer: str | None = None
    """Tokenizer of a random-init GR00T preset: a local directory with the Qwen/Eagle tokenizer files, `builtin`
    (the project's offline one), or None (the preset's own: the hub's Qwen/Qwen3-1.7B for gr00t-n1.5-3b)."""
    gr00t_noise_level: float | None = None
    """Flow-SDE noise level a of GR00T's stochastic denoising steps: the exploration of RL (sigma_t = a sqrt((1-t)/t)).
    None: the checkpoint's or preset's (0.5)."""
    gr00t_sde_steps: Literal["one", "all"] | None = None
    """Which of GR00T's denoising steps are stochastic in RL: `one` random step per `sample` call (RLinf) or `all`.
    None: the checkpoint's or preset's (`one`)."""
    cuda_graphs: bool = False
    """Replay GR00T's `sample` from CUDA graphs (GPU only; one graph per batch shape)."""
    compile: bool = False
    """torch.compile GR00T's repeated transformer blocks (regional: each block class compiles once; about 25 s for
    the 3B model on an H100; faster `sample` and `evaluate`)."""
    num_iterations: int = 2
    """Rollout + update iterations in total (a resumed run continues up to this number)."""
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


class ConfigError(ValueError):
    """A bad flag or input, reported to the user as one line (train.py / eval.py exit with it)."""


def check_run_config(cfg: RunConfig) -> None:
    for name in ("num_iterations", "save_every", "keep_last"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise ConfigError(f"--max-minutes must be > 0, got {cfg.max_minutes}")
    if cfg.gr00t_noise_level is not None and not cfg.gr00t_noise_level > 0:
        raise ConfigError(f"--gr00t-noise-level must be > 0, got {cfg.gr00t_noise_level}")
    if cfg.policy == "mlp" and (cfg.gr00t_noise_level is not None or cfg.gr00t_sde_steps is not None):
        raise ConfigError("--gr00t-noise-level / --gr00t-sde-steps set GR00T's Flow-SDE; --policy mlp has none")
    if cfg.env.num_envs < 1:
        raise ConfigError(f"--env.num-envs must be >= 1, got {cfg.env.num_envs}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.env.num_envs % world_size:
        raise ConfigError(f"--env.num-envs {cfg.env.num_envs} is not divisible by the {world_size} DDP ranks")
    if cfg.resume:
        find_checkpoint(cfg.resume)


# ------------------------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK) and the run context.
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a training process knows about itself: its rank, device, RNG, output directory and logger."""

    cfg: RunConfig
    algo: str
    rank: int
    world_size: int
    device: torch.device
    generator: torch.Generator
    run_dir: Path | None
    logger: Logger | None
    bf16: bool
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 compute on GPU with fp32 master weights; a no-op in fp32."""
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one (and it is not joined yet): NCCL on GPU, gloo on CPU.
    Returns rank, world size, device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per rank
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, dev


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def timestamp(run: Run) -> float:
    """Wall-clock seconds after the GPU has finished the work queued so far (so phases can be timed)."""
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return time.perf_counter()


def perf_metrics(run: Run, t_rollout: float, t_update: float, t_done: float) -> dict[str, float]:
    """Seconds of an iteration's rollout and update (from `timestamp`s) and the peak GPU memory of all ranks."""
    return {"perf/rollout_time": t_update - t_rollout, "perf/update_time": t_done - t_update,
            "perf/peak_memory_gb": peak_memory_gb(run)}


def peak_memory_gb(run: Run) -> float:
    """The largest peak of allocated GPU memory over all ranks, in GiB (0 on CPU)."""
    if run.device.type != "cuda":
        return 0.0
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(run.device)), device=run.device)
    return all_reduce_max(peak).item() / 2**30


def all_reduce_grads(params: list[torch.Tensor], bucket_numel: int = 1 << 25) -> None:
    """Average the gradients of `params` over ranks in a few flat buckets (a missing gradient counts as zero)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    world_size = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        start = 0
        while start < len(grads):
            end, numel = start, 0
            while end < len(grads) and (numel == 0 or numel + grads[end].numel() <= bucket_numel):
                numel += grads[end].numel()
                end += 1
            flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
            dist.all_reduce(flat)
            flat /= world_size
            for g, chunk in zip(grads[start:end], flat.split([g.numel() for g in grads[start:end]])):
                g.copy_(chunk.view_as(g))
            start = end


def start_run(cfg: RunConfig, algo: str) -> Run:
    """Join the process group, seed everything, pick the run directory and (rank 0) open the logger."""
    joined_before = dist.is_initialized()
    rank, world_size, device = setup_distributed(cfg.env.device)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)  # env randomisation draws from here: different per rank
    torch.backends.cudnn.deterministic = cfg.torch_deterministic
    generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    run_dir = None
    if rank == 0:
        if cfg.run_dir:
            run_dir = Path(cfg.run_dir)
        elif cfg.resume:
            run_dir = find_checkpoint(cfg.resume).parent.parent
        else:
            run_dir = Path("runs") / f"{cfg.exp_name}__{algo}__{cfg.seed}__{int(time.time())}"
        run_dir.mkdir(parents=True, exist_ok=True)
    logger = Logger(run_dir, cfg, algo) if rank == 0 else None
    return Run(cfg, algo, rank, world_size, device, generator, run_dir, logger, bf16,
               owns_process_group=dist.is_initialized() and not joined_before)


def finish_run(run: Run) -> None:
    if run.logger is not None:
        run.logger.close()
    if dist.is_initialized():
        dist.barrier()
        if run.owns_process_group:  # a caller that set up the group tears it down itself
            dist.destroy_process_group()


def rank_env_config(env_cfg: EnvConfig, run: Run) -> EnvConfig:
    """This rank's share of the envs, on this rank's device."""
    if env_cfg.num_envs % run.world_size:
        raise ConfigError(f"--env.num-envs {env_cfg.num_envs} is not divisible by the {run.world_size} DDP ranks")
    return dataclasses.replace(env_cfg, num_envs=env_cfg.num_envs // run.world_size, device=str(run.device))


def env_seed(seed: int, rank: int) -> int:
    return seed + 1_000_003 * rank


# ------------------------------------------------------------------------------------------------------------------
# Policy and optimizer.
# ------------------------------------------------------------------------------------------------------------------
def make_policy(cfg: RunConfig, env, device: torch.device, bf16: bool = False, base: dict | None = None):
    """The policy named by `--policy` and its initial params. Returns (policy, params, base): `base` says where
    the frozen weights came from (a seeded init or a checkpoint, plus GR00T's normalisation metadata); it is
    recorded in every checkpoint, and passing it back rebuilds the same policy (resume, eval)."""
    if cfg.policy == "mlp":
        policy = MLPPolicy(env.state_dim, env.action_dim, cfg.mlp, device)
        return policy, policy.init(cfg.seed), {"policy": "mlp", "init_seed": cfg.seed}
    from models.gr00t import PRESETS, Gr00tConfig, Gr00tPolicy

    dtype = torch.bfloat16 if bf16 else torch.float32
    rl_head = {k: v for k, v in (("noise_level", cfg.gr00t_noise_level), ("sde_steps", cfg.gr00t_sde_steps))
               if v is not None}
    if cfg.policy in PRESETS:  # random init: for CPU runs, tests and from-scratch experiments
        if env.num_views < 1:
            raise ConfigError(f"--policy {cfg.policy} needs a camera task; {env_task(env)} has no cameras "
                              "(use --policy mlp)")
        metadata = (base or {}).get("metadata") or identity_metadata(env)
        policy = Gr00tPolicy(Gr00tConfig.preset(cfg.policy, num_views=env.num_views, **rl_head), device, metadata,
                             compute_dtype=dtype, tokenizer=cfg.gr00t_tokenizer, cuda_graphs=cfg.cuda_graphs,
                             compile=cfg.compile)
        return policy, policy.init(cfg.seed), {"policy": cfg.policy, "init_seed": cfg.seed, "metadata": metadata}
    if not (Path(cfg.policy).is_dir() or cfg.policy.count("/") == 1):
        raise ConfigError(f"--policy {cfg.policy!r} is neither 'mlp', a GR00T preset ({', '.join(sorted(PRESETS))}), "
                          "a checkpoint directory nor a Hugging Face id")
    policy, params = Gr00tPolicy.from_pretrained(cfg.policy, device, compute_dtype=dtype, cuda_graphs=cfg.cuda_graphs,
                                                 compile=cfg.compile, **rl_head)
    return policy, params, {"policy": "gr00t", "checkpoint": cfg.policy}


def checkpoint_base(resume: str | None) -> dict | None:
    """The `base` recorded in the checkpoint that --resume names (None when not resuming)."""
    if not resume:
        return None
    return json.loads((find_checkpoint(resume) / "state.json").read_text())["policy"]["base"]


def env_task(env) -> str:
    return getattr(env, "task", type(env).__name__)


def env_metadata(state: torch.Tensor, action: torch.Tensor, view_size: tuple[int, int], num_views: int,
                 embodiment_tag: str = "new_embodiment") -> dict:
    """GR00T normalisation metadata for env vectors, from frames of them: state [F, S] under key "state", the
    action's arm dims [F, A-1] under "action" and its last dim under "gripper"; views "view0".. at (width, height).
    The one place that fixes this key layout (random-init policies and SFT on demonstrations both use it)."""
    from models.gr00t_processor import metadata_from_data

    arm = {"action": action[:, :-1]} if action.shape[1] > 1 else {}  # a 1-d action is the gripper alone
    return metadata_from_data(embodiment_tag, {"state": state}, {**arm, "gripper": action[:, -1:]},
                              {f"view{v}": view_size for v in range(num_views)})


def identity_metadata(env) -> dict:
    """GR00T normalisation metadata for a randomly initialised model, which has no data statistics: every state
    and action dim gets min -1, max 1 (min-max normalisation is then the identity); views at the env's size."""
    unit = lambda d: torch.tensor([[-1.0] * d, [1.0] * d])  # noqa: E731  (two frames: min -1, max 1)
    size = getattr(getattr(env, "cfg", None), "image_size", 224)
    return env_metadata(unit(env.state_dim), unit(env.action_dim), (size, size), env.num_views)


def trainable_params(policy, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p for n, p in params.items() if policy.is_trainable(n)}


def make_optimizer(policy, params: dict[str, torch.Tensor], lr: float, value_lr: float | None, weight_decay: float,
                   include_value: bool = True) -> torch.optim.AdamW:
    """AdamW over the trainable params; the value head (if any) gets its own learning rate."""
    is_value = getattr(policy, "is_value_param", lambda name: False)
    named = trainable_params(policy, params)
    groups = [{"params": [(n, p) for n, p in named.items() if not is_value(n)], "lr": lr}]
    value = [(n, p) for n, p in named.items() if is_value(n)]
    if value and include_value:
        groups.append({"params": value, "lr": value_lr if value_lr is not None else lr})
    fused = next(iter(named.values())).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Backward, average gradients over DDP ranks, clip, step. Returns the pre-clip norm of all gradients.

    Each param group (the policy; the value head) is clipped to `max_grad_norm` on its own, as rsl_rl clips
    actor and critic: a large value-loss gradient then does not shrink the policy's step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_grads(optimizer_params(optimizer))
    norms = [torch.nn.utils.clip_grad_norm_(g["params"], max_grad_norm) for g in optimizer.param_groups]
    optimizer.step()
    return torch.linalg.vector_norm(torch.stack([n.to(loss.device) for n in norms]))  # a group without grads: CPU 0


def recompute_logprob(policy, params, rows: dict[str, torch.Tensor], num_minibatches: int,
                      run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout's log-probs [R] recomputed by `evaluate` under the rollout's params, in minibatches of the
    update's sizes; and the mean |recomputed - sampled| (a scalar, for the logs).

    `sample` and `evaluate` may reach their numbers by different kernels (a CUDA graph, other batch shapes, in
    bf16, GR00T's fused GELU of `sample`), and a gap summed over a chunk's action dims would read as policy change.
    Ratios against the recomputed log-probs start at exactly 1. (Lift, gr00t-small, bf16, no CUDA graphs, H100,
    before the fused GELU: the gap was 0.) Autograd stays on, as in the update, so that `evaluate` runs the
    update's kernels and compiled graphs (GR00T fuses its GELU only without autograd); each minibatch's graph is
    dropped once its log-probs are detached."""
    num_rows = rows["logprob"].shape[0]
    parts = []
    for idx in torch.tensor_split(torch.arange(num_rows, device=rows["logprob"].device), num_minibatches):
        with run.autocast():
            logprob, _, _ = policy.evaluate(params, {k: v[idx] for k, v in rows.items()})
        parts.append(logprob.detach().float())
    recomputed = torch.cat(parts)
    gap = (recomputed - rows["logprob"].float()).abs().mean() if num_rows else torch.zeros((), device=run.device)
    return recomputed, gap


def logprob_gap_metric(gap: torch.Tensor | None, run: Run) -> dict[str, float]:
    """`recompute_logprob`'s gap averaged over ranks, as rollout/logprob_gap; nothing when not recomputed."""
    if gap is None:
        return {}
    return {"rollout/logprob_gap": (all_reduce_sum(gap.double()) / run.world_size).item()}


def minibatch_indices(num_rows: int, num_minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A fresh random split of `num_rows` rows into `num_minibatches` near-equal index sets (call once per epoch)."""
    perm = torch.randperm(num_rows, generator=generator, device=generator.device)
    return list(torch.tensor_split(perm, num_minibatches))


def policy_value(policy, params, obs: dict[str, torch.Tensor], instruction: str, run: Run) -> torch.Tensor:
    """V(obs). Policies without a `value` method compute it by a deterministic `sample` on a throwaway generator,
    so the training RNG stream is not disturbed."""
    with torch.no_grad(), run.autocast():
        if hasattr(policy, "value"):
            return policy.value(params, obs, instruction).float()
        scratch = torch.Generator(device=run.device).manual_seed(0)
        return policy.sample(params, obs, instruction, scratch, deterministic=True)["value"].float()


# ------------------------------------------------------------------------------------------------------------------
# Rollout collection: one loop for T = 1 (MLP) and action chunks of T > 1 (GR00T).
# ------------------------------------------------------------------------------------------------------------------
class Episodes:
    """Sums over the episodes that ended during a rollout, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # return, length, success, count

    def add(self, done: torch.Tensor, returns: torch.Tensor, lengths: torch.Tensor, success: torch.Tensor) -> None:
        d = done.double()
        self.sums += torch.stack([(returns.double() * d).sum(), (lengths.double() * d).sum(),
                                  (success.double() * d).sum(), d.sum()])

    def metrics(self) -> dict[str, float]:
        """Means over all ranks: env/episode_return, env/episode_len, env/success_once (none if no episode ended)."""
        total, length, success, n = all_reduce_sum(self.sums).tolist()
        if n == 0:
            return {}
        return {"env/episode_return": total / n, "env/episode_len": length / n, "env/success_once": success / n,
                "env/episodes": n}


@torch.no_grad()
def collect_rollout(env, policy, params, obs: dict[str, torch.Tensor], num_decisions: int, run: Run,
                    success_seen: torch.Tensor, stop_when_all_done: bool = False,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Episodes, int]:
    """Run the policy for up to `num_decisions` decisions of T env steps each (T = the action chunk length).

    Returns (batch, next obs, finished episodes, env steps taken). `batch` stacks everything `policy.sample`
    returned, each [D, N, ...], plus the chunk-level `reward` (sum of the chunk's step rewards up to the
    sub-env's end), `terminated` and `truncated` (the sub-env ended during the chunk, by failure/success or by
    time limit) and `success` (the task succeeded during the chunk, before any end). A sub-env that ends
    mid-chunk is reset by the env and spends the rest of the chunk in its next episode: holding still with the
    env's `idle_action` if it has one (the chunk's remaining actions were planned for the old episode), else
    playing them; those steps' rewards are left out. `success_seen` [N] (carried across rollouts, updated in
    place) tracks whether the current episode has succeeded yet. With `stop_when_all_done` (GRPO) the rollout
    ends as soon as every sub-env has ended an episode.
    """
    n = env.num_envs
    idle = getattr(env, "idle_action", None)
    steps: list[dict[str, torch.Tensor]] = []
    episodes = Episodes(run.device)
    ended_once = torch.zeros(n, dtype=torch.bool, device=run.device)
    env_steps = 0
    for _ in range(num_decisions):
        with run.autocast():
            out = policy.sample(params, obs, env.instruction, run.generator)
        actions = out["actions"].float()
        reward = torch.zeros(n, device=run.device)
        terminated = torch.zeros(n, dtype=torch.bool, device=run.device)
        truncated = torch.zeros(n, dtype=torch.bool, device=run.device)
        success = torch.zeros(n, dtype=torch.bool, device=run.device)
        for k in range(actions.shape[1]):
            action = actions[:, k]
            if idle is not None:
                action = torch.where((terminated | truncated).unsqueeze(-1), idle, action)
            obs, r, term, trunc, info = env.step(action.contiguous())
            env_steps += n
            in_chunk_episode = ~(terminated | truncated)
            reward += r.float() * in_chunk_episode
            terminated |= term & in_chunk_episode
            truncated |= trunc & in_chunk_episode & ~term
            success |= info["success"] & in_chunk_episode
            success_seen |= info["success"]
            done = term | trunc
            episodes.add(done, info["episode_return"], info["episode_length"], success_seen)
            success_seen &= ~done
        steps.append({**out, "reward": reward, "terminated": terminated, "truncated": truncated, "success": success})
        ended_once |= terminated | truncated
        if stop_when_all_done and bool(ended_once.all()):
            break
    batch = {k: torch.stack([s[k] for s in steps]) for k in steps[0]}
    return batch, obs, episodes, env_steps


# ------------------------------------------------------------------------------------------------------------------
# RNG capture (python, numpy, torch CPU, CUDA, the run's generator), JSON-serialisable.
# ------------------------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else None,
        "generator": _b64(generator.get_state()),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    generator.set_state(_unb64(state["generator"]))


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: <run_dir>/checkpoints/iter_000012/{policy,normalizer,optimizer,carry_rank<r>}.safetensors + state.json
# ------------------------------------------------------------------------------------------------------------------
def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint under a run directory."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(root.glob(f"{CHECKPOINT_PREFIX}*/state.json")) if root.is_dir() else []
    if not found:
        raise ConfigError(f"no checkpoint at {path} (expected a directory with state.json, or a run "
                                f"directory with checkpoints/{CHECKPOINT_PREFIX}*/)")
    return found[-1].parent


def _to_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: str(o) if isinstance(o, Path) else o.__dict__))


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    return _to_json(dataclasses.asdict(cfg))


def save_checkpoint(run: Run, iteration: int, counters: dict[str, Any], policy, params, base: dict[str, Any],
                    optimizer: torch.optim.Optimizer, carry: dict[str, torch.Tensor]) -> Path | None:
    """Write a checkpoint atomically (temp dir + rename) and keep the newest `keep_last`. Collective: every rank
    calls it; rank 0 writes. `carry` is this rank's rollout state (next obs, episode flags, env state if any)."""
    rank_state = {"rng": rng_state(run.generator), "carry": {k: v.detach().cpu() for k, v in carry.items()}}
    if run.world_size > 1:
        gathered: list[Any] = [None] * run.world_size
        dist.all_gather_object(gathered, rank_state)
    else:
        gathered = [rank_state]
    final = None
    if run.is_main:
        root = run.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{iteration:06d}"
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cpu = lambda d: {k: v.detach().cpu().contiguous() for k, v in d.items()}  # noqa: E731
        save_file(cpu(trainable_params(policy, params)), tmp / "policy.safetensors")
        normalizer = {n: params[n] for n in getattr(policy, "normalizer_names", ())}
        if normalizer:
            save_file(cpu(normalizer), tmp / "normalizer.safetensors")
        opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
        save_file(cpu(opt_tensors), tmp / "optimizer.safetensors")
        for r, state in enumerate(gathered):
            if state["carry"]:
                save_file(cpu(state["carry"]), tmp / f"carry_rank{r}.safetensors")
        meta = {"algo": run.algo, "iteration": iteration, **counters, "world_size": run.world_size,
                "policy": {"name": run.cfg.policy, "base": base, "trainable": sorted(trainable_params(policy, params))},
                "optimizer": opt_meta, "config": config_dict(run.cfg), "rng": [s["rng"] for s in gathered]}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # re-saving the same iteration (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[: -max(run.cfg.keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        if run.logger is not None:
            run.logger.flush()
    if run.world_size > 1:
        dist.barrier()
    return final


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state keyed by parameter name ("<param>/<exp_avg|exp_avg_sq|step>"); hyperparameters as JSON."""
    sd = optimizer.state_dict()
    names = [n for g in sd["param_groups"] for n in g["param_names"]]
    tensors = {f"{names[i]}/{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_checkpoint(run: Run, path: str | Path, policy, params: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore params (in place), optimizer state and this rank's RNG. Returns (state.json, this rank's carry)."""
    ckpt = find_checkpoint(path)
    meta = json.loads((ckpt / "state.json").read_text())
    load_params_into(ckpt, policy, params)
    if optimizer is not None:
        tensors = load_file(ckpt / "optimizer.safetensors", device=str(run.device))
        groups = [{k: tuple(v) if isinstance(v, list) and k not in ("params", "param_names") else v
                   for k, v in g.items()} for g in meta["optimizer"]["param_groups"]]  # JSON made betas a list
        ours = [n for g in optimizer.param_groups for n in g["param_names"]]
        theirs = [n for g in groups for n in g["param_names"]]
        if ours != theirs:
            raise ValueError(f"{ckpt}: optimizer parameters differ from this run's (was the policy changed?)")
        state = {}
        for i, name in enumerate(theirs):
            entry = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
            if entry:
                state[i] = entry
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    carry: dict[str, torch.Tensor] = {}
    if meta["world_size"] == run.world_size:
        set_rng_state(meta["rng"][run.rank], run.generator)
        carry_file = ckpt / f"carry_rank{run.rank}.safetensors"
        if carry_file.is_file():
            carry = load_file(carry_file, device=str(run.device))
    else:
        warnings.warn(f"{ckpt} was written by {meta['world_size']} ranks, this run has {run.world_size}: "
                      "RNG streams and env state restart, so the continuation is not bit-exact")
    return meta, carry


def load_params_into(ckpt: Path, policy, params: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's trainable params and normaliser into `params` (whose frozen part is the base)."""
    for file in ("policy.safetensors", "normalizer.safetensors"):
        if not (ckpt / file).is_file():
            continue
        for name, t in load_file(ckpt / file).items():
            if name not in params:
                raise ValueError(f"{ckpt / file}: {name!r} is not a parameter of this policy")
            with torch.no_grad():
                params[name].copy_(t)


def checkpoint_due(run: Run, iteration: int) -> bool:
    """Save after iteration `iteration` (1-based count of finished iterations)?"""
    return iteration % run.cfg.save_every == 0 or iteration == run.cfg.num_iterations


def out_of_time(run: Run, started: float) -> bool:
    """Has --max-minutes passed since `started` (time.perf_counter())? Judged by the slowest rank's clock, so that
    all ranks stop after the same iteration."""
    if run.cfg.max_minutes is None:
        return False
    elapsed = all_reduce_max(torch.tensor(time.perf_counter() - started, device=run.device, dtype=torch.float64))
    if elapsed.item() < 60 * run.cfg.max_minutes:
        return False
    if run.is_main:
        print(f"{run.algo}: --max-minutes {run.cfg.max_minutes:g} reached; stopping")
    return True


def carry_state(env, obs: dict[str, torch.Tensor], success_seen: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a rollout carries into the next iteration. Bit-exact resume needs the env's own state too, which only
    an env with `state_dict()` provides; otherwise a resumed run restarts its episodes."""
    carry = {f"obs.{k}": v for k, v in obs.items()}
    carry["success_seen"] = success_seen
    if getattr(env, "state_dict", None) is not None:
        carry.update({f"env.{k}": v for k, v in env.state_dict().items()})
    return carry


def restore_carry(env, carry: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """The inverse of `carry_state`: (obs, success_seen), or None if the env's state cannot be restored."""
    env_state = {k[4:]: v for k, v in carry.items() if k.startswith("env.")}
    if not env_state or getattr(env, "load_state_dict", None) is None:
        warnings.warn("the env cannot restore its mid-episode state (no state_dict/load_state_dict): the resumed "
                      "run starts fresh episodes, so it does not continue bit-exactly")
        return None
    env.load_state_dict(env_state)
    obs = {k[4:]: v for k, v in carry.items() if k.startswith("obs.")}
    return obs, carry["success_seen"].bool()


# ------------------------------------------------------------------------------------------------------------------
# Logging: TensorBoard always, W&B with --track; the config is saved with the run.
# ------------------------------------------------------------------------------------------------------------------
class Logger:
    def __init__(self, run_dir: Path, cfg: RunConfig, algo: str):
        from torch.utils.tensorboard import SummaryWriter

        config = {"algo": algo, **config_dict(cfg)}
        (run_dir / "config.json").write_text(json.dumps(config, indent=1))
        self.writer = SummaryWriter(str(run_dir))
        self.writer.add_text("config", "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # the same scalars, one JSON line per log call, for scripts
        self.wandb = None
        if cfg.track:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_dir.name,
                                    config=config, dir=str(run_dir), mode=cfg.wandb_mode, resume="allow",
                                    id=run_dir.name.replace(".", "_"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if not math.isnan(v):
                self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **{k: v for k, v in metrics.items() if not math.isnan(v)}}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if not math.isnan(v)}, step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress(run: Run, start: int, total: int) -> Iterator[int]:
    """Iterations `start..total-1` with a tqdm bar on rank 0 (postfix set by `show`)."""
    if not run.is_main:
        return iter(range(start, total))
    from tqdm import tqdm

    return tqdm(range(start, total), initial=start, total=total, desc=run.algo, dynamic_ncols=True)


def show(bar, metrics: dict[str, float]) -> None:
    if hasattr(bar, "set_postfix"):
        keys = {"SPS": "charts/SPS", "success": "env/success_once", "return": "env/episode_return"}
        bar.set_postfix({k: f"{metrics[m]:.3g}" for k, m in keys.items() if m in metrics}, refresh=False)



def config_from_dict(cls, values: dict[str, Any]):
    """Rebuild a (nested) config dataclass from its JSON dict (lists become tuples; unknown keys are ignored)."""
    import typing

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
