"""Isaac Lab tasks as batched torch environments.

    env = make_env(EnvConfig(task="IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor", num_envs=4))
    obs = env.reset(seed=0)                          # {"rgb": uint8 [N,V,H,W,3], "state": float32 [N,S]}
    obs, reward, terminated, truncated, info = env.step(actions)   # actions float32 [N, A]

Sub-envs that finish are reset inside `step` (the returned obs is the first obs of the new episode).
`reset(seed, reset_keys=keys)` starts every env from the initial state that its key names: envs that share
a key start identically (GRPO groups). `envs/env.py` states the contract that the algorithms rely on.
"""

from envs.config import EnvConfig, TaskConfig
from envs.env import Env
from envs.isaaclab_env import IsaacLabEnv, make_env

__all__ = ["Env", "EnvConfig", "IsaacLabEnv", "TaskConfig", "make_env"]
