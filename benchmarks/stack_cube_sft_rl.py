"""Demonstrations -> flow-matching SFT -> PPO and GRPO on the stack-cube scene, one eval protocol for every number.

    python benchmarks/stack_cube_sft_rl.py --out runs/sft_rl_lift --rl-minutes 12.8   # the README's run (one GPU)
    python benchmarks/stack_cube_sft_rl.py --task IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor --ppo-num-steps 28
    python benchmarks/stack_cube_sft_rl.py --gpus 0 1 2 --ppo-learning-rates 1e-7 3e-7   # one RL job per GPU
    python benchmarks/stack_cube_sft_rl.py --out runs/lift_e4 --sft-run runs/sft_rl_lift/sft --phases rl eval report \
        "--ppo-flags=--value-warmup-iterations 2 --no-bootstrap-time-limits --update-epochs 4"  # one SFT, other RL
    python benchmarks/stack_cube_sft_rl.py --out runs/ppo_alone --sft-run runs/sft_rl_lift/sft --phases rl eval report \
        --rl-algos ppo                                                                  # PPO alone on the GPU
    python benchmarks/stack_cube_sft_rl.py --out runs/crop --demos runs/sft_rl_lift/demos --phases sft eval report \
        --sft-random-crop                                                # an SFT setting on the same demonstrations
    python benchmarks/stack_cube_sft_rl.py --out runs/crop_more --demos runs/sft_rl_lift/demos --phases sft eval report \
        --sft-random-crop --sft-policy runs/crop/sft/gr00t --seed 2            # more SFT on from that run's model

Phases (`--phases` picks some; each reads what the earlier ones wrote under --out; `sft` and `rl` refuse to start
over an existing run, `demos` over demos an SFT run there trained on, all before any phase starts):
  demos   the scripted expert's successful episodes as a LeRobot v2 dataset   (envs/record_demos.py)
  sft     GR00T (`--sft-policy`: random init, or an SFT export) trained on them   (train.py sft)
  rl      PPO (one run per --ppo-learning-rates) and GRPO from the SFT model   (train.py ppo / grpo)
  eval    every model above, same protocol: --eval-episodes episodes from --eval-seed, deterministic actions; and
          the SFT model's open-loop fit of its demos by expert phase              (benchmarks/sft_open_loop.py)
          (a model's eval, or the fit, already under <out>/eval for its newest checkpoint, made after that
          checkpoint and, for an eval, with this protocol, is kept)
  report  results.md / results.json (success with 95 % intervals, milestones reached) and
          success_vs_env_steps.png (against env steps and RL minutes); task, protocol and GPU as the evals
          recorded them (`--phases report` alone reads the other arguments from the <out>/args.json of the last
          command that ran a phase)

Every job is a subprocess on one GPU (CUDA_VISIBLE_DEVICES) with its log under `<out>/logs/`. Jobs of one phase
run in parallel, one per entry of `--gpus` (default `0 0`: two jobs share GPU 0). The training curves are the runs' own rollouts
(stochastic actions); the eval points are deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from algos.checkpoint import checkpoint_dirs, find_checkpoint  # noqa: E402

PHASES = ("demos", "sft", "rl", "eval", "report")


@dataclass
class Args:
    out: Path = Path("runs/stack_cube_sft_rl")
    """Folder for everything: demos/, sft/, ppo_lr*/, grpo/, eval/, logs/, results.*"""
    phases: list[Literal["demos", "sft", "rl", "eval", "report"]] = field(default_factory=lambda: list(PHASES))
    """Phases to run, in this order."""
    gpus: list[int] = field(default_factory=lambda: [0, 0])
    """GPU of each job slot: a phase runs one job per slot at a time. Repeat an index to share a GPU (`0 0 0`:
    three jobs at once on GPU 0). Ignored with --device cpu (one job at a time)."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where every job runs."""
    seed: int = 1
    """Seed of SFT and of the RL runs."""
    task: str = "Leanvla-Lift-Red-Cube-Franka-IK-Rel-Visuomotor"
    """Camera task with a scripted expert: stack-cube's first pick alone (160 steps; the default, since SFT on
    full stack-cube has reached 10.9 % here so far, `benchmarks/results/sft_rl_stack_cube/`: few successes for RL
    to reinforce), or
    `IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor` (448 steps)."""
    image_size: int = 128
    """Camera size (pixels) for demos, training and eval. GR00T resizes every view to its input size (224 px, or
    --sft-image-size)."""
    max_episode_steps: int | None = None
    """Time limit of the SFT/RL/eval episodes. None: the task's (448 steps). Demos always use the task's."""
    # demos
    demo_episodes: int = 300
    """Successful expert episodes to record."""
    demo_num_envs: int = 64
    """Parallel envs while recording."""
    demo_action_noise: float = 0.0
    """DART noise while recording: the std of the noise on the executed arm actions (record_demos --action-noise)."""
    demos: Path | None = None
    """Fine-tune on this existing dataset instead of <out>/demos, e.g. to compare SFT settings on one set of
    demonstrations, one --out each. Not with the demos phase."""
    # sft
    sft_policy: str = "gr00t-small"
    """GR00T preset to fine-tune from random init (no pretrained weights are reachable here), or the export of an
    earlier SFT run (`<its --out>/sft/gr00t`) to train on from (a fresh optimizer and learning-rate schedule; the
    report records the earlier run's recipe too)."""
    sft_iterations: int = 3000
    """SFT gradient steps."""
    sft_image_size: int | None = None
    """Input size (px) of the random-init GR00T (train.py sft --gr00t-image-size; 126 is about the cameras' 128 px
    with 81 image tokens per view). None: the preset's 224 (256 tokens)."""
    sft_batch_size: int = 64
    """SFT frames per step."""
    sft_learning_rate: float = 1e-4
    """SFT peak learning rate."""
    sft_tune_visual: bool = True
    """Also train the vision tower during SFT."""
    sft_tune_llm: bool = False
    """Also train the language model layers during SFT (a random-init preset's are otherwise frozen at random)."""
    sft_random_crop: bool = False
    """Augment SFT's views with GR00T's train-mode random crop (train.py sft --random-crop)."""
    sft_color_jitter: bool = False
    """Augment SFT's views with GR00T's training colour jitter (train.py sft --color-jitter)."""
    sft_compile: bool = False
    """Regional torch.compile of GR00T's blocks during SFT (train.py sft --compile): more steps per minute."""
    sft_minutes: float | None = None
    """Time budget of SFT (train.py sft --max-minutes: it stops, with a checkpoint and the export, after the step
    that crosses it; the schedule still spans --sft-iterations). None: the steps decide."""
    sft_run: Path | None = None
    """Start RL from this existing SFT run (and evaluate it as `sft`) instead of <out>/sft, e.g. to compare RL
    settings from one SFT model, one --out each. Not with the sft phase."""
    # rl
    rl_algos: list[Literal["ppo", "grpo"]] = field(default_factory=lambda: ["ppo", "grpo"])
    """RL algorithms to run from the SFT model (`ppo` alone gives PPO a GPU to itself under the default --gpus 0)."""
    rl_num_envs: int = 256
    """Envs of each RL run (in total over its GPUs)."""
    rl_gpus_per_run: int = 1
    """GPUs of each RL run, data-parallel through torchrun: the RL phase's job slots are consecutive groups of
    this many --gpus entries (`--gpus 0 1 2 3 --rl-gpus-per-run 2`: PPO on GPUs 0-1, GRPO on 2-3)."""
    rl_minutes: float | None = 14.0
    """Time budget of each RL run (train.py --max-minutes: it stops, with a checkpoint, after the iteration that
    crosses it); the RL runs of a phase share the GPUs, so it bounds the phase. None: the iteration counts decide."""
    ppo_iterations: int = 200
    """PPO iterations at most."""
    ppo_num_steps: int = 10
    """PPO decisions per env per rollout (10 x 16 steps = one 160-step lift episode; 28 for stack-cube)."""
    ppo_learning_rates: list[float] = field(default_factory=lambda: [1e-6])
    """One PPO run per (initial) learning rate of the policy; the value head keeps train.py's default."""
    grpo_iterations: int = 200
    """GRPO iterations at most (each plays every env's episode to its end)."""
    grpo_group_size: int = 8
    """GRPO group size."""
    grpo_learning_rate: float = 1e-6
    """GRPO learning rate."""
    ppo_num_minibatches: int = 8
    """PPO minibatches per epoch (bounds the memory of the update)."""
    grpo_num_minibatches: int = 16
    """GRPO minibatches per epoch (a GRPO rollout holds whole episodes: up to 28 decisions per env)."""
    ppo_flags: str = "--value-warmup-iterations 2 --no-bootstrap-time-limits"
    """More `train.py ppo` flags for every PPO run, as one shell-quoted string (replacing these defaults): a
    critic warm-up from the fresh value head, and the time limit as part of the task (success within it). The
    rate stays constant, as GRPO's: the adaptive schedule (`--lr-schedule adaptive --adaptive-lr-bounds 1e-8 1e-5`)
    drove it down to 1e-8 at times on the lift."""
    grpo_flags: str = ""
    """More `train.py grpo` flags, likewise."""
    rl_save_every: int = 5
    """RL checkpoint interval (iterations); a run stopped early is evaluated at its newest checkpoint."""
    # eval
    eval_episodes: int = 256
    """Episodes per evaluated model."""
    eval_num_envs: int = 256
    """Parallel envs of each eval."""
    eval_seed: int = 12345
    """Seed of the eval resets (apart from the training seeds)."""
    eval_action_exec_horizon: int | None = None
    """Play only the first K actions of each chunk in eval (eval.py --action-exec-horizon). None: the whole chunk."""


@dataclass
class Job:
    name: str
    cmd: list[str]


def gpu_slots(args: Args, gpus_per_job: int = 1) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each job slot: --gpus in consecutive groups of `gpus_per_job` (None on CPU)."""
    if args.device != "cuda":
        return [None]
    if gpus_per_job < 1 or len(args.gpus) % gpus_per_job:
        raise SystemExit(f"error: --gpus {' '.join(map(str, args.gpus))} does not split into groups of "
                         f"{gpus_per_job} GPUs (--rl-gpus-per-run)")
    groups = [args.gpus[i:i + gpus_per_job] for i in range(0, len(args.gpus), gpus_per_job)]
    return [",".join(map(str, group)) for group in groups]


def run_jobs(jobs: list[Job], args: Args, gpus_per_job: int = 1) -> None:
    """Run `jobs`, one per slot of `gpu_slots` at a time; stop at the first failure, naming its log."""
    gpus = gpu_slots(args, gpus_per_job)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, running = list(jobs), {}  # slot -> (job, process, started, log)
    while pending or running:
        for slot, gpu in enumerate(gpus):
            if slot not in running and pending:
                job = pending.pop(0)
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # jobs sharing a GPU fragment it
                if gpu is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(gpu)
                print(f"[{time.strftime('%H:%M:%S')}] start {job.name} (gpu {gpu}): {' '.join(job.cmd)}", flush=True)
                log = open(logs / f"{job.name}.log", "w")
                # a session of its own: a failure elsewhere stops the job's whole group (torchrun's workers too)
                running[slot] = (job, subprocess.Popen(job.cmd, cwd=ROOT, env=env, stdout=log,
                                                       stderr=subprocess.STDOUT, start_new_session=True),
                                 time.time(), log)
        for slot, (job, proc, started, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[slot]
            print(f"[{time.strftime('%H:%M:%S')}] done  {job.name}: exit {proc.returncode} after "
                  f"{time.time() - started:.0f} s", flush=True)
            if proc.returncode != 0:
                for _, other, _, other_log in running.values():
                    stop_group(other)
                    other_log.close()
                raise SystemExit(f"error: {job.name} failed; see {logs / f'{job.name}.log'}")
        time.sleep(1.0)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to a job's process group (torchrun passes it to its workers), SIGKILL after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def python(*argv: str) -> list[str]:
    return [sys.executable, *argv]


def launcher(num_gpus: int, *argv: str) -> list[str]:
    """`python argv` on one GPU; torchrun with one process per GPU (DDP) on more."""
    if num_gpus == 1:
        return python(*argv)
    return python("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_gpus}", *argv)


def task_flags(args: Args, time_limit: bool = True) -> list[str]:
    """The task, as SFT records it for evaluation."""
    flags = ["--env.task", args.task, "--env.image-size", str(args.image_size)]
    if time_limit and args.max_episode_steps is not None:
        flags += ["--env.max-episode-steps", str(args.max_episode_steps)]
    return flags


def env_flags(args: Args, num_envs: int, time_limit: bool = True) -> list[str]:
    """The task and how many envs step it, where."""
    return [*task_flags(args, time_limit), "--env.device", args.device, "--env.num-envs", str(num_envs)]


def demos_dir(args: Args) -> Path:
    return args.demos if args.demos is not None else args.out / "demos"


def sft_dir(args: Args) -> Path:
    """The SFT run that RL starts from."""
    return args.sft_run if args.sft_run is not None else args.out / "sft"


def rl_runs(args: Args) -> dict[str, list[str]]:
    """Run name -> `train.py` arguments of every RL run."""
    shared = ["--policy", str(sft_dir(args) / "gr00t"), *env_flags(args, args.rl_num_envs), "--seed",
              str(args.seed)]
    budget = ["--max-minutes", str(args.rl_minutes)] if args.rl_minutes is not None else []
    runs = {}
    for lr in args.ppo_learning_rates if "ppo" in args.rl_algos else []:
        name = f"ppo_lr{lr:g}"
        runs[name] = ["ppo", *shared, "--num-steps", str(args.ppo_num_steps), "--learning-rate", str(lr),
                      "--num-iterations", str(args.ppo_iterations), "--save-every", str(args.rl_save_every),
                      "--num-minibatches", str(args.ppo_num_minibatches), "--run-dir", str(args.out / name),
                      *budget, *shlex.split(args.ppo_flags)]
    if "grpo" in args.rl_algos:
        name = f"grpo_lr{args.grpo_learning_rate:g}"
        runs[name] = ["grpo", *shared, "--group-size", str(args.grpo_group_size),
                      "--learning-rate", str(args.grpo_learning_rate), "--num-iterations", str(args.grpo_iterations),
                      "--save-every", str(args.rl_save_every), "--num-minibatches", str(args.grpo_num_minibatches),
                      "--run-dir", str(args.out / name), *budget, *shlex.split(args.grpo_flags)]
    return runs


def models(args: Args) -> dict[str, Path]:
    """Evaluated model name -> run directory (its newest checkpoint is evaluated)."""
    return {"sft": sft_dir(args), **{name: args.out / name for name in rl_runs(args)}}


def refuse_existing(runs: list[Path]) -> None:
    """A training run appends to an existing run directory; refuse rather than mix two runs' logs."""
    existing = [str(r) for r in runs if r.exists()]
    if existing:
        raise SystemExit(f"error: {', '.join(existing)} already exist; remove them or pick another --out")


def phase_jobs(phase: str, args: Args) -> list[Job]:
    if phase == "demos":
        return [Job("demos", python("-m", "envs.record_demos", "--out", str(args.out / "demos"), "--overwrite",
                                    "--episodes", str(args.demo_episodes), "--seed", "0",
                                    "--action-noise", str(args.demo_action_noise),
                                    *env_flags(args, args.demo_num_envs, time_limit=False)))]
    if phase == "sft":
        return [Job("sft", python("train.py", "sft", "--dataset", str(demos_dir(args)), "--policy", args.sft_policy,
                                  "--num-iterations", str(args.sft_iterations), "--batch-size", str(args.sft_batch_size),
                                  "--learning-rate", str(args.sft_learning_rate), "--seed", str(args.seed),
                                  "--run-dir", str(args.out / "sft"), "--save-every", str(args.sft_iterations),
                                  *(["--tune-visual"] if args.sft_tune_visual else []),
                                  *(["--tune-llm"] if args.sft_tune_llm else []),
                                  *(["--random-crop"] if args.sft_random_crop else []),
                                  *(["--color-jitter"] if args.sft_color_jitter else []),
                                  *(["--compile"] if args.sft_compile else []),
                                  *([] if args.sft_image_size is None else
                                    ["--gr00t-image-size", str(args.sft_image_size)]),
                                  *([] if args.sft_minutes is None else ["--max-minutes", str(args.sft_minutes)]),
                                  "--device", args.device, *task_flags(args)))]
    if phase == "rl":
        per_run = args.rl_gpus_per_run if args.device == "cuda" else 1
        return [Job(name, launcher(per_run, "train.py", *argv)) for name, argv in rl_runs(args).items()]
    if phase == "eval":
        todo, skipped = {}, set()
        for name, run in models(args).items():
            if not checkpoint_dirs(run):
                print(f"eval: {name} has no checkpoint yet; skipped", flush=True)
                skipped.add(name)
            elif not done_at_newest(args.out / "eval" / name / "summary.json", run, f"the eval of {name}",
                                    eval_protocol(args)):
                todo[name] = run
        return [Job(f"eval_{name}", python("eval.py", "--checkpoint", str(run), "--num-episodes", str(args.eval_episodes),
                                           "--num-envs", str(args.eval_num_envs), "--seed", str(args.eval_seed),
                                           "--device", args.device, "--num-videos", "0",
                                           "--output", str(args.out / "eval" / name),
                                           *([] if args.eval_action_exec_horizon is None else
                                             ["--action-exec-horizon", str(args.eval_action_exec_horizon)])))
                for name, run in todo.items()] + ([open_loop_job(args)] if "sft" not in skipped and not done_at_newest(
                    args.out / "eval" / "sft_open_loop" / "results.json", sft_dir(args), "the open-loop fit") else [])
    return []


PROTOCOL = ("num_episodes", "seed", "deterministic", "action_exec_horizon")
"""What eval.py's summary.json records of how a model was evaluated."""


def eval_protocol(args: Args) -> dict:
    """How every model is evaluated, as eval.py's summary.json records it."""
    return dict(zip(PROTOCOL, (args.eval_episodes, args.eval_seed, True, args.eval_action_exec_horizon)))


def done_at_newest(results: Path, run: Path, what: str, protocol: dict | None = None) -> bool:
    """Whether `results` (an eval's summary.json, sft_open_loop's results.json) was computed at `run`'s newest
    checkpoint, after that checkpoint was written (a run made anew under the same name has a checkpoint of the
    same name) and, for an eval, with `protocol`; then it is kept. (The open-loop fit may be a copy from a run that
    evaluated the same model with another --eval-action-exec-horizon: it does not depend on that.)"""
    newest = find_checkpoint(run)
    found = read_json(results)
    if found.get("checkpoint") != str(newest) or results.stat().st_mtime < (newest / "state.json").stat().st_mtime:
        return False
    if protocol is not None and any(found.get(k) != v for k, v in protocol.items()):
        print(f"eval: {what} at {newest} used another protocol; redone", flush=True)
        return False
    print(f"eval: {what} at {newest} is there already; kept", flush=True)
    return True


def open_loop_job(args: Args) -> Job:
    """The SFT model's per-phase fit of its own demonstrations (benchmarks/sft_open_loop.py): under-fitting or
    drift, beside the closed-loop milestones."""
    return Job("open_loop_sft", python("benchmarks/sft_open_loop.py", str(sft_dir(args)), "--device", args.device,
                                       "--out", str(args.out / "eval" / "sft_open_loop")))


def success_interval(successes: int, episodes: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of a success rate (it stays inside [0, 1], unlike mean +- 2 SE)."""
    from scipy.stats import binomtest

    interval = binomtest(successes, episodes).proportion_ci(0.95, method="wilson")
    return float(interval.low), float(interval.high)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def sft_recipe(sft_run: Path, default_demos: Path) -> dict:
    """How an SFT model was made, as its run and its demos recorded it (sft_levers.py compares runs by these):
    the run's config, the steps it made and the demos' size and recording (the dataset its config names;
    `default_demos` where the run has no config yet); for a run that trained on from another SFT run's export, that
    run's recipe under "continues"."""
    config = read_json(sft_run / "config.json")
    demos = Path(config["dataset"]) if config else default_demos
    info = read_json(demos / "meta" / "info.json")
    newest = checkpoint_dirs(sft_run)
    recipe = {"config": config, "demos": {"episodes": info.get("total_episodes"), "frames": info.get("total_frames"),
                                          "recording": read_json(demos / "meta" / "recording.json")},
              # the steps it made (--sft-minutes may stop it before its --num-iterations)
              "trained_steps": read_json(newest[-1] / "state.json").get("iteration") if newest else None}
    start = Path(config.get("policy", ""))
    earlier = read_json(start.parent / "config.json") if (start / "config.json").is_file() else {}
    if "dataset" in earlier and start.parent.resolve() != sft_run.resolve():  # an export in another SFT run
        recipe["continues"] = sft_recipe(start.parent, default_demos)
    return recipe


def sft_chain(recipe: dict) -> list[dict]:
    """The SFT recipes that made a model, first to last (a recipe holds the one it continues under "continues")."""
    chain = []
    while recipe:
        chain.insert(0, recipe)
        recipe = recipe.get("continues")
    return chain


def recorded_protocol(evals: dict[str, dict]) -> dict:
    """The eval protocol the summaries share (episodes, seed, deterministic, actions per chunk); one that differs
    between the models' evals, or a task that does, is an error: their numbers would not compare."""
    keys = ("task", *PROTOCOL)
    seen = {k: {json.dumps(e.get(k)) for e in evals.values() if k in e} for k in keys}
    mixed = {k: sorted(v) for k, v in seen.items() if len(v) > 1}
    if mixed:
        raise SystemExit(f"error: the evals under the output folder differ in {mixed}: rerun the eval phase")
    return {k: json.loads(next(iter(v))) for k, v in seen.items() if v and k != "task"}


def report(args: Args) -> dict:
    """results.json, results.md and the plot, from what the phases wrote."""
    evals = {name: json.loads((args.out / "eval" / name / "summary.json").read_text())
             for name in models(args) if (args.out / "eval" / name / "summary.json").is_file()}
    curves = {name: read_jsonl(args.out / name / "metrics.jsonl") for name in rl_runs(args)}
    recipe = sft_recipe(sft_dir(args), demos_dir(args))
    rows = []
    for name in models(args):
        if name not in evals:
            continue
        e = evals[name]
        # the evaluated checkpoint's own counters (a run cut short is evaluated at its newest checkpoint)
        state = json.loads((Path(e["checkpoint"]) / "state.json").read_text())
        curve = [r for r in curves.get(name, []) if r["step"] <= state.get("global_step", 0)]
        successes = round(e["success_rate"] * e["num_episodes"])
        rows.append({"model": name, "task": e.get("task"), "success_rate": e["success_rate"],
                     "episodes": e["num_episodes"],
                     "ci95": success_interval(successes, e["num_episodes"]),
                     "milestone_rates": e.get("milestone_rates", {}),
                     "iteration": None if name == "sft" else state["iteration"],
                     "env_steps": state.get("global_step", 0),
                     "train_minutes": (sum(r.get("perf/rollout_time", 0) + r.get("perf/update_time", 0)
                                           for r in curve) / 60) if curve else None})
    sft = next((r for r in rows if r["model"] == "sft"), None)
    for r in rows:
        rl = sft is not None and r is not sft
        r["gain_points"] = 100 * (r["success_rate"] - sft["success_rate"]) if rl else None
        # the gain stands clear of the noise when the two 95 % intervals do not overlap
        r["clear_of_sft"] = (r["ci95"][0] > sft["ci95"][1] or r["ci95"][1] < sft["ci95"][0]) if rl else None
    protocol = recorded_protocol(evals)
    device = ", ".join(sorted({e.get("device", "?") for e in evals.values()})) or "?"
    task = next((e["task"] for e in evals.values() if "task" in e), args.task)
    image_size = next((e["image_size"] for e in evals.values() if "image_size" in e), args.image_size)
    # the GR00T preset the model started from: the first SFT run's --policy (a later run's names an export)
    chain = sft_chain(recipe)
    policy = chain[0]["config"].get("policy", args.sft_policy) if chain[0]["config"] else args.sft_policy
    continued = f" ({len(chain)} SFT runs in a row)" if len(chain) > 1 else ""
    executed = ("" if protocol.get("action_exec_horizon") is None else
                f", the first {protocol['action_exec_horizon']} actions of each chunk executed")
    actions = "deterministic" if protocol.get("deterministic", True) else "sampled"
    lines = [f"`{task}` ({image_size} px), GR00T `{policy}`: SFT on {recipe['demos']['episodes'] or '?'} "
             f"expert demos{continued}, then RL; {device}. Eval: {protocol.get('num_episodes', '?')} episodes from "
             f"seed {protocol.get('seed', '?')}, {actions} actions{executed}; success with its 95 % Wilson interval.",
             "",
             "| model | success [95 % interval] | gain over SFT | intervals apart | RL iterations | RL env steps | "
             "RL time (rollout + update) |",
             "|---|---:|---:|:---:|---:|---:|---:|"]
    for r in rows:
        gain = "" if r["gain_points"] is None else f"{r['gain_points']:+.1f} points"
        apart = "" if r["clear_of_sft"] is None else ("yes" if r["clear_of_sft"] else "no")
        minutes = "" if r["train_minutes"] is None else f"{r['train_minutes']:.1f} min"
        lines.append(f"| {r['model']} | {r['success_rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                     f"({r['episodes']} ep) | {gain} | {apart} | {r['iteration'] or ''} | {r['env_steps']:,} | {minutes} |")
    milestones = list(rows[0]["milestone_rates"]) if rows else []
    if milestones:  # how far the episodes got: the share that reached each of the task's milestones
        lines += ["", "| model | " + " | ".join(milestones) + " |", "|---|" + "---:|" * len(milestones)]
        lines += [f"| {r['model']} | " + " | ".join(f"{r['milestone_rates'].get(m, float('nan')):.3f}"
                                                    for m in milestones) + " |" for r in rows]
    open_loop = args.out / "eval" / "sft_open_loop"
    if (open_loop / "results.md").is_file():
        lines += ["", "The SFT model on its own demonstrations, open loop, by expert phase "
                  "(`benchmarks/sft_open_loop.py`):", "", (open_loop / "results.md").read_text().strip()]
    markdown = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(markdown)
    results = {"device": device, "task": task, "eval_protocol": protocol,
               "args": json.loads(json.dumps(asdict(args), default=str)), "sft_recipe": recipe,
               "rows": rows, "sft_open_loop": read_json(open_loop / "results.json").get("rows"),
               "curves": {k: [{m: r[m] for m in ("step", "env/success_once", "rollout/success_rate") if m in r}
                              for r in v] for k, v in curves.items()}}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(args, curves, rows)
    print(markdown)
    return results


def plot(args: Args, curves: dict[str, list[dict]], rows: list[dict]) -> None:
    """Training-rollout success of each RL run against env steps and against training minutes (rollout + update);
    each model's eval as a point (`report`'s rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_steps, by_minutes) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    evals = {r["model"]: r for r in rows}
    sft = evals.get("sft", {}).get("success_rate")
    for i, (name, curve) in enumerate(curves.items()):
        records = [r for r in curve if "env/success_once" in r]
        minutes = [sum(r.get("perf/rollout_time", 0) + r.get("perf/update_time", 0) for r in curve[:k + 1]) / 60
                   for k, r in enumerate(curve) if "env/success_once" in r]
        color = f"C{i}"
        for ax, xs, eval_x in ((by_steps, [r["step"] for r in records], "env_steps"),
                               (by_minutes, minutes, "train_minutes")):
            if records:
                ax.plot(xs, [r["env/success_once"] for r in records], color=color, label=f"{name} (training rollouts)")
            if name in evals and evals[name][eval_x] is not None:
                ax.plot([evals[name][eval_x]], [evals[name]["success_rate"]], "o", color=color, ms=8,
                        label=f"{name} (eval) {evals[name]['success_rate']:.3f}")
    for ax, label in ((by_steps, "env steps"), (by_minutes, "RL minutes (rollout + update)")):
        if sft is not None:
            ax.axhline(sft, color="gray", ls="--", label=f"SFT (eval) {sft:.3f}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    by_steps.set_ylabel("success rate")
    by_steps.set_ylim(0, 1)
    by_steps.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['task'] if rows else args.task}: SFT -> RL", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "success_vs_env_steps.png", dpi=120)


def absolute(args: Args) -> Args:
    """The paths made absolute: the jobs run in the repository root, wherever the pipeline was started."""
    policy = Path(args.sft_policy)
    return dataclasses.replace(
        args, out=args.out.resolve(), demos=args.demos and args.demos.resolve(),
        sft_run=args.sft_run and args.sft_run.resolve(),
        sft_policy=str(policy.resolve()) if policy.exists() else args.sft_policy)


def stored_args(args: Args) -> Args:
    """For `--phases report` alone: the arguments of the last command that ran a phase in --out (its args.json),
    which name its runs; the command's own where there is none."""
    saved = read_json(args.out / "args.json")
    if not saved:
        return args
    print(f"report: the runs as {args.out / 'args.json'} names them", flush=True)
    paths = {"out", "demos", "sft_run"}
    fields = {f.name for f in dataclasses.fields(Args)}
    values = {k: (Path(v) if k in paths and v is not None else v) for k, v in saved.items() if k in fields}
    return dataclasses.replace(Args(**values), out=args.out, phases=args.phases)


def check_phases(args: Args) -> None:
    """Everything that would make a phase refuse or mislabel, before any phase starts (a refusal after minutes of
    demos or SFT wastes them)."""
    if args.demos is not None and "demos" in args.phases:
        raise SystemExit(f"error: --demos {args.demos} reuses a dataset; leave out the demos phase "
                         "(e.g. --phases sft eval report)")
    if args.sft_run is not None and "sft" in args.phases:
        raise SystemExit(f"error: --sft-run {args.sft_run} reuses an SFT run; leave out the sft phase "
                         "(e.g. --phases rl eval report)")
    if not args.rl_algos and "rl" in args.phases:
        raise SystemExit("error: --rl-algos is empty; name ppo, grpo or both")
    if "demos" in args.phases and "sft" not in args.phases and (args.out / "sft").exists():
        raise SystemExit(f"error: {args.out / 'sft'} was trained on the demos the demos phase would record anew; "
                         "remove it or pick another --out")
    if "sft" in args.phases:
        refuse_existing([args.out / "sft"])
        if "demos" not in args.phases:
            recorded = read_json(demos_dir(args) / "meta" / "recording.json").get("task")
            if recorded is not None and recorded != args.task:
                raise SystemExit(f"error: {demos_dir(args)} holds {recorded} demos; --task is {args.task}")
        saved = read_json(Path(args.sft_policy) / "leanvla_config.json")  # an export: its parts stay trained
        for flag, on in (("tune_visual", args.sft_tune_visual), ("tune_llm", args.sft_tune_llm)):
            if saved.get(flag) and not on:
                raise SystemExit(f"error: --sft-policy {args.sft_policy} trained with {flag}, which SFT keeps; "
                                 f"pass --sft-{flag.replace('_', '-')}")
    if "rl" in args.phases:
        refuse_existing([args.out / name for name in rl_runs(args)])
        if "sft" not in args.phases:
            trained = read_json(sft_dir(args) / "config.json").get("env", {}).get("task")
            if trained is not None and trained != args.task:
                raise SystemExit(f"error: {sft_dir(args)} was trained on {trained}; --task is {args.task}")


def main(args: Args) -> None:
    args = absolute(args)
    if args.phases == ["report"]:
        args = stored_args(args)
    check_phases(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phases != ["report"]:
        (args.out / "args.json").write_text(json.dumps(asdict(args), indent=1, default=str))
    for phase in PHASES:
        if phase not in args.phases:
            continue
        started = time.time()
        if phase == "report":
            report(args)
        else:
            run_jobs(phase_jobs(phase, args), args, args.rl_gpus_per_run if phase == "rl" else 1)
        print(f"[{time.strftime('%H:%M:%S')}] phase {phase} took {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
