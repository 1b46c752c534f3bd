"""Shared plumbing: the MLP policy and its normaliser, optimizer groups, minibatches, RNG capture, checkpoints."""

import json
import random
import types

import numpy as np
import pytest
import torch

from algos.checkpoint import (find_checkpoint, load_checkpoint, load_params_into, rng_state, save_checkpoint,
                              set_rng_state)
from algos.config import ConfigError, check_rl_config, config_dict, config_from_dict
from algos.ppo import PPOConfig, minibatch_indices
from algos.run import Run, env_metadata, make_optimizer, make_rl_policy, optimizer_step
from envs.config import EnvConfig
from models.mlp import MLPConfig, MLPPolicy, gaussian_logprob, merge_moments


def test_merge_moments_equals_moments_of_the_concatenation():
    a, b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([10.0, 20.0], dtype=torch.float64)
    mean, var, count = merge_moments(a.mean(), a.var(unbiased=False), torch.tensor(3.0, dtype=torch.float64),
                                     b.mean(), b.var(unbiased=False), torch.tensor(2.0, dtype=torch.float64))
    both = torch.cat([a, b])
    assert (mean.item(), var.item(), count.item()) == pytest.approx((both.mean().item(),
                                                                     both.var(unbiased=False).item(), 5.0))


def test_mlp_normalizer_is_in_params_and_changes_the_input():
    policy = MLPPolicy(state_dim=2, action_dim=1, cfg=MLPConfig(hidden_sizes=(4,)))
    params = policy.init(0)
    assert policy.normalizer_names == ("obs_norm.mean", "obs_norm.var", "obs_norm.count")
    assert not policy.is_trainable("obs_norm.mean") and policy.is_trainable("actor.0.weight")
    policy.update_normalizer(params, torch.tensor([[0.0, 10.0], [2.0, 30.0]]))
    assert params["obs_norm.mean"].tolist() == [1.0, 20.0]
    assert params["obs_norm.var"].tolist() == [1.0, 100.0]
    assert params["obs_norm.count"].item() == 2.0
    # the policy sees (s - mean) / std: the raw mean state and the zero state normalised look the same
    # to a fresh normaliser
    fresh = policy.init(0)
    v_mean = policy.value(params, {"state": torch.tensor([[1.0, 20.0]])})
    v_zero = policy.value(fresh, {"state": torch.tensor([[0.0, 0.0]])})
    assert torch.allclose(v_mean, v_zero, atol=1e-6)


def test_mlp_sample_logprob_matches_gaussian_and_evaluate():
    policy = MLPPolicy(3, 2, MLPConfig(hidden_sizes=(8,), init_std=0.5))
    params = policy.init(1)
    obs = {"state": torch.randn(5, 3)}
    out = policy.sample(params, obs, "", torch.Generator().manual_seed(0))
    mean = policy.sample(params, obs, "", None, deterministic=True)["actions"][:, 0]
    a = out["actions"][:, 0]
    expected = (-0.5 * ((a - mean) / 0.5) ** 2 - np.log(0.5) - 0.5 * np.log(2 * np.pi)).sum(-1)
    assert torch.allclose(out["logprob"], expected, atol=1e-5)
    logprob, value, entropy = policy.evaluate(params, out)
    assert torch.equal(logprob, out["logprob"]) and torch.equal(value, out["value"])
    assert torch.allclose(entropy, torch.full((5,), 2 * (np.log(0.5) + 0.5 * np.log(2 * np.pi * np.e))), atol=1e-6)
    assert torch.allclose(gaussian_logprob(mean, mean, torch.zeros(2)), torch.full((5,), -np.log(2 * np.pi)))


def test_optimizer_has_a_separate_value_head_learning_rate():
    policy = MLPPolicy(2, 1, MLPConfig(hidden_sizes=(4,)))
    params = policy.init(0)
    opt = make_optimizer(policy, params, lr=1e-3, value_lr=5e-3, weight_decay=0.0)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-3]
    assert all(n.startswith("critic.") for n in opt.param_groups[1]["param_names"])
    assert "std" in opt.param_groups[0]["param_names"]
    assert not any(n.startswith("obs_norm") for g in opt.param_groups for n in g["param_names"])
    no_value = make_optimizer(policy, params, 1e-3, None, 0.0, include_value=False)
    assert len(no_value.param_groups) == 1


def test_minibatches_cover_all_rows_and_are_reshuffled_every_epoch():
    g = torch.Generator().manual_seed(0)
    epoch1, epoch2 = minibatch_indices(10, 3, g), minibatch_indices(10, 3, g)
    assert [len(i) for i in epoch1] == [4, 3, 3]
    assert sorted(torch.cat(epoch1).tolist()) == list(range(10)) == sorted(torch.cat(epoch2).tolist())
    assert torch.cat(epoch1).tolist() != torch.cat(epoch2).tolist()


def test_rng_state_round_trip_through_json():
    g = torch.Generator().manual_seed(5)
    state = json.loads(json.dumps(rng_state(g)))
    draws = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=g)  # move every stream on
    set_rng_state(state, g)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item()) == draws


def _run(tmp_path, keep_last=2):
    cfg = PPOConfig(env=EnvConfig(task="toy", num_envs=2, device="cpu"), keep_last=keep_last, run_dir=str(tmp_path))
    return Run(cfg, "ppo", 0, 1, torch.device("cpu"), torch.Generator().manual_seed(0), tmp_path, None, False)


def test_checkpoint_round_trip_restores_params_optimizer_rng_and_carry(tmp_path):
    run = _run(tmp_path)
    policy = MLPPolicy(2, 1, MLPConfig(hidden_sizes=(4,)))
    params = policy.init(0)
    policy.update_normalizer(params, torch.randn(7, 2))
    opt = make_optimizer(policy, params, 1e-3, 2e-3, 0.0)
    loss = policy.evaluate(params, policy.sample(params, {"state": torch.randn(3, 2)}, "", run.generator))[0].sum()
    optimizer_step(opt, -loss, 1.0)
    carry = {"obs.state": torch.randn(2, 2), "success_seen": torch.tensor([True, False])}
    path = save_checkpoint(run, 7, {"global_step": 70}, policy, params, {"policy": "mlp", "init_seed": 0},
                                  opt, carry)
    assert path == tmp_path / "checkpoints" / "iter_000007"
    assert sorted(p.name for p in path.iterdir()) == ["carry_rank0.safetensors", "normalizer.safetensors",
                                                      "optimizer.safetensors", "policy.safetensors", "state.json"]
    meta = json.loads((path / "state.json").read_text())
    assert meta["iteration"] == 7 and meta["global_step"] == 70 and meta["policy"]["base"]["init_seed"] == 0
    expected_draw = torch.rand(4, generator=run.generator)

    run2 = _run(tmp_path)
    params2 = policy.init(1)  # different values, to be overwritten
    opt2 = make_optimizer(policy, params2, 1e-3, 2e-3, 0.0)
    meta2, carry2 = load_checkpoint(run2, tmp_path, policy, params2, opt2)  # run dir -> newest checkpoint
    assert meta2["global_step"] == 70
    for n in params:
        assert torch.equal(params[n], params2[n]), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))
    assert torch.equal(torch.rand(4, generator=run2.generator), expected_draw)
    assert torch.equal(carry2["obs.state"], carry["obs.state"]) and carry2["success_seen"].tolist() == [True, False]


def test_checkpoints_are_pruned_to_keep_last_and_leave_no_temp_dirs(tmp_path):
    run = _run(tmp_path, keep_last=2)
    policy = MLPPolicy(2, 1, MLPConfig(hidden_sizes=(4,)))
    params = policy.init(0)
    opt = make_optimizer(policy, params, 1e-3, None, 0.0)
    (tmp_path / "checkpoints" / ".tmp-iter_000009-99999").mkdir(parents=True)  # what a crashed run left
    for it in (1, 2, 3, 3):  # saving the same iteration twice replaces it
        save_checkpoint(run, it, {"global_step": it}, policy, params, {}, opt, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000002", "iter_000003"]
    assert find_checkpoint(tmp_path).name == "iter_000003"


def test_a_checkpoint_missing_tensors_or_files_is_a_clear_error(tmp_path):
    """Loading is strict: a checkpoint copied in part must not leave params at their init unnoticed."""
    from safetensors.torch import load_file, save_file

    run = _run(tmp_path)
    policy = MLPPolicy(2, 1, MLPConfig(hidden_sizes=(4,)))
    params = policy.init(0)
    path = save_checkpoint(run, 1, {"global_step": 1}, policy, params, {}, make_optimizer(policy, params, 1e-3,
                                                                                           None, 0.0), {})
    load_params_into(path, policy, policy.init(1))  # whole: fine
    tensors = load_file(path / "policy.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "actor.0.weight"}, path / "policy.safetensors")
    with pytest.raises(ValueError, match="policy.safetensors: missing actor.0.weight, unexpected none"):
        load_params_into(path, policy, policy.init(1))
    (path / "policy.safetensors").unlink()
    with pytest.raises(ValueError, match="policy.safetensors is missing"):
        load_params_into(path, policy, policy.init(1))
    save_file(tensors, path / "policy.safetensors")
    (path / "normalizer.safetensors").unlink()
    with pytest.raises(ValueError, match="normalizer.safetensors is missing"):
        load_params_into(path, policy, policy.init(1))
    meta = json.loads((path / "state.json").read_text())
    meta["policy"]["trainable"].remove("std")
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="this policy trains std that it did not"):
        load_params_into(path, policy, policy.init(1))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint at"):
        find_checkpoint(tmp_path / "nope")


def test_config_from_dict_round_trip():
    cfg = PPOConfig(env=EnvConfig(task="toy", num_envs=6), mlp=MLPConfig(hidden_sizes=(3, 5)), dual_clip=2.0)
    again = config_from_dict(PPOConfig, json.loads(json.dumps(config_dict(cfg))))
    assert again == cfg


def test_both_policies_satisfy_the_policy_protocol():
    """The algorithms call only the Policy protocol; both policies provide all of it (a missing member fails)."""
    from models.gr00t import Gr00tPolicy
    from models.policy import Policy
    from tests.test_gr00t_processor import make_metadata

    mlp = MLPPolicy(2, 1, MLPConfig(hidden_sizes=(4,)))
    gr00t = Gr00tPolicy("gr00t-tiny", metadata=make_metadata())
    assert isinstance(mlp, Policy) and isinstance(gr00t, Policy)
    assert gr00t.normalizer_names == () and not isinstance(object(), Policy)
    obs = {"state": torch.randn(3, 2)}
    out = mlp.sample(mlp.init(0), obs, "", torch.Generator().manual_seed(0))
    assert torch.equal(out["state"], obs["state"])  # every policy returns the state it acted on


def test_env_metadata_splits_arm_and_gripper_and_takes_a_gripper_alone():
    state, action = torch.randn(50, 8), torch.randn(50, 7)
    meta = env_metadata(state, action, (64, 48), 2)
    assert sorted(meta["statistics"]["action"]) == ["action", "gripper"]
    assert meta["statistics"]["action"]["action"]["max"] == action[:, :6].max(0).values.tolist()
    assert meta["statistics"]["action"]["gripper"]["min"] == [action[:, 6].min().item()]
    assert meta["modalities"]["video"]["view1"]["resolution"] == [64, 48]
    one_d = env_metadata(state, action[:, :1], (16, 16), 1)  # e.g. a 1-d force: no arm part
    assert list(one_d["statistics"]["action"]) == ["gripper"]


def test_gr00t_flow_sde_flags_reach_the_policy_from_a_preset_and_a_checkpoint(tmp_path):
    env = types.SimpleNamespace(task="camera task", state_dim=8, action_dim=7, num_views=2, image_size=32)
    cfg = PPOConfig(policy="gr00t-tiny", gr00t_noise_level=0.3, gr00t_sde_steps="all")
    policy, params, base = make_rl_policy(cfg, env, torch.device("cpu"))
    assert (policy.cfg.noise_level, policy.cfg.sde_steps) == (0.3, "all")
    policy.save(params, str(tmp_path / "gr00t"))
    loaded, _, _ = make_rl_policy(PPOConfig(policy=str(tmp_path / "gr00t"), gr00t_noise_level=0.7), env,
                                      torch.device("cpu"))
    assert (loaded.cfg.noise_level, loaded.cfg.sde_steps) == (0.7, "all")  # the checkpoint's steps, the flag's level
    default, _, _ = make_rl_policy(PPOConfig(policy="gr00t-tiny"), env, torch.device("cpu"))
    assert (default.cfg.noise_level, default.cfg.sde_steps) == (0.5, "one")


def test_rl_keeps_the_backbone_of_an_sft_export_frozen(tmp_path):
    """An SFT export that trained its vision tower records tune_visual; RL never trains the backbone (its features
    are computed once, without gradients), so its policy has it frozen."""
    from models.gr00t import Gr00tConfig, Gr00tPolicy
    from tests.test_gr00t_processor import make_metadata

    sft_policy = Gr00tPolicy(Gr00tConfig.preset("gr00t-tiny", tune_visual=True, tune_llm=True), metadata=make_metadata())
    sft_policy.save(sft_policy.init(0), str(tmp_path / "gr00t"))
    env = types.SimpleNamespace(task="camera task", state_dim=8, action_dim=7, num_views=2, image_size=32)
    policy, params, _ = make_rl_policy(PPOConfig(policy=str(tmp_path / "gr00t")), env, torch.device("cpu"))
    assert not policy.cfg.tune_visual and not policy.cfg.tune_llm
    assert not any(policy.is_trainable(n) for n in params if n.startswith("backbone."))


def test_bad_gr00t_flow_sde_flags_are_clear_errors():
    with pytest.raises(ConfigError, match="--gr00t-noise-level must be > 0, got 0.0"):
        check_rl_config(PPOConfig(gr00t_noise_level=0.0))
    with pytest.raises(ConfigError, match="--policy mlp has none"):
        check_rl_config(PPOConfig(policy="mlp", gr00t_sde_steps="all"))
