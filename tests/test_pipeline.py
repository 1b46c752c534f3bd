"""The pipelined rollout (--pipeline-stages, envs/workers.py): stages in worker processes give the same numbers as
the same stages stepped in this process one after the other, and, for an env that is deterministic, as each
stage's env run alone."""

import contextlib
import dataclasses
import types

import pytest
import torch

from algos import grpo, ppo
from algos.config import ConfigError
from algos.rollout import collect_rollout
from envs import EnvConfig, make_env
from envs.workers import EnvWorkers, LocalStages, TensorPipe, stage_seed
from models.mlp import MLPConfig, MLPPolicy
from tests.algos_toy_env import (ToyCameraEnv, ToyEnv, echo_doubled, make_env_failing_in_one_stage, make_failing_env,
                                 unpicklable_reply, without_timing)


def _run(seed: int = 0) -> types.SimpleNamespace:
    return types.SimpleNamespace(device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                                 autocast=contextlib.nullcontext)


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k!r} differs"


def _rollouts(env, policy, params, rounds: int, decisions: int, first_episodes: bool = False) -> list:
    """`rounds` rollouts in a row from reset(seed=3), the obs and success flags carried, the same sampling seed."""
    run, out = _run(), []
    obs = env.reset(seed=3)
    seen = torch.zeros(env.num_envs, dtype=torch.bool)
    for _ in range(rounds):
        batch, obs, stats = collect_rollout(env, policy, params, obs, decisions, run, seen, first_episodes)
        out.append((batch, obs, seen.clone(), stats))
    return out


@pytest.mark.parametrize("first_episodes", [False, True])
def test_worker_stages_equal_the_same_stages_in_this_process(first_episodes):
    """Two stages of a camera toy env in worker processes (the policy samples one stage while the other plays)
    against the same two envs here, played one after the other: batches, obs (uint8 images through shared memory),
    success flags, episode sums and step counts are equal. GRPO's early stop included."""
    cfg = EnvConfig(task="toy", num_envs=6, device="cpu", max_episode_steps=5)
    half = dataclasses.replace(cfg, num_envs=3)
    policy = MLPPolicy(2, 1, MLPConfig(hidden_sizes=(8,)), torch.device("cpu"))
    params = policy.init(0)
    with EnvWorkers(ToyCameraEnv, cfg, stages=2) as workers:
        assert workers.num_envs == 6 and workers.stage_envs == 3 and workers.num_views == 1
        assert workers.instruction == "stay near the middle"
        pipelined = _rollouts(workers, policy, params, rounds=3, decisions=4, first_episodes=first_episodes)
        state = workers.state_dict()
    local_envs = LocalStages([ToyCameraEnv(half), ToyCameraEnv(half)])
    local = _rollouts(local_envs, policy, params, rounds=3, decisions=4, first_episodes=first_episodes)
    for r, ((b1, o1, s1, st1), (b2, o2, s2, st2)) in enumerate(zip(pipelined, local)):
        _assert_equal(b1, b2, f"rollout {r} batch")
        _assert_equal(o1, o2, f"rollout {r} obs")
        assert torch.equal(s1, s2)
        assert torch.equal(st1.episodes.sums, st2.episodes.sums) and st1.env_steps == st2.env_steps
        assert b1["reward"].shape[1] == 6 and st1.env_time > 0
    assert any(st.episodes.sums[0, 3] > 0 for *_, st in pipelined), "episodes should end within the rollouts"
    _assert_equal(state, local_envs.state_dict(), "env state")
    if not first_episodes:
        assert pipelined[0][0]["reward"].shape[0] == 4


def test_pipelined_ppo_equals_the_same_stages_in_this_process_and_resumes_exactly(tmp_path):
    """PPO with --pipeline-stages 2 against PPO on the same two stage envs held in this process: the same params
    and metrics. Resuming its checkpoint (the stages' env states included) continues exactly."""
    flags = dict(policy="mlp", env=EnvConfig(task="toy", num_envs=4, device="cpu", max_episode_steps=6),
                 num_steps=5, num_iterations=2, num_minibatches=2, mlp=MLPConfig(hidden_sizes=(8,)),
                 learning_rate=1e-3, save_every=1, seed=4)
    piped = ppo.train(ppo.PPOConfig(pipeline_stages=2, run_dir=str(tmp_path / "piped"), **flags), make_env=ToyEnv)
    local = ppo.train(ppo.PPOConfig(run_dir=str(tmp_path / "local"), **flags),
                      make_env=lambda cfg: LocalStages([ToyEnv(dataclasses.replace(cfg, num_envs=2))
                                                        for _ in range(2)]))
    resumed = ppo.train(ppo.PPOConfig(pipeline_stages=2, resume=str(tmp_path / "piped" / "checkpoints" / "iter_000001"),
                                      run_dir=str(tmp_path / "resumed"), **flags), make_env=ToyEnv)
    for other in (local, resumed):
        _assert_equal(piped["params"], other["params"], "params")
    assert [without_timing(h) for h in piped["history"]] == [without_timing(h) for h in local["history"]]
    with pytest.raises(KeyError, match="--pipeline-stages"):  # a state saved by 2 stages does not fit 1
        ppo.train(ppo.PPOConfig(resume=str(tmp_path / "piped" / "checkpoints" / "iter_000001"),
                                run_dir=str(tmp_path / "wrong"), **flags),
                  make_env=lambda cfg: LocalStages([ToyEnv(cfg)]))
    with pytest.raises(KeyError, match="saved by 2 pipeline stages and this env has none: resume with "
                                       "--pipeline-stages 2"):  # nor into a plain env
        ppo.train(ppo.PPOConfig(resume=str(tmp_path / "piped" / "checkpoints" / "iter_000001"),
                                run_dir=str(tmp_path / "plain"), **flags), make_env=ToyEnv)


class FeedbackPolicy:
    """Deterministic chunks of T = 3 actions from the state (no sampling): each stage's rollout depends only on
    its own env."""

    def sample(self, params, obs, instruction, generator, deterministic=False):
        state = obs["state"]
        action = (-2.0 * state[:, :1] - state[:, 2:3]).clamp(-1, 1)
        actions = torch.stack([action, 0.5 * action, -action], dim=1)
        return {"actions": actions, "logprob": state.sum(1), "value": torch.zeros(len(state)), "state": state}


def test_pipelined_cartpole_equals_each_stage_alone():
    """Isaac Lab Cartpole: 2 stages of 2 envs in worker processes, played pipelined, give for each stage exactly what
    a lone 2-env Cartpole reset with that stage's seed gives in the plain rollout (episode ends included)."""
    cfg = EnvConfig(task="Isaac-Cartpole", num_envs=4, device="cpu", max_episode_steps=7)
    with EnvWorkers(make_env, cfg, stages=2) as workers:
        pipelined = _rollouts(workers, FeedbackPolicy(), {}, rounds=2, decisions=4)
    for s in range(2):
        rows = slice(2 * s, 2 * s + 2)
        with make_env(dataclasses.replace(cfg, num_envs=2)) as env:
            run, seen = _run(), torch.zeros(2, dtype=torch.bool)
            obs = env.reset(seed=stage_seed(3, s))
            for r in range(2):
                batch, obs, stats = collect_rollout(env, FeedbackPolicy(), {}, obs, 4, run, seen)
                p_batch, p_obs, p_seen, _ = pipelined[r]
                _assert_equal({k: v[:, rows] for k, v in p_batch.items()}, batch, f"stage {s} rollout {r} batch")
                _assert_equal({k: v[rows] for k, v in p_obs.items()}, obs, f"stage {s} rollout {r} obs")
                assert torch.equal(p_seen[rows], seen)
    ends = torch.cat([b["terminated"] | b["truncated"] for b, *_ in pipelined])
    assert ends.any(), "episodes should end within the rollouts"


def test_worker_errors_name_the_stage():
    with pytest.raises(RuntimeError, match=r"(?s)pipeline stage [01] failed to start.*no env for task 'toy'"):
        EnvWorkers(make_failing_env, EnvConfig(task="toy", num_envs=2, device="cpu"), stages=2)
    with EnvWorkers(ToyEnv, EnvConfig(task="toy", num_envs=4, device="cpu"), stages=2) as workers:
        with pytest.raises(ValueError, match=r"reset_keys must have shape \(4,\)"):
            workers.reset(seed=0, reset_keys=torch.zeros(3, dtype=torch.long))
        workers.reset(seed=0)
        with pytest.raises(RuntimeError, match=r"(?s)pipeline stage 0 failed to run _step.*IndexError"):
            workers.step(torch.zeros(4))  # no action dim: the stage's env.step raises
        obs, *_ = workers.step(torch.zeros(4, 1))  # the workers still serve after an error
        assert obs["state"].shape == (4, 2)
        # a reply that cannot be sent is an error the stage reports, and it serves on
        with pytest.raises(RuntimeError, match=r"(?s)pipeline stage 0 failed to run unpicklable_reply.*pickle"):
            workers._on_all(unpicklable_reply)
        # a request that cannot be sent fails here and leaves the pipe in step (its new buffer never left)
        with pytest.raises(Exception, match="pickle"):
            workers.submit(0, unpicklable_reply, {"actions": torch.zeros(2, 1), "fresh": torch.zeros(3)}, lambda: 0)
        workers.submit(0, unpicklable_reply, {"fresh": torch.ones(3)})
        with pytest.raises(RuntimeError, match="failed to run unpicklable_reply"):
            workers.collect(0)
        workers.step(torch.zeros(4, 1))
        # a worker that died is named, and the other stage is not left with an uncollected result
        workers.processes[1].kill()
        workers.processes[1].join()
        for _ in range(2):
            with pytest.raises(RuntimeError, match=r"stage 1 exited \(exit code -9\)"):
                workers.step(torch.zeros(4, 1))


def test_a_stage_that_fails_to_start_stops_the_stages_still_starting(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANVLA_TEST_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"(?s)failed to start.*this stage cannot build its env"):
        EnvWorkers(make_env_failing_in_one_stage, EnvConfig(task="toy", num_envs=3, device="cpu"), stages=3)
    # the two other stages were stopped while building, not waited for (they would have built after a minute)
    assert (tmp_path / "failed").exists() and not (tmp_path / "built").exists()


def test_pipeline_stage_flags_are_checked():
    env = EnvConfig(task="toy", num_envs=6, device="cpu")
    with pytest.raises(ConfigError, match="--pipeline-stages 4 does not divide the 6 envs"):
        ppo.check_config(ppo.PPOConfig(policy="mlp", env=env, pipeline_stages=4))
    with pytest.raises(ConfigError, match="--pipeline-stages must be >= 1"):
        ppo.check_config(ppo.PPOConfig(policy="mlp", env=env, pipeline_stages=0))
    with pytest.raises(ConfigError, match="not supported with --num-seeds"):
        ppo.check_config(ppo.PPOConfig(policy="mlp", env=env, pipeline_stages=2, num_seeds=2))
    with pytest.raises(ConfigError, match="3 envs per stage, not divisible by --group-size 2"):
        grpo.check_config(grpo.GRPOConfig(policy="mlp", env=env, pipeline_stages=2, group_size=2))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_tensor_pipe_between_processes(device):
    """Shared memory (CPU) or CUDA IPC (GPU) between two processes; empty tensors arrive on their device."""
    ctx = torch.multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=echo_doubled, args=(there,), daemon=True)
    child.start()
    pipe = TensorPipe(here)
    try:
        x, empty = torch.arange(6.0, device=device).view(2, 3), torch.zeros(4, 0, dtype=torch.bool, device=device)
        received = []
        for k in range(3):  # the buffers are made once and reused
            pipe.send(f"round {k}", {"x": x + k, "empty": empty})
            message, back = pipe.recv()
            assert message == f"round {k}" and torch.equal(back["x"], 2 * (x + k))
            assert back["x"].device == x.device and back["empty"].device == empty.device
            assert back["empty"].shape == (4, 0) and back["empty"].dtype == torch.bool
            received.append(back["x"])
        assert torch.equal(received[0], 2 * x)  # what a message delivered stays valid after the next ones
    finally:
        pipe.send(None)
        child.join(timeout=30)
    assert child.exitcode == 0
