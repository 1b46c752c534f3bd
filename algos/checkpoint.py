"""Checkpoints and exact resume: <run_dir>/checkpoints/iter_000012/ holds policy.safetensors (the trainable params),
normalizer.safetensors (running statistics, if the policy has any), optimizer.safetensors (AdamW's state by
parameter name), carry_rank<r>.safetensors (what each rank's rollout carries into the next iteration: next obs,
episode flags, the env's own state) and state.json (algorithm, counters, config, every rank's RNG states, and the
`base` that rebuilds the policy's frozen part). Written to a temporary name and renamed: a crash never leaves a
torn checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from algos.config import ConfigError, config_dict
from algos.run import Run, trainable_params
from envs import Env
from envs.workers import StagedEnv
from models.policy import Params, Policy

CHECKPOINT_PREFIX = "iter_"


# ------------------------------------------------------------------------------------------------------------------
# RNG capture (python, numpy, torch CPU, CUDA, the run's generator), JSON-serialisable.
# ------------------------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else None,
        "generator": _b64(generator.get_state()),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    generator.set_state(_unb64(state["generator"]))


# ------------------------------------------------------------------------------------------------------------------
# Writing and reading checkpoints.
# ------------------------------------------------------------------------------------------------------------------
def checkpoint_dirs(path: str | Path) -> list[Path]:
    """The checkpoints of a run directory (or of its checkpoints/ folder), oldest first."""
    path = Path(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return [f.parent for f in sorted(root.glob(f"{CHECKPOINT_PREFIX}*/state.json"))] if root.is_dir() else []


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint under a run directory."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise ConfigError(f"no checkpoint at {path} (expected a directory with state.json, or a run "
                                f"directory with checkpoints/{CHECKPOINT_PREFIX}*/)")
    return found[-1]


def later_checkpoints(run_dir: Path, ckpt: Path) -> list[str]:
    """The checkpoints in `run_dir` past `ckpt` (by iteration)."""
    return [c.name for c in checkpoint_dirs(run_dir) if c.name > ckpt.name]


def resume_step(resume: str) -> int:
    """The step the resumed checkpoint's run had logged its metrics at (RL: env steps; SFT: iterations)."""
    meta = json.loads((find_checkpoint(resume) / "state.json").read_text())
    return meta.get("global_step", meta["iteration"])


def checkpoint_base(resume: str | None) -> dict | None:
    """The `base` recorded in the checkpoint that --resume names (None when not resuming)."""
    if not resume:
        return None
    return json.loads((find_checkpoint(resume) / "state.json").read_text())["policy"]["base"]


def save_checkpoint(run: Run, iteration: int, counters: dict[str, Any], policy: Policy, params: Params,
                    base: dict[str, Any], optimizer: torch.optim.Optimizer,
                    carry: dict[str, torch.Tensor]) -> Path | None:
    """Write a checkpoint atomically (temp dir + rename) and keep the newest `keep_last`. Collective: every rank
    calls it; rank 0 writes. `carry` is this rank's rollout state (next obs, episode flags, env state if any)."""
    rank_state = {"rng": rng_state(run.generator), "carry": {k: v.detach().cpu() for k, v in carry.items()}}
    if run.world_size > 1:
        gathered: list[Any] = [None] * run.world_size
        dist.all_gather_object(gathered, rank_state)
    else:
        gathered = [rank_state]
    final = None
    if run.is_main:
        root = run.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{iteration:06d}"
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cpu = lambda d: {k: v.detach().cpu().contiguous() for k, v in d.items()}  # noqa: E731
        save_file(cpu(trainable_params(policy, params)), tmp / "policy.safetensors")
        normalizer = {n: params[n] for n in policy.normalizer_names}
        if normalizer:
            save_file(cpu(normalizer), tmp / "normalizer.safetensors")
        opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
        save_file(cpu(opt_tensors), tmp / "optimizer.safetensors")
        for r, state in enumerate(gathered):
            if state["carry"]:
                save_file(cpu(state["carry"]), tmp / f"carry_rank{r}.safetensors")
        meta = {"algo": run.algo, "iteration": iteration, **counters, "world_size": run.world_size,
                "policy": {"name": run.cfg.policy, "base": base, "trainable": sorted(trainable_params(policy, params))},
                "optimizer": opt_meta, "config": config_dict(run.cfg), "rng": [s["rng"] for s in gathered]}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        replaced = root / f".old-{final.name}-{os.getpid()}"
        if final.exists():  # re-saving the same iteration (after a resume): move it aside, never leave it half gone
            os.rename(final, replaced)
        os.rename(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[: -max(run.cfg.keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)  # (no later ones: check_run_config refuses such a resume)
        for stale in root.glob(f".tmp-{CHECKPOINT_PREFIX}*"):  # what crashed runs left half written
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        if run.logger is not None:
            run.logger.flush()
    if run.world_size > 1:
        dist.barrier()
    return final


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state keyed by parameter name ("<param>/<exp_avg|exp_avg_sq|step>"); hyperparameters as JSON."""
    sd = optimizer.state_dict()
    names = [n for g in sd["param_groups"] for n in g["param_names"]]
    tensors = {f"{names[i]}/{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_checkpoint(run: Run, path: str | Path, policy: Policy, params: Params,
                    optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore params (in place), optimizer state and this rank's RNG. Returns (state.json, this rank's carry)."""
    ckpt = find_checkpoint(path)
    meta = json.loads((ckpt / "state.json").read_text())
    load_params_into(ckpt, policy, params)
    if optimizer is not None:
        tensors = load_file(ckpt / "optimizer.safetensors", device=str(run.device))
        groups = [{k: tuple(v) if isinstance(v, list) and k not in ("params", "param_names") else v
                   for k, v in g.items()} for g in meta["optimizer"]["param_groups"]]  # JSON made betas a list
        ours = [n for g in optimizer.param_groups for n in g["param_names"]]
        theirs = [n for g in groups for n in g["param_names"]]
        if ours != theirs:
            raise ValueError(f"{ckpt}: optimizer parameters differ from this run's (was the policy changed?)")
        state = {}
        for i, name in enumerate(theirs):
            entry = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
            if entry:
                state[i] = entry
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    carry: dict[str, torch.Tensor] = {}
    if meta["world_size"] == run.world_size:
        set_rng_state(meta["rng"][run.rank], run.generator)
        carry_file = ckpt / f"carry_rank{run.rank}.safetensors"
        if carry_file.is_file():
            carry = load_file(carry_file, device=str(run.device))
    else:
        warnings.warn(f"{ckpt} was written by {meta['world_size']} ranks, this run has {run.world_size}: "
                      "RNG streams and env state restart, so the continuation is not bit-exact")
    return meta, carry


def load_params_into(ckpt: Path, policy: Policy, params: Params) -> None:
    """Copy a checkpoint's trainable params and normaliser into `params` (whose frozen part is the base). Strict:
    policy.safetensors must hold exactly the trainable params state.json lists, which must be those `policy`
    trains, and normalizer.safetensors exactly the policy's normaliser."""
    meta = json.loads((ckpt / "state.json").read_text())
    expected = {"policy.safetensors": set(meta["policy"]["trainable"]),
                "normalizer.safetensors": set(policy.normalizer_names)}
    trains = set(trainable_params(policy, params))
    if expected["policy.safetensors"] != trains:
        raise ValueError(f"{ckpt}: it trained {_names(expected['policy.safetensors'] - trains)} that this policy "
                         f"does not, and this policy trains {_names(trains - expected['policy.safetensors'])} that it "
                         "did not (was the policy or a --tune-* flag changed?)")
    for file, names in expected.items():
        if not names:
            continue
        if not (ckpt / file).is_file():
            raise ValueError(f"{ckpt}: {file} is missing (a checkpoint copied in part?)")
        tensors = load_file(ckpt / file)
        if set(tensors) != names:
            raise ValueError(f"{ckpt / file}: missing {_names(names - set(tensors))}, unexpected "
                             f"{_names(set(tensors) - names)}")
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)


def _names(names: set[str], most: int = 5) -> str:
    shown = sorted(names)
    return "none" if not shown else ", ".join(shown[:most]) + (f" and {len(shown) - most} more" if len(shown) > most
                                                               else "")


def carry_state(env: Env | None, obs: dict[str, torch.Tensor], success_seen: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a rollout carries into the next iteration: the next obs, `success_seen`, and the env's own state (for a
    bit-exact resume; an env that cannot capture it gives {}; None: not carried, as for a learner of --num-seeds,
    whose env is shared)."""
    carry = {f"obs.{k}": v for k, v in obs.items()}
    carry["success_seen"] = success_seen
    carry.update({f"env.{k}": v for k, v in (env.state_dict() if env is not None else {}).items()})
    return carry


def restore_carry(env: Env, carry: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """The inverse of `carry_state`: (obs, success_seen), or None if the checkpoint holds no env state."""
    env_state = {k[4:]: v for k, v in carry.items() if k.startswith("env.")}
    if not env_state:
        warnings.warn("the checkpoint holds no mid-episode env state (an env that cannot capture it, another number "
                      "of ranks, or a learner of --num-seeds): the resumed run starts fresh episodes, so it does not "
                      "continue bit-exactly")
        return None
    saved_stages = {k.split(".", 1)[0] for k in env_state if re.match(r"stage\d+\.", k)}
    if saved_stages and not isinstance(env, StagedEnv):
        raise KeyError(f"the checkpoint's env state was saved by {len(saved_stages)} pipeline stages and this env has "
                       f"none: resume with --pipeline-stages {len(saved_stages)}")
    env.load_state_dict(env_state)
    obs = {k[4:]: v for k, v in carry.items() if k.startswith("obs.")}
    return obs, carry["success_seen"].bool()
