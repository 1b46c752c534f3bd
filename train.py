"""Train a policy with PPO or GRPO (or fine-tune GR00T on demonstrations with `sft`, see algos/sft.py).

    python train.py ppo                     # the default job: small GR00T on stack-cube, a few envs and iterations
    python train.py ppo --policy mlp --env.task Isaac-Cartpole --env.num-envs 4096 --num-iterations 150
    python train.py grpo --env.num-envs 64 --group-size 8
    python train.py sft --dataset data/stack_cube_demos --num-iterations 2000   # flow-matching SFT on demos
    python train.py ppo --policy runs/<sft run>/gr00t  # RL from the fine-tuned model
    python train.py ppo --resume runs/<run>           # continue a run from its newest checkpoint
    torchrun --nproc-per-node 8 train.py ppo ...      # DDP: one process and one env instance per GPU

`python train.py ppo --help` lists every flag. With `--resume`, the checkpoint's config is the default and
flags given alongside override it (e.g. a larger `--num-iterations`).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Union

import tyro

from algos import grpo, ppo, sft
from algos.checkpoint import find_checkpoint
from algos.config import ConfigError, RunConfig, config_from_dict

ALGOS = {"ppo": (ppo.PPOConfig, ppo.train), "grpo": (grpo.GRPOConfig, grpo.train), "sft": (sft.SFTConfig, sft.train)}


def _resume_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--resume" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--resume="):
            return a.split("=", 1)[1]
    return None


def parse(argv: list[str]) -> RunConfig:
    """Flags -> the algorithm's config. Resuming makes the checkpoint's config the default."""
    defaults = {name: cls() for name, (cls, _) in ALGOS.items()}
    resume = _resume_arg(argv)
    if resume:
        state = json.loads((find_checkpoint(resume) / "state.json").read_text())
        cls = ALGOS[state["algo"]][0]
        defaults[state["algo"]] = config_from_dict(cls, state["config"])
        if argv and argv[0] in ALGOS and argv[0] != state["algo"]:
            raise ConfigError(f"--resume {resume} is a {state['algo']} run, not {argv[0]}")
    union = Union[tuple(Annotated[cls, tyro.conf.subcommand(name, default=defaults[name])]  # type: ignore[misc]
                        for name, (cls, _) in ALGOS.items())]
    return tyro.cli(union, args=argv, description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse(argv)
        algo = next(name for name, (cls, _) in ALGOS.items() if type(cfg) is cls)
        return ALGOS[algo][1](cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
