"""One batched env split into S *stages*, each an env of its own, so that the rollout can step some stages while the
policy computes actions for another (a pipelined rollout, `--pipeline-stages S`; `algos/rollout.py`).

Isaac Lab steps every sub-env of an env instance at once, and a process holds one instance, so pipelining needs
the stages in processes of their own: `EnvWorkers` runs each stage's env in a worker process and moves tensors
through shared memory (CPU) or CUDA IPC (GPU). `LocalStages` holds the stage envs in this process and runs each
request at once: the same rollout without the overlap (with one stage: the plain rollout).

Both are an `Env` over all N sub-envs (stage s holds sub-envs [s N/S, (s+1) N/S), reset with seed + 10007 s), so a
training loop resets, checkpoints and closes them as any env. On top of that a stage runs any function of its env:

    stages.submit(s, fn, tensors, *args)   start fn(env_s, tensors, *args) -> (meta, tensors) (a worker: returns at once)
    meta, tensors = stages.collect(s)      wait for its result

`fn` must be a module-level function (a worker process imports it by name).
"""

from __future__ import annotations

import dataclasses
import multiprocessing.connection
import signal
import traceback
from collections.abc import Callable
from typing import Any

import torch

from envs.config import EnvConfig

Tensors = dict[str, torch.Tensor]
StageFn = Callable[..., tuple[Any, Tensors]]
STAGE_SEED_STRIDE = 10_007
"""Stage s resets with seed + s x this (DDP ranks are 1,000,003 apart: no collision below 99 stages)."""
SPACES = ("task", "num_envs", "num_views", "image_size", "state_dim", "action_dim", "instruction", "max_episode_steps",
          "milestones")


def stage_seed(seed: int | None, stage: int) -> int | None:
    return None if seed is None else seed + STAGE_SEED_STRIDE * stage


def flat(prefix: str, tensors: Tensors) -> Tensors:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unflat(prefix: str, tensors: Tensors) -> Tensors:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------------------------------------------
# The Env protocol's calls, as stage functions.
# ----------------------------------------------------------------------------------------------------------------
def _reset(env, tensors: Tensors, seed: int | None) -> tuple[None, Tensors]:
    return None, flat("obs", env.reset(seed=seed, reset_keys=tensors.get("reset_keys")))


def _step(env, tensors: Tensors) -> tuple[None, Tensors]:
    obs, reward, terminated, truncated, info = env.step(tensors["actions"])
    return None, {**flat("obs", obs), "reward": reward, "terminated": terminated, "truncated": truncated,
                  **flat("info", info)}


def _state_dict(env, tensors: Tensors) -> tuple[None, Tensors]:
    return None, env.state_dict()


def _load_state_dict(env, tensors: Tensors) -> tuple[None, Tensors]:
    env.load_state_dict(tensors)
    return None, {}


def _spaces(env) -> dict[str, Any]:
    return {name: getattr(env, name, None) for name in SPACES}


class StagedEnv:
    """The Env protocol over S stage envs of equal size; subclasses say where the stages run (`submit`, `collect`)."""

    def __init__(self, spaces: list[dict[str, Any]], idle_action: torch.Tensor | None):
        first = spaces[0]
        for s, other in enumerate(spaces[1:], 1):
            differ = [k for k in SPACES if k != "instruction" and other[k] != first[k]]
            if differ:
                raise ValueError(f"stage {s}'s env differs from stage 0's in {differ}: stages must be alike")
        self.num_stages = len(spaces)
        self.stage_envs = first["num_envs"]
        """Sub-envs per stage."""
        self.num_envs = self.stage_envs * self.num_stages
        for name in ("task", "num_views", "image_size", "state_dim", "action_dim", "max_episode_steps", "milestones"):
            setattr(self, name, first[name])
        self.stage_instructions = [s["instruction"] for s in spaces]
        """Each stage's instruction (a string, or one per sub-env of the stage)."""
        if all(i == first["instruction"] and isinstance(i, str) for i in self.stage_instructions):
            self.instruction = first["instruction"]
        else:
            self.instruction = [x for i in self.stage_instructions
                                for x in ([i] * self.stage_envs if isinstance(i, str) else i)]
        self.idle_action = idle_action

    def stage_slice(self, stage: int) -> slice:
        return slice(stage * self.stage_envs, (stage + 1) * self.stage_envs)

    def split(self, tensors: Tensors) -> list[Tensors]:
        """Batched tensors [N, ...] -> each stage's rows (views)."""
        return [{k: v[self.stage_slice(s)] for k, v in tensors.items()} for s in range(self.num_stages)]

    def submit(self, stage: int, fn: StageFn, tensors: Tensors | None = None, *args) -> None:
        raise NotImplementedError

    def collect(self, stage: int) -> tuple[Any, Tensors]:
        raise NotImplementedError

    def _on_all(self, fn: StageFn, tensors: list[Tensors] | None = None, args: list[tuple] | None = None,
                ) -> list[Tensors]:
        """fn on every stage at once (workers run them in parallel); their returned tensors, in stage order."""
        submitted, results, error = [], [], None
        for s in range(self.num_stages):
            try:
                self.submit(s, fn, tensors[s] if tensors else {}, *(args[s] if args else ()))
                submitted.append(s)
            except RuntimeError as e:
                error = error or e
                break
        for s in submitted:  # collect every submitted stage before raising, so that none is left pending
            try:
                results.append(self.collect(s)[1])
            except RuntimeError as e:
                error = error or e
        if error is not None:
            raise error
        return results

    @staticmethod
    def _cat(parts: list[Tensors]) -> Tensors:
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    # the Env protocol
    def reset(self, seed: int | None = None, reset_keys: torch.Tensor | None = None) -> Tensors:
        keys = None
        if reset_keys is not None:
            reset_keys = torch.as_tensor(reset_keys)
            if reset_keys.shape != (self.num_envs,):
                raise ValueError(f"reset_keys must have shape ({self.num_envs},), got {tuple(reset_keys.shape)}")
            keys = [{"reset_keys": k} for k in reset_keys.tensor_split(self.num_stages)]
        out = self._cat(self._on_all(_reset, keys, [(stage_seed(seed, s),) for s in range(self.num_stages)]))
        return unflat("obs", out)

    def step(self, actions: torch.Tensor):
        if actions.shape[0] != self.num_envs:
            raise ValueError(f"actions must have {self.num_envs} rows (num_envs), got {tuple(actions.shape)}")
        out = self._cat(self._on_all(_step, self.split({"actions": actions})))
        return (unflat("obs", out), out["reward"], out["terminated"], out["truncated"], unflat("info", out))

    def state_dict(self) -> Tensors:
        """Every stage's state under `stage<s>.`; {} if a stage cannot capture its state."""
        parts = self._on_all(_state_dict)
        if any(not p for p in parts):
            return {}
        return {k: v for s, p in enumerate(parts) for k, v in flat(f"stage{s}", p).items()}

    def load_state_dict(self, state: Tensors) -> None:
        stages = sorted({k.split(".", 1)[0] for k in state})
        expected = [f"stage{s}" for s in range(self.num_stages)]
        if sorted(stages) != sorted(expected):
            raise KeyError(f"the saved env state has parts {stages}, this env has {self.num_stages} pipeline stages "
                           f"({expected}): resume with the --pipeline-stages the state was saved with")
        self._on_all(_load_state_dict, [unflat(f"stage{s}", state) for s in range(self.num_stages)])

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalStages(StagedEnv):
    """The stages' envs in this process; `submit` runs the function at once."""

    def __init__(self, envs: list):
        self.envs = envs
        super().__init__([_spaces(env) for env in envs], envs[0].idle_action)
        self._results: dict[int, tuple[Any, Tensors]] = {}

    def submit(self, stage: int, fn: StageFn, tensors: Tensors | None = None, *args) -> None:
        self._results[stage] = fn(self.envs[stage], tensors or {}, *args)

    def collect(self, stage: int) -> tuple[Any, Tensors]:
        return self._results.pop(stage)

    def close(self) -> None:
        for env in self.envs:
            env.close()


# ----------------------------------------------------------------------------------------------------------------
# Worker processes.
# ----------------------------------------------------------------------------------------------------------------
class TensorPipe:
    """One end of a pipe between two processes that carries a picklable message plus named tensors.

    The tensors travel through shared buffers: the sending side makes one per name the first time it sends that
    name (again if its shape, dtype or device changes), and only then does the buffer itself cross the pipe (shared
    memory on CPU, a CUDA IPC handle on GPU). Each message copies into the buffers and waits for its device before
    the message goes; the receiver clones out of them, so what it receives stays valid after the next message."""

    def __init__(self, conn):
        self.conn = conn
        self.sent: Tensors = {}
        self.received: Tensors = {}

    def send(self, message: Any, tensors: Tensors | None = None) -> None:
        tensors = tensors or {}
        fresh, buffers = {}, {}
        for name, t in tensors.items():
            buffer = self.sent.get(name)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype or buffer.device != t.device:
                if t.numel() == 0:  # an empty storage cannot be shared: send what it is, to rebuild there
                    buffer, fresh[name] = t.detach(), (tuple(t.shape), t.dtype, str(t.device))
                else:
                    buffer = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                    if buffer.device.type == "cpu":
                        buffer.share_memory_()
                    fresh[name] = buffer
            buffers[name] = buffer
            if t.numel():
                buffer.copy_(t.detach())
        for device in {t.device for t in tensors.values() if t.device.type == "cuda"}:
            torch.cuda.synchronize(device)  # the other process reads the buffers as soon as the message arrives
        self.conn.send((message, list(tensors), fresh))
        self.sent.update(buffers)  # only now: a message that failed to pickle took no new buffer across

    def recv(self) -> tuple[Any, Tensors]:
        message, names, fresh = self.conn.recv()
        self.received.update({name: torch.empty(b[0], dtype=b[1], device=b[2]) if isinstance(b, tuple) else b
                              for name, b in fresh.items()})
        out = {name: self.received[name].clone() for name in names}
        for device in {t.device for t in out.values() if t.device.type == "cuda"}:
            torch.cuda.synchronize(device)  # the copies are done before the sender may refill the buffers
        return message, out


def _worker_main(make_env: Callable, cfg: EnvConfig, conn) -> None:
    """A stage's process: build the env, then run the functions the main process submits until it says close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the main process, which closes the workers
    pipe = TensorPipe(conn)
    try:
        env = make_env(cfg)
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        return
    idle = env.idle_action
    pipe.send(("ready", _spaces(env)), {} if idle is None else {"idle_action": idle})
    while True:
        try:
            (fn, args), tensors = pipe.recv()
        except EOFError:  # the main process is gone
            env.close()
            return
        except BaseException:  # e.g. a function this process cannot import: say so, and serve on
            pipe.send(("error", traceback.format_exc()))
            continue
        if fn is None:
            env.close()
            pipe.send(("closed", None))
            return
        try:
            meta, out = fn(env, tensors, *args)
            pipe.send(("ok", meta), out)
        except BaseException:  # in fn, or a reply that cannot be sent (not picklable, not tensors)
            pipe.send(("error", traceback.format_exc()))


class EnvWorkers(StagedEnv):
    """S stages, each `make_env(cfg with num_envs / S)` in a worker process of its own (spawned; built in parallel).

    `make_env` must be picklable (a module-level function or class). An exception in a worker is raised here with
    the worker's traceback; a worker that dies is reported with its exit code."""

    def __init__(self, make_env: Callable, cfg: EnvConfig, stages: int):
        if stages < 1 or cfg.num_envs % stages:
            raise ValueError(f"--pipeline-stages {stages} must be >= 1 and divide the {cfg.num_envs} envs")
        ctx = torch.multiprocessing.get_context("spawn")
        stage_cfg = dataclasses.replace(cfg, num_envs=cfg.num_envs // stages)
        self.processes, self.pipes = [], []
        for s in range(stages):
            here, there = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(make_env, stage_cfg, there), daemon=True,
                                  name=f"leanvla-env-stage{s}")
            process.start()
            there.close()  # so that a dead worker shows here as EOF
            self.processes.append(process)
            self.pipes.append(TensorPipe(here))
        self._pending: list[str | None] = [None] * stages
        ready: dict[int, tuple[dict[str, Any], torch.Tensor | None]] = {}  # stage -> its spaces and idle action
        try:  # in the order the stages report, so that one that fails stops the rest at once
            while len(ready) < stages:
                waiting = {self.pipes[s].conn: s for s in range(stages) if s not in ready}
                for conn in multiprocessing.connection.wait(list(waiting)):
                    spaces = self._reply(waiting[conn], "start")
                    ready[waiting[conn]] = spaces, self._last_tensors.get("idle_action")
        except BaseException:
            for s, process in enumerate(self.processes):
                if s not in ready:  # still building its env (minutes for Isaac Lab): no need to wait for it
                    process.kill()
                    process.join()
            self.close()
            raise
        super().__init__([ready[s][0] for s in range(stages)], ready[0][1])

    def _reply(self, stage: int, doing: str) -> Any:
        try:
            (status, meta), tensors = self.pipes[stage].recv()
        except EOFError:
            raise self._exited(stage, f"while it was asked to {doing}") from None
        if status == "error":
            raise RuntimeError(f"the env worker of pipeline stage {stage} failed to {doing}:\n{meta}")
        self._last_tensors = tensors
        return meta

    def submit(self, stage: int, fn: StageFn, tensors: Tensors | None = None, *args) -> None:
        if self._pending[stage]:
            raise RuntimeError(f"pipeline stage {stage} has a result not yet collected")
        try:
            self.pipes[stage].send((fn, args), tensors)
            gone = False
        except OSError:  # a broken pipe: the worker is gone (raised below, once the OSError and its frames are freed)
            gone = True
        if gone:
            raise self._exited(stage, f"before it could be asked to run {fn.__name__}")
        self._pending[stage] = fn.__name__

    def _exited(self, stage: int, when: str) -> RuntimeError:
        """The error for a worker found dead (its pipe closed), with its exit code."""
        self.processes[stage].join(timeout=5)
        return RuntimeError(f"the env worker of pipeline stage {stage} exited (exit code "
                            f"{self.processes[stage].exitcode}) {when}")

    def collect(self, stage: int) -> tuple[Any, Tensors]:
        doing, self._pending[stage] = self._pending[stage], None
        if doing is None:
            raise RuntimeError(f"pipeline stage {stage} has no submitted work to collect")
        meta = self._reply(stage, f"run {doing}")
        return meta, self._last_tensors

    def close(self) -> None:
        for s, (process, pipe) in enumerate(zip(self.processes, self.pipes)):
            if process.is_alive():
                try:  # a stage stuck in its work (a hung simulator) is killed below after the wait
                    if self._pending[s] and pipe.conn.poll(30):
                        pipe.recv()
                    pipe.send((None, ()))
                    if pipe.conn.poll(30):
                        pipe.recv()
                except (EOFError, OSError, RuntimeError):
                    pass
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
            pipe.conn.close()
        self.processes, self.pipes = [], []


def make_stages(make_env: Callable, cfg: EnvConfig, stages: int) -> Any:
    """`make_env(cfg)` for one stage; `EnvWorkers` for more."""
    return make_env(cfg) if stages == 1 else EnvWorkers(make_env, cfg, stages)

