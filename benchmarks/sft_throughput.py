"""SFT speed: frames/s of `train.py sft`, eager against `--compile`, per GR00T preset, input size and batch size, on
one dataset.

    python -m envs.record_demos --out runs/demos8 --episodes 8 --env.image-size 128
    python benchmarks/sft_throughput.py --dataset runs/demos8 --policies gr00t-small --iterations 300 \
        --out runs/sft_throughput
    python benchmarks/sft_throughput.py --dataset runs/demos8 --batch-sizes 64 256 --blocks compile \
        --out runs/sft_batch                                                   # compiled, by batch size
    python benchmarks/sft_throughput.py --dataset runs/demos8 --model-sizes 224 126 --batch-sizes 256 \
        --blocks compile --out runs/sft_px                                     # by the model's input size

Each run is its own `train.py sft` process (a fresh compile cache for every compiled run) with the same seed and
flags; its log goes to <out>/runs/<policy>_<px>px_b<batch>_<eager|compile>/. Frames/s is the batch times the steps
between the first logged step at or after --warmup and the last one, over the wall time between their log
lines: the steady state, without loading the demos, the one-off compile or the final export. The mean SFT loss over
the last --loss-window logged steps of each run shows that the compiled blocks train as the eager ones do (the
same seed draws the same batches and noise; the kernels differ, so the losses agree closely, not bit for bit).
Writes results.json and results.md under --out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.report import write_results  # noqa: E402


@dataclass
class Args:
    dataset: Path
    """LeRobot v2 dataset to fine-tune on (envs/record_demos.py writes one)."""
    policies: tuple[str, ...] = ("gr00t-small",)
    """GR00T presets (random init) to time."""
    iterations: int = 300
    """SFT steps per run."""
    warmup: int = 100
    """Steps left out of the timing (the first steps hold the one-off compile)."""
    model_sizes: tuple[int, ...] = (224,)
    """GR00T input sizes in px (train.py sft --gr00t-image-size; 224 is the presets' own): one run per size."""
    batch_sizes: tuple[int, ...] = (64,)
    """Frames per step: one run per batch size (and per entry of --blocks)."""
    blocks: tuple[Literal["eager", "compile"], ...] = ("eager", "compile")
    """GR00T's blocks as they are, and/or regionally compiled (train.py sft --compile)."""
    tune_visual: bool = True
    """Train the vision tower too (train.py sft --tune-visual)."""
    tune_llm: bool = False
    """Train the language model layers too (train.py sft --tune-llm)."""
    random_crop: bool = True
    """GR00T's train-mode random crop of the views (train.py sft --random-crop)."""
    task: str = "IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor"
    """The task the dataset is of (train.py sft --env.task)."""
    image_size: int = 128
    """The dataset's camera size in pixels (train.py sft --env.image-size)."""
    device: str = "cuda"
    """Where SFT runs."""
    loss_window: int = 5
    """Logged steps at the end of each run whose mean loss is reported."""
    out: Path = Path("runs/sft_throughput")
    """Output directory."""


def check(args: Args) -> None:
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise SystemExit(f"error: --batch-sizes needs one or more positive sizes, got {list(args.batch_sizes)}")
    if not args.model_sizes or any(px < 14 or px % 14 for px in args.model_sizes):
        raise SystemExit(f"error: --model-sizes needs one or more multiples of 14 (GR00T's patch size), "
                         f"got {list(args.model_sizes)}")
    if not args.blocks:
        raise SystemExit("error: --blocks needs eager, compile or both")
    if args.warmup >= args.iterations - 10:
        raise SystemExit(f"error: --warmup {args.warmup} leaves fewer than the 10 logged steps needed for a rate "
                         f"out of --iterations {args.iterations}")
    if not (args.dataset / "meta" / "info.json").is_file():
        raise SystemExit(f"error: --dataset {args.dataset} is not a LeRobot v2 dataset (no meta/info.json)")


def steady_frames_per_s(metrics: list[dict], warmup: int, batch_size: int) -> float:
    """Frames per second between the first logged step at or after `warmup` and the last logged step."""
    logged = [m for m in metrics if "sft/loss" in m]
    first = next((m for m in logged if m["step"] >= warmup), None)
    last = logged[-1] if logged else None
    if first is None or last is None or last["step"] == first["step"]:
        raise ValueError(f"no two logged steps at or after step {warmup} to time")
    return batch_size * (last["step"] - first["step"]) / (last["time"] - first["time"])


def three_digits(x: float) -> str:
    """A rate to three significant digits, whole numbers from 100 up: a CPU's 1.05 frames/s stays readable beside a
    GPU's 1670."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def sft_command(args: Args, policy: str, px: int, batch_size: int, compile: bool, run_dir: Path) -> list[str]:
    """`train.py sft` of one timed run."""
    return [sys.executable, "train.py", "sft", "--dataset", str(args.dataset), "--policy", policy,
           "--gr00t-image-size", str(px),
           "--num-iterations", str(args.iterations), "--batch-size", str(batch_size), "--seed", "0",
           "--log-every", "10", "--save-every", str(args.iterations), "--run-dir", str(run_dir),
           "--device", args.device, "--env.task", args.task, "--env.image-size", str(args.image_size),
           *(["--tune-visual"] if args.tune_visual else []), *(["--tune-llm"] if args.tune_llm else []),
           *(["--random-crop"] if args.random_crop else []),
           *(["--compile"] if compile else [])]


def run_sft(args: Args, policy: str, px: int, batch_size: int, compile: bool) -> dict:
    """One `train.py sft` process; its steady frames/s, final loss and wall time."""
    name = f"{policy} {px} px batch {batch_size} {'compile' if compile else 'eager'}"
    run_dir = args.out / "runs" / f"{policy}_{px}px_b{batch_size}_{'compile' if compile else 'eager'}"
    if run_dir.exists():
        raise SystemExit(f"error: {run_dir} already exists; remove it or pick another --out")
    cmd = sft_command(args, policy, px, batch_size, compile, run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        raise SystemExit(f"error: SFT of {name} failed; see {log}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["sft/loss"] for m in metrics if "sft/loss" in m][-args.loss_window:]
    return {"policy": policy, "model_px": px, "batch_size": batch_size, "compile": compile,
            "frames_per_s": steady_frames_per_s(metrics, args.warmup, batch_size),
            "final_loss": sum(losses) / len(losses), "wall_s": time.perf_counter() - started}


def main(args: Args) -> list[dict]:
    check(args)
    rows = [run_sft(args, policy, px, batch_size, blocks == "compile") for policy in args.policies
            for px in args.model_sizes for batch_size in args.batch_sizes for blocks in args.blocks]
    for row in rows:  # against the policy's first run: its first size, batch size and --blocks entry
        first = next(r for r in rows if r["policy"] == row["policy"])
        row["speedup"] = row["frames_per_s"] / first["frames_per_s"]
    device = args.device
    if args.device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(0)
    info = json.loads((args.dataset / "meta" / "info.json").read_text())
    lines = [f"`train.py sft` on {info.get('total_frames', '?')} frames of `{args.task}` ({args.image_size} px), "
             f"{args.iterations} steps (timed after step {args.warmup}), vision tower "
             f"{'trained' if args.tune_visual else 'frozen'}, language model "
             f"{'trained' if args.tune_llm else 'frozen'}, random crop {'on' if args.random_crop else 'off'}; "
             f"{device}. Speed-up: against the policy's first row.", "",
             "| policy | model px | batch | blocks | frames/s | steps/s | speed-up | mean loss, last logged steps | "
             "wall time (load, compile, export) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['policy']} | {r['model_px']} | {r['batch_size']} | {'compiled' if r['compile'] else 'eager'} | "
              f"{three_digits(r['frames_per_s'])} | {three_digits(r['frames_per_s'] / r['batch_size'])} | "
              f"{r['speedup']:.2f}x | "
              f"{r['final_loss']:.4f} | {r['wall_s']:.0f} s |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    write_results(args.out, markdown, {"device": device, "args": asdict(args), "rows": rows})
    print(markdown)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
