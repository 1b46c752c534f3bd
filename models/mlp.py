"""A small Gaussian MLP actor-critic for state tasks, as a stateless policy over a params dict.

    policy = MLPPolicy(state_dim=4, action_dim=1)
    params = policy.init(seed=0)                       # {"actor.0.weight": ..., "obs_norm.mean": ..., ...}
    out = policy.sample(params, obs, "", generator)    # actions [N, 1, A], logprob [N], value [N], state [N, S]
    logprob, value, entropy = policy.evaluate(params, out)

Separate actor and critic MLPs (as rsl_rl), a state-independent log-std, orthogonal init (as CleanRL).
Observation normalisation is a running mean/variance kept in the params dict (`obs_norm.*`, not trainable),
so it is saved with the policy; the training loop updates it once per iteration with `update_normalizer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

NORMALIZER_PREFIX = "obs_norm."


@dataclass
class MLPConfig:
    hidden_sizes: tuple[int, ...] = (256, 128, 64)
    """Hidden layer widths, shared by the actor and the critic (each has its own layers)."""
    activation: Literal["elu", "tanh", "relu"] = "elu"
    """Hidden-layer nonlinearity."""
    init_std: float = 1.0
    """Initial standard deviation of the Gaussian action distribution."""
    init: Literal["orthogonal", "torch"] = "orthogonal"
    """Weight init: orthogonal (gain sqrt(2); 0.01 for the action mean, 1 for the value, as CleanRL) or PyTorch's
    default nn.Linear init (as rsl_rl)."""
    std_param: Literal["scalar", "log"] = "scalar"
    """Learn the std itself (as rsl_rl; clamped at 1e-6) or its log (as CleanRL). With Adam the step is about the
    same in either, so a learned std shrinks faster than a learned log-std once it is small."""
    normalize_obs: bool = True
    """Normalise the state by a running mean and variance (saved in checkpoints)."""


def merge_moments(
    mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor,
    batch_mean: torch.Tensor, batch_var: torch.Tensor, batch_count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine running (mean, population variance, count) with a batch's (Chan et al.'s parallel algorithm)."""
    total = count + batch_count
    delta = batch_mean - mean
    new_mean = mean + delta * batch_count / total
    m2 = var * count + batch_var * batch_count + delta.square() * count * batch_count / total
    return new_mean, m2 / total, total


def updated_moments(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, states: torch.Tensor,
                    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running (mean, variance, count) [S], [S], [] with a batch of states [..., S] folded in, in float64;
    `all_reduce_sum` pools the batch over DDP ranks."""
    x = states.reshape(-1, states.shape[-1]).to(torch.float64)
    batch_count = all_reduce_sum(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
    batch_mean = all_reduce_sum(x.sum(0)) / batch_count
    batch_var = all_reduce_sum((x - batch_mean).square().sum(0)) / batch_count
    return merge_moments(mean, var, count, batch_mean, batch_var, batch_count)


def gaussian_logprob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, exp(log_std)^2), summed over the last (action) dimension."""
    z = (actions - mean) / log_std.exp()
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_entropy(log_std: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """Entropy of a diagonal Gaussian, summed over the action dimension, broadcast to the batch."""
    return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1).expand(batch_shape)


def _mlp(sizes: list[int], activation: str, out_gain: float, init: str) -> nn.Sequential:
    act = {"elu": nn.ELU, "tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(d_in, d_out)
        last = i == len(sizes) - 2
        if init == "orthogonal":
            nn.init.orthogonal_(linear.weight, out_gain if last else math.sqrt(2))
            nn.init.zeros_(linear.bias)
        layers += [linear] if last else [linear, act()]
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, cfg: MLPConfig):
        super().__init__()
        self.normalize_obs = cfg.normalize_obs
        if cfg.normalize_obs:
            # float64: the count passes 2**24 in long runs, where float32 stops counting
            self.register_buffer("obs_norm_mean", torch.zeros(state_dim, dtype=torch.float64))
            self.register_buffer("obs_norm_var", torch.ones(state_dim, dtype=torch.float64))
            self.register_buffer("obs_norm_count", torch.zeros((), dtype=torch.float64))
        sizes = list(cfg.hidden_sizes)
        self.actor = _mlp([state_dim, *sizes, action_dim], cfg.activation, out_gain=0.01, init=cfg.init)
        self.critic = _mlp([state_dim, *sizes, 1], cfg.activation, out_gain=1.0, init=cfg.init)
        self.std_param = cfg.std_param
        init = cfg.init_std if cfg.std_param == "scalar" else math.log(cfg.init_std)
        self.std = nn.Parameter(torch.full((action_dim,), float(init)))

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.normalize_obs:
            std = (self.obs_norm_var + 1e-8).sqrt()
            state = ((state - self.obs_norm_mean) / std).float().clamp(-10.0, 10.0)
        log_std = self.std.clamp(min=1e-6).log() if self.std_param == "scalar" else self.std
        return self.actor(state).float(), log_std.float(), self.critic(state).squeeze(-1).float()


# The params dict names buffers with dots like parameters; map "obs_norm.mean" <-> module buffer "obs_norm_mean".
def _module_name(name: str) -> str:
    return name.replace(NORMALIZER_PREFIX, "obs_norm_", 1) if name.startswith(NORMALIZER_PREFIX) else name


def _param_name(name: str) -> str:
    return name.replace("obs_norm_", NORMALIZER_PREFIX, 1) if name.startswith("obs_norm_") else name


class MLPPolicy:
    """Stateless Gaussian MLP actor-critic: every method takes the params dict explicitly."""

    def __init__(self, state_dim: int, action_dim: int, cfg: MLPConfig | None = None,
                 device: str | torch.device = "cpu"):
        if state_dim <= 0 or action_dim <= 0:
            raise ValueError(f"MLPPolicy needs a state task (state_dim={state_dim}, action_dim={action_dim})")
        self.cfg = cfg or MLPConfig()
        self.state_dim, self.action_dim = state_dim, action_dim
        self.device = torch.device(device)
        with torch.device("meta"):  # a shape-only module: functional_call supplies every tensor
            self.net = ActorCritic(state_dim, action_dim, self.cfg)
        self.normalizer_names = tuple(
            _param_name(n) for n, _ in self.net.named_buffers() if n.startswith("obs_norm_")
        )

    # ---- params ----
    def init(self, seed: int) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):  # leave the global RNG untouched
            torch.manual_seed(seed)
            net = ActorCritic(self.state_dim, self.action_dim, self.cfg)
        return self._as_params({_param_name(n): t for n, t in net.state_dict().items()})

    def load(self, path: str) -> dict[str, torch.Tensor]:
        return self._as_params(load_file(path))

    def save(self, params: dict[str, torch.Tensor], path: str) -> None:
        save_file({n: t.detach().cpu().contiguous() for n, t in params.items()}, path)

    def is_trainable(self, name: str) -> bool:
        return not name.startswith(NORMALIZER_PREFIX)

    def is_value_param(self, name: str) -> bool:
        return name.startswith("critic.")

    def _as_params(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        expected = {_param_name(n) for n in self.net.state_dict()}
        if set(tensors) != expected:
            raise ValueError(f"MLP params mismatch: missing {sorted(expected - set(tensors))}, "
                             f"unexpected {sorted(set(tensors) - expected)}")
        return {n: t.detach().clone().to(self.device).requires_grad_(self.is_trainable(n)) for n, t in tensors.items()}

    def _forward(self, params, state):
        return functional_call(self.net, {_module_name(n): t for n, t in params.items()}, (state,))

    # ---- acting ----
    def sample(self, params, obs, instruction: str = "", generator: torch.Generator | None = None,
               deterministic: bool = False) -> dict[str, torch.Tensor]:
        state = obs["state"]
        shape = (state.shape[0], self.action_dim)
        noise = torch.zeros(shape, device=state.device) if deterministic else \
            torch.randn(shape, generator=generator, device=state.device)
        return self.act(params, state, noise)

    def act(self, params, state: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """`sample` after its random draw, a pure function: actions = mean + std * noise [N, A] (the mean where
        the noise is 0), their log-prob, the value."""
        mean, log_std, value = self._forward(params, state)
        actions = mean + log_std.exp() * noise
        return {"actions": actions.unsqueeze(1), "logprob": gaussian_logprob(actions, mean, log_std),
                "value": value, "state": state}

    def evaluate(self, params, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_std, value = self._forward(params, batch["state"])
        logprob = gaussian_logprob(batch["actions"][:, 0], mean, log_std)
        return logprob, value, gaussian_entropy(log_std, logprob.shape)

    def value(self, params, obs, instruction: str = "") -> torch.Tensor:
        return self._forward(params, obs["state"])[2]

    # ---- observation normalisation ----
    @torch.no_grad()
    def update_normalizer(self, params, states: torch.Tensor,
                          all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Fold a batch of states [..., S] into the running moments, in place; `all_reduce_sum` pools DDP ranks."""
        if not self.normalizer_names:
            return
        moments = updated_moments(*(params[n] for n in self.normalizer_names), states, all_reduce_sum)
        for name, value in zip(self.normalizer_names, moments):
            params[name].copy_(value)
