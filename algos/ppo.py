"""PPO for action-chunk policies (GR00T N1.5 on stack-cube; a small MLP on Isaac Lab state tasks), in one file.

    python train.py ppo                                  # GR00T (tiny, random init) on stack-cube: the CPU smoke job
    python train.py ppo --policy RLinf/RLinf-Gr00t-SFT-Stack-cube --env.num-envs 64 --num-steps 28 ...   # GPU
    python train.py ppo --policy mlp --env.task Isaac-Cartpole --env.num-envs 4096 --num-steps 16 \
        --num-iterations 150 --mlp.hidden-sizes 32 32 --learning-rate 1e-3 --value-learning-rate 1e-3 \
        --lr-schedule adaptive --value-loss mse --ent-coef 0.005 --update-epochs 5 --num-minibatches 4

Defaults are a starting point for fine-tuning GR00T (small policy step, larger value-head step, Huber value loss);
the MLP line uses rsl_rl's Cartpole settings (benchmarks/ppo_vs_rsl_rl.py maps any task's rsl_rl config).

The algorithm is the pure functions below (`gae`, `normalize`, `clipped_policy_loss`, `value_loss`,
`adaptive_lr`); `train(cfg)` is the loop and the only place with side effects. A decision executes an action
chunk of T env steps (T = 1 for the MLP): rewards are summed over the chunk and a chunk is done if any of its
steps ended the episode, so GAE runs over decisions with one discount per decision (`algos/rollout.py` defines
what a rollout holds).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from algos import checkpoint
from algos.config import ConfigError, RLConfig, check_positive, check_range, check_rl_config
from algos.distributed import all_reduce_sum, launched_world_size
from algos.rollout import collect_rollout, logprob_gap_metric, recompute_logprob
from algos.run import (Run, checkpoint_due, env_seed, finish_run, make_optimizer, make_rl_policy, optimizer_step,
                       out_of_time, perf_metrics, progress, rank_env_config, show, start_run, timestamp)
from envs.workers import make_stages
from models.policy import Params, Policy


@dataclass
class PPOConfig(RLConfig):
    num_steps: int = 4
    """Decisions per env per rollout (each executes one action chunk of T env steps)."""
    gamma: float = 0.99
    """Discount per decision."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    update_epochs: int = 2
    """Passes over the rollout per iteration."""
    num_minibatches: int = 2
    """Minibatches per epoch (per rank; the rows are reshuffled every epoch)."""
    norm_adv: bool = True
    """Normalise advantages to zero mean, unit std over the whole batch of all ranks."""
    recompute_logprob: bool = False
    """Before the update, recompute the rollout's log-probs with `evaluate` under the same params (one forward
    pass more) and log their gap to the sampled ones as rollout/logprob_gap; the ratios then start at exactly 1
    even where sampling runs other kernels than the update (a CUDA graph, other batch shapes)."""
    clip_coef: float = 0.2
    """Policy ratio clip range epsilon."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 (Ye et al. 2020): bounds the loss of negative-advantage rows at c*|A|. None: off."""
    clip_vloss: bool = True
    """Clip the value update around the rollout's values (PPO2's clipped value loss)."""
    vf_clip_coef: float = 0.2
    """Value clip range (absolute, in return units)."""
    value_loss: Literal["mse", "huber"] = "huber"
    """Value regression loss."""
    huber_delta: float = 10.0
    """Huber loss threshold (with --value-loss huber)."""
    vf_coef: float = 1.0
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (policies that report no entropy, like GR00T, get none)."""
    learning_rate: float = 5e-6
    """AdamW learning rate of the policy."""
    value_learning_rate: float | None = 1e-4
    """AdamW learning rate of the value head. None: same as --learning-rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this."""
    lr_schedule: Literal["constant", "linear", "adaptive"] = "constant"
    """`adaptive`: scale the learning rates by 1.5 up/down to keep the KL near --desired-kl (as rsl_rl);
    `linear`: anneal to 0 over --num-iterations (as CleanRL)."""
    desired_kl: float = 0.01
    """Target KL per minibatch of the adaptive schedule."""
    value_warmup_iterations: int = 0
    """Leading iterations that train only the value head (the policy's weights stay fixed: no policy loss, no
    entropy bonus, learning rate 0), so that a fresh critic (e.g. after SFT) gives sensible advantages first."""
    bootstrap_time_limits: bool = True
    """At a time-limit truncation, count what the episode would have earned next as V (rsl_rl): right when the
    limit only cuts a longer task short. --no-bootstrap-time-limits: the limit is part of the task (succeed
    within N steps, as the camera tasks here and RLinf's Isaac Lab tasks), so a timed-out episode earns 0 more."""
    adaptive_lr_bounds: tuple[float, float] = (1e-5, 1e-2)
    """(min, max) of the policy's learning rate under the adaptive schedule (rsl_rl's bounds suit MLPs; GR00T
    needs far smaller rates, e.g. 1e-8 1e-5). The value head's rate moves by the same factor."""
    num_seeds: int = 1
    """K > 1: train K independent learners, seeds --seed ... --seed + K - 1, in one process on one env instance of
    K x --env.num-envs sub-envs, with their params stacked and vmapped (algos/ppo_seeds.py; --policy mlp, one
    process). Each seed logs and checkpoints to <run dir>/seed_<s>/ as a run of its own."""


# ------------------------------------------------------------------------------------------------------------------
# The algorithm: pure functions of tensors.
# ------------------------------------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, next_value: torch.Tensor, terminated: torch.Tensor,
        truncated: torch.Tensor, gamma: float, gae_lambda: float,
        truncation_values: torch.Tensor | None = None, bootstrap_truncations: bool = True,
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over decisions. Returns (advantages, returns), each [D, N].

    rewards, values, terminated, truncated: [D, N]; next_value: [N], the value of the obs after the last decision.
    After a decision that ended the episode the next row belongs to a new episode, so nothing flows back across
    it. What the ended episode would have earned next is 0 after a termination, but after a truncation (time
    limit) it is estimated by `truncation_values` [D, N]: the value of the final obs if one has it; by default
    V(s_t) of the decision itself, as rsl_rl does, since the env returns the next episode's first obs instead.
    With `bootstrap_truncations=False` a truncation is an end like a termination (the time limit is part of the
    task).
    """
    if not bootstrap_truncations:
        terminated, truncated = terminated | truncated, torch.zeros_like(truncated)
    if truncation_values is None:
        truncation_values = values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        following = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        following = torch.where(truncated[t], truncation_values[t], following)
        following = torch.where(terminated[t], torch.zeros_like(following), following)
        ended = terminated[t] | truncated[t]
        delta = rewards[t] + gamma * following - values[t]
        running = delta + gamma * gae_lambda * (~ended) * running
        advantages[t] = running
    return advantages, advantages + values


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1)


def normalize(x: torch.Tensor, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
              eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) with the mean and (unbiased) std over every rank's x: pass a DDP sum."""
    count = all_reduce_sum(torch.tensor(float(x.numel()), device=x.device, dtype=torch.float64))
    mean = all_reduce_sum(x.sum().double()) / count
    var = all_reduce_sum((x.double() - mean).square().sum()) / (count - 1).clamp(min=1)
    return ((x - mean) / (var.sqrt() + eps)).to(x.dtype)


def clipped_policy_loss(logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, clip_coef: float,
                        dual_clip: float | None = None, mask: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, -min(r A, clip(r, 1-eps, 1+eps) A), averaged over (masked) rows.

    With dual clip c, rows with A < 0 lose at most c*|A| (Ye et al. 2020), so a huge ratio cannot dominate.
    Also returns approx_kl, the low-variance estimator E[(r - 1) - log r] of KL(old || new), and clipfrac,
    the fraction of rows with |r - 1| > eps.
    """
    log_ratio = logprob - old_logprob
    ratio = log_ratio.exp()
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    if dual_clip is not None:
        losses = torch.where(advantages < 0, torch.min(losses, -advantages * dual_clip), losses)
    with torch.no_grad():
        stats = {"approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
                 "clipfrac": masked_mean(((ratio - 1).abs() > clip_coef).float(), mask)}
    return masked_mean(losses, mask), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_coef: float | None,
               kind: Literal["mse", "huber"] = "mse", huber_delta: float = 10.0,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression of values on returns (squared error or Huber). With `clip_coef`, the larger of the losses of the
    new value and of the value clipped to old_value +- clip_coef (PPO2). Returns (loss, fraction of rows where
    the clipped loss was the larger, i.e. where clipping held the update back)."""
    def err(v):
        if kind == "huber":
            return F.huber_loss(v, returns, delta=huber_delta, reduction="none")
        return (v - returns).square()

    losses = err(values)
    if clip_coef is None:
        return losses.mean(), torch.zeros((), device=values.device)
    clipped = err(old_values + (values - old_values).clamp(-clip_coef, clip_coef))
    return torch.max(losses, clipped).mean(), (clipped > losses).float().mean()


def minibatch_indices(num_rows: int, num_minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A fresh random split of `num_rows` rows into `num_minibatches` near-equal index sets (call once per epoch)."""
    perm = torch.randperm(num_rows, generator=generator, device=generator.device)
    return list(torch.tensor_split(perm, num_minibatches))


def adaptive_lr(lr: float, kl: float, desired_kl: float, low: float = 1e-5, high: float = 1e-2) -> float:
    """rsl_rl's schedule: divide the rate by 1.5 when KL > 2x target, multiply by 1.5 when KL < target/2."""
    if kl > 2.0 * desired_kl:
        return max(low, lr / 1.5)
    if 0.0 < kl < desired_kl / 2.0:
        return min(high, lr * 1.5)
    return lr


def ppo_loss(cfg: PPOConfig, logprob: torch.Tensor, value: torch.Tensor, entropy: torch.Tensor | None,
             mb: dict[str, torch.Tensor], train_policy: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A minibatch's loss from `evaluate`'s log-prob, value and entropy on its rows `mb`: vf_coef x value loss +
    clipped surrogate - ent_coef x entropy (the value loss alone with `train_policy=False`); and its statistics."""
    pg_loss, pg_stats = clipped_policy_loss(logprob.float(), mb["logprob"].float(), mb["advantages"], cfg.clip_coef,
                                            cfg.dual_clip)
    v_loss, v_clip_ratio = value_loss(value.float(), mb["value"].float(), mb["returns"],
                                      cfg.vf_clip_coef if cfg.clip_vloss else None, cfg.value_loss, cfg.huber_delta)
    entropy = entropy.float().mean() if entropy is not None else torch.zeros((), device=logprob.device)
    loss = cfg.vf_coef * v_loss + ((pg_loss - cfg.ent_coef * entropy) if train_policy else 0.0)
    return loss, {"actor/loss": loss, "actor/policy_loss": pg_loss, "actor/value_loss": v_loss,
                  "actor/entropy": entropy, "actor/approx_kl": pg_stats["approx_kl"],
                  "actor/pg_clipfrac": pg_stats["clipfrac"], "actor/value_clip_ratio": v_clip_ratio}


# ------------------------------------------------------------------------------------------------------------------
# The update (side effects: the optimizer) and the training loop.
# ------------------------------------------------------------------------------------------------------------------
def update(cfg: PPOConfig, policy: Policy, params: Params, optimizer: torch.optim.Optimizer,
           batch: dict[str, torch.Tensor], run: Run, train_policy: bool = True) -> dict[str, float]:
    """`update_epochs` passes of minibatch AdamW steps over `batch` (flat rows, with advantages and returns).
    With `train_policy=False` only the value loss is minimised and the policy's learning rate is 0 (so that weight
    decay does not move it either)."""
    policy_lr = optimizer.param_groups[0]["lr"]  # make_optimizer puts the policy's group first
    if not train_policy:
        optimizer.param_groups[0]["lr"] = 0.0
    num_rows = batch["advantages"].shape[0]
    totals: dict[str, list[torch.Tensor]] = {}
    for _ in range(cfg.update_epochs):
        for idx in minibatch_indices(num_rows, cfg.num_minibatches, run.generator):
            mb = {k: v[idx] for k, v in batch.items()}
            with run.autocast():
                logprob, value, entropy = policy.evaluate(params, mb)
            loss, stats = ppo_loss(cfg, logprob, value, entropy, mb, train_policy)
            if cfg.lr_schedule == "adaptive" and train_policy:  # on this minibatch's KL over ranks (as rsl_rl)
                kl = (all_reduce_sum(stats["actor/approx_kl"]) / run.world_size).item()
                factor = adaptive_lr(policy_lr, kl, cfg.desired_kl, *cfg.adaptive_lr_bounds) / policy_lr
                for group in optimizer.param_groups:
                    group["lr"] *= factor
                policy_lr = optimizer.param_groups[0]["lr"]
            stats["actor/grad_norm"] = optimizer_step(optimizer, loss, cfg.max_grad_norm)
            for k, v in stats.items():
                totals.setdefault(k, []).append(v.detach().float())
    optimizer.param_groups[0]["lr"] = policy_lr
    means = all_reduce_sum(torch.stack([torch.stack(v).mean() for v in totals.values()])) / run.world_size
    return dict(zip(totals, means.tolist()))


def check_config(cfg: PPOConfig) -> None:
    check_positive(cfg, "num_seeds")
    if cfg.num_seeds > 1:
        if cfg.policy != "mlp":
            raise ConfigError(f"--num-seeds {cfg.num_seeds} trains stacked MLP learners; --policy is {cfg.policy!r}")
        if launched_world_size() > 1:
            raise ConfigError("--num-seeds > 1 runs in one process; launch it without torchrun")
        if cfg.resume:
            raise ConfigError("--resume continues one seed's run: pass that seed's directory (<run>/seed_<s>) "
                              "with --num-seeds 1")
        for flag, value in (("max_minutes", cfg.max_minutes), ("recompute_logprob", cfg.recompute_logprob),
                            ("track", cfg.track)):
            if value:
                raise ConfigError(f"--{flag.replace('_', '-')} is not supported with --num-seeds > 1 (each seed "
                                  "logs to TensorBoard under <run>/seed_<s>)")
        if cfg.pipeline_stages > 1:
            raise ConfigError("--pipeline-stages > 1 is not supported with --num-seeds > 1 (the seeds share one env "
                              "instance in the training process)")
    check_rl_config(cfg)
    check_positive(cfg, "num_steps", "update_epochs", "num_minibatches")
    world_size = launched_world_size()
    rank_rows = cfg.num_steps * (cfg.env.num_envs // world_size)
    if cfg.num_minibatches > rank_rows:
        raise ConfigError(f"--num-minibatches {cfg.num_minibatches} exceeds the {rank_rows} rows of each of the "
                          f"{world_size} DDP rank(s) (--num-steps x --env.num-envs / ranks)")
    check_policy_update(cfg)
    check_range(cfg, "gamma", 0, 1, closed=True)
    check_range(cfg, "gae_lambda", 0, 1, closed=True)
    if cfg.clip_vloss:
        check_range(cfg, "vf_clip_coef", 0)
    if cfg.value_loss == "huber":
        check_range(cfg, "huber_delta", 0)
    if cfg.lr_schedule == "adaptive":
        check_range(cfg, "desired_kl", 0)
    check_range(cfg, "value_warmup_iterations", 0, closed=True)
    low, high = cfg.adaptive_lr_bounds
    if cfg.lr_schedule == "adaptive" and not 0 < low <= cfg.learning_rate <= high:
        raise ConfigError(f"--learning-rate {cfg.learning_rate:g} is outside --adaptive-lr-bounds "
                                 f"{low:g} {high:g} of the adaptive schedule")


def check_policy_update(cfg: RLConfig) -> None:
    """The flags of the clipped-surrogate update that PPO and GRPO share."""
    check_range(cfg, "clip_coef", 0, 1)
    if cfg.dual_clip is not None:
        check_range(cfg, "dual_clip", 1)
    check_range(cfg, "max_grad_norm", 0)


def train(cfg: PPOConfig, make_env: Callable | None = None) -> dict:
    """Train; returns {"params", "history" (metrics per iteration), "run_dir"}. `make_env` defaults to envs.make_env."""
    check_config(cfg)
    if make_env is None:
        from envs import make_env
    if cfg.num_seeds > 1:
        from algos import ppo_seeds

        return ppo_seeds.train(cfg, make_env)
    run = start_run(cfg, "ppo", cfg.env.device)
    env = make_stages(make_env, rank_env_config(cfg.env, run), cfg.pipeline_stages)
    policy, params, base = make_rl_policy(cfg, env, run.device, run.bf16, checkpoint.checkpoint_base(cfg.resume))
    optimizer = make_optimizer(policy, params, cfg.learning_rate, cfg.value_learning_rate, cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # the configured rates (a resume restores annealed ones)
    start, global_step, restored = 0, 0, None
    if cfg.resume:
        meta, carry = checkpoint.load_checkpoint(run, cfg.resume, policy, params, optimizer)
        start, global_step = meta["iteration"], meta["global_step"]
        restored = checkpoint.restore_carry(env, carry)  # None if the checkpoint holds no env state
    if restored is not None:
        obs, success_seen = restored
    else:  # fresh episodes (on resume without env state, seeded by the iteration: not bit-exact)
        obs = env.reset(seed=env_seed(cfg.seed + start, run.rank))
        success_seen = torch.zeros(env.num_envs, dtype=torch.bool, device=run.device)

    history, steps_here, t_start = [], 0, time.perf_counter()
    bar = progress(run, start, cfg.num_iterations)
    for iteration in bar:
        if cfg.lr_schedule == "linear":
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * (1.0 - iteration / cfg.num_iterations)

        # 1. Rollout: num_steps decisions of every env, then the value of where it stopped.
        t_rollout = timestamp(run)
        batch, obs, stats = collect_rollout(env, policy, params, obs, cfg.num_steps, run, success_seen)
        with torch.no_grad(), run.autocast():
            next_value = policy.value(params, obs, env.instruction).float()

        # 2. Advantages over decisions (chunk-level rewards and dones).
        advantages, returns = gae(batch["reward"], batch["value"].float(), next_value, batch["terminated"],
                                  batch["truncated"], cfg.gamma, cfg.gae_lambda,
                                  bootstrap_truncations=cfg.bootstrap_time_limits)
        rows = {k: v.flatten(0, 1) for k, v in batch.items()}
        rows["returns"] = returns.flatten()
        rows["advantages"] = normalize(advantages.flatten(), all_reduce_sum) if cfg.norm_adv \
            else advantages.flatten()
        logprob_gap = None
        if cfg.recompute_logprob:
            rows["logprob"], logprob_gap = recompute_logprob(policy, params, rows, cfg.num_minibatches, run)

        # 3. Update, then fold this rollout into the observation normaliser (used from the next rollout on).
        t_update = timestamp(run)
        metrics = update(cfg, policy, params, optimizer, rows, run,
                         train_policy=iteration >= cfg.value_warmup_iterations)
        policy.update_normalizer(params, batch["state"], all_reduce_sum)
        t_done = timestamp(run)

        # 4. Log and checkpoint.
        global_step += stats.env_steps * run.world_size
        steps_here += stats.env_steps * run.world_size
        sums = all_reduce_sum(torch.stack([returns.sum(), advantages.sum(), batch["reward"].sum()]).double())
        n = returns.numel() * run.world_size
        metrics |= {"rollout/returns_mean": sums[0].item() / n, "rollout/advantages_mean": sums[1].item() / n,
                    "rollout/rewards_mean": sums[2].item() / n, **stats.metrics(),
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
                                       optimizer, checkpoint.carry_state(env, obs, success_seen))
        if stop:
            break
    env.close()
    finish_run(run)
    return {"params": params, "history": history, "run_dir": run.run_dir}
