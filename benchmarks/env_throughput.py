"""Stack-cube env throughput against num_envs and camera size, the adapter's overhead, and the expert's success rate.

    python benchmarks/env_throughput.py --num-envs 16 64 256 1024 --image-sizes 128 224 --out runs/bench_env

For every (num_envs, image size) it times the raw Isaac Lab step (`env.unwrapped.step`, observations included)
and leanvla's adapter step on the same env, and reports env-steps/s and the adapter's overhead. Then it runs
the scripted expert for `--expert-episodes` episodes and reports its success rate. Prints a markdown table and
writes it, with a JSON of every number, to `--out`.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import write_results  # noqa: E402
from envs import EnvConfig, make_env  # noqa: E402
from envs.expert import StackExpert  # noqa: E402


@dataclass
class Args:
    num_envs: list[int] = field(default_factory=lambda: [16, 64, 256, 1024])
    """Sub-env counts to sweep."""
    image_sizes: list[int] = field(default_factory=lambda: [128, 224, 256])
    """Square camera sizes (pixels) to sweep; both cameras use it."""
    steps: int = 100
    """Timed steps per round (after `warmup`)."""
    rounds: int = 3
    """Rounds of raw-then-adapter timing per configuration; the median round of each is reported."""
    warmup: int = 10
    """Untimed steps first (Warp kernel compilation, CUDA graph capture)."""
    expert_episodes: int = 256
    """Episodes for the expert's success rate (0 skips it)."""
    expert_num_envs: int = 128
    """Parallel envs for the expert run."""
    expert_image_size: int = 64
    """Camera size for the expert run (images are not used by the expert)."""
    device: str = "auto"
    """Simulation device."""
    ls_iterations: int | None = None
    """MuJoCo-Warp line-search iterations (`--env.ls-iterations`); None: the task's."""
    out: Path = Path("runs/bench_env")
    """Folder for results.md and results.json."""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(env, step, actions, steps: int, warmup: int) -> float:
    """Seconds per step of `step(actions)`, averaged over `steps` after `warmup`."""
    for _ in range(warmup):
        step(actions)
    _sync(env.device)
    start = time.perf_counter()
    for _ in range(steps):
        step(actions)
    _sync(env.device)
    return (time.perf_counter() - start) / steps


def hold_actions(env) -> torch.Tensor:
    actions = torch.zeros(env.num_envs, env.action_dim, device=env.device)
    actions[:, 6] = 1.0
    return actions


def bench_throughput(args: Args) -> list[dict]:
    rows = []
    for image_size in args.image_sizes:
        for num_envs in args.num_envs:
            env = make_env(EnvConfig(num_envs=num_envs, image_size=image_size, device=args.device,
                                     ls_iterations=args.ls_iterations))
            try:
                env.reset(seed=0)
                actions = hold_actions(env)
                # alternate raw and adapter rounds so that drifts (clocks, other load) hit both alike
                raw_rounds, adapter_rounds = [], []
                for _ in range(args.rounds):
                    raw_rounds.append(time_steps(env, env.unwrapped.step, actions, args.steps, args.warmup))
                    adapter_rounds.append(time_steps(env, env.step, actions, args.steps, args.warmup))
                raw, adapter = statistics.median(raw_rounds), statistics.median(adapter_rounds)
                row = {
                    "num_envs": num_envs,
                    "image_size": image_size,
                    "raw_steps_per_s": num_envs / raw,
                    "adapter_steps_per_s": num_envs / adapter,
                    "adapter_overhead_pct": 100.0 * (adapter - raw) / raw,
                    # raw rounds' overflows fold into the next adapter step's count
                    "solver_overflows": env.solver_overflows.counts() if env.solver_overflows else None,
                }
            finally:
                env.close()
            rows.append(row)
            print(row, flush=True)
    return rows


def bench_expert(args: Args) -> dict:
    env = make_env(EnvConfig(num_envs=args.expert_num_envs, image_size=args.expert_image_size, device=args.device,
                             ls_iterations=args.ls_iterations))
    expert = StackExpert(env.num_envs, env.device)
    successes, lengths = [], []
    try:
        env.reset(seed=0)
        expert.reset()
        while len(successes) < args.expert_episodes:
            _, _, terminated, truncated, info = env.step(expert.act(env.privileged_state()))
            done = (terminated | truncated).nonzero().flatten()
            if len(done):
                successes += info["success"][done].tolist()
                lengths += info["episode_length"][done].tolist()
                expert.reset(done)
                print(f"expert: {sum(successes)}/{len(successes)} episodes succeeded", flush=True)
        overflows = env.solver_overflows.counts() if env.solver_overflows else None
        sub_env_steps = env.solver_overflows.sub_env_steps if env.solver_overflows else None
    finally:
        env.close()
    successes, lengths = successes[: args.expert_episodes], lengths[: args.expert_episodes]
    return {
        "episodes": len(successes),
        "success_rate": sum(successes) / len(successes),
        "mean_length_successful": sum(l for l, s in zip(lengths, successes) if s) / max(1, sum(successes)),
        "solver_overflows": overflows, "sub_env_steps": sub_env_steps,
    }


def main(args: Args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.processor() or "CPU"
    rows = bench_throughput(args) if args.num_envs and args.image_sizes else []
    expert = bench_expert(args) if args.expert_episodes > 0 else None
    lines = [f"Stack-cube visuomotor, two cameras, kit-less (Newton + Warp renderer), device: {device}", ""]
    lines += ["| num_envs | image | raw Isaac Lab env-steps/s | leanvla adapter env-steps/s | adapter overhead |"]
    lines += ["|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['num_envs']} | {r['image_size']}×{r['image_size']} | {r['raw_steps_per_s']:,.0f} | "
            f"{r['adapter_steps_per_s']:,.0f} | {r['adapter_overhead_pct']:+.1f} % |"
        )
    if expert:
        lines += ["", f"Scripted expert: {expert['success_rate']:.1%} success over {expert['episodes']} episodes "
                  f"(mean successful episode {expert['mean_length_successful']:.0f} steps)."]
    table = "\n".join(lines)
    print(table)
    write_results(args.out, table + "\n", {"device": device, "args": asdict(args), "throughput": rows,
                                           "expert": expert})


if __name__ == "__main__":
    main(tyro.cli(Args))
