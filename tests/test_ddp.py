"""DDP on CPU (gloo, 2 processes): ranks stay identical and match a single process on the same data."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from algos import grpo, ppo
from algos.distributed import all_reduce_sum, setup_distributed
from algos.run import Run, make_optimizer
from envs.config import EnvConfig
from models.mlp import MLPConfig, MLPPolicy
from tests.algos_toy_env import ToyEnv

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    port = _free_port()
    mp.spawn(_entry, args=(fn, port, *args), nprocs=WORLD, join=True)


def _entry(rank: int, fn, port: int, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fn(rank, *args)


# ---- the update on fixed data ------------------------------------------------------------------------------------
CFG = ppo.PPOConfig(env=EnvConfig(task="toy", num_envs=2, device="cpu"), update_epochs=3, num_minibatches=1,
                    mlp=MLPConfig(hidden_sizes=(8,)), ent_coef=0.01, learning_rate=3e-3, lr_schedule="adaptive")


def _fixed_batch() -> tuple[MLPPolicy, dict, dict]:
    policy = MLPPolicy(3, 2, CFG.mlp)
    params = policy.init(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rows = policy.sample(params, {"state": torch.randn(16, 3, generator=g) * 3}, "", g)
    rows["advantages"] = torch.randn(16, generator=g) * 2 + 1
    rows["returns"] = torch.randn(16, generator=g)
    return policy, params, rows


def _update(policy, params, rows, world_size: int, rank: int) -> dict:
    run = Run(CFG, "ppo", rank, world_size, torch.device("cpu"), torch.Generator().manual_seed(rank), None,
                     None, False)
    optimizer = make_optimizer(policy, params, CFG.learning_rate, 1e-2, 0.0)
    rows = dict(rows, advantages=ppo.normalize(rows["advantages"], all_reduce_sum))
    ppo.update(CFG, policy, params, optimizer, rows, run)
    policy.update_normalizer(params, rows["state"], all_reduce_sum)
    return {n: t.detach().clone() for n, t in params.items()}


def _warmup_then_update(policy, params, rows, world_size: int, rank: int) -> dict:
    """Two iterations of value warm-up (the policy's lr 0 and no policy loss), then one update of both."""
    run = Run(CFG, "ppo", rank, world_size, torch.device("cpu"), torch.Generator().manual_seed(rank), None,
              None, False)
    optimizer = make_optimizer(policy, params, CFG.learning_rate, 1e-2, 0.0)
    rows = dict(rows, advantages=ppo.normalize(rows["advantages"], all_reduce_sum))
    for _ in range(2):
        ppo.update(CFG, policy, params, optimizer, rows, run, train_policy=False)
    ppo.update(CFG, policy, params, optimizer, rows, run)
    return {n: t.detach().clone() for n, t in params.items()}


GRPO_CFG = grpo.GRPOConfig(env=EnvConfig(task="toy", num_envs=2, device="cpu"), update_epochs=2, num_minibatches=1,
                           mlp=MLPConfig(hidden_sizes=(8,)), learning_rate=3e-3)


def _grpo_update(policy, params, rows, world_size: int, rank: int) -> dict:
    run = Run(GRPO_CFG, "grpo", rank, world_size, torch.device("cpu"), torch.Generator().manual_seed(rank), None,
              None, False)
    optimizer = make_optimizer(policy, params, GRPO_CFG.learning_rate, None, 0.0, include_value=False)
    grpo.update(GRPO_CFG, policy, params, optimizer, rows, run)
    return {n: t.detach().clone() for n, t in params.items()}


def _worker(rank: int, out_dir: str) -> None:
    """One spawn for every DDP check (process start-up is the slow part): the updates on fixed data, then
    two iterations of each training loop."""
    setup_distributed("cpu")
    policy, params, rows = _fixed_batch()
    half = {k: v[rank * 8:(rank + 1) * 8] for k, v in rows.items()}  # each rank owns half of the data
    torch.save(_update(policy, params, half, WORLD, rank), Path(out_dir) / f"update_rank{rank}.pt")
    policy, params, rows = _fixed_batch()
    torch.save(_warmup_then_update(policy, params, half, WORLD, rank), Path(out_dir) / f"warmup_rank{rank}.pt")
    policy, params, rows = _fixed_batch()
    uneven = {k: (v[:2] if rank == 0 else v[2:]) for k, v in rows.items()}  # GRPO's kept rows differ by rank
    torch.save(_grpo_update(policy, params, uneven, WORLD, rank), Path(out_dir) / f"grpo_update_rank{rank}.pt")
    for algo in ("ppo", "grpo"):  # train() joins the group set up above and leaves it to us
        _train(rank, algo, str(Path(out_dir) / algo))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, str(out))
    return out


def test_ddp_update_equals_single_process_on_the_same_data(ddp_outputs):
    rank0, rank1 = (torch.load(ddp_outputs / f"update_rank{r}.pt") for r in range(WORLD))
    policy, params, rows = _fixed_batch()
    initial = {n: t.detach().clone() for n, t in params.items()}
    single = _update(policy, params, rows, 1, 0)
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name  # the ranks stay bit-identical
        assert torch.allclose(rank0[name], single[name], atol=1e-6, rtol=1e-5), name  # = one process on all data
        if policy.is_trainable(name):
            assert not torch.equal(single[name], initial[name]), name  # the update did move every parameter
    assert single["obs_norm.count"].item() == 16.0 and rank0["obs_norm.count"].item() == 16.0


@pytest.mark.parametrize("name, update", [("warmup", _warmup_then_update), ("grpo_update", _grpo_update)])
def test_ddp_equals_single_process_with_value_warmup_and_with_uneven_rows(ddp_outputs, name, update):
    """PPO after value warm-up (the policy's params get no gradient on any rank: AdamW must skip them, not count
    zero-gradient steps), and GRPO with 2 rows on one rank and 14 on the other (each row weighs the same)."""
    rank0, rank1 = (torch.load(ddp_outputs / f"{name}_rank{r}.pt") for r in range(WORLD))
    policy, params, rows = _fixed_batch()
    single = update(policy, params, rows, 1, 0)
    for n in single:
        assert torch.equal(rank0[n], rank1[n]), n
        assert torch.allclose(rank0[n], single[n], atol=1e-6, rtol=1e-5), n


# ---- the whole training loop -------------------------------------------------------------------------------------
def _train(rank: int, algo: str, run_dir: str) -> None:
    if algo == "ppo":
        cfg = ppo.PPOConfig(env=EnvConfig(task="toy", num_envs=4, device="cpu"), num_steps=5, num_iterations=2,
                            policy="mlp", mlp=MLPConfig(hidden_sizes=(8,)), run_dir=run_dir)
        out = ppo.train(cfg, make_env=ToyEnv)
    else:
        cfg = grpo.GRPOConfig(env=EnvConfig(task="toy", num_envs=4, device="cpu", max_episode_steps=6), group_size=2,
                              num_iterations=2, num_minibatches=2, policy="mlp", mlp=MLPConfig(hidden_sizes=(8,)),
                              run_dir=run_dir)
        out = grpo.train(cfg, make_env=ToyEnv)
    torch.save({"params": out["params"], "history": out["history"]}, Path(run_dir) / f"out_rank{rank}.pt")


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_ddp_training_keeps_ranks_identical(ddp_outputs, algo):
    tmp_path = ddp_outputs / algo
    out0, out1 = (torch.load(tmp_path / f"out_rank{r}.pt") for r in range(WORLD))
    for name in out0["params"]:
        assert torch.equal(out0["params"][name], out1["params"][name]), name
    assert out0["history"][-1]["actor/loss"] == out1["history"][-1]["actor/loss"]  # metrics are all-reduced
    ckpt = tmp_path / "checkpoints" / "iter_000002"
    state = __import__("json").loads((ckpt / "state.json").read_text())
    assert state["world_size"] == WORLD and len(state["rng"]) == WORLD
    assert state["rng"][0]["generator"] != state["rng"][1]["generator"]  # each rank has its own stream
    if algo == "ppo":
        assert (ckpt / "carry_rank0.safetensors").is_file() and (ckpt / "carry_rank1.safetensors").is_file()
        # 2 iterations x 5 decisions x 4 envs over both ranks
        assert state["global_step"] == 40
