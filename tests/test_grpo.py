"""GRPO's pure functions against hand-computed values, and its loop on the toy env."""

import math

import pytest
import torch

from algos.config import ConfigError
from algos.grpo import (GRPOConfig, first_episode_mask, group_reset_keys, grpo_advantages, informative_groups, train,
                        update)
from envs.config import EnvConfig
from models.mlp import MLPConfig
from tests.algos_toy_env import ToyEnv

T, F = True, False


def test_grpo_advantages_per_group():
    returns = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    adv = grpo_advantages(returns, group_size=4, eps=0.0 + 1e-6)
    # group 0: mean .75, unbiased std sqrt((3 * .25^2 + .75^2) / 3) = .5; group 1: all equal -> 0;
    # group 2: mean 2, std sqrt((1 + 1 + 0 + 0) / 3)
    s2 = (2 / 3) ** 0.5
    expected = [0.5, -1.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 1 / s2, -1 / s2, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_informative_groups_drop_all_success_and_all_failure():
    success = torch.tensor([T, F, T, T, F, F, F, F, T, T, T, T])
    assert informative_groups(success, 4).tolist() == [T] * 4 + [F] * 4 + [F] * 4


def test_first_episode_mask():
    ended = torch.tensor([[F, T, F], [T, F, F], [F, T, F]])
    assert first_episode_mask(ended).tolist() == [[T, T, T], [T, F, T], [F, F, T]]


def test_group_reset_keys_share_within_group_differ_across_groups_ranks_iterations():
    k = group_reset_keys(seed=1, iteration=0, rank=0, world_size=2, num_envs=6, group_size=3)
    assert k.tolist() == [(1 << 32)] * 3 + [(1 << 32) + 1] * 3
    other_rank = group_reset_keys(1, 0, 1, 2, 6, 3)
    next_iteration = group_reset_keys(1, 1, 0, 2, 6, 3)
    all_keys = set(k.tolist()) | set(other_rank.tolist()) | set(next_iteration.tolist())
    assert len(all_keys) == 6


def test_num_envs_not_divisible_by_group_size_is_a_clear_error():
    with pytest.raises(ConfigError, match="not divisible by --group-size 4"):
        train(GRPOConfig(env=EnvConfig(num_envs=6), group_size=4))


def test_grpo_loop_on_toy_env_groups_start_identically_and_critic_is_untouched(tmp_path):
    resets = []

    class RecordingEnv(ToyEnv):
        def reset(self, seed=0, reset_keys=None):
            obs = super().reset(seed, reset_keys)
            resets.append((reset_keys.clone(), obs["state"].clone()))
            return obs

    cfg = GRPOConfig(env=EnvConfig(task="toy", num_envs=6, device="cpu", max_episode_steps=8), group_size=3,
                     num_iterations=2, run_dir=str(tmp_path), policy="mlp", mlp=MLPConfig(hidden_sizes=(8,)), seed=3)
    policy_init = __import__("models.mlp", fromlist=["MLPPolicy"]).MLPPolicy(2, 1, cfg.mlp).init(cfg.seed)
    out = train(cfg, make_env=RecordingEnv)
    assert len(resets) == 2  # one group reset per iteration
    for keys, states in resets:
        assert keys.tolist()[:3] == [keys[0].item()] * 3 and keys[3] != keys[0]
        assert torch.equal(states[0], states[1]) and torch.equal(states[0], states[2])
        assert not torch.equal(states[0], states[3])
    assert not torch.equal(resets[0][1], resets[1][1])  # new start states each iteration
    params = out["params"]
    for name, before in policy_init.items():
        changed = not torch.equal(params[name].detach(), before)
        if name.startswith("critic."):
            assert not changed, name  # GRPO has no critic: its params are not in the optimizer
        elif name.startswith("actor."):
            assert changed, name
    h = out["history"][-1]
    assert h["rollout/groups_kept"] == 1.0 and h["rollout/decisions"] > 0
    assert abs(h["rollout/advantages_mean"]) < 1e-5  # group-normalised advantages average to zero


def test_an_update_without_rows_leaves_params_and_optimizer_alone():
    """Every group filtered out: no AdamW step (its momentum and weight decay would move the params anyway)."""
    from models.mlp import MLPPolicy
    from algos.run import Run, make_optimizer

    cfg = GRPOConfig(env=EnvConfig(task="toy", num_envs=2, device="cpu"), mlp=MLPConfig(hidden_sizes=(8,)),
                     num_minibatches=2, weight_decay=0.1, learning_rate=1e-2)
    policy = MLPPolicy(2, 1, cfg.mlp)
    params = policy.init(0)
    run = Run(cfg, "grpo", 0, 1, torch.device("cpu"), torch.Generator().manual_seed(0), None, None, False)
    optimizer = make_optimizer(policy, params, cfg.learning_rate, None, cfg.weight_decay, include_value=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rows = policy.sample(params, {"state": torch.randn(4, 2, generator=g)}, "", g)
    rows["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    update(cfg, policy, params, optimizer, rows, run)  # a real step first: AdamW now has momentum
    before = {n: t.detach().clone() for n, t in params.items()}
    steps = [s["step"].item() for s in optimizer.state.values()]
    metrics = update(cfg, policy, params, optimizer, {k: v[:0] for k, v in rows.items()}, run)
    assert all(torch.equal(params[n], before[n]) for n in before)
    assert [s["step"].item() for s in optimizer.state.values()] == steps
    assert all(math.isnan(v) for v in metrics.values())  # no minibatch step to report
