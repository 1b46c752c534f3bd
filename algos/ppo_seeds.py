"""PPO for K seeds at once: K independent learners in one process, on one env instance split into K groups.

    python train.py ppo --num-seeds 16 --policy mlp --env.task Isaac-Cartpole --env.num-envs 512 ...

PureJaxRL's trick in PyTorch. Every learner's params are stacked along a leading seed axis [K, ...]; the policy and
PPO's loss (the functions of `ppo.py`) are vmapped over it with torch.func, and AdamW is a pure function of the
stacked tensors, so one rollout step, one backward and one optimizer step serve all K learners. The env holds
K x --env.num-envs sub-envs; group k (sub-envs k*n ... (k+1)*n - 1) is learner k's. What keeps the learners
independent: each has its own params, AdamW moments, learning rates, gradient clipping, observation normaliser,
RNG stream (its noise and its minibatches drawn from a generator seeded with its seed, in the order a run of its
own draws them) and its own logs and checkpoints under <run dir>/seed_<s>/, which eval.py and --resume read as a
run of that seed alone. The env is shared: its randomisation is one stream for all groups.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import vmap

from algos import checkpoint
from algos.ppo import PPOConfig, adaptive_lr, gae, minibatch_indices, normalize, ppo_loss
from algos.rollout import Episodes, play_chunk
from algos.run import (Run, checkpoint_due, env_seed, finish_run, make_optimizer, make_rl_policy, perf_metrics,
                       progress, show, start_run, timestamp)
from models.mlp import updated_moments
from models.policy import Params


def stack(per_seed: list[Params]) -> Params:
    """K params dicts -> one dict of [K, ...] tensors (trainable ones as leaves that require grad)."""
    return {n: torch.stack([p[n].detach() for p in per_seed]).requires_grad_(per_seed[0][n].requires_grad)
            for n in per_seed[0]}


def adamw(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
          lr: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step of stacked params [K, ...] with a learning rate per seed, lr [K], as torch.optim.AdamW
    computes it (decoupled weight decay, bias-corrected moments). Returns the new (param, exp_avg, exp_avg_sq)."""
    beta1, beta2 = betas
    lr = lr.view(-1, *[1] * (param.ndim - 1))
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add(eps)
    param = param * (1 - lr * weight_decay) - lr / (1 - beta1 ** step) * exp_avg / denom
    return param, exp_avg, exp_avg_sq


def clip_per_seed(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each seed's slice of `grads` [K, ...] to a global norm of at most `max_norm`, as
    torch.nn.utils.clip_grad_norm_ scales one learner's. Returns the norms before clipping [K]."""
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]),
                                     dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.ndim - 1)))
    return norms


def train(cfg: PPOConfig, make_env: Callable) -> dict:
    """Train K = cfg.num_seeds learners; returns {"params", "history", "run_dir"}, each a list over the seeds."""
    num_seeds, n = cfg.num_seeds, cfg.env.num_envs
    seeds = [cfg.seed + k for k in range(num_seeds)]
    root = Path(cfg.run_dir or f"runs/{cfg.exp_name}__ppo__{cfg.seed}x{num_seeds}__{int(time.time())}")
    seed_cfgs = [dataclasses.replace(cfg, seed=s, num_seeds=1, run_dir=str(root / f"seed_{s}")) for s in seeds]
    # start_run seeds the global RNGs (the env's randomisation) with its seed: the first seed's run starts last
    runs: list[Run] = [start_run(c, "ppo", cfg.env.device) for c in reversed(seed_cfgs)][::-1]
    run, device = runs[0], runs[0].device
    env = make_env(dataclasses.replace(cfg.env, num_envs=num_seeds * n, device=str(device)))
    built = [make_rl_policy(c, env, device, run.bf16) for c in seed_cfgs]
    policy, bases = built[0][0], [base for _, _, base in built]
    params = stack([p for _, p, _ in built])
    trainable = [name for name, p in params.items() if p.requires_grad]
    moments = {name: (torch.zeros_like(params[name]), torch.zeros_like(params[name])) for name in trainable}
    value_lr = cfg.value_learning_rate if cfg.value_learning_rate is not None else cfg.learning_rate
    base_lr = {False: cfg.learning_rate, True: value_lr}  # by is_value_param
    # float64, as the Python floats of a run of its own (the adaptive schedule multiplies them every minibatch)
    lrs = {is_value: torch.full((num_seeds,), lr, dtype=torch.float64, device=device)
           for is_value, lr in base_lr.items()}
    adam_steps = dict.fromkeys(trainable, 0)  # per param, as torch's AdamW counts (a param without a grad: no step)

    act = vmap(lambda p, state, noise: policy.act(p, state, noise))
    values = vmap(lambda p, state: policy.value(p, {"state": state}))
    by_seed = lambda x: x.view(num_seeds, n, *x.shape[1:])  # noqa: E731  [K*n, ...] -> [K, n, ...]

    def seed_loss(p, mb, train_policy):
        logprob, value, entropy = policy.evaluate(p, mb)
        return ppo_loss(cfg, logprob, value, entropy, mb, train_policy)

    def seed_optimizer(k: int) -> torch.optim.AdamW:
        """Learner k's AdamW state as torch.optim.AdamW holds it, for a checkpoint that a run of its own resumes."""
        own = {name: t[k].detach().clone().requires_grad_(t.requires_grad) for name, t in params.items()}
        optimizer = make_optimizer(policy, own, lrs[False][k].item(), lrs[True][k].item(), cfg.weight_decay)
        names = [name for group in optimizer.param_groups for name in group["param_names"]]
        state = {i: {"step": torch.tensor(float(adam_steps[name])), "exp_avg": moments[name][0][k].clone(),
                     "exp_avg_sq": moments[name][1][k].clone()} for i, name in enumerate(names) if adam_steps[name]}
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        return optimizer

    def seed_carry(k: int) -> dict[str, torch.Tensor]:
        """Learner k's next obs and episode flags (the env's state is shared by all groups: not carried)."""
        rows = slice(k * n, (k + 1) * n)
        return checkpoint.carry_state(None, {key: v[rows] for key, v in obs.items()}, success_seen[rows])

    obs = env.reset(seed=env_seed(cfg.seed, 0))
    success_seen = torch.zeros(num_seeds * n, dtype=torch.bool, device=device)
    histories: list[list[dict]] = [[] for _ in seeds]
    global_step, t_start = 0, time.perf_counter()
    bar = progress(run, 0, cfg.num_iterations)
    for iteration in bar:
        if cfg.lr_schedule == "linear":
            for is_value in lrs:
                lrs[is_value].fill_(base_lr[is_value] * (1.0 - iteration / cfg.num_iterations))

        # 1. Rollout: every learner's noise from its own generator, one vmapped policy call, one env step.
        t_rollout = timestamp(run)
        episodes, steps, policy_time, env_time = Episodes(device, num_seeds, env.milestones), [], 0.0, 0.0
        with torch.no_grad():
            for _ in range(cfg.num_steps):
                t_policy = timestamp(run)
                noise = torch.stack([torch.randn((n, env.action_dim), generator=r.generator, device=device)
                                     for r in runs])
                with run.autocast():
                    out = act(params, by_seed(obs["state"]), noise)
                t_env = timestamp(run)
                obs, decision = play_chunk(env, out["actions"].flatten(0, 1).float(), success_seen, episodes)
                policy_time, env_time = policy_time + t_env - t_policy, env_time + timestamp(run) - t_env
                steps.append({**out, **{k: by_seed(v) for k, v in decision.items()}})
            with run.autocast():
                next_value = values(params, by_seed(obs["state"])).float()
        batch = {k: torch.stack([s[k] for s in steps], dim=1) for k in steps[0]}  # [K, D, n, ...]

        # 2. Advantages: GAE is per sub-env; the normalisation is over each learner's own rows.
        advantages, returns = vmap(gae, in_dims=(0, 0, 0, 0, 0, None, None))(
            batch["reward"], batch["value"].float(), next_value, batch["terminated"], batch["truncated"], cfg.gamma,
            cfg.gae_lambda, bootstrap_truncations=cfg.bootstrap_time_limits)
        rows = {k: v.flatten(1, 2) for k, v in batch.items()}  # [K, D*n, ...]
        rows["returns"] = returns.flatten(1)
        rows["advantages"] = vmap(normalize)(advantages.flatten(1)) if cfg.norm_adv else advantages.flatten(1)

        # 3. Update: the minibatches of each learner from its own generator; one backward for all of them.
        t_update = timestamp(run)
        train_policy = iteration >= cfg.value_warmup_iterations
        num_rows, totals = rows["advantages"].shape[1], {}
        for _ in range(cfg.update_epochs):
            splits = [minibatch_indices(num_rows, cfg.num_minibatches, r.generator) for r in runs]
            for idx in (torch.stack(parts) for parts in zip(*splits)):  # [K, B]
                mb = {k: v[torch.arange(num_seeds, device=device)[:, None], idx] for k, v in rows.items()}
                with run.autocast():
                    loss, stats = vmap(seed_loss, in_dims=(0, 0, None))(params, mb, train_policy)
                if cfg.lr_schedule == "adaptive" and train_policy:  # each learner's rate follows its own KL
                    factor = torch.tensor([adaptive_lr(lr, kl, cfg.desired_kl, *cfg.adaptive_lr_bounds) / lr
                                           for lr, kl in zip(lrs[False].tolist(), stats["actor/approx_kl"].tolist())],
                                          dtype=torch.float64, device=device)  # as lrs: a single run's floats
                    for is_value in lrs:
                        lrs[is_value] *= factor
                # the sum's gradient w.r.t. learner k's slice is learner k's own (the learners share nothing);
                # params the loss does not reach (the policy's, in the value warm-up) get none and are not stepped
                grads = torch.autograd.grad(loss.sum(), [params[name] for name in trainable], allow_unused=True)
                grads = {name: g.float().clone() for name, g in zip(trainable, grads) if g is not None}
                group_norms = [clip_per_seed(g, cfg.max_grad_norm) if g else torch.zeros(num_seeds, device=device)
                               for g in ([grads[name] for name in grads if policy.is_value_param(name) == is_value]
                                         for is_value in (False, True))]
                stats["actor/grad_norm"] = torch.linalg.vector_norm(torch.stack(group_norms), dim=0)
                with torch.no_grad():
                    for name, grad in grads.items():
                        adam_steps[name] += 1
                        p, m, v = adamw(params[name], grad, *moments[name], adam_steps[name],
                                        lrs[policy.is_value_param(name)], weight_decay=cfg.weight_decay)
                        params[name].copy_(p)
                        moments[name][0].copy_(m)
                        moments[name][1].copy_(v)
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v.detach().float())
        with torch.no_grad():  # each learner's normaliser folds in its own states
            names = policy.normalizer_names
            if names:
                for name, value in zip(names, vmap(updated_moments)(*(params[n] for n in names), rows["state"])):
                    params[name].copy_(value)
        t_done = timestamp(run)

        # 4. Log and checkpoint, learner by learner.
        env_steps = cfg.num_steps * n * batch["actions"].shape[3]
        global_step += env_steps
        elapsed = time.perf_counter() - t_start
        update_means = {k: torch.stack(v).mean(0) for k, v in totals.items()}  # [K] each
        for k, r in enumerate(runs):
            metrics = {name: float(v[k]) for name, v in update_means.items()}
            metrics |= {"rollout/returns_mean": returns[k].mean().item(),
                        "rollout/advantages_mean": advantages[k].mean().item(),
                        "rollout/rewards_mean": batch["reward"][k].mean().item(), **episodes.metrics(k),
                        "perf/policy_time": policy_time, "perf/env_time": env_time,
                        "charts/learning_rate": lrs[False][k].item(), "charts/SPS": global_step / elapsed,
                        "charts/total_SPS": num_seeds * global_step / elapsed, "charts/iteration": iteration + 1,
                        **perf_metrics(r, t_rollout, t_update, t_done)}
            histories[k].append(metrics)
            r.logger.log(metrics, global_step)
        show(run, bar, {**histories[0][-1], "charts/SPS": histories[0][-1]["charts/total_SPS"]})
        if checkpoint_due(run, iteration + 1):
            for k, r in enumerate(runs):
                seed_params = {name: t[k] for name, t in params.items()}
                checkpoint.save_checkpoint(r, iteration + 1, {"global_step": global_step}, policy, seed_params,
                                           bases[k], seed_optimizer(k), seed_carry(k))
    env.close()
    for r in runs:
        finish_run(r)
    return {"params": [{name: t[k].detach() for name, t in params.items()} for k in range(num_seeds)],
            "history": histories, "run_dir": [r.run_dir for r in runs]}
