"""PPO with K seeds in one process (algos/ppo_seeds.py): each learner equals its seed run alone."""

import json

import pytest
import torch
from safetensors.torch import load_file

from algos import ppo
from algos.config import ConfigError
from algos.ppo_seeds import adamw, clip_per_seed
from envs.config import EnvConfig
from models.mlp import MLPConfig
from tests.algos_toy_env import StackedToyEnv, ToyEnv


def test_stacked_adamw_and_clipping_equal_torchs_per_seed():
    torch.manual_seed(0)
    params, grads = torch.randn(3, 4, 5), [torch.randn(3, 4, 5) * 3, torch.randn(3, 2)]
    lr = torch.tensor([1e-3, 3e-3, 0.0])
    exp_avg, exp_avg_sq, p = torch.zeros_like(params), torch.zeros_like(params), params.clone()
    clipped = [g.clone() for g in grads]
    norms = clip_per_seed(clipped, 1.0)
    for step in (1, 2):
        p, exp_avg, exp_avg_sq = adamw(p, clipped[0], exp_avg, exp_avg_sq, step, lr, weight_decay=0.1)
    for k in range(3):
        ours = [g[k].clone().requires_grad_() for g in grads]
        for o, g in zip(ours, grads):
            o.grad = g[k].clone()
        assert torch.allclose(norms[k], torch.nn.utils.clip_grad_norm_(ours, 1.0))
        assert all(torch.allclose(o.grad, c[k]) for o, c in zip(ours, clipped))
        ref = params[k].clone().requires_grad_()
        opt = torch.optim.AdamW([ref], lr=lr[k].item(), weight_decay=0.1)
        for _ in range(2):
            ref.grad = clipped[0][k].clone()
            opt.step()
        torch.testing.assert_close(p[k], ref.detach(), rtol=1e-6, atol=1e-7)


FLAGS = dict(policy="mlp", env=EnvConfig(task="toy", num_envs=4, device="cpu", max_episode_steps=12), num_steps=8,
             num_iterations=3, update_epochs=2, num_minibatches=2, mlp=MLPConfig(hidden_sizes=(16, 16)),
             lr_schedule="adaptive", learning_rate=1e-3, value_learning_rate=3e-3, weight_decay=0.01,
             max_grad_norm=0.5, value_warmup_iterations=1, save_every=3)
COMPARED = ("rollout/returns_mean", "rollout/advantages_mean", "env/episode_return", "actor/loss",
            "actor/value_loss", "actor/approx_kl", "actor/grad_norm", "charts/learning_rate")


def test_k_seeds_in_one_process_equal_each_seed_run_alone(tmp_path):
    """Seeds 5 and 6 trained together (stacked params, vmapped policy and loss, per-seed AdamW, clipping, adaptive
    rate, normaliser, RNG) give each seed's run alone: params, metrics and checkpoints, within float tolerance."""
    alone = [ppo.train(ppo.PPOConfig(seed=s, run_dir=str(tmp_path / f"alone_{s}"), **FLAGS), make_env=ToyEnv)
             for s in (5, 6)]
    together = ppo.train(ppo.PPOConfig(seed=5, num_seeds=2, run_dir=str(tmp_path / "together"), **FLAGS),
                         make_env=lambda cfg: StackedToyEnv(cfg, groups=2))
    assert [str(d) for d in together["run_dir"]] == [str(tmp_path / "together" / f"seed_{s}") for s in (5, 6)]
    for k, ref in enumerate(alone):
        for name, t in ref["params"].items():
            torch.testing.assert_close(together["params"][k][name], t.detach(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"seed {k}, {name}: {m}")
        assert len(together["history"][k]) == len(ref["history"]) == 3
        for ours, theirs in zip(together["history"][k], ref["history"]):
            assert set(ours) == set(theirs) | {"charts/total_SPS"}         # the same metrics, and the total SPS
            for key in (key for key in COMPARED if key in theirs):          # no episode ends in the first rollout
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (k, key)
        ckpt = "checkpoints/iter_000003"
        for file in ("policy.safetensors", "normalizer.safetensors", "optimizer.safetensors"):
            ours, theirs = load_file(together["run_dir"][k] / ckpt / file), load_file(ref["run_dir"] / ckpt / file)
            assert ours.keys() == theirs.keys()
            for key in theirs:
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
        # the adaptive rate moved (x1.5 steps); in float64, as a run alone's Python floats (float32 drifts 3e-8 a step)
        lrs = [[g["lr"] for g in json.loads((d / ckpt / "state.json").read_text())["optimizer"]["param_groups"]]
               for d in (together["run_dir"][k], ref["run_dir"])]
        assert lrs[0] == pytest.approx(lrs[1], rel=1e-12, abs=0) and lrs[1][0] != FLAGS["learning_rate"], lrs
    # the learners differ from each other (different seeds), as their runs alone do
    assert not torch.allclose(together["params"][0]["actor.0.weight"], together["params"][1]["actor.0.weight"])


def test_a_seeds_checkpoint_resumes_as_a_run_of_its_own(tmp_path):
    flags = {**FLAGS, "num_iterations": 1, "save_every": 1}
    ppo.train(ppo.PPOConfig(seed=5, num_seeds=2, run_dir=str(tmp_path), **flags),
              make_env=lambda cfg: StackedToyEnv(cfg, groups=2))
    with pytest.warns(UserWarning, match="starts fresh episodes"):
        out = ppo.train(ppo.PPOConfig(**{**flags, "num_iterations": 2}, resume=str(tmp_path / "seed_6")),
                        make_env=ToyEnv)
    assert [h["charts/iteration"] for h in out["history"]] == [2]


@pytest.mark.parametrize("flags, message", [
    ({"policy": "gr00t-tiny"}, "--num-seeds 2 trains stacked MLP learners"),
    ({"resume": "runs/x"}, "--resume continues one seed's run"),
])
def test_num_seeds_refuses_what_it_cannot_do(flags, message):
    with pytest.raises(ConfigError, match=message):
        ppo.check_config(ppo.PPOConfig(**{**FLAGS, "num_seeds": 2, **flags}))
