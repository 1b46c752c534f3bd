"""A training process's plumbing, shared by PPO, GRPO and SFT: the run context (rank, device, RNG, run directory),
logging, timing, and the construction of the policy and its optimizer. All side effects; no algorithm here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from algos.config import ConfigError, RLConfig, RunConfig, config_dict
from algos.distributed import all_reduce_grads, all_reduce_max, setup_distributed
from envs import Env, EnvConfig
from models.mlp import MLPConfig, MLPPolicy
from models.policy import Params, Policy


# ------------------------------------------------------------------------------------------------------------------
# The run context.
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


def uses_bf16(precision: str, device: torch.device) -> bool:
    """--precision: `bf16`, or `auto` on a GPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def start_run(cfg: RunConfig, algo: str, device: str) -> Run:
    """Join the process group, seed everything, pick the run directory and (rank 0) open the logger."""
    from algos.checkpoint import find_checkpoint, resume_step

    joined_before = dist.is_initialized()
    rank, world_size, dev = setup_distributed(device)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)  # env randomisation draws from here: different per rank
    torch.backends.cudnn.deterministic = cfg.torch_deterministic
    generator = torch.Generator(device=dev).manual_seed(cfg.seed + rank)

    run_dir = None
    if rank == 0:
        if cfg.run_dir:
            run_dir = Path(cfg.run_dir)
        elif cfg.resume:
            run_dir = find_checkpoint(cfg.resume).parent.parent
        else:
            run_dir = Path("runs") / f"{cfg.exp_name}__{algo}__{cfg.seed}__{int(time.time())}"
        run_dir.mkdir(parents=True, exist_ok=True)
    logger = Logger(run_dir, cfg, algo, resume_step(cfg.resume) if cfg.resume else None) if rank == 0 else None
    return Run(cfg, algo, rank, world_size, dev, generator, run_dir, logger, uses_bf16(cfg.precision, dev),
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


# ------------------------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------------
# The policy and its optimizer.
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spaces:
    """What a policy acts on: the env's spaces in RL and eval, the demonstrations' in SFT."""

    task: str
    state_dim: int
    action_dim: int
    num_views: int
    image_size: int
    """Height and width of the camera views (camera tasks)."""

    @classmethod
    def of(cls, env: Env) -> Spaces:
        return cls(env.task, env.state_dim, env.action_dim, env.num_views, env.image_size)


def make_policy(cfg: RunConfig, spaces: Spaces, device: torch.device, bf16: bool, base: dict | None = None, *,
                metadata: dict | None = None, gr00t_overrides: dict | None = None, mlp: MLPConfig | None = None,
                compile: bool = False, cuda_graphs: bool = False) -> tuple[Policy, Params, dict]:
    """The policy that `cfg.policy` names and its initial params, for PPO, GRPO, SFT and eval alike.

    Returns (policy, params, base): `base` says where the frozen weights came from (a seeded init or a checkpoint,
    plus GR00T's normalisation metadata); it is recorded in every checkpoint, and passing it back rebuilds the same
    policy (resume, eval). `metadata`: the normalisation statistics of a random-init GR00T preset (None: identity,
    min -1 and max 1 for every dim); `gr00t_overrides`: Gr00tConfig fields to set (the RL head's noise, the parts
    SFT trains); `mlp`: the MLP's config, None where this job cannot train an MLP; `compile` / `cuda_graphs`: GR00T's
    GPU fast path (models/gr00t_fast.py)."""
    not_a_preset = "--gr00t-image-size sets the input size of a random-init GR00T preset; --policy {} {}"
    if cfg.policy == "mlp":
        if cfg.gr00t_image_size is not None:
            raise ConfigError(not_a_preset.format(cfg.policy, "has no images"))
        if mlp is None:
            raise ConfigError("this job trains GR00T: --policy must be a GR00T preset or checkpoint, not mlp")
        policy = MLPPolicy(spaces.state_dim, spaces.action_dim, mlp, device)
        return policy, policy.init(cfg.seed), {"policy": "mlp", "init_seed": cfg.seed}
    from models.gr00t import PRESETS, Gr00tConfig, Gr00tPolicy
    from models.gr00t_fast import accelerate

    dtype = torch.bfloat16 if bf16 else torch.float32
    overrides = gr00t_overrides or {}
    if cfg.policy in PRESETS:  # random init: for CPU runs, tests and from-scratch experiments
        if spaces.num_views < 1:
            raise ConfigError(f"--policy {cfg.policy} needs camera images; {spaces.task} has no cameras")
        metadata = (base or {}).get("metadata") or metadata or identity_metadata(spaces)
        size = {} if cfg.gr00t_image_size is None else {"image_size": cfg.gr00t_image_size}
        policy = Gr00tPolicy(Gr00tConfig.preset(cfg.policy, num_views=spaces.num_views, **size, **overrides), device,
                             metadata, compute_dtype=dtype, tokenizer=cfg.gr00t_tokenizer)
        params = policy.init(cfg.seed)
        base = {"policy": cfg.policy, "init_seed": cfg.seed, "metadata": metadata}
    elif Path(cfg.policy).is_dir() or cfg.policy.count("/") == 1:
        if cfg.gr00t_image_size is not None:
            raise ConfigError(not_a_preset.format(cfg.policy, "keeps the size it was trained at"))
        policy, params = Gr00tPolicy.from_pretrained(cfg.policy, device, compute_dtype=dtype, **overrides)
        base = {"policy": "gr00t", "checkpoint": cfg.policy}
    else:
        raise ConfigError(f"--policy {cfg.policy!r} is neither 'mlp', a GR00T preset ({', '.join(sorted(PRESETS))}), "
                          "a checkpoint directory nor a Hugging Face id")
    if compile or cuda_graphs:
        accelerate(policy, compile=compile, cuda_graphs=cuda_graphs)
    return policy, params, base


FROZEN_BACKBONE = {"tune_llm": False, "tune_visual": False}


def make_rl_policy(cfg: RLConfig, env: Env, device: torch.device, bf16: bool = False,
                   base: dict | None = None) -> tuple[Policy, Params, dict]:
    """`make_policy` with the RL flags: the MLP, GR00T's Flow-SDE exploration and its fast path. RL leaves GR00T's
    backbone frozen whatever the checkpoint was fine-tuned with: `sample` computes its features once, without
    gradients, and `evaluate` reuses them."""
    rl_head = {k: v for k, v in (("noise_level", cfg.gr00t_noise_level), ("sde_steps", cfg.gr00t_sde_steps))
               if v is not None}
    return make_policy(cfg, Spaces.of(env), device, bf16, base, gr00t_overrides=rl_head | FROZEN_BACKBONE,
                       mlp=cfg.mlp, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)


def env_metadata(state: torch.Tensor, action: torch.Tensor, view_size: tuple[int, int], num_views: int,
                 embodiment_tag: str = "new_embodiment") -> dict:
    """GR00T normalisation metadata for env vectors, from frames of them: state [F, S] under key "state", the
    action's arm dims [F, A-1] under "action" and its last dim under "gripper"; views "view0".. at (width, height).
    The one place that fixes this key layout (random-init policies and SFT on demonstrations both use it)."""
    from models.gr00t_processor import metadata_from_data

    arm = {"action": action[:, :-1]} if action.shape[1] > 1 else {}  # a 1-d action is the gripper alone
    return metadata_from_data(embodiment_tag, {"state": state}, {**arm, "gripper": action[:, -1:]},
                              {f"view{v}": view_size for v in range(num_views)})


def identity_metadata(spaces: Spaces) -> dict:
    """GR00T normalisation metadata for a randomly initialised model, which has no data statistics: every state
    and action dim gets min -1, max 1 (min-max normalisation is then the identity); views at the spaces' size."""
    unit = lambda d: torch.tensor([[-1.0] * d, [1.0] * d])  # noqa: E731  (two frames: min -1, max 1)
    size = spaces.image_size
    return env_metadata(unit(spaces.state_dim), unit(spaces.action_dim), (size, size), spaces.num_views)


def trainable_params(policy: Policy, params: Params) -> Params:
    return {n: p for n, p in params.items() if policy.is_trainable(n)}


def make_optimizer(policy: Policy, params: Params, lr: float, value_lr: float | None, weight_decay: float,
                   include_value: bool = True) -> torch.optim.AdamW:
    """AdamW over the trainable params; the value head (if any) gets its own learning rate (its own group, second)."""
    named = trainable_params(policy, params)
    groups = [{"params": [(n, p) for n, p in named.items() if not policy.is_value_param(n)], "lr": lr}]
    value = [(n, p) for n, p in named.items() if policy.is_value_param(n)]
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


# ------------------------------------------------------------------------------------------------------------------
# Logging: TensorBoard always, W&B with --track, the same scalars as JSON lines; the config is saved with the run.
# ------------------------------------------------------------------------------------------------------------------
class Logger:
    def __init__(self, run_dir: Path, cfg: RunConfig, algo: str, resumed_at: int | None = None):
        """`resumed_at`: the step of the checkpoint a resumed run continues from; what the earlier run logged
        after it (before it stopped) is dropped, in metrics.jsonl and TensorBoard, as the resumed run logs it anew."""
        from torch.utils.tensorboard import SummaryWriter

        config = {"algo": algo, **config_dict(cfg)}
        (run_dir / "config.json").write_text(json.dumps(config, indent=1))
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(str(run_dir), purge_step=purge)
        self.writer.add_text("config", "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        # the same scalars, one JSON line per log call, with the wall-clock time, for scripts
        jsonl = run_dir / "metrics.jsonl"
        if resumed_at is not None and jsonl.is_file():
            kept = [line for line in jsonl.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["step"] <= resumed_at]
            tmp = jsonl.with_name(f".{jsonl.name}.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, jsonl)
        self.jsonl = open(jsonl, "a")
        self.wandb = None
        if cfg.track:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_dir.name,
                                    config=config, dir=str(run_dir), mode=cfg.wandb_mode, resume="allow",
                                    id=run_dir.name.replace(".", "_"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in metrics.items() if not math.isnan(v)}
        for k, v in finite.items():
            self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **finite}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(finite, step=step)

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


RL_PROGRESS = {"SPS": "charts/SPS", "success": "env/success_once", "return": "env/episode_return"}


def show(run: Run, bar, metrics: dict[str, float], keys: dict[str, str] = RL_PROGRESS) -> None:
    """Put metrics[keys[label]] on rank 0's progress bar under each label."""
    if run.is_main:
        bar.set_postfix({k: f"{metrics[m]:.3g}" for k, m in keys.items() if m in metrics}, refresh=False)
