"""GRPO for action-chunk policies, in one file: PPO's clipped objective with group-relative advantages, no critic.

    python train.py grpo --env.num-envs 8 --group-size 4

Each iteration resets the envs in groups of G that start from identical states (same reset key), plays every
env until its episode ends, and scores each env by its episode return R. The advantage of every decision of
an episode is (R - mean of its group) / (std of its group + eps). Groups in which every env succeeded or every
env failed carry no signal and can be dropped (`--filter-groups`). The policy is then updated with PPO's
clipped surrogate on the decisions of the episodes (steps after an env's first episode ended are masked out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from algos import checkpoint
from algos.config import ConfigError, RLConfig, check_positive, check_range, check_rl_config
from algos.distributed import all_reduce_sum, launched_world_size
from algos.ppo import check_policy_update, clipped_policy_loss, minibatch_indices
from algos.rollout import collect_rollout, logprob_gap_metric, recompute_logprob
from algos.run import (Run, checkpoint_due, env_seed, finish_run, make_optimizer, make_rl_policy, optimizer_params,
                       optimizer_step, out_of_time, perf_metrics, progress, rank_env_config, show, start_run, timestamp)
from envs.workers import make_stages
from models.policy import Params, Policy


@dataclass
class GRPOConfig(RLConfig):
    group_size: int = 2
    """G: envs per group; they start from identical states. Must divide --env.num-envs per DDP rank."""
    max_decisions: int | None = None
    """Decisions per episode at most. None: the env's time limit / T (every episode then ends by itself)."""
    filter_groups: bool = False
    """Drop groups whose envs all succeeded or all failed (their advantages carry no signal)."""
    adv_eps: float = 1e-6
    """eps in (R - mean) / (std + eps)."""
    update_epochs: int = 1
    """Passes over the rollout per iteration."""
    num_minibatches: int = 1
    """Minibatches per epoch (per rank; reshuffled every epoch)."""
    recompute_logprob: bool = False
    """Before the update, recompute the rollout's log-probs with `evaluate` under the same params (one forward
    pass more) and log their gap to the sampled ones as rollout/logprob_gap; the ratios then start at exactly 1
    even where sampling runs other kernels than the update (a CUDA graph, other batch shapes)."""
    clip_coef: float = 0.2
    """Policy ratio clip range epsilon."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages. None: off."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (policies that report no entropy get none)."""
    learning_rate: float = 5e-6
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this."""


# ------------------------------------------------------------------------------------------------------------------
# The algorithm: pure functions of tensors.
# ------------------------------------------------------------------------------------------------------------------
def grpo_advantages(returns: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(R - group mean) / (group std + eps) for returns [N] laid out group by group; std is the unbiased one."""
    groups = returns.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).flatten()


def informative_groups(success: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: the env's group has both successes and failures."""
    groups = success.view(-1, group_size)
    return (groups.any(dim=1) & ~groups.all(dim=1)).repeat_interleave(group_size)


def first_episode_mask(ended: torch.Tensor) -> torch.Tensor:
    """[D, N] bool: the decisions of each env's first episode (up to and including the one that ended it)."""
    ended_before = torch.cumsum(ended.long(), dim=0) - ended.long()
    return ended_before == 0


def group_reset_keys(seed: int, iteration: int, rank: int, world_size: int, num_envs: int, group_size: int,
                     ) -> torch.Tensor:
    """[num_envs] int64 reset keys: G equal keys per group, new groups every iteration and on every rank."""
    groups_per_rank = num_envs // group_size
    first = (seed << 32) + (iteration * world_size + rank) * groups_per_rank
    return (first + torch.arange(groups_per_rank, dtype=torch.int64)).repeat_interleave(group_size)


# ------------------------------------------------------------------------------------------------------------------
# The update (side effects: the optimizer) and the training loop.
# ------------------------------------------------------------------------------------------------------------------
def update(cfg: GRPOConfig, policy: Policy, params: Params, optimizer: torch.optim.Optimizer,
           rows: dict[str, torch.Tensor], run: Run) -> dict[str, float]:
    """`update_epochs` passes of minibatch AdamW steps of the clipped surrogate over `rows` (this rank's kept
    decisions; ranks may hold different numbers). Each step minimises the mean over the minibatch's rows of all
    ranks; a minibatch with no rows on any rank takes no step (AdamW's momentum and weight decay would still move
    the params), and a rank with none while others have some contributes a zero gradient to their step."""
    num_rows = rows["advantages"].shape[0]
    totals: dict[str, list[torch.Tensor]] = {}
    for _ in range(cfg.update_epochs):
        for idx in minibatch_indices(num_rows, cfg.num_minibatches, run.generator):
            all_rows = all_reduce_sum(torch.tensor(float(idx.numel()), device=run.device)).item()
            if all_rows == 0:
                continue
            if idx.numel() == 0:
                loss = sum((p * 0).sum() for p in optimizer_params(optimizer))
                optimizer_step(optimizer, loss, cfg.max_grad_norm)
                continue
            mb = {k: v[idx] for k, v in rows.items()}
            with run.autocast():
                logprob, _, entropy = policy.evaluate(params, mb)
            pg_loss, stats = clipped_policy_loss(logprob.float(), mb["logprob"].float(), mb["advantages"],
                                                 cfg.clip_coef, cfg.dual_clip)
            entropy = entropy.float().mean() if entropy is not None else torch.zeros((), device=run.device)
            loss = pg_loss - cfg.ent_coef * entropy
            # this rank's share of the rows: DDP averages the gradients over ranks, so the step is that of the
            # mean over all rows (each row weighs the same whichever rank holds it); 1 in a single process
            share = idx.numel() * run.world_size / all_rows
            grad_norm = optimizer_step(optimizer, loss * share, cfg.max_grad_norm)
            for k, v in {"actor/loss": loss, "actor/entropy": entropy, "actor/grad_norm": grad_norm,
                         "actor/approx_kl": stats["approx_kl"], "actor/pg_clipfrac": stats["clipfrac"]}.items():
                totals.setdefault(k, []).append(v.detach().float())
    # mean over the minibatch steps of all ranks that had rows
    keys = ["actor/loss", "actor/entropy", "actor/grad_norm", "actor/approx_kl", "actor/pg_clipfrac"]
    local = torch.stack([torch.stack(totals[k]).sum() if k in totals else torch.zeros((), device=run.device)
                         for k in keys] + [torch.tensor(float(len(totals.get(keys[0], []))), device=run.device)])
    local = all_reduce_sum(local)
    return {k: (local[i] / local[-1]).item() if local[-1] > 0 else math.nan for i, k in enumerate(keys)}


def check_config(cfg: GRPOConfig) -> None:
    check_rl_config(cfg)
    check_positive(cfg, "update_epochs", "num_minibatches")
    check_range(cfg, "group_size", 2, closed=True)  # a lone env is its group's mean: its advantage is always 0
    check_range(cfg, "adv_eps", 0)
    check_policy_update(cfg)
    world_size = launched_world_size()
    stage_envs = cfg.env.num_envs // world_size // cfg.pipeline_stages
    if stage_envs % cfg.group_size:
        raise ConfigError(
            f"--env.num-envs {cfg.env.num_envs} over {world_size} rank(s) and {cfg.pipeline_stages} pipeline stage(s) "
            f"gives {stage_envs} envs per stage, not divisible by --group-size {cfg.group_size} (groups must not "
            "straddle ranks or stages)")
    if cfg.max_decisions is not None and cfg.max_decisions < 1:
        raise ConfigError(f"--max-decisions must be >= 1, got {cfg.max_decisions}")


def train(cfg: GRPOConfig, make_env: Callable | None = None) -> dict:
    """Train; returns {"params", "history" (metrics per iteration), "run_dir"}. `make_env` defaults to envs.make_env."""
    check_config(cfg)
    if make_env is None:
        from envs import make_env
    run = start_run(cfg, "grpo", cfg.env.device)
    env = make_stages(make_env, rank_env_config(cfg.env, run), cfg.pipeline_stages)
    if not isinstance(env.instruction, str):  # a group compares attempts at one task, from one start
        mixed = [g for g in range(env.num_envs // cfg.group_size)
                 if len(set(env.instruction[g * cfg.group_size:(g + 1) * cfg.group_size])) > 1]
        if mixed:
            env.close()
            raise ConfigError(f"--group-size {cfg.group_size}: groups {mixed} of {env.task} mix instructions "
                              "(a group's envs must share one task); pick a group size that divides each task's envs")
    policy, params, base = make_rl_policy(cfg, env, run.device, run.bf16, checkpoint.checkpoint_base(cfg.resume))
    optimizer = make_optimizer(policy, params, cfg.learning_rate, None, cfg.weight_decay, include_value=False)
    start, global_step = 0, 0
    if cfg.resume:  # every iteration starts from a reset, so no env state needs restoring
        meta, _ = checkpoint.load_checkpoint(run, cfg.resume, policy, params, optimizer)
        start, global_step = meta["iteration"], meta["global_step"]
    success_seen = torch.zeros(env.num_envs, dtype=torch.bool, device=run.device)

    history, steps_here, t_start = [], 0, time.perf_counter()
    bar = progress(run, start, cfg.num_iterations)
    for iteration in bar:
        # 1. Rollout: groups start identically; play until every env has ended its first episode.
        t_rollout = timestamp(run)
        keys = group_reset_keys(cfg.seed, iteration, run.rank, run.world_size, env.num_envs, cfg.group_size)
        obs = env.reset(seed=env_seed(cfg.seed + iteration, run.rank), reset_keys=keys.to(run.device))
        success_seen.zero_()
        num_decisions = cfg.max_decisions or env.max_episode_steps  # the time limit ends every episode by then
        batch, obs, stats = collect_rollout(env, policy, params, obs, num_decisions, run, success_seen,
                                                          first_episodes=True)

        # 2. Group-relative advantages of each env's first episode, broadcast to its decisions.
        in_episode = first_episode_mask(batch["terminated"] | batch["truncated"])
        returns = (batch["reward"] * in_episode).sum(0)
        success = (batch["success"] & in_episode).any(0)
        advantages = grpo_advantages(returns, cfg.group_size, cfg.adv_eps)
        keep = informative_groups(success, cfg.group_size) if cfg.filter_groups \
            else torch.ones_like(success)
        mask = in_episode & keep
        rows = {k: v[mask] for k, v in batch.items()}
        rows["advantages"] = advantages.expand_as(mask)[mask]
        logprob_gap = None
        if cfg.recompute_logprob:
            rows["logprob"], logprob_gap = recompute_logprob(policy, params, rows, cfg.num_minibatches, run)

        # 3. Update.
        t_update = timestamp(run)
        metrics = update(cfg, policy, params, optimizer, rows, run)
        policy.update_normalizer(params, batch["state"][in_episode], all_reduce_sum)
        t_done = timestamp(run)

        # 4. Log and checkpoint.
        env_steps = int(all_reduce_sum(torch.tensor(float(stats.env_steps), device=run.device)).item())
        global_step += env_steps
        steps_here += env_steps
        sums = all_reduce_sum(torch.stack([returns.sum(), success.float().sum(), keep.float().sum(),
                                                  (advantages * keep).sum(), mask.float().sum()]).double())
        n = env.num_envs * run.world_size
        metrics |= {"rollout/returns_mean": sums[0].item() / n, "rollout/success_rate": sums[1].item() / n,
                    "rollout/groups_kept": sums[2].item() / n,
                    "rollout/advantages_mean": sums[3].item() / max(sums[2].item(), 1),
                    "rollout/decisions": sums[4].item(), **stats.metrics(),
                    **logprob_gap_metric(logprob_gap, run),
                    "charts/learning_rate": optimizer.param_groups[0]["lr"],
                    "charts/SPS": steps_here / (time.perf_counter() - t_start), "charts/iteration": iteration + 1,
                    **perf_metrics(run, t_rollout, t_update, t_done)}
        history.append(metrics)
        if run.logger is not None:
            run.logger.log(metrics, global_step)
        show(run, bar, metrics)
        stop = out_of_time(run, t_start)
        if checkpoint_due(run, iteration + 1) or stop:
            checkpoint.save_checkpoint(run, iteration + 1, {"global_step": global_step}, policy, params, base,
                                       optimizer, {})
        if stop:
            break
    env.close()
    finish_run(run)
    return {"params": params, "history": history, "run_dir": run.run_dir}
