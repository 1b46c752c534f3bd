"""Rollouts: the policy acting in the batched env, one action chunk per decision. PPO and GRPO both collect with
`collect_rollout`; this file is everything they assume about a rollout.

A decision is one `policy.sample` call: it returns a chunk of T actions per sub-env (GR00T: T = 16; the MLP:
T = 1), which the env plays step by step. What the algorithms see is per decision:
  reward      the sum of the chunk's step rewards, up to the sub-env's end;
  terminated  the episode ended inside the chunk by a terminal state (success, failure): nothing to bootstrap;
  truncated   it ended by the time limit, and not also by a terminal state (termination takes precedence);
  success     the task succeeded inside the chunk, before any end.
A sub-env whose episode ends mid-chunk is reset by the env and spends the rest of the chunk in its next episode:
holding still with the env's `idle_action` where there is one (the chunk's remaining actions were planned for the
episode that ended), else playing them. Those steps' rewards are left out of the decision, and their ends too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from algos.distributed import all_reduce_sum
from algos.run import Run
from envs import Env
from envs.workers import LocalStages, StagedEnv, flat, unflat
from models.policy import Params, Policy


class Episodes:
    """Sums over the episodes that ended during a rollout, kept on the device (no host sync per step); with
    `groups` G, per group of consecutive sub-envs (the learners of a multi-seed run). `milestones`: the env's
    milestone names, each counted where an ending episode reached it."""

    def __init__(self, device: torch.device, groups: int = 1, milestones: tuple[str, ...] = ()):
        self.milestones = tuple(milestones)
        # return, length, success, count, then one column per milestone
        self.sums = torch.zeros(groups, 4 + len(self.milestones), dtype=torch.float64, device=device)

    def add(self, done: torch.Tensor, returns: torch.Tensor, lengths: torch.Tensor, success: torch.Tensor,
            milestones: torch.Tensor | None = None) -> None:
        """done, returns, lengths, success [N]; milestones [N, M] bool (those each episode reached)."""
        d = done.double().view(len(self.sums), -1)
        columns = [returns, lengths, success, done]
        if self.milestones:
            if milestones is None:
                raise KeyError(f"the env names milestones {self.milestones}, but its step info has no 'milestones' "
                               "[N, M] (see envs/env.py)")
            columns += list(milestones.unbind(-1))
        self.sums += torch.stack([(c.double().view_as(d) * d).sum(1) for c in columns], dim=1)

    def metrics(self, group: int = 0) -> dict[str, float]:
        """Means over all ranks: env/episode_return, env/episode_len, env/success_once and, per milestone,
        env/reached_<name> (the share of episodes that reached it); none if no episode ended."""
        total, length, success, n, *reached = all_reduce_sum(self.sums[group]).tolist()
        if n == 0:
            return {}
        return {"env/episode_return": total / n, "env/episode_len": length / n, "env/success_once": success / n,
                **{f"env/reached_{name}": r / n for name, r in zip(self.milestones, reached)}, "env/episodes": n}


def play_chunk(env: Env, actions: torch.Tensor, success_seen: torch.Tensor, episodes: Episodes,
               counting: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Step the env through a chunk of actions [N, T, A]. Returns the obs after it and the decision's
    {"reward", "terminated", "truncated", "success"} [N], as the module docstring defines them. `success_seen` [N]
    (whether the current episode has succeeded yet) is updated in place; every episode that ends is added to
    `episodes`, or with `counting` [N] bool only those of the sub-envs where it is set, and it is cleared in place
    where an episode ends (so that each sub-env's first episode alone counts)."""
    n, device = env.num_envs, success_seen.device
    reward = torch.zeros(n, device=device)
    terminated = torch.zeros(n, dtype=torch.bool, device=device)
    truncated = torch.zeros(n, dtype=torch.bool, device=device)
    success = torch.zeros(n, dtype=torch.bool, device=device)
    for k in range(actions.shape[1]):
        ended = terminated | truncated  # the decision's episode is over: these steps belong to the next one
        action = actions[:, k]
        if env.idle_action is not None:
            action = torch.where(ended.unsqueeze(-1), env.idle_action, action)
        obs, r, term, trunc, info = env.step(action.contiguous())
        reward += r.float() * ~ended
        terminated |= term & ~ended
        truncated |= trunc & ~ended & ~term
        success |= info["success"] & ~ended
        success_seen |= info["success"]
        done = term | trunc
        counted = done if counting is None else done & counting
        episodes.add(counted, info["episode_return"], info["episode_length"], success_seen, info.get("milestones"))
        success_seen &= ~done
        if counting is not None:
            counting &= ~done
    return obs, {"reward": reward, "terminated": terminated, "truncated": truncated, "success": success}


def play_stage_chunk(env: Env, tensors: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """`play_chunk` as a pipeline stage's function (envs/workers.py): tensors "actions" [n, T, A], "success_seen"
    [n] and optionally "counting" [n] in; the seconds it took, and the obs ("obs.*"), the decision, "success_seen",
    "counting" (if given) and "episode_sums" out."""
    seen, counting = tensors["success_seen"], tensors.get("counting")
    episodes = Episodes(seen.device, milestones=env.milestones)
    start = time.perf_counter()
    obs, decision = play_chunk(env, tensors["actions"], seen, episodes, counting)
    if seen.device.type == "cuda":
        torch.cuda.synchronize(seen.device)
    return time.perf_counter() - start, {**flat("obs", obs), **decision, "success_seen": seen,
                                         **({} if counting is None else {"counting": counting}),
                                         "episode_sums": episodes.sums}


@dataclass
class RolloutStats:
    episodes: Episodes
    """The episodes that ended during the rollout."""
    env_steps: int
    """Env steps taken (this rank)."""
    policy_time: float
    """Seconds spent in `policy.sample` (the device synchronised after each call)."""
    env_time: float
    """Seconds the envs spent playing chunks (per pipeline stage, averaged over the stages)."""

    def metrics(self) -> dict[str, float]:
        """env/* of the finished episodes (all ranks) and this rank's perf/policy_time, perf/env_time."""
        return {**self.episodes.metrics(), "perf/policy_time": self.policy_time, "perf/env_time": self.env_time}


@torch.no_grad()
def collect_rollout(env: Env | StagedEnv, policy: Policy, params: Params, obs: dict[str, torch.Tensor],
                    num_decisions: int, run: Run, success_seen: torch.Tensor, first_episodes: bool = False,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], RolloutStats]:
    """Run the policy for up to `num_decisions` decisions, sampling with the run's generator.

    Returns (batch, next obs, stats). `batch` stacks everything `policy.sample` returned and `play_chunk`'s reward,
    terminated, truncated and success, each [D, N, ...]. `success_seen` [N] is carried across rollouts.

    With an env of S pipeline stages (envs/workers.py), each decision samples stage 0's chunk and hands it to
    stage 0, then stage 1's, ...: while the policy samples for one stage, the others play their chunks. A stage's
    sample waits only for its own last chunk. The policy sees the stages' obs in that fixed order, so the numbers
    do not depend on timing; a plain env is one stage (sample, play, sample, play).

    With `first_episodes` (GRPO: each sub-env's first episode is what it learns from) the rollout ends at the start
    of a decision once every sub-env has ended an episode, as far as the chunks finished by then show (stage 0's
    last chunk, the others' chunk before it: with S > 1 stages that can be one decision more than needed, whose
    rows lie after every first episode), and `stats` count the first episodes alone: episodes that end before
    the others' first ones are the short ones, and counting them would tilt the env/* means toward them."""
    stages = env if isinstance(env, StagedEnv) else LocalStages([env])
    num_stages = stages.num_stages
    stage_obs = stages.split(obs)
    stage_seen = [success_seen[stages.stage_slice(s)] for s in range(num_stages)]
    stage_counting = [torch.ones(stages.stage_envs, dtype=torch.bool, device=run.device) if first_episodes else None
                      for s in range(num_stages)]
    episodes = Episodes(run.device, milestones=env.milestones)
    ended_once = torch.zeros(stages.num_envs, dtype=torch.bool, device=run.device)
    steps: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(num_stages)]
    pending = [False] * num_stages
    env_steps, policy_time, env_time = 0, 0.0, 0.0

    def finish_chunk(s: int) -> None:  # wait for stage s's chunk and file its results
        nonlocal env_time
        seconds, out = stages.collect(s)
        pending[s] = False
        env_time += seconds / num_stages
        stage_obs[s] = unflat("obs", out)
        steps[s][-1].update({k: out[k] for k in ("reward", "terminated", "truncated", "success")})
        stage_seen[s].copy_(out["success_seen"])
        if first_episodes:
            stage_counting[s] = out["counting"]
        episodes.sums += out["episode_sums"]
        ended_once[stages.stage_slice(s)] |= out["terminated"] | out["truncated"]

    for decision in range(num_decisions):
        if decision > 0:
            finish_chunk(0)
            if first_episodes and bool(ended_once.all()):
                break
        for s in range(num_stages):
            if pending[s]:
                finish_chunk(s)
            start = time.perf_counter()
            with run.autocast():
                out = policy.sample(params, stage_obs[s], stages.stage_instructions[s], run.generator)
            actions = out["actions"].float()
            if actions.device.type == "cuda":
                torch.cuda.synchronize(actions.device)
            policy_time += time.perf_counter() - start
            chunk_in = {"actions": actions, "success_seen": stage_seen[s]}
            if first_episodes:
                chunk_in["counting"] = stage_counting[s]
            stages.submit(s, play_stage_chunk, chunk_in)
            pending[s] = True
            steps[s].append(out)
            env_steps += actions.shape[0] * actions.shape[1]
    for s in range(num_stages):
        if pending[s]:
            finish_chunk(s)
    batch = {k: _cat([torch.stack([step[k] for step in stage]) for stage in steps], dim=1) for k in steps[0][0]}
    obs = {k: _cat([o[k] for o in stage_obs]) for k in stage_obs[0]}
    return batch, obs, RolloutStats(episodes, env_steps, policy_time, env_time)


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)  # one stage: no copy


def recompute_logprob(policy: Policy, params: Params, rows: dict[str, torch.Tensor], num_minibatches: int,
                      run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout's log-probs [R] recomputed by `evaluate` under the rollout's params, in minibatches of the
    update's sizes; and the mean |recomputed - sampled| (a scalar, for the logs).

    `sample` and `evaluate` may reach their numbers by different kernels (other batch shapes in bf16; with GR00T's
    fast path, fused GEMM epilogues and CUDA graphs in `sample` only), and a gap summed over a chunk's action dims
    would read as policy change. Ratios against the recomputed log-probs start at exactly 1. Autograd stays on, as
    in the update, so that `evaluate` runs the update's kernels and compiled graphs; each minibatch's graph is
    dropped once its log-probs are detached."""
    num_rows = rows["logprob"].shape[0]
    parts = [rows["logprob"].new_zeros(0).float()]
    for idx in torch.tensor_split(torch.arange(num_rows, device=rows["logprob"].device), num_minibatches):
        if idx.numel() == 0:  # e.g. GRPO with every group filtered out: nothing to evaluate
            continue
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
