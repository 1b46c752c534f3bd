"""Policies as stateless functions over a params dict: GR00T N1.5 (`gr00t.py`; its GPU fast path `gr00t_fast.py`,
its checkpoints `gr00t_checkpoint.py`, its processor `gr00t_processor.py`) and a small MLP actor-critic (`mlp.py`).
Both satisfy the contract in `policy.py`."""

from models.policy import Params, Policy

__all__ = ["Params", "Policy"]
