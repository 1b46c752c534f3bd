"""The benchmark drivers: the commands they build parse as real train.py / eval.py / record_demos flags, and the
scaling arithmetic matches a hand computation."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import demo_loading  # noqa: E402
import eval as eval_script  # noqa: E402
import loop_throughput  # noqa: E402
import scaling  # noqa: E402
import sft_levers  # noqa: E402
import sft_loss_curves  # noqa: E402
import sft_open_loop  # noqa: E402
import sft_throughput  # noqa: E402
import stack_cube_sft_rl  # noqa: E402
import train as train_script  # noqa: E402
from algos import grpo, ppo, sft  # noqa: E402
from envs import record_demos  # noqa: E402
from envs.lerobot import LeRobotWriter  # noqa: E402


def test_scaling_summary_skips_warmup_and_sums_time():
    # 3 iterations of 1000 env steps each; the first is warm-up
    records = [{"step": 1000 * (i + 1), "perf/rollout_time": r, "perf/update_time": u, "perf/peak_memory_gb": m}
               for i, (r, u, m) in enumerate([(9.0, 9.0, 5.0), (1.5, 0.5, 7.0), (2.5, 0.5, 6.0)])]
    row = scaling.summarize(records, warmup=1, num_gpus=2)
    assert row["env_steps_timed"] == 2000 and row["iterations_timed"] == 2
    assert row["env_steps_per_s"] == pytest.approx(2000 / 5.0)
    assert row["rollout_s_per_iter"] == pytest.approx(2.0) and row["update_s_per_iter"] == pytest.approx(0.5)
    assert row["peak_memory_gb"] == 7.0
    with pytest.raises(RuntimeError, match="need more than --warmup 3"):
        scaling.summarize(records, warmup=3, num_gpus=2)


def test_scaling_efficiency_in_the_table():
    rows = [{"gpus": 1, "env_steps_per_s": 1000.0, "rollout_s_per_iter": 1, "update_s_per_iter": 1,
             "peak_memory_gb": 1},
            {"gpus": 4, "env_steps_per_s": 3600.0, "rollout_s_per_iter": 1, "update_s_per_iter": 1,
             "peak_memory_gb": 1}]
    table = scaling.table(rows, scaling.Args(), "test GPU")
    assert "| 4 | 3,600 |" in table and "| 90 % |" in table


def test_scaling_report_only_rebuilds_the_results_from_the_metrics(tmp_path):
    for n, seconds in ((1, 2.0), (2, 2.5)):  # 2 iterations of 1000 env steps per GPU; the first is warm-up
        (tmp_path / f"metrics_{n}gpu.jsonl").write_text("\n".join(json.dumps(
            {"step": 1000 * n * (i + 1), "perf/rollout_time": seconds, "perf/update_time": 0.0,
             "perf/peak_memory_gb": 1.0}) for i in range(2)))
    rows = scaling.main(scaling.Args(gpus=[1, 2], iterations=2, warmup=1, report_only=True, out=tmp_path,
                                     device_label="test GPU"))
    assert [r["env_steps_per_s"] for r in rows] == [500.0, 800.0]
    assert "| 2 | 800 | 2.50 | 0.00 | 80 % |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["device"] == "test GPU"


def test_scaling_command_is_a_valid_train_command(tmp_path):
    args = scaling.Args(envs_per_gpu=8, gr00t_tokenizer="/tok", extra="--gamma 0.9")
    cmd = scaling.train_command(args, 4, tmp_path / "run")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    cfg = train_script.parse(cmd[6:])
    assert isinstance(cfg, ppo.PPOConfig) and cfg.env.num_envs == 32 and cfg.policy == "gr00t-n1.5-3b"
    assert cfg.gr00t_tokenizer == "/tok" and cfg.cuda_graphs and cfg.gamma == 0.9 and cfg.run_dir == str(tmp_path / "run")


def test_loop_throughput_summary_and_table_hand_computed(tmp_path):
    # 3 iterations of 4096 env steps; the first is warm-up
    records = [{"step": 4096 * (i + 1), "time": 100.0 + i, "perf/rollout_time": r, "perf/update_time": 0.5,
                "perf/policy_time": p, "perf/env_time": e, "perf/peak_memory_gb": 3.0}
               for i, (r, p, e) in enumerate([(30.0, 20.0, 10.0), (1.5, 0.5, 1.0), (2.5, 1.5, 1.0)])]
    row = loop_throughput.summarize(records, warmup=1)
    assert row["env_steps_per_iter"] == 4096 and row["env_steps_per_s"] == pytest.approx(4096 / 2.5)
    assert (row["rollout_s"], row["policy_s"], row["env_s"]) == pytest.approx((2.0, 1.0, 1.0))
    assert (row["timed_from"], row["timed_to"]) == (100.0, 102.0)
    table = loop_throughput.table([{"num_envs": 64, "stages": 2, **row, "gpu_util": 50.0}], loop_throughput.Args(),
                                  "test GPU")
    assert "| 64 | 2 | **1,638** | 2.00 | 0.50 | 1.00 | 1.00 | 4,096 | 4,096 | 50 % |" in table
    with pytest.raises(RuntimeError, match="need more than --warmup 3"):
        loop_throughput.summarize(records, warmup=3)
    markdown = loop_throughput.write_report([{"num_envs": 64, "stages": 2, **row, "gpu_util": 50.0}],
                                            loop_throughput.Args(device="cpu", out=tmp_path / "out"))
    assert (tmp_path / "out" / "results.md").read_text() == markdown and "| **1,638** |" in markdown
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]["env_steps_per_iter"] == 4096
    cmd = loop_throughput.train_command(loop_throughput.Args(gr00t_tokenizer="/tok"), 64, 2, tmp_path / "run")
    cfg = train_script.parse(cmd[2:])
    assert isinstance(cfg, ppo.PPOConfig) and cfg.env.num_envs == 64 and cfg.pipeline_stages == 2
    assert cfg.compile and cfg.cuda_graphs and cfg.num_steps == 4 and cfg.policy == "gr00t-n1.5-3b"


SCRIPTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py") if p.name != "report.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_benchmark_runs_as_a_file_from_anywhere(script, tmp_path):
    # as the docs run them, `python benchmarks/<name>.py`, but from another folder and without PYTHONPATH: each
    # script finds the repository's packages itself
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_write_results_writes_the_table_and_the_numbers(tmp_path):
    from benchmarks.report import write_results

    write_results(tmp_path / "a" / "b", "| x |\n", {"path": tmp_path, "rows": [1.5]})
    assert (tmp_path / "a" / "b" / "results.md").read_text() == "| x |\n"
    assert json.loads((tmp_path / "a" / "b" / "results.json").read_text()) == {"path": str(tmp_path), "rows": [1.5]}
    write_results(tmp_path / "c", "table\n", None)
    assert (tmp_path / "c" / "results.md").is_file() and not (tmp_path / "c" / "results.json").exists()


def test_stack_cube_pipeline_commands_are_valid(tmp_path):
    args = stack_cube_sft_rl.Args(out=tmp_path, image_size=64, max_episode_steps=100, ppo_learning_rates=[1e-5, 3e-5],
                                  grpo_learning_rate=1e-5, ppo_num_minibatches=4, grpo_num_minibatches=8,
                                  ppo_flags="--gamma 0.95", sft_random_crop=True, sft_color_jitter=True,
                                  sft_compile=True, sft_minutes=12.5, sft_image_size=126, sft_tune_llm=True,
                                  eval_action_exec_horizon=8,
                                  demo_action_noise=0.02)
    (demos,) = stack_cube_sft_rl.phase_jobs("demos", args)
    demo_args = tyro.cli(record_demos.Args, args=demos.cmd[3:])
    assert demo_args.env.image_size == 64 and demo_args.env.max_episode_steps is None  # the task's limit
    assert demo_args.env.task == args.task and demo_args.action_noise == 0.02
    (sft_job,) = stack_cube_sft_rl.phase_jobs("sft", args)
    sft_cfg = train_script.parse(sft_job.cmd[2:])
    assert isinstance(sft_cfg, sft.SFTConfig) and sft_cfg.env.image_size == 64 and sft_cfg.dataset == str(tmp_path / "demos")
    assert sft_cfg.random_crop and sft_cfg.color_jitter and sft_cfg.compile and sft_cfg.max_minutes == 12.5
    assert sft_cfg.gr00t_image_size == 126 and sft_cfg.tune_visual and sft_cfg.tune_llm
    (default_sft,) = stack_cube_sft_rl.phase_jobs("sft", stack_cube_sft_rl.Args(out=tmp_path / "defaults"))
    default_cfg = train_script.parse(default_sft.cmd[2:])
    assert default_cfg.max_minutes is None and default_cfg.gr00t_image_size is None  # the steps decide; 224 px
    assert default_cfg.tune_visual and not default_cfg.tune_llm
    rl = {job.name: train_script.parse(job.cmd[2:]) for job in stack_cube_sft_rl.phase_jobs("rl", args)}
    assert sorted(rl) == ["grpo_lr1e-05", "ppo_lr1e-05", "ppo_lr3e-05"]
    assert isinstance(rl["grpo_lr1e-05"], grpo.GRPOConfig) and rl["ppo_lr3e-05"].learning_rate == 3e-5
    assert all(c.policy == str(tmp_path / "sft" / "gr00t") and c.env.max_episode_steps == 100 for c in rl.values())
    assert rl["ppo_lr1e-05"].gamma == 0.95 and rl["ppo_lr1e-05"].run_dir == str(tmp_path / "ppo_lr1e-05")
    assert rl["ppo_lr1e-05"].num_minibatches == 4 and rl["grpo_lr1e-05"].num_minibatches == 8
    assert {c.max_minutes for c in rl.values()} == {args.rl_minutes}
    # the default PPO run: GRPO's constant rate, critic warm-up, success within the time limit
    (default_ppo,) = [train_script.parse(j.cmd[2:]) for j in stack_cube_sft_rl.phase_jobs(
        "rl", stack_cube_sft_rl.Args(out=tmp_path / "defaults")) if j.name.startswith("ppo")]
    assert default_ppo.lr_schedule == "constant" and default_ppo.learning_rate == 1e-6
    assert default_ppo.value_warmup_iterations == 2 and not default_ppo.bootstrap_time_limits
    (tmp_path / "ppo_lr3e-05").mkdir()  # an earlier run there: RL refuses to mix into it, before any phase starts
    with pytest.raises(SystemExit, match="ppo_lr3e-05 already exist"):
        stack_cube_sft_rl.check_phases(dataclasses.replace(args, phases=["demos", "rl"]))
    # eval covers the runs that exist, all with one protocol
    for name in ("sft", "ppo_lr1e-05", "ppo_lr3e-05"):
        (tmp_path / name / "checkpoints" / "iter_000005").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "iter_000005" / "state.json").write_text("{}")
    (tmp_path / "eval" / "ppo_lr3e-05").mkdir(parents=True)  # evaluated at this checkpoint already, this way
    summary = tmp_path / "eval" / "ppo_lr3e-05" / "summary.json"
    protocol = {"num_episodes": 256, "seed": 12345, "deterministic": True, "action_exec_horizon": 8}
    summary.write_text(json.dumps({"checkpoint": str(tmp_path / "ppo_lr3e-05" / "checkpoints" / "iter_000005"),
                                   **protocol}))
    *evals, open_loop = stack_cube_sft_rl.phase_jobs("eval", args)
    assert [job.name for job in evals] == ["eval_sft", "eval_ppo_lr1e-05"] and open_loop.name == "open_loop_sft"
    open_loop_args = tyro.cli(sft_open_loop.Args, args=open_loop.cmd[2:])
    assert open_loop_args.run == tmp_path / "sft" and open_loop_args.out == tmp_path / "eval" / "sft_open_loop"
    cfgs = [tyro.cli(eval_script.EvalConfig, args=job.cmd[2:]) for job in evals]
    assert {(c.num_episodes, c.seed, c.deterministic, c.action_exec_horizon) for c in cfgs} == {(256, 12345, True, 8)}
    # an eval with another protocol is redone, and so is one older than its checkpoint (a run made anew)
    later = stack_cube_sft_rl.phase_jobs("eval", dataclasses.replace(args, eval_seed=7))
    assert "eval_ppo_lr3e-05" in [job.name for job in later]
    state = tmp_path / "ppo_lr3e-05" / "checkpoints" / "iter_000005" / "state.json"
    os.utime(summary, (state.stat().st_mtime - 10, state.stat().st_mtime - 10))
    assert "eval_ppo_lr3e-05" in [job.name for job in stack_cube_sft_rl.phase_jobs("eval", args)]
    summary.write_text(summary.read_text())
    # the open-loop fit does not depend on --eval-action-exec-horizon: one of this checkpoint is kept
    (tmp_path / "eval" / "sft_open_loop").mkdir()
    (tmp_path / "eval" / "sft_open_loop" / "results.json").write_text(
        json.dumps({"checkpoint": str(tmp_path / "sft" / "checkpoints" / "iter_000004")}))  # an older one
    assert stack_cube_sft_rl.phase_jobs("eval", args)[-1].name == "open_loop_sft"
    (tmp_path / "eval" / "sft_open_loop" / "results.json").write_text(
        json.dumps({"checkpoint": str(tmp_path / "sft" / "checkpoints" / "iter_000005")}))
    assert [job.name for job in stack_cube_sft_rl.phase_jobs("eval", args)] == ["eval_sft", "eval_ppo_lr1e-05"]


def test_stack_cube_pipeline_starts_rl_from_another_sft_run(tmp_path):
    sft_run = tmp_path / "first" / "sft"
    args = stack_cube_sft_rl.Args(out=tmp_path / "second", sft_run=sft_run, phases=["rl", "eval", "report"])
    rl = [train_script.parse(job.cmd[2:]) for job in stack_cube_sft_rl.phase_jobs("rl", args)]
    assert {c.policy for c in rl} == {str(sft_run / "gr00t")}
    assert {c.run_dir for c in rl} == {str(tmp_path / "second" / n) for n in ("ppo_lr1e-06", "grpo_lr1e-06")}
    (sft_run / "checkpoints" / "iter_000001").mkdir(parents=True)
    (sft_run / "checkpoints" / "iter_000001" / "state.json").write_text("{}")
    eval_sft, _ = stack_cube_sft_rl.phase_jobs("eval", args)   # the RL runs have no checkpoint yet
    assert tyro.cli(eval_script.EvalConfig, args=eval_sft.cmd[2:]).checkpoint == str(sft_run)
    args.phases = ["sft", "rl"]
    with pytest.raises(SystemExit, match="--sft-run .* reuses an SFT run; leave out the sft phase"):
        stack_cube_sft_rl.main(args)


def test_stack_cube_pipeline_fine_tunes_on_another_runs_demos(tmp_path):
    demos = tmp_path / "first" / "demos"
    args = stack_cube_sft_rl.Args(out=tmp_path / "second", demos=demos, phases=["sft", "eval", "report"])
    (sft_job,) = stack_cube_sft_rl.phase_jobs("sft", args)
    assert train_script.parse(sft_job.cmd[2:]).dataset == str(demos)
    args.phases = ["demos", "sft"]
    with pytest.raises(SystemExit, match="--demos .* reuses a dataset; leave out the demos phase"):
        stack_cube_sft_rl.main(args)


def test_stack_cube_pipeline_runs_only_the_named_rl_algorithms(tmp_path):
    ppo_only = stack_cube_sft_rl.Args(out=tmp_path, rl_algos=["ppo"], ppo_learning_rates=[1e-6, 2e-6])
    assert [job.name for job in stack_cube_sft_rl.phase_jobs("rl", ppo_only)] == ["ppo_lr1e-06", "ppo_lr2e-06"]
    assert list(stack_cube_sft_rl.models(ppo_only)) == ["sft", "ppo_lr1e-06", "ppo_lr2e-06"]
    grpo_only = stack_cube_sft_rl.Args(out=tmp_path, rl_algos=["grpo"])
    assert [job.cmd[2] for job in stack_cube_sft_rl.phase_jobs("rl", grpo_only)] == ["grpo"]
    with pytest.raises(SystemExit, match="--rl-algos is empty"):
        stack_cube_sft_rl.main(stack_cube_sft_rl.Args(out=tmp_path / "none", rl_algos=[], phases=["rl"]))


def test_stack_cube_pipeline_stops_at_a_failed_job(tmp_path):
    args = stack_cube_sft_rl.Args(out=tmp_path, device="cpu")
    jobs = [stack_cube_sft_rl.Job("ok", [sys.executable, "-c", "print('fine')"]),
            stack_cube_sft_rl.Job("bad", [sys.executable, "-c", "raise SystemExit(3)"])]
    with pytest.raises(SystemExit, match="bad failed; see .*bad.log"):
        stack_cube_sft_rl.run_jobs(jobs, args)
    assert (tmp_path / "logs" / "ok.log").read_text() == "fine\n"


def test_a_failed_job_stops_the_whole_process_group_of_the_job_beside_it(tmp_path):
    """As torchrun's workers: a job's child process goes with it when a job beside it fails."""
    args = stack_cube_sft_rl.Args(out=tmp_path, gpus=[0, 0])
    parent = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(120)']); open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(120)")
    jobs = [stack_cube_sft_rl.Job("parent", [sys.executable, "-c", parent, str(tmp_path / "child.pid")]),
            stack_cube_sft_rl.Job("bad", [sys.executable, "-c", "import time; time.sleep(3); raise SystemExit(3)"])]
    with pytest.raises(SystemExit, match="bad failed"):
        stack_cube_sft_rl.run_jobs(jobs, args)
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the group got SIGTERM; the child is reaped by init shortly after
        if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the job's child {child} is still running")


def test_stack_cube_pipeline_checks_every_phase_before_it_starts(tmp_path, monkeypatch):
    stack = "IsaacContrib-Stack-Cube-Franka-IK-Rel-Visuomotor"
    (tmp_path / "sft").mkdir()
    with pytest.raises(SystemExit, match="sft was trained on the demos the demos phase would record anew"):
        stack_cube_sft_rl.main(stack_cube_sft_rl.Args(out=tmp_path, phases=["demos"]))
    demos = tmp_path / "other" / "demos"
    (demos / "meta").mkdir(parents=True)
    (demos / "meta" / "recording.json").write_text(json.dumps({"task": stack}))
    with pytest.raises(SystemExit, match=f"holds {stack} demos; --task is Leanvla-Lift"):
        stack_cube_sft_rl.main(stack_cube_sft_rl.Args(out=tmp_path / "new", demos=demos, phases=["sft"]))
    (tmp_path / "sft" / "config.json").write_text(json.dumps({"env": {"task": stack}}))
    with pytest.raises(SystemExit, match=f"was trained on {stack}; --task is Leanvla-Lift"):
        stack_cube_sft_rl.main(stack_cube_sft_rl.Args(out=tmp_path / "new", sft_run=tmp_path / "sft", phases=["rl"]))
    export = tmp_path / "export"
    export.mkdir()
    (export / "leanvla_config.json").write_text(json.dumps({"tune_visual": True, "tune_llm": True}))
    with pytest.raises(SystemExit, match="trained with tune_llm, which SFT keeps; pass --sft-tune-llm"):
        stack_cube_sft_rl.main(stack_cube_sft_rl.Args(out=tmp_path / "new", demos=demos, task=stack,
                                                      sft_policy=str(export), phases=["sft"]))
    # a relative --out is the caller's, though the jobs run in the repository root
    monkeypatch.chdir(tmp_path)
    assert stack_cube_sft_rl.absolute(stack_cube_sft_rl.Args(out=Path("rel"))).out == tmp_path / "rel"


def test_stack_cube_report_alone_takes_the_runs_from_the_stored_arguments(tmp_path, monkeypatch):
    args = stack_cube_sft_rl.Args(out=tmp_path, ppo_learning_rates=[3e-7], rl_algos=["ppo"])
    (tmp_path / "args.json").write_text(json.dumps(dataclasses.asdict(args), default=str))
    reported = []
    monkeypatch.setattr(stack_cube_sft_rl, "report", lambda a: reported.append(list(stack_cube_sft_rl.models(a))))
    stack_cube_sft_rl.main(stack_cube_sft_rl.Args(out=tmp_path, phases=["report"]))  # the defaults name other runs
    assert reported == [["sft", "ppo_lr3e-07"]]
    assert json.loads((tmp_path / "args.json").read_text())["ppo_learning_rates"] == [3e-7]  # not overwritten


def test_stack_cube_pipeline_runs_jobs_side_by_side_on_shared_gpus(tmp_path):
    args = stack_cube_sft_rl.Args(out=tmp_path, gpus=[0, 0])  # two slots on GPU 0
    # each job announces itself, then succeeds only if it sees the other one running at the same time
    code = ("import os, pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); "
            "print(os.environ['CUDA_VISIBLE_DEVICES']); t = time.time()\n"
            "while not (d / sys.argv[3]).exists():\n"
            "    time.sleep(0.05)\n"
            "    if time.time() - t > 60: sys.exit(1)")
    jobs = [stack_cube_sft_rl.Job(f"j{i}", [sys.executable, "-c", code, str(tmp_path), f"s{i}", f"s{1 - i}"])
            for i in range(2)]
    stack_cube_sft_rl.run_jobs(jobs, args)
    assert [(tmp_path / "logs" / f"j{i}.log").read_text() for i in range(2)] == ["0\n", "0\n"]


def test_stack_cube_pipeline_runs_each_rl_job_data_parallel_on_a_gpu_group(tmp_path):
    args = stack_cube_sft_rl.Args(out=tmp_path, gpus=[0, 1, 2, 3], rl_gpus_per_run=2, rl_num_envs=512)
    assert stack_cube_sft_rl.gpu_slots(args, 2) == ["0,1", "2,3"] and stack_cube_sft_rl.gpu_slots(args) == list("0123")
    jobs = stack_cube_sft_rl.phase_jobs("rl", args)
    assert [j.name for j in jobs] == ["ppo_lr1e-06", "grpo_lr1e-06"]
    for job in jobs:
        assert job.cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        cfg = train_script.parse(job.cmd[6:])  # after train.py: the same flags as on one GPU
        assert cfg.env.num_envs == 512 and cfg.run_dir == str(tmp_path / job.name)
    with pytest.raises(SystemExit, match="does not split into groups of 3 GPUs"):
        stack_cube_sft_rl.gpu_slots(args, 3)


def test_policy_profile_sorts_kernels_by_kind_and_sums_to_the_total(tmp_path):
    from benchmarks import policy_profile

    # kernel names from the H100 profiles of the 3B model (eager, then regional compile)
    assert policy_profile.kind("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "matmul"
    assert policy_profile.kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert policy_profile.kind("void at::native::vectorized_layer_norm_kernel<float, float, false>") == "other"
    assert policy_profile.kind("triton_per_fused__scaled_dot_product_cudnn_attention__to_copy_add_cat") == "other"
    assert policy_profile.kind("triton_mm_1658") == "matmul" and policy_profile.kind("aten::addmm") == "matmul"
    table = policy_profile.main(policy_profile.Args(preset="gr00t-tiny", device="cpu", batch_size=2, warmup=1,
                                                    calls=1, top=5, ops=4, out=tmp_path))
    assert (tmp_path / "results.md").read_text() == table
    total = float(table.split(": ")[1].split(" ms")[0])
    kinds = {row.split(" | ")[0][2:]: float(row.split(" | ")[1]) for row in table.splitlines()
             if row.startswith(("| matmul |", "| attention |", "| other |"))}
    assert set(kinds) == {"matmul", "attention", "other"} and sum(kinds.values()) == pytest.approx(total, abs=0.2)
    kernel_rows, op_rows = [], []
    for row in table.splitlines():
        if row.startswith("| `"):
            (op_rows if row.startswith("| `aten::") and row.count(" | ") == 4 else kernel_rows).append(row.split(" | "))
    assert len(kernel_rows) == 5
    # --ops: the 4 ATen ops with the most time, by input shapes, slowest first; eager here (no --compile)
    assert len(op_rows) == 4 and {r[2] for r in op_rows} == {"eager"}
    assert all(r[1].startswith("[[") for r in op_rows)
    times = [float(r[3]) for r in op_rows]
    assert times == sorted(times, reverse=True) and times[-1] > 0


def test_stack_cube_report_intervals_gains_and_milestones(tmp_path):
    """report() from eval summaries the test writes: Wilson intervals (hand-computed), gains, whether the intervals
    are apart, and the milestone table."""
    args = stack_cube_sft_rl.Args(out=tmp_path, rl_algos=["ppo", "grpo"], device="cpu")
    names = ["sft", "ppo_lr1e-06", "grpo_lr1e-06"]
    successes = {"sft": 64, "ppo_lr1e-06": 128, "grpo_lr1e-06": 80}  # of 256
    for i, name in enumerate(names):
        ckpt = tmp_path / name / "checkpoints" / "iter_000004"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"iteration": 4, "global_step": 1000 * i}))
        (tmp_path / "eval" / name).mkdir(parents=True)
        rate = successes[name] / 256
        (tmp_path / "eval" / name / "summary.json").write_text(json.dumps(
            {"checkpoint": str(ckpt), "success_rate": rate, "num_episodes": 256,
             "milestone_rates": {"reach_red": 1.0, "place_green": rate}}))
    (tmp_path / "ppo_lr1e-06" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "perf/rollout_time": 50.0, "perf/update_time": 10.0}) for s in (500, 1000)))
    open_loop = tmp_path / "eval" / "sft_open_loop"  # what sft_open_loop.py wrote
    open_loop.mkdir()
    (open_loop / "results.md").write_text("| expert phase | frames |\n|---|---:|\n| round 1 approach | 7 |\n")
    (open_loop / "results.json").write_text(json.dumps({"rows": [{"phase": "round 1 approach", "frames": 7}]}))
    results = stack_cube_sft_rl.report(args)
    assert results["sft_open_loop"] == [{"phase": "round 1 approach", "frames": 7}]
    rows = {r["model"]: r for r in results["rows"]}
    # Wilson, z = 1.96: 64/256 -> centre (0.25 + z^2/512) / (1 + z^2/256) = 0.25370, half-width
    # z sqrt(0.25 * 0.75 / 256 + z^2 / (4 * 256^2)) / (1 + z^2/256) = 0.05278
    assert rows["sft"]["ci95"] == pytest.approx((0.20092, 0.30648), abs=1e-5)
    assert rows["ppo_lr1e-06"]["ci95"] == pytest.approx((0.43921, 0.56079), abs=1e-5)
    assert rows["ppo_lr1e-06"]["gain_points"] == pytest.approx(25.0) and rows["ppo_lr1e-06"]["clear_of_sft"]
    assert rows["grpo_lr1e-06"]["gain_points"] == pytest.approx(6.25) and not rows["grpo_lr1e-06"]["clear_of_sft"]
    assert rows["sft"]["gain_points"] is None and rows["sft"]["clear_of_sft"] is None
    assert rows["ppo_lr1e-06"]["train_minutes"] == pytest.approx(2.0)  # the two records up to its global step 1000
    markdown = (tmp_path / "results.md").read_text()
    assert "| ppo_lr1e-06 | 0.500 [0.439, 0.561] (256 ep) | +25.0 points | yes | 4 | 1,000 | 2.0 min |" in markdown
    assert "| grpo_lr1e-06 | 0.312 [0.259, 0.372] (256 ep) | +6.2 points | no | 4 | 2,000 |  |" in markdown
    assert "| model | reach_red | place_green |" in markdown and "| sft | 1.000 | 0.250 |" in markdown
    assert markdown.endswith("by expert phase (`benchmarks/sft_open_loop.py`):\n\n| expert phase | frames |\n"
                             "|---|---:|\n| round 1 approach | 7 |\n")
    assert (tmp_path / "success_vs_env_steps.png").is_file()


def test_sft_throughput_times_the_steady_steps_hand_computed():
    # batch 8, logged every 10 steps; the run is timed from the first logged step at or after warm-up 15 (step 20)
    metrics = [{"step": s, "time": t, "sft/loss": 1.0} for s, t in [(10, 100.0), (20, 130.0), (30, 132.0), (40, 134.5)]]
    assert sft_throughput.steady_frames_per_s(metrics, warmup=15, batch_size=8) == pytest.approx(8 * 20 / 4.5)
    with pytest.raises(ValueError, match="no two logged steps at or after step 40"):
        sft_throughput.steady_frames_per_s(metrics, warmup=40, batch_size=8)


def test_sft_throughput_commands_are_valid_and_differ_only_in_compile(tmp_path):
    args = sft_throughput.Args(dataset=tmp_path / "demos", policies=("gr00t-tiny",), iterations=50,
                               random_crop=False)
    configs = {}
    for compile in (False, True):
        cmd = sft_throughput.sft_command(args, "gr00t-tiny", 126, 4, compile, tmp_path / "run")
        assert cmd[1:3] == ["train.py", "sft"]
        configs[compile] = train_script.parse(cmd[2:])
    eager, compiled = configs[False], configs[True]
    assert isinstance(eager, sft.SFTConfig) and not eager.compile and compiled.compile
    assert (eager.num_iterations, eager.batch_size, eager.policy, eager.gr00t_image_size, eager.tune_visual,
            eager.random_crop) == (50, 4, "gr00t-tiny", 126, True, False)
    assert {**vars(eager), "compile": True} == vars(compiled)
    assert not eager.tune_llm
    with_llm = sft_throughput.sft_command(dataclasses.replace(args, tune_llm=True), "gr00t-tiny", 126, 4, False,
                                          tmp_path / "run")
    assert {**vars(eager), "tune_llm": True} == vars(train_script.parse(with_llm[2:]))


def test_sft_throughput_runs_every_batch_size_and_blocks_and_compares_with_the_first(tmp_path, monkeypatch):
    (tmp_path / "demos" / "meta").mkdir(parents=True)
    (tmp_path / "demos" / "meta" / "info.json").write_text(json.dumps({"total_frames": 3071}))
    runs = []

    def fake_run(args, policy, px, batch_size, compile):  # frames/s: 100 per 64 frames of batch, x1.5 compiled,
        runs.append((policy, px, batch_size, compile))  # x2 at 126 px
        return {"policy": policy, "model_px": px, "batch_size": batch_size, "compile": compile, "final_loss": 0.5,
                "frames_per_s": 100.0 * batch_size / 64 * (1.5 if compile else 1.0) * (2 if px == 126 else 1),
                "wall_s": 60.0}

    monkeypatch.setattr(sft_throughput, "run_sft", fake_run)
    rows = sft_throughput.main(sft_throughput.Args(dataset=tmp_path / "demos", batch_sizes=(64, 256),
                                                   model_sizes=(224, 126), blocks=("compile",), device="cpu",
                                                   out=tmp_path / "out"))
    assert runs == [("gr00t-small", 224, 64, True), ("gr00t-small", 224, 256, True), ("gr00t-small", 126, 64, True),
                    ("gr00t-small", 126, 256, True)]
    assert [r["speedup"] for r in rows] == [1.0, 4.0, 2.0, 8.0]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| gr00t-small | 224 | 256 | compiled | 600 | 2.34 | 4.00x | 0.5000 | 60 s |" in markdown
    assert "| gr00t-small | 126 | 256 | compiled | 1200 | 4.69 | 8.00x | 0.5000 | 60 s |" in markdown
    assert json.loads((tmp_path / "out" / "results.json").read_text())["args"]["batch_sizes"] == [64, 256]


def test_sft_throughput_writes_a_cpu_rate_to_three_digits():
    assert [sft_throughput.three_digits(x) for x in (1670.4, 100.0, 99.94, 2.28118, 0.0653)] == \
        ["1670", "100", "99.9", "2.28", "0.0653"]


def test_sft_throughput_refuses_a_warmup_that_leaves_nothing_to_time(tmp_path):
    with pytest.raises(SystemExit, match="--warmup 95 leaves fewer than the 10 logged steps"):
        sft_throughput.check(sft_throughput.Args(dataset=tmp_path, iterations=100, warmup=95))
    with pytest.raises(SystemExit, match="is not a LeRobot v2 dataset"):
        sft_throughput.check(sft_throughput.Args(dataset=tmp_path, iterations=100, warmup=10))
    with pytest.raises(SystemExit, match="--batch-sizes needs one or more positive sizes, got \\[64, 0\\]"):
        sft_throughput.check(sft_throughput.Args(dataset=tmp_path, batch_sizes=(64, 0)))
    with pytest.raises(SystemExit, match="--model-sizes needs one or more multiples of 14.*got \\[224, 100\\]"):
        sft_throughput.check(sft_throughput.Args(dataset=tmp_path, model_sizes=(224, 100)))
    with pytest.raises(SystemExit, match="--blocks needs eager, compile or both"):
        sft_throughput.check(sft_throughput.Args(dataset=tmp_path, blocks=()))


def fake_sft_run(out: Path, successes: int, random_crop: bool, exec_horizon: int | None,
                 policy: str = "gr00t-small", trained_steps: int = 2500) -> Path:
    """A stack_cube_sft_rl.py output folder with only an evaluated SFT model: its config, demos meta, export
    (config.json alone) and eval (its summary.json with the protocol, as eval.py writes it)."""
    demos = out / "demos"
    (demos / "meta").mkdir(parents=True)
    (demos / "meta" / "info.json").write_text(json.dumps({"total_episodes": 600, "total_frames": 220_000}))
    (demos / "meta" / "recording.json").write_text(json.dumps({"action_noise": 0.01}))
    ckpt = out / "sft" / "checkpoints" / f"iter_{trained_steps:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"iteration": trained_steps}))
    (out / "sft" / "gr00t").mkdir()
    (out / "sft" / "gr00t" / "config.json").write_text("{}")
    (out / "sft" / "config.json").write_text(json.dumps(
        {"dataset": str(demos), "policy": policy, "num_iterations": 2500, "batch_size": 64,
         "learning_rate": 1e-4, "tune_visual": True, "random_crop": random_crop, "color_jitter": False, "seed": 1,
         "env": {"image_size": 128}}))
    (out / "eval" / "sft").mkdir(parents=True)
    (out / "eval" / "sft" / "summary.json").write_text(json.dumps(
        {"checkpoint": str(ckpt), "success_rate": successes / 256, "num_episodes": 256, "seed": 12345,
         "deterministic": True, "action_exec_horizon": exec_horizon, "task": "IsaacContrib-Stack-Cube", "device": "CPU",
         "milestone_rates": {"reach_red": 0.9, "place_green": successes / 256}}))
    stack_cube_sft_rl.report(stack_cube_sft_rl.Args(out=out, rl_algos=[], device="cpu"))
    return out


def test_sft_levers_table_shows_only_the_settings_that_differ(tmp_path):
    runs = [fake_sft_run(tmp_path / "base", 64, False, None), fake_sft_run(tmp_path / "crop", 128, True, None),
            fake_sft_run(tmp_path / "crop8", 80, True, 8)]
    recipe = json.loads((runs[0] / "results.json").read_text())["sft_recipe"]
    assert recipe["demos"] == {"episodes": 600, "frames": 220_000, "recording": {"action_noise": 0.01}}
    rows = sft_levers.main(sft_levers.Args(runs=runs, out=tmp_path / "levers"))
    assert [r["settings"]["random crop"] for r in rows] == [False, True, True]
    assert rows[0]["settings"]["passes"] == 0.73  # 2500 steps x 64 / 220,000 frames
    markdown = (tmp_path / "levers" / "results.md").read_text()
    assert markdown.startswith("Shared by every run: demos 600, demo noise 0.01, policy gr00t-small, model px 224, SFT steps 2500, "
                               "batch 64, passes 0.73, lr 0.0001")
    assert "| run | random crop | eval actions per chunk | SFT success [95 % interval] | reach_red | place_green |" in markdown
    # the Wilson intervals of 64/256 and 128/256 as in test_stack_cube_report_intervals_gains_and_milestones
    assert "| base | no | all (16) | 0.250 [0.201, 0.306] (256 ep) | 0.900 | 0.250 |" in markdown
    assert "| crop8 | yes | 8 | 0.312 [0.259, 0.372] (256 ep) | 0.900 | 0.312 |" in markdown
    assert "deterministic actions, the first 8 actions of each chunk executed;" in (runs[2] / "results.md").read_text()
    assert "deterministic actions;" in (runs[0] / "results.md").read_text()
    with pytest.raises(SystemExit, match="results.json is missing"):
        sft_levers.main(sft_levers.Args(runs=[tmp_path / "nowhere"], out=tmp_path / "levers"))
    # a run that --sft-minutes stopped early shows the steps it made, not the ones planned
    short = fake_sft_run(tmp_path / "short", 64, False, None, trained_steps=1000)
    (row,) = sft_levers.main(sft_levers.Args(runs=[short], out=tmp_path / "levers_short"))
    assert row["settings"]["SFT steps"] == 1000 and row["settings"]["passes"] == 0.29  # 1000 x 64 / 220,000
    # evals of one report made with different protocols do not compare
    summary = json.loads((runs[0] / "eval" / "sft" / "summary.json").read_text())
    (runs[0] / "eval" / "ppo_lr1e-06").mkdir()
    (runs[0] / "eval" / "ppo_lr1e-06" / "summary.json").write_text(json.dumps({**summary, "seed": 7}))
    with pytest.raises(SystemExit, match="the evals under the output folder differ in {'seed': \\['12345', '7'\\]}"):
        stack_cube_sft_rl.report(stack_cube_sft_rl.Args(out=runs[0], rl_algos=["ppo"], device="cpu"))


def test_sft_levers_adds_up_a_model_trained_by_two_sft_runs_in_a_row(tmp_path):
    first = fake_sft_run(tmp_path / "first", 64, True, None)
    second = fake_sft_run(tmp_path / "second", 96, True, None, policy=str(first / "sft" / "gr00t"))
    recipe = json.loads((second / "results.json").read_text())["sft_recipe"]
    assert recipe["config"]["policy"] == str(first / "sft" / "gr00t")
    assert recipe["continues"]["config"]["policy"] == "gr00t-small" and "continues" not in recipe["continues"]
    assert recipe["continues"]["demos"]["frames"] == 220_000
    rows = sft_levers.main(sft_levers.Args(runs=[first, second], out=tmp_path / "levers"))
    # 2 x 2500 steps x 64 / 220,000 frames; the policy is where the first run started
    assert rows[1]["settings"]["passes"] == 1.45
    assert rows[1]["settings"]["policy"] == "gr00t-small"
    markdown = (tmp_path / "levers" / "results.md").read_text()
    assert "| run | SFT steps | batch | passes | SFT success [95 % interval] | reach_red | place_green |" in markdown
    assert "| second | 2500+2500 | 64+64 | 1.45 | 0.375 [" in markdown
    # the pipeline's own report names the preset the model started from, not the export it continued
    assert "GR00T `gr00t-small`: SFT on 600 expert demos (2 SFT runs in a row), then RL" in (
        second / "results.md").read_text()


def test_sft_levers_grows_an_earlier_table(tmp_path):
    """An earlier table's results.json stands for its rows; a column added since shows "?" in its old rows."""
    sft_levers.main(sft_levers.Args(runs=[fake_sft_run(tmp_path / "base", 64, False, None)], out=tmp_path / "old"))
    old = json.loads((tmp_path / "old" / "results.json").read_text())
    del old[0]["settings"]["language model trained"]
    (tmp_path / "old" / "results.json").write_text(json.dumps(old))
    crop = fake_sft_run(tmp_path / "crop", 128, True, None)
    config = json.loads((crop / "sft" / "config.json").read_text())
    (crop / "sft" / "config.json").write_text(json.dumps({**config, "tune_llm": True}))
    stack_cube_sft_rl.report(stack_cube_sft_rl.Args(out=crop, rl_algos=[], device="cpu"))
    rows = sft_levers.main(sft_levers.Args(runs=[tmp_path / "old" / "results.json", crop], out=tmp_path / "new"))
    assert [Path(r["run"]).name for r in rows] == ["base", "crop"]
    markdown = (tmp_path / "new" / "results.md").read_text()
    assert "| run | language model trained | random crop | SFT success [95 % interval] |" in markdown
    assert "| base | ? | no | 0.250 [0.201, 0.306] (256 ep) |" in markdown
    assert "| crop | yes | yes | 0.500 [" in markdown
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="bad.json is not the results.json of an sft_levers table"):
        sft_levers.main(sft_levers.Args(runs=[tmp_path / "bad.json"], out=tmp_path / "new"))


def test_demo_loading_decodes_every_episode_both_ways_and_restores_the_switch(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv(demo_loading.SWITCH, "1")
    writer = LeRobotWriter(tmp_path / "ds", fps=20, image_size=16)
    for length in (3, 5):
        images = {k: np.zeros((length, 16, 16, 3), np.uint8) for k in ("image", "wrist_image")}
        writer.add_episode(images, np.zeros((length, 8), np.float32), np.zeros((length, 7), np.float32), "t")
    writer.close()
    rows = demo_loading.main(demo_loading.Args(dataset=tmp_path / "ds", held_gb=(0.0, 0.01), out=tmp_path / "out"))
    assert [r["held_gb"] for r in rows] == [0.0, 0.01]
    assert all(r["fork_s"] > 0 and r["vfork_s"] > 0 for r in rows)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "(2 episodes of `ds`, 2 videos each)" in markdown and "| 0.01 GB |" in markdown
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == rows
    assert demo_loading.os.environ[demo_loading.SWITCH] == "1"


def test_demo_loading_refuses_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="is not a LeRobot v2 dataset"):
        demo_loading.check(demo_loading.Args(dataset=tmp_path))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text("{}")
    with pytest.raises(SystemExit, match="--held-gb must be 0 or more"):
        demo_loading.check(demo_loading.Args(dataset=tmp_path, held_gb=(-1.0,)))


def test_sft_loss_curves_pairs_the_runs_steps_window_by_window(tmp_path):
    def fake_run(name, losses, **config):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"seed": 1, "run_dir": str(run), "env": {"image_size": 128},
                                                     **config}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "sft/loss": v}) + "\n"
                                                   for s, v in losses.items()))
        return run

    base = fake_run("frozen", {10: 1.0, 20: 0.8, 30: 0.6, 40: 0.5}, tune_llm=False)
    other = fake_run("trained", {10: 1.2, 20: 0.6, 30: 0.5, 40: 0.5}, tune_llm=True, env={"image_size": 64})
    rows = sft_loss_curves.main(sft_loss_curves.Args(runs=[base, other], window=20, out=tmp_path / "out"))
    assert [r["steps"] for r in rows] == [[1, 20], [21, 40]] and [r["logged"] for r in rows] == [2, 2]
    assert rows[0]["mean_loss"] == pytest.approx([0.9, 0.9]) and rows[0]["lower_at"] == [1]
    assert rows[1]["mean_loss"] == pytest.approx([0.55, 0.5]) and rows[1]["difference"] == pytest.approx([-0.05])
    assert rows[1]["lower_at"] == [1]  # step 40 is a tie: not lower
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert markdown.startswith("Settings that differ: env.image_size: frozen 128, trained 64; "
                               "tune_llm: frozen False, trained True.")  # run_dir left out
    assert "| 1–20 | 2 | 0.900 | 0.900 | +0.000 | 1/2 |" in markdown
    assert "| 21–40 | 2 | 0.550 | 0.500 | -0.050 | 1/2 |" in markdown
    fake_run("elsewhere", {15: 1.0})
    with pytest.raises(SystemExit, match="logged no step in common"):
        sft_loss_curves.main(sft_loss_curves.Args(runs=[base, tmp_path / "elsewhere"], out=tmp_path / "x"))
    with pytest.raises(SystemExit, match="is not a train.py sft run directory"):
        sft_loss_curves.main(sft_loss_curves.Args(runs=[base, tmp_path / "missing"], out=tmp_path / "x"))
