"""End to end: train.py's CLI, exact resume, logging, checkpoints, eval.py, and clear errors for bad input."""

import json
import warnings

import imageio.v2 as imageio
import pytest
import torch

import eval as eval_script
import train as train_script
from tests.algos_toy_env import ToyCameraEnv, ToyEnv, ToyEnvNoState, without_timing

SMALL = ["--policy", "mlp", "--env.task", "toy", "--env.device", "cpu", "--mlp.hidden-sizes", "16", "16",
         "--save-every", "2"]
DESIGN_METRICS = ["actor/loss", "actor/value_loss", "actor/grad_norm", "actor/approx_kl", "actor/pg_clipfrac",
                  "actor/value_clip_ratio", "rollout/returns_mean", "rollout/advantages_mean", "env/episode_len",
                  "env/success_once", "charts/SPS"]


def _same_run(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
    assert [without_timing(h) for h in a["history"]] == [without_timing(h) for h in b["history"]]


@pytest.mark.parametrize("algo, flags", [("ppo", ["--env.num-envs", "4", "--num-steps", "6"]),
                                         ("grpo", ["--env.num-envs", "4", "--group-size", "2",
                                                   "--env.max-episode-steps", "12", "--num-minibatches", "2"])])
def test_resume_continues_exactly(tmp_path, monkeypatch, algo, flags):
    monkeypatch.setattr("envs.make_env", ToyEnv)
    straight = train_script.main([algo, *SMALL, *flags, "--num-iterations", "4", "--run-dir", str(tmp_path / "a")])
    first = train_script.main([algo, *SMALL, *flags, "--num-iterations", "2", "--run-dir", str(tmp_path / "b")])
    # the checkpoint's config is the default: only the iteration count is given again
    resumed = train_script.main([algo, "--resume", str(tmp_path / "b"), "--num-iterations", "4"])
    assert len(first["history"]) == 2 and len(resumed["history"]) == 2
    _same_run(straight, {"params": resumed["params"], "history": first["history"] + resumed["history"]})
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").iterdir())] == ["iter_000002", "iter_000004"]
    state = lambda run: json.loads((tmp_path / run / "checkpoints" / "iter_000004" / "state.json").read_text())  # noqa
    assert state("b")["iteration"] == 4 and state("b")["global_step"] == state("a")["global_step"] > 0


def test_a_resume_after_a_crash_logs_each_step_once(tmp_path, monkeypatch, capsys):
    """A run stopped between checkpoints (iter 4 was never written) logged iterations 3 and 4 already: resumed
    from iter 2 it logs them anew, so metrics.jsonl and TensorBoard drop the first records of those steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr("envs.make_env", ToyEnv)
    flags = [*SMALL, "--env.num-envs", "4", "--num-steps", "6", "--num-iterations", "4"]
    train_script.main(["ppo", *flags, "--run-dir", str(tmp_path / "a")])
    train_script.main(["ppo", *flags, "--run-dir", str(tmp_path / "b")])
    checkpoints = tmp_path / "b" / "checkpoints"
    import shutil
    shutil.rmtree(checkpoints / "iter_000004")  # the crash
    # a checkpoint with a later one beside it is refused: the continuation would mix with that run's future
    with pytest.raises(SystemExit):
        train_script.main(["ppo", "--resume", str(tmp_path / "a" / "checkpoints" / "iter_000002")])
    assert "holds later checkpoints (iter_000004)" in capsys.readouterr().err
    train_script.main(["ppo", "--resume", str(tmp_path / "b"), "--num-iterations", "4"])
    records = {run: [without_timing(json.loads(line)) for line in (tmp_path / run / "metrics.jsonl").read_text()
                     .splitlines()] for run in ("a", "b")}
    assert [r["step"] for r in records["b"]] == [24, 48, 72, 96]
    assert [{k: v for k, v in r.items() if k != "time"} for r in records["b"]] == \
           [{k: v for k, v in r.items() if k != "time"} for r in records["a"]]
    events = EventAccumulator(str(tmp_path / "b"))
    events.Reload()
    assert [e.step for e in events.Scalars("actor/loss")] == [24, 48, 72, 96]


def test_resume_without_env_state_restarts_episodes_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr("envs.make_env", ToyEnvNoState)
    train_script.main(["ppo", *SMALL, "--env.num-envs", "2", "--num-steps", "4", "--num-iterations", "1",
                       "--run-dir", str(tmp_path)])
    with pytest.warns(UserWarning, match="does not continue bit-exactly"):
        out = train_script.main(["ppo", "--resume", str(tmp_path), "--num-iterations", "2"])
    assert len(out["history"]) == 1


def test_logs_tensorboard_metrics_and_config(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr("envs.make_env", ToyEnv)
    train_script.main(["ppo", *SMALL, "--env.num-envs", "4", "--num-steps", "16", "--env.max-episode-steps", "10",
                       "--num-iterations", "2", "--run-dir", str(tmp_path), "--exp-name", "tb"])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert set(DESIGN_METRICS) <= tags, set(DESIGN_METRICS) - tags
    assert [e.step for e in events.Scalars("actor/loss")] == [64, 128]  # global env steps
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["algo"] == "ppo" and config["exp_name"] == "tb" and config["env"]["num_envs"] == 4
    # the same scalars as JSON lines, plus the timing that benchmarks/scaling.py reads
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [64, 128]
    assert lines[1]["actor/loss"] == pytest.approx(events.Scalars("actor/loss")[1].value, rel=1e-6)
    assert all(r["perf/rollout_time"] > 0 and r["perf/update_time"] > 0 and r["perf/peak_memory_gb"] == 0
               for r in lines)
    # per milestone, the share of finished episodes that reached it; the toy's last milestone is its success
    assert all(1 >= r["env/reached_near"] >= r["env/reached_centre"] == r["env/success_once"] for r in lines)


def test_wandb_offline_logging(tmp_path, monkeypatch):
    monkeypatch.setattr("envs.make_env", ToyEnv)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_script.main(["ppo", *SMALL, "--env.num-envs", "2", "--num-steps", "4", "--num-iterations", "1",
                       "--run-dir", str(tmp_path), "--track", "--wandb-mode", "offline"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_eval_writes_summary_and_videos(tmp_path, monkeypatch):
    monkeypatch.setattr("envs.make_env", ToyCameraEnv)
    train_script.main(["ppo", *SMALL, "--env.num-envs", "2", "--num-steps", "4", "--env.max-episode-steps", "6",
                       "--num-iterations", "1", "--run-dir", str(tmp_path)])
    summary = eval_script.main(["--checkpoint", str(tmp_path), "--num-episodes", "3", "--num-videos", "1"])
    assert summary["num_episodes"] == 3 and summary["iteration"] == 1
    assert [e["env"] for e in summary["episodes"]] == [0, 1, 0]  # 2 + 1 episodes spread over the 2 envs
    assert summary["return_mean"] == pytest.approx(sum(e["return"] for e in summary["episodes"]) / 3)
    out = tmp_path / "eval" / "iter_000001"
    assert json.loads((out / "summary.json").read_text())["success_rate"] == summary["success_rate"]
    rates = summary["milestone_rates"]  # the toy's milestones: |x| < 0.5, then success
    assert list(rates) == ["near", "centre"] and rates["centre"] == summary["success_rate"]
    assert rates["near"] == sum("near" in e["milestones"] for e in summary["episodes"]) / 3
    frames = imageio.mimread(out / "episode_0.mp4")
    length = summary["episodes"][0]["length"]
    assert len(frames) == length + 1 and frames[0].shape == (16, 16, 3)  # every step + the final verdict


@pytest.mark.parametrize("argv, message", [
    (["ppo", "--no-such-flag"], "no-such-flag"),
    (["ppo", "--env.num-envs", "many"], "many"),
    (["ppo", "--num-steps", "0"], "--num-steps must be >= 1"),
    (["ppo", "--dual-clip", "0.5"], "--dual-clip must be > 1"),
    (["ppo", "--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
    (["ppo", "--vf-clip-coef", "-0.2"], "--vf-clip-coef must be > 0, got -0.2"),
    (["ppo", "--max-grad-norm", "0"], "--max-grad-norm must be > 0, got 0.0"),
    (["ppo", "--value-warmup-iterations", "-1"], "--value-warmup-iterations must be >= 0, got -1"),
    (["grpo", "--group-size", "1"], "--group-size must be >= 2"),
    (["grpo", "--adv-eps", "0"], "--adv-eps must be > 0, got 0.0"),
    (["grpo", "--clip-coef", "1.5"], "--clip-coef must be in (0, 1), got 1.5"),
    (["ppo", "--lr-schedule", "adaptive", "--learning-rate", "3e-7"], "--learning-rate 3e-07 is outside --adaptive-lr"),
    (["grpo", "--env.num-envs", "3", "--group-size", "2"], "not divisible by --group-size 2"),
    (["ppo", "--resume", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
    (["grpo", "--max-minutes", "0"], "--max-minutes must be > 0, got 0.0"),
    (["ppo", "--policy", "mlp", "--compile"], "--policy mlp has no fast path"),
    # SFT steps no env and has no RL head: it refuses their flags rather than ignoring them
    (["sft", "--cuda-graphs"], "--cuda-graphs"),
    (["sft", "--gr00t-noise-level", "0.3"], "--gr00t-noise-level"),
    (["sft", "--env.num-envs", "4"], "--env.num-envs"),
])
def test_bad_flags_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [([], "no checkpoint at"),
                                            (["--action-exec-horizon", "0"], "--action-exec-horizon must be >= 1")])
def test_eval_bad_input_is_a_clear_error(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["--checkpoint", str(tmp_path / "missing"), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_resume_with_the_other_algorithm_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("envs.make_env", ToyEnv)
    train_script.main(["ppo", *SMALL, "--env.num-envs", "2", "--num-steps", "2", "--num-iterations", "1",
                       "--run-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        train_script.main(["grpo", "--resume", str(tmp_path)])
    assert "is a ppo run, not grpo" in capsys.readouterr().err


# ---- the real kit-less Isaac Lab env (the first env of the pytest process costs ~20 s; later ones ~1 s) ----------
STACK = ["--env.image-size", "64", "--env.max-episode-steps", "16", "--env.device", "cpu"]  # 1 decision/episode


def test_default_job_on_stack_cube_end_to_end_then_eval_and_resume(tmp_path):
    """The default job (GR00T-tiny, stack-cube, PPO) shortened to 2 iterations of 1 decision (16 env steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train_script.main(["ppo", *STACK, "--num-iterations", "2", "--num-steps", "1", "--save-every", "1",
                             "--run-dir", str(tmp_path)])
    assert [h["charts/iteration"] for h in out["history"]] == [1, 2]
    assert out["history"][-1]["env/episode_len"] == 16.0  # every episode hit the 16-step limit
    ckpt = tmp_path / "checkpoints" / "iter_000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["policy"]["base"]["policy"] == "gr00t-tiny" and state["global_step"] == 2 * 16 * 2
    from safetensors.torch import load_file

    saved = load_file(ckpt / "policy.safetensors")
    assert sorted(saved) == state["policy"]["trainable"] and any(k.startswith("value_head.") for k in saved)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(DESIGN_METRICS) <= set(events.Tags()["scalars"])

    summary = eval_script.main(["--checkpoint", str(tmp_path), "--num-episodes", "2", "--num-videos", "1",
                                "--device", "cpu"])
    assert summary["num_episodes"] == 2 and all(e["length"] == 16 for e in summary["episodes"])
    frames = imageio.mimread(tmp_path / "eval" / "iter_000002" / "episode_0.mp4")
    assert len(frames) == 17 and frames[0].shape == (64, 64, 3)

    with warnings.catch_warnings():  # the env's state is in the checkpoint: the episodes continue
        warnings.filterwarnings("error", message=".*bit-exactly")
        resumed = train_script.main(["ppo", "--resume", str(tmp_path), "--num-iterations", "3"])
    assert [h["charts/iteration"] for h in resumed["history"]] == [3]
    assert json.loads((tmp_path / "checkpoints" / "iter_000003" / "state.json").read_text())["global_step"] == 96


def test_grpo_on_stack_cube(tmp_path):
    out = train_script.main(["grpo", *STACK, "--env.num-envs", "2", "--group-size", "2", "--num-iterations", "1",
                             "--run-dir", str(tmp_path)])
    h = out["history"][0]
    assert h["rollout/decisions"] == 2.0 and h["env/episodes"] == 2.0  # one 16-step decision per env
    assert (tmp_path / "checkpoints" / "iter_000001" / "state.json").is_file()


def test_ppo_on_a_two_instruction_env_gives_each_env_its_own_prompt(tmp_path, monkeypatch):
    """Lift-red-or-blue: every rollout and bootstrap call of GR00T gets the env's two instructions, one per env
    (left-padded and masked in one batch), and PPO trains on the mixed rollout."""
    from models.gr00t_processor import Gr00tProcessor

    seen = []
    prompts = Gr00tProcessor.prompts
    monkeypatch.setattr(Gr00tProcessor, "prompts", lambda self, instruction, n: (seen.append(instruction),
                                                                                 prompts(self, instruction, n))[1])
    out = train_script.main(["ppo", *STACK, "--env.task", "Leanvla-Lift-Red-Or-Blue-Cube-Franka-IK-Rel-Visuomotor",
                             "--env.num-envs", "2", "--num-iterations", "1", "--num-steps", "1",
                             "--recompute-logprob", "--run-dir", str(tmp_path)])
    assert seen and all(s == ["Pick up the red block.", "Pick up the blue block."] for s in seen)
    history = out["history"][0]
    assert history["env/episode_len"] == 16.0 and history["rollout/logprob_gap"] < 1e-4  # fp32: evaluate agrees


def test_grpo_refuses_groups_that_mix_instructions(tmp_path, capsys):
    """Lift-red-or-blue with 2 envs has one red and one blue env: a group of 2 would compare two tasks."""
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["grpo", *STACK, "--env.task", "Leanvla-Lift-Red-Or-Blue-Cube-Franka-IK-Rel-Visuomotor",
                           "--env.num-envs", "2", "--group-size", "2", "--num-iterations", "1",
                           "--run-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "groups [0] of Leanvla-Lift-Red-Or-Blue" in capsys.readouterr().err


def test_resume_on_cartpole_continues_exactly(tmp_path):
    """PPO on the real Isaac Lab env: 2 iterations, then 2 more after a resume, equal 4 straight. The checkpoint
    falls mid-episode (16 env steps into 10-step episodes), so this needs the env's state_dict."""
    flags = ["--policy", "mlp", "--env.task", "Isaac-Cartpole", "--env.num-envs", "2", "--env.device", "cpu",
             "--env.max-episode-steps", "10", "--num-steps", "8", "--mlp.hidden-sizes", "16", "16", "--save-every", "2"]
    straight = train_script.main(["ppo", *flags, "--num-iterations", "4", "--run-dir", str(tmp_path / "a")])
    first = train_script.main(["ppo", *flags, "--num-iterations", "2", "--run-dir", str(tmp_path / "b")])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*bit-exactly")
        resumed = train_script.main(["ppo", "--resume", str(tmp_path / "b"), "--num-iterations", "4"])
    _same_run(straight, {"params": resumed["params"], "history": first["history"] + resumed["history"]})


def test_mlp_on_cartpole(tmp_path):
    out = train_script.main(["ppo", "--policy", "mlp", "--env.task", "Isaac-Cartpole", "--env.num-envs", "4",
                             "--env.device", "cpu", "--num-steps", "8", "--num-iterations", "2",
                             "--run-dir", str(tmp_path)])
    assert out["params"]["obs_norm.count"].item() == 2 * 8 * 4
    assert all(torch.isfinite(torch.tensor(h["actor/loss"])) for h in out["history"])


def test_value_warmup_trains_the_critic_and_leaves_the_policy(tmp_path, monkeypatch):
    from algos.run import make_rl_policy

    monkeypatch.setattr("envs.make_env", ToyEnv)
    flags = [*SMALL, "--env.num-envs", "4", "--num-steps", "8", "--weight-decay", "0.1", "--run-dir", str(tmp_path)]
    out = train_script.main(["ppo", *flags, "--num-iterations", "2", "--value-warmup-iterations", "2"])
    cfg = train_script.parse(["ppo", *flags])
    _, initial, _ = make_rl_policy(cfg, ToyEnv(cfg.env), torch.device("cpu"))
    weights = [n for n in initial if n.startswith(("actor.", "log_std", "std"))]
    assert weights and all(torch.equal(out["params"][n], initial[n]) for n in weights)
    assert not torch.equal(out["params"]["critic.0.weight"], initial["critic.0.weight"])
    assert out["history"][-1]["charts/learning_rate"] == cfg.learning_rate  # restored after each update


@pytest.mark.parametrize("algo, flags", [("ppo", ["--num-steps", "4"]),
                                         ("grpo", ["--group-size", "2", "--env.max-episode-steps", "8"])])
def test_max_minutes_stops_early_with_a_checkpoint(tmp_path, monkeypatch, capsys, algo, flags):
    monkeypatch.setattr("envs.make_env", ToyEnv)
    out = train_script.main([algo, *SMALL, *flags, "--env.num-envs", "4", "--num-iterations", "5", "--save-every",
                             "4", "--max-minutes", "1e-9", "--run-dir", str(tmp_path)])
    assert len(out["history"]) == 1  # the budget ran out during the first iteration
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter_000001"]
    assert "--max-minutes 1e-09 reached; stopping" in capsys.readouterr().out


@pytest.mark.parametrize("algo, flags", [("ppo", ["--num-steps", "8"]),
                                         ("grpo", ["--group-size", "2", "--env.max-episode-steps", "8"])])
def test_sampled_and_recomputed_logprobs_agree_in_fp32(tmp_path, monkeypatch, algo, flags):
    monkeypatch.setattr("envs.make_env", ToyEnv)
    out = train_script.main([algo, *SMALL, *flags, "--env.num-envs", "4", "--num-iterations", "2",
                             "--recompute-logprob", "--run-dir", str(tmp_path)])
    assert all(0 <= h["rollout/logprob_gap"] < 1e-5 for h in out["history"])
    off = train_script.main([algo, *SMALL, *flags, "--env.num-envs", "4", "--num-iterations", "1",
                             "--run-dir", str(tmp_path / "off")])
    assert "rollout/logprob_gap" not in off["history"][0]


def test_compile_flag_compiles_the_gr00t_blocks(tmp_path):
    """--compile reaches GR00T, random init or checkpoint: its repeated blocks and its three glue norms are compiled
    (lazily, at first call)."""
    from algos.run import make_rl_policy

    def compiled_blocks(policy) -> int:
        return sum(m._compiled_call_impl is not None for m in policy.model.modules())

    flags = ["--policy", "gr00t-tiny", "--env.task", "toy", "--env.device", "cpu", "--env.num-envs", "2"]
    cfg = train_script.parse(["ppo", *flags, "--compile"])
    env = ToyCameraEnv(cfg.env)
    policy, params, _ = make_rl_policy(cfg, env, torch.device("cpu"))
    c = policy.cfg
    assert compiled_blocks(policy) == c.vision_layers + c.llm_layers + c.vl_layers + c.dit_layers + 3
    policy.save(params, str(tmp_path / "ckpt"))
    from_checkpoint = train_script.parse(["ppo", *flags, "--compile", "--policy", str(tmp_path / "ckpt")])
    loaded, _, _ = make_rl_policy(from_checkpoint, env, torch.device("cpu"))
    assert compiled_blocks(loaded) == compiled_blocks(policy)
    plain, _, _ = make_rl_policy(train_script.parse(["ppo", *flags]), env, torch.device("cpu"))
    assert compiled_blocks(plain) == 0
