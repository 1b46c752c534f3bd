"""IsaacLabEnv.state_dict / load_state_dict: a fresh env loaded with a saved state continues bit-exactly.

Each test runs env A for K steps, saves its state, records M more steps (with sub-env resets among them), closes
A, builds B, walks B somewhere else, loads the state and replays the same M actions: observations (camera images
included), rewards, dones and info must be *equal* (torch.equal, no tolerance).
"""

import pytest
import torch

from envs import EnvConfig, make_env

K, M = 5, 12


def _actions(num_envs: int, action_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(K + M, num_envs, action_dim, generator=g) * 2 - 1


def _steps(env, actions: torch.Tensor) -> list:
    return [env.step(a) for a in actions]


def _assert_same(a: list, b: list) -> None:
    for t, ((obs_a, r_a, te_a, tr_a, info_a), (obs_b, r_b, te_b, tr_b, info_b)) in enumerate(zip(a, b)):
        assert obs_a.keys() == obs_b.keys()
        for k in obs_a:
            assert torch.equal(obs_a[k], obs_b[k]), f"step {t}: obs {k!r} differs"
        assert torch.equal(r_a, r_b) and torch.equal(te_a, te_b) and torch.equal(tr_a, tr_b), f"step {t}"
        for k in info_a:
            assert torch.equal(info_a[k], info_b[k]), f"step {t}: info {k!r} differs"


def _round_trip(cfg: EnvConfig) -> tuple[list, list, dict]:
    env = make_env(cfg)
    actions = _actions(env.num_envs, env.action_dim)
    env.reset(seed=3)
    torch.manual_seed(123)  # Isaac Lab's reset events draw from torch's global generator
    _steps(env, actions[:K])
    state = {k: v.cpu().clone() for k, v in env.state_dict().items()}
    recorded = _steps(env, actions[K:])
    env.close()

    env = make_env(cfg)
    try:
        env.reset(seed=9)  # a different history: other episodes, other RNG, other solver warm start
        _steps(env, 0.5 * actions[:3])
        torch.manual_seed(999)
        env.load_state_dict(state)
        replayed = _steps(env, actions[K:])
        bad = dict(state)
        del bad["adapter.episode_return"]
        with pytest.raises(KeyError, match="does not fit this env"):
            env.load_state_dict(bad)
        bad = {k: (v[:1] if k == "adapter.episode_length" else v) for k, v in state.items()}
        with pytest.raises(ValueError, match="adapter.episode_length"):
            env.load_state_dict(bad)
    finally:
        env.close()
    return recorded, replayed, state


def test_cartpole_state_restores_exactly_into_a_fresh_env():
    recorded, replayed, state = _round_trip(EnvConfig(task="Isaac-Cartpole", num_envs=2, device="cpu",
                                                      max_episode_steps=8))
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    assert any((te | tr).any() for _, _, te, tr, _ in recorded), "the replay should cross a sub-env reset"
    _assert_same(recorded, replayed)


def test_stack_cube_state_restores_exactly_into_a_fresh_env():
    """Contacts (cubes on the table, MuJoCo-Warp's warm-started solver), IK-relative actions, cameras, keyed resets."""
    recorded, replayed, _ = _round_trip(EnvConfig(num_envs=2, device="cpu", image_size=32, max_episode_steps=10))
    assert any((te | tr).any() for _, _, te, tr, _ in recorded)
    _assert_same(recorded, replayed)
