"""PPO's pure functions against hand-computed values, and the chunked rollout that feeds them."""

import contextlib
import math
import types

import pytest
import torch

from algos.config import ConfigError
from algos.ppo import (PPOConfig, adaptive_lr, check_config, clipped_policy_loss, gae, minibatch_indices, normalize,
                        value_loss)
from algos.rollout import collect_rollout, recompute_logprob
from envs.config import EnvConfig

T, F = True, False


def test_gae_terminations_truncations_hand_computed():
    # env 0: terminates after decision 1; env 1: truncated (time limit) after decision 1. gamma = lambda = 0.5.
    rewards = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    values = torch.tensor([[1.0, 2.0], [1.0, 4.0], [1.0, 8.0]])
    terminated = torch.tensor([[F, F], [T, F], [F, F]])
    truncated = torch.tensor([[F, F], [F, T], [F, F]])
    next_value = torch.tensor([2.0, 4.0])
    adv, ret = gae(rewards, values, next_value, terminated, truncated, gamma=0.5, gae_lambda=0.5)
    # env 0: t2: 3 + .5*2 - 1 = 3 | t1 (terminated, no bootstrap): 2 - 1 = 1 | t0: 1 + .5*1 - 1 + .25*1 = 0.75
    # env 1: t2: 0 + .5*4 - 8 = -6 | t1 (truncated, bootstrap V(s_1) = 4): 1 + 2 - 4 = -1, and the -6 of the
    #        next episode does not flow back | t0: 0 + .5*4 - 2 + .25*(-1) = -0.25
    assert adv.tolist() == [[0.75, -0.25], [1.0, -1.0], [3.0, -6.0]]
    assert ret.tolist() == [[1.75, 1.75], [2.0, 3.0], [4.0, 2.0]]
    # with the value of the true final obs (10) for the truncation instead of V(s_t)
    trunc_values = values.clone()
    trunc_values[1, 1] = 10.0
    adv, _ = gae(rewards, values, next_value, terminated, truncated, 0.5, 0.5, truncation_values=trunc_values)
    assert adv[:, 1].tolist() == [0.5, 2.0, -6.0]  # t1: 1 + .5*10 - 4 = 2; t0: 0 + 2 - 2 + .25*2 = 0.5
    # with the time limit as part of the task: the truncation ends the episode like a termination
    adv, ret = gae(rewards, values, next_value, terminated, truncated, 0.5, 0.5, bootstrap_truncations=False)
    assert adv[:, 1].tolist() == [-0.75, -3.0, -6.0]  # t1: 1 - 4 = -3; t0: 0 + .5*4 - 2 + .25*(-3) = -0.75
    assert adv[:, 0].tolist() == [0.75, 1.0, 3.0]  # env 0 is unchanged


class ScriptedEnv:
    """Two envs, fixed per-step rewards and ends: env 1 terminates at step 1 and is truncated at step 4."""

    num_envs, device, instruction, idle_action, milestones = 2, torch.device("cpu"), "", None, ("halfway",)
    rewards = [[1, 1], [1, 2], [1, 4], [1, 8], [1, 16], [1, 32]]
    terminated = [[F, F], [F, T], [F, F], [F, F], [F, F], [F, F]]
    truncated = [[F, F], [F, F], [F, F], [F, F], [F, T], [F, F]]
    success = [[F, F], [F, F], [F, T], [F, F], [T, F], [F, F]]
    halfway = [[F, F], [T, F], [T, T], [T, T], [T, T], [T, F]]  # reached so far in the episode


    def __init__(self):
        self.t = 0
        self.actions = []

    def step(self, actions):
        t, self.t = self.t, self.t + 1
        self.actions.append(actions.clone())
        info = {"success": torch.tensor(self.success[t]), "episode_return": torch.tensor([10.0 * t, 20.0 * t]),
                "episode_length": torch.tensor([t + 1, t + 1]), "milestones": torch.tensor(self.halfway[t])[:, None]}
        return ({"state": torch.full((2, 1), float(t + 1))}, torch.tensor(self.rewards[t], dtype=torch.float32),
                torch.tensor(self.terminated[t]), torch.tensor(self.truncated[t]), info)


class ChunkPolicy:
    """Chunks of T=3 actions; action k of decision d for env n is 100 d + 10 k + n. Values are 1."""

    def sample(self, params, obs, instruction, generator, deterministic=False):
        d = int(obs["state"][0, 0]) // 3
        actions = torch.tensor([[[100.0 * d + 10 * k + n] for k in range(3)] for n in range(2)])
        return {"actions": actions, "logprob": torch.zeros(2), "value": torch.ones(2), "state": obs["state"]}


def test_chunked_rollout_and_gae_hand_computed():
    env, run = ScriptedEnv(), types.SimpleNamespace(device=torch.device("cpu"), generator=None,
                                                   autocast=contextlib.nullcontext)
    success_seen = torch.zeros(2, dtype=torch.bool)
    batch, obs, stats = collect_rollout(env, ChunkPolicy(), {}, {"state": torch.zeros(2, 1)}, 2, run, success_seen)
    assert stats.env_steps == 12
    assert [a.tolist() for a in env.actions] == [[[0.0], [1.0]], [[10.0], [11.0]], [[20.0], [21.0]],
                                                 [[100.0], [101.0]], [[110.0], [111.0]], [[120.0], [121.0]]]
    # env 1's chunk 0 ends at its step 1, so its step-2 reward (4) belongs to the next episode; chunk 1 ends
    # by truncation at step 4, so 32 is left out.
    assert batch["reward"].tolist() == [[3.0, 3.0], [3.0, 24.0]]
    assert batch["terminated"].tolist() == [[F, T], [F, F]]
    assert batch["truncated"].tolist() == [[F, F], [F, T]]
    assert batch["success"].tolist() == [[F, F], [T, F]]  # env 1's success at step 2 was in its next episode
    assert batch["actions"].shape == (2, 2, 3, 1)
    # env 1's episodes: return 20 (length 2, not halfway), then 80 (length 5, halfway, succeeded at step 2 of the
    # new episode)
    assert stats.episodes.metrics() == {"env/episode_return": 50.0, "env/episode_len": 3.5, "env/success_once": 0.5,
                                        "env/reached_halfway": 0.5, "env/episodes": 2.0}
    assert success_seen.tolist() == [T, F]  # env 0 is mid-episode and has succeeded
    adv, _ = gae(batch["reward"], batch["value"], torch.tensor([2.0, 2.0]), batch["terminated"], batch["truncated"],
                 gamma=0.5, gae_lambda=0.5)
    # env 0: t1: 3 + 1 - 1 = 3; t0: 3 + .5 - 1 + .25*3 = 3.25.  env 1: t1 (truncated, V=1): 24 + .5 - 1 = 23.5;
    # t0 (terminated): 3 - 1 = 2
    assert adv.tolist() == [[3.25, 2.0], [3.0, 23.5]]


def test_first_episodes_rollout_counts_each_envs_first_episode_alone():
    """GRPO's rollout: env 1's second episode (return 80, 5 steps, a success) ends while env 0 is still in its
    first; the env/* means count env 1's first episode alone (counting the second too would favour short ones)."""
    env, run = ScriptedEnv(), types.SimpleNamespace(device=torch.device("cpu"), generator=None,
                                                   autocast=contextlib.nullcontext)
    batch, _, stats = collect_rollout(env, ChunkPolicy(), {}, {"state": torch.zeros(2, 1)}, 2, run,
                                      torch.zeros(2, dtype=torch.bool), first_episodes=True)
    assert batch["reward"].tolist() == [[3.0, 3.0], [3.0, 24.0]]  # the same decisions as the plain rollout's
    assert stats.episodes.metrics() == {"env/episode_return": 20.0, "env/episode_len": 2.0, "env/success_once": 0.0,
                                        "env/reached_halfway": 0.0, "env/episodes": 1.0}


def test_chunk_leftovers_after_an_episode_end_are_the_idle_action():
    env, run = ScriptedEnv(), types.SimpleNamespace(device=torch.device("cpu"), generator=None,
                                                   autocast=contextlib.nullcontext)
    env.idle_action = torch.tensor([-7.0])
    batch, *_ = collect_rollout(env, ChunkPolicy(), {}, {"state": torch.zeros(2, 1)}, 2, run,
                                       torch.zeros(2, dtype=torch.bool))
    # env 1 ends at step 1 (terminated) and step 4 (truncated): the rest of each chunk holds still
    assert [a.tolist() for a in env.actions] == [[[0.0], [1.0]], [[10.0], [11.0]], [[20.0], [-7.0]],
                                                 [[100.0], [101.0]], [[110.0], [111.0]], [[120.0], [-7.0]]]
    assert batch["reward"].tolist() == [[3.0, 3.0], [3.0, 24.0]]  # the bookkeeping is unchanged


def test_clipped_policy_loss_hand_computed():
    ratio = torch.tensor([1.5, 0.5, 1.0, 1.1])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    logprob = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    loss, stats = clipped_policy_loss(logprob, old, adv, clip_coef=0.2)
    # rows: max(-1.5, -1.2) = -1.2 | max(-0.5, -0.8) = -0.5 | max(1, 1) = 1 | max(-2.2, -2.2) = -2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0 - 2.2) / 4)
    assert stats["clipfrac"].item() == 0.5
    kl = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.0, 1.1)]
    assert stats["approx_kl"].item() == pytest.approx(sum(kl) / 4, rel=1e-6)
    loss.backward()
    # the clipped row 0 gets no gradient; row 1 (pessimistic unclipped) gets -A*r/4
    assert logprob.grad.tolist() == pytest.approx([0.0, -0.5 / 4, 0.25, -2.2 / 4])


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.zeros(2)
    logprob = torch.log(torch.tensor([5.0, 5.0]))
    adv = torch.tensor([-1.0, 1.0])
    loss, _ = clipped_policy_loss(logprob, old, adv, clip_coef=0.2)
    assert loss.item() == pytest.approx((5.0 - 1.2) / 2)  # row 0: max(5, 1.2) = 5; row 1: max(-5, -1.2) = -1.2
    loss, _ = clipped_policy_loss(logprob, old, adv, clip_coef=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 - 1.2) / 2)  # row 0: min(5, 3 * |A|) = 3


def test_masked_policy_loss_ignores_masked_rows():
    old = torch.zeros(3)
    logprob = torch.log(torch.tensor([1.1, 1.0, 9.0]))
    loss, stats = clipped_policy_loss(logprob, old, torch.tensor([1.0, 2.0, 5.0]), 0.2,
                                      mask=torch.tensor([1.0, 1.0, 0.0]))
    assert loss.item() == pytest.approx((-1.1 - 2.0) / 2)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_clipped_and_huber_hand_computed():
    returns = torch.tensor([2.0, 2.0, 1.0])
    old = torch.tensor([0.0, 0.0, 0.0])
    values = torch.tensor([1.0, 3.0, 0.2])
    loss, clip_ratio = value_loss(values, old, returns, clip_coef=0.5)
    # unclipped: 1, 1, 0.64; clipped values 0.5, 0.5, 0.2 -> 2.25, 2.25, 0.64; max -> 2.25, 2.25, 0.64
    assert loss.item() == pytest.approx((2.25 + 2.25 + 0.64) / 3)
    assert clip_ratio.item() == pytest.approx(2 / 3)
    loss, clip_ratio = value_loss(values, old, returns, clip_coef=None)
    assert loss.item() == pytest.approx((1 + 1 + 0.64) / 3) and clip_ratio.item() == 0.0
    loss, _ = value_loss(torch.tensor([4.0, 0.5]), torch.zeros(2), torch.zeros(2), None, kind="huber", huber_delta=1.0)
    assert loss.item() == pytest.approx((3.5 + 0.125) / 2)  # delta*(|e| - delta/2) = 3.5; e^2/2 = 0.125


def test_normalize_and_adaptive_lr():
    x = normalize(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt(5 / 3)  # unbiased
    assert x.tolist() == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], rel=1e-6)
    assert adaptive_lr(1e-3, kl=0.05, desired_kl=0.01) == pytest.approx(1e-3 / 1.5)
    assert adaptive_lr(1e-3, kl=0.001, desired_kl=0.01) == pytest.approx(1.5e-3)
    assert adaptive_lr(1e-3, kl=0.01, desired_kl=0.01) == 1e-3
    assert adaptive_lr(1e-5, kl=1.0, desired_kl=0.01) == 1e-5  # floor
    assert adaptive_lr(1e-2, kl=0.0001, desired_kl=0.01) == 1e-2  # ceiling


def test_recompute_logprob_uses_the_update_minibatch_sizes():
    class HalfPolicy:  # evaluate gives 2x; sampling had reported 2x + 0.5
        sizes = []

        def evaluate(self, params, mb):
            self.sizes.append(mb["x"].shape[0])
            return 2 * mb["x"], None, None

    x = torch.arange(10.0)
    run = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    logprob, gap = recompute_logprob(HalfPolicy(), {}, {"x": x, "logprob": 2 * x + 0.5}, 3, run)
    assert logprob.tolist() == (2 * x).tolist() and gap.item() == 0.5
    assert HalfPolicy.sizes == [len(i) for i in minibatch_indices(10, 3, torch.Generator())] == [4, 3, 3]


def test_recompute_logprob_runs_evaluate_with_autograd_as_the_update_and_detaches():
    weight = torch.tensor(2.0, requires_grad=True)

    class GradPolicy:  # GR00T picks kernels by autograd mode (its fused GELU): recompute must match the update's
        grad_modes = []

        def evaluate(self, params, mb):
            self.grad_modes.append(torch.is_grad_enabled())
            return weight * mb["x"], None, None

    x = torch.arange(4.0)
    run = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    logprob, gap = recompute_logprob(GradPolicy(), {}, {"x": x, "logprob": 2 * x}, 2, run)
    assert GradPolicy.grad_modes == [True, True]
    assert not logprob.requires_grad and not gap.requires_grad and logprob.tolist() == (2 * x).tolist()


def test_minibatches_are_checked_against_each_ranks_rows(monkeypatch):
    """--env.num-envs is the total over DDP ranks: 2 envs on 2 ranks give each rank 1 row per decision."""
    cfg = PPOConfig(policy="mlp", env=EnvConfig(task="toy", num_envs=2, device="cpu"), num_steps=1, num_minibatches=2)
    check_config(cfg)  # one process: 2 rows
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--num-minibatches 2 exceeds the 1 rows of each of the 2 DDP rank"):
        check_config(cfg)
