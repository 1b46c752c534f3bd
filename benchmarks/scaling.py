"""Multi-GPU scaling of PPO with GR00T N1.5 on stack-cube: the same envs per GPU on 1, 2, 4 ... GPUs.

    python benchmarks/scaling.py --gpus 1 2 4 --envs-per-gpu 64 --gr00t-tokenizer <qwen tokenizer dir> \
        --out benchmarks/results/scaling

For each GPU count N it runs `torchrun --standalone --nproc-per-node N train.py ppo` (official 3B size, random
weights, bf16, CUDA-graphed sampling) and reads the run's `metrics.jsonl`. Per iteration PPO logs the rollout
time (env steps and sampling), the update time (PPO epochs, gradient all-reduce included) and the peak GPU memory
of the busiest rank. After `--warmup` iterations (graph capture, allocator growth) the benchmark reports

    env-steps/s  = env steps of all ranks / (rollout + update time), summed over the timed iterations
    efficiency   = env-steps/s with N GPUs / (N x env-steps/s with 1 GPU)        (weak scaling)

and writes `results.json` and `results.md` (the README's table) to `--out`. `--device cpu` runs the same
pipeline with gloo on CPU processes (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.report import write_results  # noqa: E402


@dataclass
class Args:
    gpus: list[int] = field(default_factory=lambda: [1, 2, 4])
    """GPU counts (torchrun processes) to run, one after the other."""
    envs_per_gpu: int = 64
    """Stack-cube envs on each GPU (the same for every GPU count)."""
    num_steps: int = 4
    """PPO decisions per env per rollout (each executes a 16-step action chunk)."""
    num_minibatches: int = 4
    """PPO minibatches per epoch (per rank)."""
    update_epochs: int = 1
    """PPO epochs per iteration."""
    iterations: int = 6
    """PPO iterations per GPU count, warm-up included."""
    warmup: int = 2
    """Leading iterations left out of the timing."""
    policy: str = "gr00t-n1.5-3b"
    """GR00T preset (random init)."""
    gr00t_tokenizer: str | None = None
    """Tokenizer directory for the preset (None: the preset's own, from the hub)."""
    image_size: int = 224
    """Camera size (pixels)."""
    device: str = "cuda"
    """`cuda` (one GPU per process, NCCL) or `cpu` (gloo; a smoke test)."""
    cuda_graphs: bool = True
    """Replay GR00T's sampling from CUDA graphs (GPU only)."""
    extra: str = ""
    """More `train.py ppo` flags as one shell-quoted string, e.g. --extra="--update-epochs 2"."""
    out: Path = Path("runs/bench_scaling")
    """Folder for results.md, results.json, each run's log and metrics."""
    run_root: Path | None = None
    """Where the runs write checkpoints (3B: several GiB each), e.g. /dev/shm. None: --out."""
    report_only: bool = False
    """Only rebuild results.md / results.json from the metrics_<N>gpu.jsonl files already in --out."""
    device_label: str | None = None
    """Name of the machine for the table (default: asked from torch; give it with --report-only)."""
    keep_runs: bool = False
    """Keep each run's directory (checkpoints included); by default only its metrics.jsonl stays, in --out."""


def train_command(args: Args, num_gpus: int, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_gpus}",
           str(ROOT / "train.py"), "ppo", "--policy", args.policy, "--env.device", args.device,
           "--env.num-envs", str(args.envs_per_gpu * num_gpus), "--env.image-size", str(args.image_size),
           "--num-steps", str(args.num_steps), "--num-minibatches", str(args.num_minibatches),
           "--update-epochs", str(args.update_epochs), "--num-iterations", str(args.iterations),
           "--save-every", str(10 * args.iterations), "--keep-last", "1", "--run-dir", str(run_dir)]
    if args.gr00t_tokenizer:
        cmd += ["--gr00t-tokenizer", args.gr00t_tokenizer]
    if args.cuda_graphs and args.device == "cuda":
        cmd += ["--cuda-graphs"]
    return cmd + shlex.split(args.extra)


def summarize(records: list[dict], warmup: int, num_gpus: int) -> dict:
    """Timing of the iterations after `warmup` from metrics.jsonl records (one per iteration, `step` = global
    env steps so far)."""
    if len(records) <= warmup:
        raise RuntimeError(f"the run logged {len(records)} iterations; need more than --warmup {warmup}")
    steps = [r["step"] for r in records]
    timed = records[warmup:]
    env_steps = steps[-1] - steps[warmup - 1] if warmup else steps[-1]
    rollout = sum(r["perf/rollout_time"] for r in timed)
    update = sum(r["perf/update_time"] for r in timed)
    return {"gpus": num_gpus, "iterations_timed": len(timed), "env_steps_timed": env_steps,
            "env_steps_per_s": env_steps / (rollout + update), "rollout_s_per_iter": rollout / len(timed),
            "update_s_per_iter": update / len(timed), "peak_memory_gb": max(r["perf/peak_memory_gb"] for r in records)}


def table(rows: list[dict], args: Args, device_name: str) -> str:
    base = next((r for r in rows if r["gpus"] == 1), None)
    precision = "bf16" if args.device == "cuda" else "fp32"
    lines = [f"PPO, GR00T `{args.policy}` (random weights, {precision}), stack-cube {args.image_size} px, "
             f"{args.envs_per_gpu} envs and {args.num_steps} x 16-step chunks per GPU per iteration; {device_name}.",
             "", "| GPUs | env-steps/s | rollout s/iter | update s/iter | scaling efficiency | peak memory / GPU |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        eff = f"{100 * r['env_steps_per_s'] / (r['gpus'] * base['env_steps_per_s']):.0f} %" if base else "-"
        lines.append(f"| {r['gpus']} | {r['env_steps_per_s']:,.0f} | {r['rollout_s_per_iter']:.2f} | "
                     f"{r['update_s_per_iter']:.2f} | {eff} | {r['peak_memory_gb']:.1f} GiB |")
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} on one host"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(args: Args) -> list[dict]:
    if args.warmup < 0 or args.iterations <= args.warmup:
        raise SystemExit(f"error: --iterations {args.iterations} must exceed --warmup {args.warmup}")
    if args.device == "cuda" and not args.report_only:
        import torch

        available = torch.cuda.device_count()
        if max(args.gpus) > available:
            raise SystemExit(f"error: --gpus asks for {max(args.gpus)} GPUs, this machine has {available}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        rows = [summarize(read_jsonl(args.out / f"metrics_{n}gpu.jsonl"), args.warmup, n) for n in args.gpus]
        return write_report(rows, args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see the device notes)
    rows = []
    for n in args.gpus:
        run_dir = (args.run_root or args.out) / f"run_{n}gpu"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = train_command(args, n, run_dir)
        print(f"[scaling] {n} GPU(s): {' '.join(cmd)}", flush=True)
        started = time.time()
        with open(args.out / f"train_{n}gpu.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"error: the {n}-GPU run failed (exit {rc}); see {args.out / f'train_{n}gpu.log'}")
        row = summarize(read_jsonl(run_dir / "metrics.jsonl"), args.warmup, n) | {"wall_s": time.time() - started}
        rows.append(row)
        print(f"[scaling] {n} GPU(s): {row['env_steps_per_s']:,.0f} env-steps/s, rollout "
              f"{row['rollout_s_per_iter']:.2f} s, update {row['update_s_per_iter']:.2f} s per iteration, "
              f"peak {row['peak_memory_gb']:.1f} GiB ({row['wall_s']:.0f} s in all)", flush=True)
        shutil.copy(run_dir / "metrics.jsonl", args.out / f"metrics_{n}gpu.jsonl")  # what --report-only reads
        if not args.keep_runs:
            shutil.rmtree(run_dir)
    return write_report(rows, args)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path} not found")
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_report(rows: list[dict], args: Args) -> list[dict]:
    name = args.device_label or device_name(args.device)
    markdown = table(rows, args, name)
    write_results(args.out, markdown, {"device": name, "args": asdict(args), "rows": rows})
    print(markdown)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
