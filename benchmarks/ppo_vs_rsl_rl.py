"""leanvla's PPO against rsl_rl's PPO (shipped with Isaac Lab) on the same Isaac Lab tasks, side by side.

    python benchmarks/ppo_vs_rsl_rl.py --tasks Isaac-Cartpole Isaac-Reach-Franka --seeds 0 1 2 --out runs/ppo_vs_rsl_rl
    python benchmarks/ppo_vs_rsl_rl.py --plot-only --out runs/ppo_vs_rsl_rl      # table + plot from results.json

Both learners run on the same env implementation (leanvla's kit-less Isaac Lab adapter, Newton physics), in one
process on one GPU, with the same number of envs, env steps, seeds and hyperparameters: each task's own rsl_rl
configuration from Isaac Lab's registry (network sizes, epochs, minibatches, learning rate with the adaptive KL
schedule, clip ranges, entropy, gamma, lambda), mapped onto `algos.ppo.PPOConfig`. Not the same by design:
leanvla uses orthogonal init, a log-std parameter, one global gradient-norm clip and the sample-based KL
estimate for the adaptive schedule; rsl_rl uses PyTorch's default init, a std parameter, a clip per network and
the analytic Gaussian KL. rsl_rl's random initial episode lengths are off (leanvla has none), so both start
from fresh episodes.

Measured identically for both: the return of an iteration is the mean `episode_return` that the env reports
for the episodes that ended during it; the final return is the mean over the last 10 % of iterations; SPS is
env steps / wall time of the learning loop (env construction and a warm-up excluded). Writes results.json,
results.md (a table) and learning_curves.png under --out.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algos import ppo  # noqa: E402
from envs.config import EnvConfig  # noqa: E402
from models.mlp import MLPConfig  # noqa: E402


@dataclass
class Args:
    tasks: tuple[str, ...] = ("Isaac-Cartpole", "Isaac-Reach-Franka")
    """Isaac Lab task ids with an rsl_rl configuration in the registry (Isaac-Ant needs NVIDIA's asset server:
    the offline asset folder has no ant)."""
    seeds: tuple[int, ...] = (0, 1)
    """Seeds; each learner runs once per seed and task."""
    iterations: tuple[int, ...] = ()
    """Iterations per task (same order as --tasks). Empty: each task's rsl_rl max_iterations."""
    num_envs: tuple[int, ...] = ()
    """Envs per task (same order as --tasks). Empty: each task's own default."""
    device: str = "cuda"
    """Device of the envs and both learners."""
    precision: str = "fp32"
    """leanvla's compute precision (`fp32`, `bf16`, `auto`); rsl_rl runs in fp32 (its default)."""
    out: str = "runs/ppo_vs_rsl_rl"
    """Output directory."""
    init: str = "orthogonal"
    """leanvla's MLP weight init: `orthogonal` or `torch` (PyTorch's default, as rsl_rl)."""
    learners: tuple[str, ...] = ("leanvla", "rsl_rl")
    """Which learners to run."""
    plot_only: bool = False
    """Only rebuild results.md and the plot from an existing results.json."""


# ---- the task's rsl_rl configuration ------------------------------------------------------------------------------
def rsl_rl_config(task: str) -> dict:
    """The task's rsl_rl runner config from Isaac Lab's registry, as the dict rsl_rl's OnPolicyRunner takes."""
    import importlib.metadata

    import isaaclab_tasks  # noqa: F401  (registers the tasks)
    from isaaclab_rl.rsl_rl.utils import handle_deprecated_rsl_rl_cfg
    from isaaclab_tasks.utils.parse_cfg import load_cfg_from_registry

    from envs.isaaclab_env import resolve_task

    cfg = load_cfg_from_registry(resolve_task(task), "rsl_rl_cfg_entry_point")
    cfg = handle_deprecated_rsl_rl_cfg(cfg, importlib.metadata.version("rsl-rl-lib"))
    d = cfg.to_dict()
    d["obs_groups"] = {"actor": ["policy"], "critic": ["policy"]}
    return d


def default_num_envs(task: str) -> int:
    from isaaclab_tasks.utils.parse_cfg import load_cfg_from_registry

    from envs.isaaclab_env import resolve_task

    return int(load_cfg_from_registry(resolve_task(task), "env_cfg_entry_point").scene.num_envs)


def leanvla_config(task: str, rsl: dict, num_envs: int, iterations: int, seed: int, args: Args, run_dir: Path
                   ) -> ppo.PPOConfig:
    """rsl_rl's hyperparameters for `task`, as leanvla flags."""
    alg, actor = rsl["algorithm"], rsl["actor"]
    return ppo.PPOConfig(
        policy="mlp", seed=seed, env=EnvConfig(task=task, num_envs=num_envs, device=args.device),
        mlp=MLPConfig(hidden_sizes=tuple(actor["hidden_dims"]), activation=actor["activation"],
                      init_std=actor["distribution_cfg"]["init_std"], normalize_obs=actor["obs_normalization"],
                      std_param=actor["distribution_cfg"].get("std_type", "scalar"), init=args.init),
        num_iterations=iterations, num_steps=rsl["num_steps_per_env"], gamma=alg["gamma"], gae_lambda=alg["lam"],
        update_epochs=alg["num_learning_epochs"], num_minibatches=alg["num_mini_batches"],
        clip_coef=alg["clip_param"], clip_vloss=alg["use_clipped_value_loss"], vf_clip_coef=alg["clip_param"],
        vf_coef=alg["value_loss_coef"], ent_coef=alg["entropy_coef"], learning_rate=alg["learning_rate"],
        value_learning_rate=None, value_loss="mse",
        max_grad_norm=alg["max_grad_norm"], desired_kl=alg["desired_kl"] or 0.01,
        lr_schedule="adaptive" if alg["schedule"] == "adaptive" else "constant", precision=args.precision,
        norm_adv=not alg.get("normalize_advantage_per_mini_batch", False),
        run_dir=str(run_dir), save_every=10**9, keep_last=1)


# ---- rsl_rl on leanvla's env ------------------------------------------------------------------------------------
class RslRlEnv:
    """rsl_rl's VecEnv interface over a leanvla env; records the episode returns it reports, per iteration."""

    def __init__(self, env, seed: int, steps_per_iteration: int):
        from tensordict import TensorDict

        self._td = TensorDict
        self.env, self.num_envs, self.num_actions = env, env.num_envs, env.action_dim
        self.max_episode_length, self.device, self.cfg = env.max_episode_steps, env.device, {}
        self.episode_length_buf = torch.zeros(env.num_envs, dtype=torch.long, device=env.device)
        self.obs = env.reset(seed=seed)
        self.steps_per_iteration, self.steps = steps_per_iteration, 0
        self.sums = torch.zeros(2, dtype=torch.float64, device=env.device)
        self.returns: list[float] = []

    def get_observations(self):
        return self._td({"policy": self.obs["state"]}, batch_size=[self.num_envs])

    def step(self, actions):
        self.obs, reward, terminated, truncated, info = self.env.step(actions.float())
        done = terminated | truncated
        self.sums += torch.stack([(info["episode_return"].double() * done).sum(), done.double().sum()])
        self.steps += 1
        if self.steps % self.steps_per_iteration == 0:
            total, n = self.sums.tolist()
            self.returns.append(total / n if n else math.nan)
            self.sums.zero_()
        return self.get_observations(), reward, done.long(), {"time_outs": truncated}


def run_rsl_rl(task: str, rsl: dict, num_envs: int, iterations: int, seed: int, args: Args) -> dict:
    from rsl_rl.runners import OnPolicyRunner

    from envs import make_env

    env = make_env(EnvConfig(task=task, num_envs=num_envs, device=args.device))
    vec = RslRlEnv(env, seed, rsl["num_steps_per_env"])
    torch.manual_seed(seed)
    runner = OnPolicyRunner(vec, {**rsl, "seed": seed, "device": str(env.device)}, log_dir=None,
                            device=str(env.device))
    sync(args.device)
    t0 = time.time()
    runner.learn(num_learning_iterations=iterations, init_at_random_ep_len=False)
    sync(args.device)
    wall = time.time() - t0
    env.close()
    steps = iterations * rsl["num_steps_per_env"] * num_envs
    return {"returns": vec.returns, "sps": steps / wall, "wall_s": wall, "env_steps": steps}


def run_leanvla(task: str, rsl: dict, num_envs: int, iterations: int, seed: int, args: Args) -> dict:
    cfg = leanvla_config(task, rsl, num_envs, iterations, seed, args, Path(args.out) / f"leanvla_{task}_{seed}")
    out = ppo.train(cfg)
    history = out["history"]
    steps = iterations * cfg.num_steps * num_envs
    return {"returns": [h.get("env/episode_return", math.nan) for h in history], "sps": history[-1]["charts/SPS"],
            "wall_s": steps / history[-1]["charts/SPS"], "env_steps": steps}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(task: str, num_envs: int, device: str) -> None:
    """Compile the task's Warp kernels before anything is timed."""
    from envs import make_env

    env = make_env(EnvConfig(task=task, num_envs=num_envs, device=device))
    env.reset(seed=0)
    for _ in range(5):
        env.step(torch.zeros(env.num_envs, env.action_dim, device=env.device))
    env.close()


# ---- report ------------------------------------------------------------------------------------------------------
def final_return(returns: list[float]) -> float:
    tail = [r for r in returns[-max(1, len(returns) // 10):] if not math.isnan(r)]
    return sum(tail) / len(tail) if tail else math.nan


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def report(results: dict, out: Path) -> str:
    lines = [f"Device: {results['device']}", "",
             "| task | learner | seeds | env steps | final return (mean ± std over seeds) | SPS (mean ± std) |",
             "|---|---|---:|---:|---:|---:|"]
    for task, by_learner in results["tasks"].items():
        for learner, runs in by_learner.items():
            runs = list(runs.values())
            if not runs:
                continue
            fr = mean_std([final_return(r["returns"]) for r in runs])
            sps = mean_std([r["sps"] for r in runs])
            lines.append(f"| {task} | {learner} | {len(runs)} | {runs[0]['env_steps']:,} | "
                         f"{fr[0]:.2f} ± {fr[1]:.2f} | {sps[0]:,.0f} ± {sps[1]:,.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    try:
        plot(results, out / "learning_curves.png")
    except ImportError:
        print("matplotlib is missing: no plot (run again with --plot-only where it is installed)")
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (task, by_learner) in zip(axes[0], tasks.items()):
        for learner, runs in by_learner.items():
            curves = [r["returns"] for r in runs.values()]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps_per_iter = next(iter(runs.values()))["env_steps"] / len(curves[0])
            # iterations in which no episode ended (NaN in every seed) are skipped
            points = [(i, [c[i] for c in curves if not math.isnan(c[i])]) for i in range(n)]
            points = [(i, v) for i, v in points if v]
            x = [(i + 1) * steps_per_iter for i, _ in points]
            mean = [sum(v) / len(v) for _, v in points]
            lo, hi = [min(v) for _, v in points], [max(v) for _, v in points]
            ax.plot(x, mean, label=f"{learner} ({len(curves)} seeds)")
            ax.fill_between(x, lo, hi, alpha=0.2)  # min..max over seeds
        ax.set_title(task)
        ax.set_xlabel("env steps")
        ax.set_ylabel("episode return (mean over seeds; band: min-max)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: Args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    if args.plot_only:
        print(report(json.loads(results_file.read_text()), out))
        return
    for name, values in (("--iterations", args.iterations), ("--num-envs", args.num_envs)):
        if values and len(values) != len(args.tasks):
            raise SystemExit(f"error: {name} needs one value per task ({len(args.tasks)})")
    from envs import assets

    assets.use_asset_root(assets.ensure_offline_assets())  # before anything imports isaaclab
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"device": device_name, "args": vars(args), "tasks": {}}
    setups = {}
    for k, seed in enumerate(args.seeds):  # seed by seed, so that a cut-short run still compares every task
        for i, task in enumerate(args.tasks):
            if task not in setups:
                rsl = rsl_rl_config(task)
                num_envs = args.num_envs[i] if args.num_envs else default_num_envs(task)
                iterations = args.iterations[i] if args.iterations else rsl["max_iterations"]
                warm_up(task, num_envs, args.device)
                setups[task] = (rsl, num_envs, iterations)
            rsl, num_envs, iterations = setups[task]
            by_learner = results["tasks"].setdefault(task, {"leanvla": {}, "rsl_rl": {}})
            order = [(n, f) for n, f in (("leanvla", run_leanvla), ("rsl_rl", run_rsl_rl)) if n in args.learners]
            for learner, fn in order if k % 2 == 0 else order[::-1]:  # alternate who runs first
                r = fn(task, rsl, num_envs, iterations, seed, args)
                by_learner[learner][str(seed)] = r
                print(f"{task} {learner} seed {seed}: final return {final_return(r['returns']):.3f}, "
                      f"SPS {r['sps']:,.0f}, {r['wall_s']:.1f} s", flush=True)
                results_file.write_text(json.dumps(results, indent=1))
                report(results, out)
    print(report(results, out))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
