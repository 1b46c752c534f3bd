"""Demo loading: seconds to decode one episode against the memory the process holds, with imageio-ffmpeg's own way
of starting ffmpeg (fork) and with leanvla's (vfork, envs/lerobot.py).

    python -m envs.record_demos --out runs/demos8 --episodes 8 --env.image-size 128
    python benchmarks/demo_loading.py --dataset runs/demos8 --held-gb 0 4 8 12 --out runs/demo_loading

SFT's loader (`algos.sft.Demonstrations.load`) decodes every episode into one tensor, so the process grows to the
frames' size while it decodes (600 stack-cube episodes at 128 px: 22.5 GB). imageio-ffmpeg starts each ffmpeg with a
preexec_fn, which makes Python fork() the whole process instead of vfork(); envs/lerobot.py sets imageio-ffmpeg's
switch IMAGEIO_FFMPEG_NO_PREVENT_SIGINT=1 to drop it. Each measurement is one process: it fills --held-gb of memory
first (standing in for the frames decoded so far), then decodes every episode of --dataset once, in one thread.
Writes results.json and results.md under --out.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import write_results  # noqa: E402

SWITCH = "IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"
STARTS = {"fork": "0", "vfork": "1"}  # imageio-ffmpeg's default; leanvla's (envs/lerobot.py)


@dataclass
class Args:
    dataset: Path
    """LeRobot v2 dataset to decode (envs/record_demos.py writes one)."""
    held_gb: tuple[float, ...] = (0.0, 4.0, 8.0, 12.0)
    """Memory each measuring process fills before it decodes [GB]."""
    out: Path = Path("runs/demo_loading")
    """Output directory."""


def check(args: Args) -> None:
    if not (args.dataset / "meta" / "info.json").is_file():
        raise SystemExit(f"error: --dataset {args.dataset} is not a LeRobot v2 dataset (no meta/info.json)")
    if any(gb < 0 for gb in args.held_gb):
        raise SystemExit(f"error: --held-gb must be 0 or more, got {args.held_gb}")


def seconds_per_episode(dataset: str, held_gb: float) -> float:
    """In this process: fill `held_gb` of memory, then decode every episode of `dataset` once; mean seconds each."""
    import torch

    from envs.lerobot import LeRobotDataset

    # held as the loader holds its frames, in a torch tensor (numpy asks the kernel for huge pages for large arrays,
    # whose page tables are small to copy); ones, not zeros, so that every page is written and resident
    held = torch.ones(int(held_gb * 1e9), dtype=torch.uint8)
    demos = LeRobotDataset(dataset)
    started = time.perf_counter()
    for i in range(len(demos)):
        demos.episode(i)
    elapsed = time.perf_counter() - started
    del held
    return elapsed / len(demos)


def measure(dataset: Path, held_gb: float, start: str) -> float:
    """`seconds_per_episode` in a fresh process whose ffmpeg children start by `start` ("fork" or "vfork")."""
    os.environ[SWITCH] = STARTS[start]  # a spawned process takes the parent's environment as it is now
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(seconds_per_episode, (str(dataset), held_gb))


def main(args: Args) -> list[dict]:
    check(args)
    saved = os.environ.get(SWITCH)
    rows = []
    try:
        for held_gb in args.held_gb:
            row = {"held_gb": held_gb}
            for start in STARTS:
                row[f"{start}_s"] = measure(args.dataset, held_gb, start)
            print(f"held {held_gb:g} GB: fork {row['fork_s']:.3f} s, vfork {row['vfork_s']:.3f} s per episode",
                  flush=True)
            rows.append(row)
    finally:  # leave this process's own setting as it was
        if saved is None:
            os.environ.pop(SWITCH, None)
        else:
            os.environ[SWITCH] = saved
    info = json.loads((args.dataset / "meta" / "info.json").read_text())
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    lines = [f"Seconds to decode one episode ({info['total_episodes']} episodes of `{args.dataset.name}`, "
             f"{info['total_videos'] // max(1, info['total_episodes'])} videos each), one thread, by the memory the "
             f"process holds; {machine}.", "",
             "| memory held | fork (imageio-ffmpeg's default) | vfork (leanvla) |", "|---:|---:|---:|"]
    lines += [f"| {r['held_gb']:g} GB | {r['fork_s']:.3f} s | {r['vfork_s']:.3f} s |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    write_results(args.out, markdown, {"machine": machine, "args": asdict(args), "rows": rows})
    print(markdown)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
