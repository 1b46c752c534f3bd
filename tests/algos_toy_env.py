"""A tiny pure-torch env with the `envs` contract, for fast tests of the training loops (no Isaac Lab).

A point mass on a line: state (position, velocity), action = force. Reward 1 - x^2 per step; terminated when
|x| > 1.5; success while |x| < 0.1; truncated at `max_episode_steps`. Milestones: |x| < 0.5 ("near"), then
success ("centre"). Like the Isaac Lab env it can save and
restore its whole state (`state_dict`), which lets a fast test check that `--resume` continues bit-exactly.
"""

from __future__ import annotations

import torch

# metrics that measure wall time: they differ between two runs that are otherwise bit-identical
TIMING_METRICS = frozenset({"charts/SPS", "perf/rollout_time", "perf/update_time", "perf/policy_time",
                            "perf/env_time"})


def without_timing(record: dict) -> dict:
    """One logged metrics record without its wall-time metrics, for comparing two runs exactly."""
    return {k: v for k, v in record.items() if k not in TIMING_METRICS}


class ToyEnv:
    task = "toy"
    num_views = 0
    image_size = 0
    instruction = ""
    state_dim = 2
    action_dim = 1
    idle_action = None
    milestones = ("near", "centre")

    def __init__(self, cfg):
        self.num_envs = cfg.num_envs
        self.device = torch.device(cfg.device if cfg.device != "auto" else "cpu")
        self.max_episode_steps = cfg.max_episode_steps or 20
        self.generator = torch.Generator().manual_seed(0)
        n = self.num_envs
        self.x, self.v = torch.zeros(n), torch.zeros(n)
        self.t, self.ret = torch.zeros(n, dtype=torch.long), torch.zeros(n)
        self.reached = torch.zeros(n, 2, dtype=torch.bool)  # milestones of the current episodes
        self.resets = 0  # how many times reset() was called (tests read it)

    def _initial(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(n, generator=generator) * 2 - 1, torch.rand(n, generator=generator) - 0.5

    def _obs(self) -> dict[str, torch.Tensor]:
        return {"state": torch.stack([self.x, self.v], -1).to(self.device)}

    def reset(self, seed: int = 0, reset_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.resets += 1
        self.generator.manual_seed(seed)
        if reset_keys is None:
            self.x, self.v = self._initial(self.num_envs, self.generator)
        else:
            starts = [self._initial(1, torch.Generator().manual_seed(int(k))) for k in reset_keys.tolist()]
            self.x, self.v = torch.cat([s[0] for s in starts]), torch.cat([s[1] for s in starts])
        self.t.zero_()
        self.ret.zero_()
        self.reached.zero_()
        return self._obs()

    def step(self, actions: torch.Tensor):
        a = actions.detach().cpu().float()[:, 0].clamp(-1, 1)
        self.v = self.v + 0.1 * a
        self.x = self.x + 0.1 * self.v
        self.t += 1
        reward = 1.0 - self.x.square()
        self.ret += reward
        terminated = self.x.abs() > 1.5
        truncated = (self.t >= self.max_episode_steps) & ~terminated
        success = self.x.abs() < 0.1
        self.reached |= torch.stack([self.x.abs() < 0.5, success], -1)
        done = terminated | truncated
        info = {"success": success.to(self.device), "episode_return": self.ret.clone().to(self.device),
                "episode_length": self.t.clone().to(self.device), "milestones": self.reached.clone().to(self.device)}
        if done.any():
            x0, v0 = self._initial(int(done.sum()), self.generator)
            self.x[done], self.v[done] = x0, v0
            self.t[done], self.ret[done], self.reached[done] = 0, 0.0, False
        dev = self.device
        return self._obs(), reward.to(dev), terminated.to(dev), truncated.to(dev), info

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"x": self.x.clone(), "v": self.v.clone(), "t": self.t.clone(), "ret": self.ret.clone(),
                "reached": self.reached.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.x, self.v = state["x"].cpu().clone(), state["v"].cpu().clone()
        self.t, self.ret = state["t"].cpu().clone(), state["ret"].cpu().clone()
        self.reached = state["reached"].cpu().clone()
        self.generator.set_state(state["generator"].cpu())

    def close(self) -> None:
        pass


class ToyCameraEnv(ToyEnv):
    """The same env with one 16x16 camera view: a white column marks the position."""

    num_views = 1
    image_size = 16
    instruction = "stay near the middle"

    def _obs(self) -> dict[str, torch.Tensor]:
        rgb = torch.zeros(self.num_envs, 1, 16, 16, 3, dtype=torch.uint8)
        col = ((self.x.clamp(-1.5, 1.5) + 1.5) / 3 * 15).round().long()
        rgb[torch.arange(self.num_envs), 0, :, col] = 255
        return {"rgb": rgb.to(self.device), **super()._obs()}


class ToyEnvNoState(ToyEnv):
    """The same env without state capture (an env that cannot restore its episodes)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


def make_toy_env(cfg):
    return ToyEnv(cfg)


class StackedToyEnv:
    """K toy envs side by side as one batched env of K groups: group k is reset with seed + k, as a run of its own
    resets learner k's env in a K-seed run (--num-seeds), whose learner k has seed --seed + k. So each group steps
    exactly as the env of that seed's run alone would."""

    def __init__(self, cfg, groups: int):
        import dataclasses

        self.envs = [ToyEnv(dataclasses.replace(cfg, num_envs=cfg.num_envs // groups)) for _ in range(groups)]
        first = self.envs[0]
        self.num_envs, self.device, self.max_episode_steps = cfg.num_envs, first.device, first.max_episode_steps
        for name in ("task", "num_views", "image_size", "instruction", "state_dim", "action_dim", "idle_action",
                     "milestones"):
            setattr(self, name, getattr(first, name))

    def reset(self, seed: int = 0, reset_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"state": torch.cat([env.reset(seed + k)["state"] for k, env in enumerate(self.envs)])}

    def step(self, actions: torch.Tensor):
        outs = [env.step(a) for env, a in zip(self.envs, actions.chunk(len(self.envs)))]
        cat = lambda i: torch.cat([o[i] for o in outs])  # noqa: E731
        info = {k: torch.cat([o[4][k] for o in outs]) for k in outs[0][4]}
        return {"state": torch.cat([o[0]["state"] for o in outs])}, cat(1), cat(2), cat(3), info

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def close(self) -> None:
        pass


def echo_doubled(conn) -> None:
    """A process at the other end of a TensorPipe: sends back each message's tensors doubled (empty ones as they
    are) until it receives None."""
    from envs.workers import TensorPipe

    pipe = TensorPipe(conn)
    while (received := pipe.recv())[0] is not None:
        message, tensors = received
        pipe.send(message, {k: v * 2 if v.numel() else v for k, v in tensors.items()})


def make_env_failing_in_one_stage(cfg):
    """For the worker-process error path with stages still starting: the first stage to get here fails at once;
    the others build for a minute and then leave a file `built` in $LEANVLA_TEST_DIR."""
    import os
    import time
    from pathlib import Path

    folder = Path(os.environ["LEANVLA_TEST_DIR"])
    try:
        os.close(os.open(folder / "failed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        time.sleep(60)
        (folder / "built").touch()
        return ToyEnv(cfg)
    raise ValueError("this stage cannot build its env")


def make_failing_env(cfg):
    """An env factory that fails, as a misconfigured task would (for the worker-process error path)."""
    raise ValueError(f"no env for task {cfg.task!r}")


def unpicklable_reply(env, tensors):
    """A pipeline stage function whose reply cannot cross the pipe (a lambda for its meta)."""
    return (lambda: 0), {}
