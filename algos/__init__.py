"""The algorithms, one file each: `ppo.py`, `grpo.py` (RL) and `sft.py` (GR00T's flow-matching fine-tuning);
`ppo_seeds.py` runs PPO for K seeds at once (`--num-seeds`).

What they share, each in a file of its own: `rollout.py` (the policy acting in the env, chunk by chunk),
`config.py` (the flags every job takes), `run.py` (the run context, logging, the policy and its optimizer),
`checkpoint.py` (checkpoints and exact resume) and `distributed.py` (DDP collectives).
"""
