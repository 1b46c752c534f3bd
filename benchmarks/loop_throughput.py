"""The whole PPO loop with GR00T on stack-cube on one GPU, with and without the pipelined rollout.

    python -m benchmarks.loop_throughput --num-envs 32 64 128 --pipeline-stages 1 2 \
        --gr00t-tokenizer <dir with the GR00T tokenizer files> --out benchmarks/results/loop_throughput

For each env count and each --pipeline-stages it runs `train.py ppo` (official 3B size, random weights, bf16,
--compile --cuda-graphs) and reads the run's metrics.jsonl. Over the iterations after --warmup it reports

    env-steps/s      env steps / (rollout + update time)
    rollout, update  seconds per iteration
    policy, env      seconds per iteration in `policy.sample` (main process) and playing chunks (per stage); with
                     one stage they take turns (policy + env = rollout), with more they overlap. The env part's and
                     the policy part's env-steps/s are the iteration's env steps over each of these times.
    GPU util         mean of nvidia-smi's utilization.gpu, sampled every 200 ms over the timed iterations

and writes results.md and results.json to --out after every run (the metrics and log of every run go into
runs.tar.gz at the end).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.report import write_results  # noqa: E402
from benchmarks.scaling import device_name, read_jsonl  # noqa: E402


@dataclass
class Args:
    num_envs: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Stack-cube env counts to run."""
    pipeline_stages: list[int] = field(default_factory=lambda: [1, 2])
    """--pipeline-stages values to run at each env count."""
    num_steps: int = 4
    """PPO decisions per env per rollout (each a 16-step action chunk)."""
    num_minibatches: int = 4
    """PPO minibatches per epoch."""
    update_epochs: int = 1
    """PPO epochs per iteration."""
    iterations: int = 8
    """PPO iterations per run, warm-up included."""
    warmup: int = 2
    """Leading iterations left out of the timing (compilation, graph capture)."""
    policy: str = "gr00t-n1.5-3b"
    """GR00T preset (random init)."""
    gr00t_tokenizer: str | None = None
    """Tokenizer directory for the preset (None: the preset's own, from the hub)."""
    image_size: int = 224
    """Camera size (pixels)."""
    device: str = "cuda"
    """`cuda`, or `cpu` (a smoke test of the script, not a measurement)."""
    fast_path: bool = True
    """--compile --cuda-graphs (GPU only)."""
    extra: str = ""
    """More `train.py ppo` flags as one shell-quoted string."""
    out: Path = Path("runs/bench_loop")
    """Folder for results.md, results.json, runs.tar.gz and each run's log."""
    run_root: Path | None = None
    """Where the runs write checkpoints (3B: several GiB each), e.g. /dev/shm. None: --out."""


def train_command(args: Args, num_envs: int, stages: int, run_dir: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "train.py"), "ppo", "--policy", args.policy, "--env.device", args.device,
           "--env.num-envs", str(num_envs), "--env.image-size", str(args.image_size),
           "--pipeline-stages", str(stages), "--num-steps", str(args.num_steps),
           "--num-minibatches", str(args.num_minibatches), "--update-epochs", str(args.update_epochs),
           "--num-iterations", str(args.iterations), "--save-every", str(10 * args.iterations), "--keep-last", "1",
           "--run-dir", str(run_dir)]
    if args.gr00t_tokenizer:
        cmd += ["--gr00t-tokenizer", args.gr00t_tokenizer]
    if args.fast_path and args.device == "cuda":
        cmd += ["--compile", "--cuda-graphs"]
    return cmd + shlex.split(args.extra)


class GpuUtilization:
    """nvidia-smi's utilization.gpu of GPU 0 every 200 ms, each sample stamped with time.time() as it arrives."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.process = None
        if shutil.which("nvidia-smi") is None:
            return
        self.process = subprocess.Popen(["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu",
                                         "--format=csv,noheader,nounits", "-lms", "200"],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append((time.time(), float(line)))

    def mean(self, start: float, end: float) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return sum(inside) / len(inside) if inside else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


def summarize(records: list[dict], warmup: int) -> dict:
    """Per-iteration means over the iterations after `warmup` (metrics.jsonl records, `step` = env steps so far)."""
    if len(records) <= warmup or warmup < 1:
        raise RuntimeError(f"the run logged {len(records)} iterations; need more than --warmup {warmup} >= 1")
    timed = records[warmup:]
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    rollout, update = mean("perf/rollout_time"), mean("perf/update_time")
    env_steps = (records[-1]["step"] - records[warmup - 1]["step"]) / len(timed)
    return {"iterations_timed": len(timed), "env_steps_per_iter": env_steps,
            "env_steps_per_s": env_steps / (rollout + update), "rollout_s": rollout, "update_s": update,
            "policy_s": mean("perf/policy_time"), "env_s": mean("perf/env_time"),
            "peak_memory_gb": max(r["perf/peak_memory_gb"] for r in records),
            "timed_from": records[warmup - 1]["time"], "timed_to": records[-1]["time"]}


def table(rows: list[dict], args: Args, device: str) -> str:
    lines = [f"PPO, GR00T `{args.policy}` (random weights), stack-cube {args.image_size} px, {args.num_steps} x "
             f"16-step chunks per env per iteration, {args.update_epochs} epoch of {args.num_minibatches} minibatches; "
             f"{device}.", "",
             "| envs | pipeline stages | env-steps/s | rollout s/iter | update s/iter | policy s/iter | env s/iter "
             "(per stage) | env-steps/s of the env part | of the policy part | GPU util |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["num_envs"], r["stages"])):
        util = f"{r['gpu_util']:.0f} %" if r.get("gpu_util") is not None else "-"
        lines.append(f"| {r['num_envs']} | {r['stages']} | **{r['env_steps_per_s']:,.0f}** | {r['rollout_s']:.2f} | "
                     f"{r['update_s']:.2f} | {r['policy_s']:.2f} | {r['env_s']:.2f} | "
                     f"{r['env_steps_per_iter'] / r['env_s']:,.0f} | {r['env_steps_per_iter'] / r['policy_s']:,.0f} "
                     f"| {util} |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> list[dict]:
    if args.warmup < 1 or args.iterations <= args.warmup:
        raise SystemExit(f"error: need 1 <= --warmup {args.warmup} < --iterations {args.iterations}")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows, gpu = [], GpuUtilization() if args.device == "cuda" else None
    try:
        for num_envs in args.num_envs:
            for stages in args.pipeline_stages:
                name = f"{num_envs}envs_{stages}stages"
                run_dir = (args.run_root or args.out) / f"run_{name}"
                shutil.rmtree(run_dir, ignore_errors=True)
                cmd = train_command(args, num_envs, stages, run_dir)
                print(f"[loop] {name}: {' '.join(cmd)}", flush=True)
                with open(args.out / f"train_{name}.log", "w") as log:
                    rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    raise SystemExit(f"error: the run {name} failed (exit {rc}); see {args.out / f'train_{name}.log'}")
                shutil.copy(run_dir / "metrics.jsonl", args.out / f"metrics_{name}.jsonl")
                shutil.rmtree(run_dir)
                row = {"num_envs": num_envs, "stages": stages,
                       **summarize(read_jsonl(args.out / f"metrics_{name}.jsonl"), args.warmup)}
                row["gpu_util"] = gpu.mean(row["timed_from"], row["timed_to"]) if gpu else None
                rows.append(row)
                write_report(rows, args)  # what was measured stays if a later run fails or the machine goes
                print(f"[loop] {name}: {row['env_steps_per_s']:,.0f} env-steps/s, rollout {row['rollout_s']:.2f} s "
                      f"(policy {row['policy_s']:.2f}, env {row['env_s']:.2f}), update {row['update_s']:.2f} s, "
                      f"GPU util {row['gpu_util']}", flush=True)
    finally:
        if gpu is not None:
            gpu.stop()
    with tarfile.open(args.out / "runs.tar.gz", "w:gz") as tar:
        for path in sorted(args.out.glob("metrics_*.jsonl")) + sorted(args.out.glob("train_*.log")):
            tar.add(path, arcname=path.name)
            path.unlink()
    print(write_report(rows, args))
    return rows


def write_report(rows: list[dict], args: Args) -> str:
    device = device_name(args.device).replace(" on one host", "") if args.device == "cuda" else device_name("cpu")
    markdown = table(rows, args, device)
    write_results(args.out, markdown, {"device": device, "args": asdict(args), "rows": rows})
    return markdown


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
