"""RL algorithms: single-file PPO and GRPO (`ppo.py`, `grpo.py`) over shared plumbing (`common.py`)."""
