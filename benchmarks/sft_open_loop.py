"""How well an SFT model fits its own demonstrations, phase by phase of the expert (open loop, no simulator).

    python benchmarks/sft_open_loop.py runs/stack_cube_sft_rl/sft --episodes 50 --stride 4 --out runs/sft_open_loop

eval.py's milestones show where closed-loop episodes stop; this shows whether the model has learnt the expert's
actions there at all, which tells under-fitting (large errors on the demonstrations themselves) from drift (small
errors here, failures in closed loop). Every --stride-th frame of --episodes episodes from --first-episode on, of
the dataset the run was fine-tuned on (or --dataset), goes through `sample` with deterministic actions, and its
action chunk is compared with the expert's recorded chunk from that frame (the window SFT trains on). The errors
are grouped by the expert phase the frame was recorded in (record_demos' labels; one group, `all`, for a dataset
without them):

    translation    mean over the chunk of the distance between the model's and the expert's commanded moves (mm)
    first move     the same for the chunk's first action, the one the env executes first (mm)
    rotation       mean over the chunk of the difference of the commanded rotations (degrees)
    gripper        share of the chunk's actions whose gripper command closes / opens as the expert's does
    expert move    the expert's mean commanded move (mm): the scale of the translation errors

Writes results.md and results.json under --out.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algos import sft  # noqa: E402
from algos.checkpoint import find_checkpoint, load_params_into  # noqa: E402
from algos.config import ConfigError, config_from_dict  # noqa: E402
from algos.distributed import setup_distributed  # noqa: E402
from algos.run import uses_bf16  # noqa: E402
from benchmarks.report import write_results  # noqa: E402
from envs.expert import ACTION_SCALE, PHASE_NAMES  # noqa: E402
from envs.lerobot import LeRobotDataset  # noqa: E402

ERRORS = ("translation_mm", "first_move_mm", "rotation_deg", "gripper_agreement", "expert_move_mm")


@dataclass
class Args:
    run: tyro.conf.Positional[Path]
    """SFT run directory (its newest checkpoint) or checkpoint directory."""
    dataset: Path | None = None
    """Demonstrations to compare with. None: the ones the run was fine-tuned on."""
    episodes: int = 50
    """Use this many episodes (fewer if the dataset ends first)."""
    first_episode: int = 0
    """Starting at this one: past the run's `--num-episodes`, episodes it did not train on."""
    stride: int = 4
    """Use every this-many-th frame of them."""
    batch_size: int = 64
    """Frames per `sample` call."""
    device: str = "auto"
    """`cpu`, `cuda`, `cuda:N` or `auto` (a GPU if there is one)."""
    seed: int = 0
    """Seed of `sample`'s generator (deterministic actions draw nothing from it)."""
    out: Path = Path("runs/sft_open_loop")
    """Where results.md and results.json go."""


def chunk_errors(predicted: torch.Tensor, expert: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame errors [B] between a model's and the expert's chunks [B, T, 7] of IK-relative actions (translation,
    rotation as axis-angle, gripper: < 0 closes), in the units of the module docstring."""
    move = (predicted[..., :3] - expert[..., :3]).norm(dim=-1) * ACTION_SCALE * 1000  # [B, T] mm
    turn = (predicted[..., 3:6] - expert[..., 3:6]).norm(dim=-1) * ACTION_SCALE * 180 / math.pi
    return {"translation_mm": move.mean(1), "first_move_mm": move[:, 0], "rotation_deg": turn.mean(1),
            "gripper_agreement": ((predicted[..., 6] < 0) == (expert[..., 6] < 0)).float().mean(1),
            "expert_move_mm": expert[..., :3].norm(dim=-1).mean(1) * ACTION_SCALE * 1000}


def phase_names(dataset: LeRobotDataset, episodes: range) -> list[str]:
    """The expert phase of every frame of these episodes ('all' where the dataset has no labels)."""
    names = []
    for i in episodes:
        labels = dataset.labels(i)
        length = dataset.episodes[i]["length"]
        if "leanvla.expert_phase" not in labels:
            names += ["all"] * length
            continue
        rounds, phases = labels["leanvla.expert_round"], labels["leanvla.expert_phase"]
        names += [f"round {r + 1} {PHASE_NAMES[p]}" for r, p in zip(rounds.tolist(), phases.tolist())]
    return names


def trained_on(cfg: sft.SFTConfig, root: Path, dataset_episodes: int, episodes: range) -> str:
    """Whether the SFT run of `cfg` trained on these episodes of `root`: "trained on", "held out", "partly trained
    on" or "another dataset"."""
    if Path(cfg.dataset).resolve() != Path(root).resolve():
        return "another dataset"
    trained = dataset_episodes if cfg.num_episodes is None else cfg.num_episodes
    return "trained on" if episodes[-1] < trained else "held out" if episodes[0] >= trained else "partly trained on"


def by_phase(names: list[str], errors: dict[str, torch.Tensor]) -> list[dict]:
    """Mean of each error over the frames of each phase, phases in the order they first appear."""
    rows = []
    for name in dict.fromkeys(names):
        rows_of = torch.tensor([n == name for n in names])
        rows.append({"phase": name, "frames": int(rows_of.sum()),
                     **{k: float(v[rows_of].mean()) for k, v in errors.items()}})
    return rows


def main(args: Args) -> list[dict]:
    if args.episodes < 1 or args.stride < 1 or args.batch_size < 1 or args.first_episode < 0:
        raise SystemExit("error: --episodes, --stride and --batch-size must be >= 1, --first-episode >= 0")
    ckpt = find_checkpoint(args.run)
    state = json.loads((ckpt / "state.json").read_text())
    if state["algo"] != "sft":
        raise SystemExit(f"error: {ckpt} is a {state['algo']} checkpoint; this compares SFT models with their demos")
    cfg = config_from_dict(sft.SFTConfig, state["config"])
    root = args.dataset or Path(cfg.dataset)
    dataset = LeRobotDataset(root)
    if args.first_episode >= len(dataset):
        raise SystemExit(f"error: --first-episode {args.first_episode}: {root} has {len(dataset)} episodes")
    episodes = range(args.first_episode, min(args.first_episode + args.episodes, len(dataset)))
    demos = sft.Demonstrations.load(root, num_episodes=len(episodes), first_episode=args.first_episode, progress=True)
    if demos.rgb.shape[2] != cfg.env.image_size:
        raise SystemExit(f"error: {root} holds {demos.rgb.shape[2]} px views; {ckpt} was fine-tuned on "
                         f"{cfg.env.image_size} px ones")
    _, _, device = setup_distributed(args.device)
    bf16 = uses_bf16(cfg.precision, device)
    policy, params, _ = sft.make_sft_policy(cfg, demos.spaces(cfg.env.task), device, bf16, state["policy"]["base"])
    load_params_into(ckpt, policy, params)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    frames = torch.arange(0, len(demos), args.stride)
    errors: dict[str, list[torch.Tensor]] = {k: [] for k in ERRORS}
    for start in range(0, len(frames), args.batch_size):
        batch = demos.batch(frames[start:start + args.batch_size], horizon=policy.cfg.action_horizon)
        obs = {"rgb": batch["rgb"].to(device), "state": batch["state"].to(device)}
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            predicted = policy.sample(params, obs, batch["instruction"], generator, deterministic=True)["actions"]
        for k, v in chunk_errors(predicted.float().cpu(), batch["actions"]).items():
            errors[k].append(v)
    names = phase_names(dataset, episodes)
    rows = by_phase([names[f] for f in frames.tolist()], {k: torch.cat(v) for k, v in errors.items()})
    if len(rows) > 1:  # a labelled dataset: the phases, then every frame together
        rows.append({"phase": "every frame", "frames": len(frames),
                     **{k: float(torch.cat(v).mean()) for k, v in errors.items()}})

    lines = [f"`{ckpt}` on `{root}`: every {args.stride}th frame of episodes {episodes[0]} to {episodes[-1]} "
             f"({trained_on(cfg, root, len(dataset), episodes)}), deterministic chunks of "
             f"{policy.cfg.action_horizon} actions; {device}.", "",
             "| expert phase | frames | translation (mm) | first move (mm) | rotation (deg) | gripper agreement | "
             "expert move (mm) |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['phase']} | {r['frames']} | {r['translation_mm']:.1f} | {r['first_move_mm']:.1f} | "
              f"{r['rotation_deg']:.2f} | {r['gripper_agreement']:.3f} | {r['expert_move_mm']:.1f} |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    write_results(args.out, markdown, {"checkpoint": str(ckpt), "dataset": str(root), "args": vars(args),
                                       "rows": rows})
    print(markdown)
    return rows


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__))
    except ConfigError as e:  # a missing checkpoint or a bad config: the message says which
        sys.exit(f"error: {e}")
