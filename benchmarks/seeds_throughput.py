"""K seeds in one process (`train.py ppo --num-seeds K`) against K separate runs: total env-steps/s and speed-up.

    python benchmarks/seeds_throughput.py --tasks Isaac-Cartpole Isaac-Reach-Franka --num-seeds 1 4 16 \
        --num-envs 1024 512 --iterations 20 --out runs/seeds_throughput

Every run is leanvla's PPO with the MLP policy and the task's rsl_rl hyperparameters (as
`benchmarks/ppo_vs_rsl_rl.py` maps them), each seed with --num-envs envs of its own. A K-seed run steps one env
instance of K x --num-envs sub-envs and updates the K stacked learners at once. Total env-steps/s counts every
seed's env steps over the rollout and update time of the iterations after --warmup; K separate runs, one after the
other on the same GPU, take K times as long as one, so the speed-up over them is the K-seed run's total env-steps/s
over the one-seed run's. The final return (mean over the seeds of each seed's mean over the last 10 % of its
iterations in which episodes ended) shows that the learners learn as a run of one does. Writes results.json,
results.md and total_sps.png under --out.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algos import ppo  # noqa: E402
from benchmarks.ppo_vs_rsl_rl import Args as RslArgs  # noqa: E402
from benchmarks.ppo_vs_rsl_rl import leanvla_config, rsl_rl_config  # noqa: E402


@dataclass
class Args:
    tasks: tuple[str, ...] = ("Isaac-Cartpole", "Isaac-Reach-Franka")
    """Isaac Lab state tasks with an rsl_rl configuration."""
    num_seeds: tuple[int, ...] = (1, 4, 16)
    """K: learners per run (1: a plain run)."""
    num_envs: tuple[int, ...] = (1024, 512)
    """Envs per seed, per task (same order as --tasks)."""
    iterations: int = 20
    """Iterations per run."""
    warmup: int = 2
    """Leading iterations left out of the timing (compile, allocation)."""
    device: str = "cuda"
    """Device of the envs and the learners."""
    out: Path = Path("runs/seeds_throughput")
    """Output directory (the runs' logs go to <out>/runs/)."""
    seed: int = 0
    """First seed of every run."""


def final_return(history: list[dict]) -> float:
    """The mean episode return over the iterations in which episodes ended: the last 10 % of the run's number of
    iterations of them (at least one)."""
    returns = [h["env/episode_return"] for h in history if "env/episode_return" in h]
    last = returns[-max(1, len(history) // 10):]
    return sum(last) / len(last) if last else float("nan")


def measure(args: Args, task: str, num_envs: int, num_seeds: int) -> dict:
    rsl = rsl_rl_config(task)
    run_dir = args.out / "runs" / f"{task}_k{num_seeds}"
    cfg = replace(leanvla_config(task, rsl, num_envs, args.iterations, args.seed, RslArgs(device=args.device),
                                 run_dir), num_seeds=num_seeds)
    started = time.perf_counter()
    out = ppo.train(cfg)
    wall = time.perf_counter() - started
    histories = out["history"] if num_seeds > 1 else [out["history"]]
    timed = histories[0][args.warmup:]
    seconds = sum(h["perf/rollout_time"] + h["perf/update_time"] for h in timed)
    steps = num_seeds * num_envs * cfg.num_steps * len(timed)
    finals = [final_return(hist) for hist in histories]
    return {"task": task, "num_seeds": num_seeds, "num_envs_per_seed": num_envs, "num_steps": cfg.num_steps,
            "iterations": args.iterations, "timed_iterations": len(timed), "total_env_steps_per_s": steps / seconds,
            "seconds_per_iteration": seconds / len(timed), "wall_s": wall,
            "final_return_mean": sum(finals) / len(finals), "final_return_per_seed": finals,
            "peak_memory_gb": histories[0][-1]["perf/peak_memory_gb"]}


def report(results: dict, out: Path) -> str:
    rows = results["rows"]
    one = {r["task"]: r["total_env_steps_per_s"] for r in rows if r["num_seeds"] == 1}
    lines = [f"K seeds in one process, on {results['device']} (`benchmarks/seeds_throughput.py`):", "",
             "| task | seeds K | envs per seed | total env-steps/s | s per iteration | speed-up over K separate runs "
             "| final return (mean over seeds) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        speedup = r["total_env_steps_per_s"] / one[r["task"]] if r["task"] in one else float("nan")
        lines.append(f"| {r['task']} | {r['num_seeds']} | {r['num_envs_per_seed']} | "
                     f"{r['total_env_steps_per_s']:,.0f} | {r['seconds_per_iteration']:.3f} | {speedup:.2f}x | "
                     f"{r['final_return_mean']:.2f} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        ax.plot([r["num_seeds"] for r in mine], [r["total_env_steps_per_s"] for r in mine], "o-", label=task)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("seeds K in one process")
    ax.set_ylabel("total env-steps/s")
    ax.set_title(f"PPO, K seeds at once ({results['device']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "total_sps.png", dpi=120)
    return text


def main(args: Args) -> dict:
    if len(args.num_envs) != len(args.tasks):
        raise SystemExit(f"error: --num-envs has {len(args.num_envs)} values for {len(args.tasks)} tasks")
    from envs import assets

    assets.use_asset_root(assets.ensure_offline_assets())  # before anything imports isaaclab
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    results = {"device": device, "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
               "rows": []}
    for task, num_envs in zip(args.tasks, args.num_envs):
        for k in args.num_seeds:
            results["rows"].append(measure(args, task, num_envs, k))
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
            print(json.dumps(results["rows"][-1]), flush=True)
    print(report(results, args.out))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
