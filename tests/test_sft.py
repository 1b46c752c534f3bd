"""SFT: data windows, the learning-rate schedule, learning on a small dataset, checkpoint + export round trip."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from algos import sft
from algos.checkpoint import load_params_into
from algos.config import ConfigError
from envs.config import TaskConfig
from envs.lerobot import LeRobotWriter
from tests.algos_toy_env import ToyEnv


def _write_dataset(root, episodes=2, length=12, size=32, seed=0, tasks=("stack the blocks",)):
    """Episodes whose actions are a fixed function of the state (learnable), random-looking images; episode i has
    the instruction tasks[i % len(tasks)]."""
    rng = np.random.default_rng(seed)
    writer = LeRobotWriter(root, fps=20, image_size=size)
    for i in range(episodes):
        state = rng.uniform(-1, 1, size=(length, 8)).astype(np.float32)
        action = np.concatenate([0.5 * state[:, :6], np.sign(state[:, 6:7])], axis=1).astype(np.float32)
        images = {k: rng.integers(0, 255, (length, size, size, 3)).astype(np.uint8) for k in ("image", "wrist_image")}
        writer.add_episode(images, state, action, tasks[i % len(tasks)])
    return writer.close()


def test_windows_repeat_the_last_action_past_the_episode_end(tmp_path):
    demos = sft.Demonstrations.load(_write_dataset(tmp_path / "ds", episodes=2, length=5))
    assert len(demos) == 10 and demos.rgb.shape == (10, 2, 32, 32, 3) and demos.instructions == ("stack the blocks",)
    batch = demos.batch(torch.tensor([3, 5]), horizon=4)
    # frame 3 of episode 0 (frames 0-4): steps 3, 4, 4, 4; frame 5 = first of episode 1: steps 5, 6, 7, 8
    torch.testing.assert_close(batch["actions"][0], demos.action[torch.tensor([3, 4, 4, 4])])
    torch.testing.assert_close(batch["actions"][1], demos.action[torch.tensor([5, 6, 7, 8])])
    torch.testing.assert_close(batch["state"], demos.state[torch.tensor([3, 5])])


def test_demonstrations_load_every_episode_in_place_with_any_number_of_threads(tmp_path):
    import json

    from envs.lerobot import LeRobotDataset

    rng = np.random.default_rng(1)
    writer = LeRobotWriter(tmp_path / "ds", fps=20, image_size=16)
    for length in (3, 7, 5, 4):  # unequal episodes: each lands at its own offset
        images = {k: rng.integers(0, 255, (length, 16, 16, 3)).astype(np.uint8) for k in ("image", "wrist_image")}
        writer.add_episode(images, rng.uniform(-1, 1, (length, 8)).astype(np.float32),
                           rng.uniform(-1, 1, (length, 7)).astype(np.float32), "stack the blocks")
    root = writer.close()
    one, three = sft.Demonstrations.load(root, workers=1), sft.Demonstrations.load(root, workers=3)
    for name in ("rgb", "state", "action", "episode_end", "task"):
        assert torch.equal(getattr(one, name), getattr(three, name)), name
    episode = LeRobotDataset(root).episode(2)  # frames 10-14
    assert torch.equal(one.rgb[10:15, 1], torch.from_numpy(episode.images["wrist_image"]))
    assert torch.equal(one.action[10:15], torch.from_numpy(episode.action))
    assert one.episode_end.tolist() == [2] * 3 + [9] * 7 + [14] * 5 + [18] * 4
    first_two = sft.Demonstrations.load(root, num_episodes=2)
    assert len(first_two) == 10 and torch.equal(first_two.rgb, one.rgb[:10])
    assert first_two.episode_end.tolist() == [2] * 3 + [9] * 7
    middle_two = sft.Demonstrations.load(root, num_episodes=2, first_episode=1)  # episodes 1 and 2: frames 3-14
    assert torch.equal(middle_two.rgb, one.rgb[3:15]) and torch.equal(middle_two.action, one.action[3:15])
    assert middle_two.episode_end.tolist() == [6] * 7 + [11] * 5
    assert len(sft.Demonstrations.load(root, first_episode=3)) == 4  # to the last episode
    with pytest.raises(ConfigError, match="has episodes 0 to 3; asked for episodes 2 to 4"):
        sft.Demonstrations.load(root, num_episodes=3, first_episode=2)
    # an index that disagrees with the episode's files is an error, not a silent misalignment
    lines = (root / "meta" / "episodes.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "length": 6})
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="episode 1 has 7 frames, its entry in meta/episodes.jsonl says 6"):
        sft.Demonstrations.load(root)


def test_a_dataset_of_several_tasks_gives_each_frame_its_own_instruction(tmp_path):
    root = _write_dataset(tmp_path / "ds", episodes=3, length=4, tasks=("lift the red block", "stack the blocks"))
    demos = sft.Demonstrations.load(root)
    assert demos.instructions == ("lift the red block", "stack the blocks")
    batch = demos.batch(torch.tensor([0, 5, 9, 3]), horizon=2)          # episodes 0, 1, 2, 0
    assert batch["instruction"] == ["lift the red block", "stack the blocks", "lift the red block",
                                    "lift the red block"]
    cfg = sft.SFTConfig(dataset=str(root), num_iterations=3, batch_size=6, run_dir=str(tmp_path / "run"),
                        env=TaskConfig(image_size=32), device="cpu", log_every=1)
    assert np.isfinite(sft.train(cfg)["sft/loss"])                      # a batch mixes both prompts


def test_step_frames_depend_on_seed_and_step_alone_and_cover_the_dataset_evenly():
    frames = sft.step_frames(1000, 64, seed=3, step=7)
    assert frames.dtype == torch.int64 and frames.shape == (64,) and 0 <= frames.min() and frames.max() < 1000
    assert torch.equal(frames, sft.step_frames(1000, 64, seed=3, step=7))  # drawn again: the same frames
    assert not torch.equal(frames, sft.step_frames(1000, 64, seed=3, step=8))
    assert not torch.equal(frames, sft.step_frames(1000, 64, seed=4, step=7))  # another DDP rank's seed
    counts = torch.bincount(torch.cat([sft.step_frames(10, 10, 0, step) for step in range(1000)]), minlength=10)
    assert counts.sum() == 10_000 and counts.min() > 880 and counts.max() < 1120  # binomial sd 30 about 1000


def test_sft_trains_each_step_on_its_own_frames_each_gathered_once(tmp_path, monkeypatch):
    """The loader thread gathers step k+1's batch while step k trains; every step still gets the frames of
    step_frames(..., step), in order, and no batch is gathered past the last step."""
    from models.gr00t import Gr00tPolicy

    root = _write_dataset(tmp_path / "ds", episodes=2, length=12)
    demos = sft.Demonstrations.load(root)
    gathered, trained_on = [], []
    frames_of, loss_of = sft.step_frames, Gr00tPolicy.sft_loss
    monkeypatch.setattr(sft, "step_frames", lambda n, b, seed, step: gathered.append(step) or frames_of(n, b, seed, step))
    monkeypatch.setattr(Gr00tPolicy, "sft_loss", lambda self, params, batch, generator=None:
                        trained_on.append(batch["state"].clone()) or loss_of(self, params, batch, generator))
    sft.train(sft.SFTConfig(dataset=str(root), num_iterations=3, batch_size=5, seed=3, run_dir=str(tmp_path / "run"),
                            env=TaskConfig(image_size=32), device="cpu"))
    assert gathered == [0, 1, 2] and len(trained_on) == 3
    for step, state in enumerate(trained_on):
        assert torch.equal(state, demos.state[frames_of(len(demos), 5, 3, step)]), step

    trained_on.clear()  # --num-episodes 1: every frame comes from the first episode (frames 0-11)
    sft.train(sft.SFTConfig(dataset=str(root), num_episodes=1, num_iterations=2, batch_size=5, seed=3,
                            run_dir=str(tmp_path / "run1"), env=TaskConfig(image_size=32), device="cpu"))
    assert len(trained_on) == 2
    for step, state in enumerate(trained_on):
        assert torch.equal(state, demos.state[frames_of(12, 5, 3, step)]), step


def test_sft_resumed_from_a_checkpoint_equals_a_straight_run(tmp_path):
    from safetensors.torch import load_file

    root = _write_dataset(tmp_path / "ds", episodes=2, length=12)
    common = dict(dataset=str(root), num_iterations=4, batch_size=4, save_every=2, seed=5, random_crop=True,
                  env=TaskConfig(image_size=32), device="cpu")
    sft.train(sft.SFTConfig(**common, run_dir=str(tmp_path / "straight")))
    sft.train(sft.SFTConfig(**common, run_dir=str(tmp_path / "resumed"),
                            resume=str(tmp_path / "straight" / "checkpoints" / "iter_000002")))
    straight, resumed = (load_file(tmp_path / run / "checkpoints" / "iter_000004" / "policy.safetensors")
                         for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and len(straight) > 0
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    frames = [json.loads((tmp_path / run / "checkpoints" / "iter_000004" / "state.json").read_text())["frames_seen"]
              for run in ("straight", "resumed")]
    assert frames == [16, 16]  # 4 steps of batch 4, the resumed run's counter carried over


def test_learning_rate_schedule():
    # 10 steps, 20 % warm-up = 2 steps: 0.5, 1.0 of peak, then cosine from 1 to 0 over the remaining 8
    lrs = [sft.learning_rate(s, 10, 1.0, 0.2) for s in range(10)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[6] == pytest.approx(0.5 * (1 + np.cos(np.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def _fixed_noise_loss(policy, params, demos) -> float:
    """The flow-matching loss on every frame, averaged over 4 fixed noise draws (deterministic)."""
    batch = demos.batch(torch.arange(len(demos)), policy.cfg.action_horizon)
    with torch.no_grad():
        return sum(float(policy.sft_loss(params, batch, generator=torch.Generator().manual_seed(s))) for s in range(4)) / 4


def test_random_crop_shift_makes_the_centre_crop_a_random_crop():
    from models.gr00t_processor import pixel_values

    rgb = torch.randint(0, 256, (64, 2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shifted = sft.random_crop_shift(rgb, 0.95, torch.Generator().manual_seed(1))
    assert shifted.shape == rgb.shape and shifted.dtype == torch.uint8
    # the same draws: crop origins in 0..2 (32 - int(0.95 * 32) = 2), rows first, then columns
    g = torch.Generator().manual_seed(1)
    top, left = torch.randint(0, 3, (64, 2), generator=g), torch.randint(0, 3, (64, 2), generator=g)
    assert set(top.flatten().tolist()) == set(left.flatten().tolist()) == {0, 1, 2}
    # what the model sees (its eval-mode centre crop of 30 px; no resize at image size 30) is the random crop
    seen = pixel_values(shifted, 30, crop_scale=0.95).view(64, 2, 3, 30, 30)
    for i in range(64):
        for j in range(2):
            y, x = int(top[i, j]), int(left[i, j])
            crop = rgb[i:i + 1, j:j + 1, y:y + 30, x:x + 30]
            assert torch.equal(seen[i, j], pixel_values(crop, 30, crop_scale=1.0)[0]), (i, j)


def test_sft_learns_and_exports_a_loadable_model(tmp_path):
    from models.gr00t import Gr00tPolicy

    root = _write_dataset(tmp_path / "ds", episodes=2, length=12)
    demos = sft.Demonstrations.load(root)
    cfg = sft.SFTConfig(dataset=str(root), num_iterations=60, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
                        log_every=60, save_every=30, run_dir=str(tmp_path / "run"),
                        env=TaskConfig(image_size=32), device="cpu", seed=3)
    # what train() starts from
    policy, initial, _ = sft.make_sft_policy(cfg, demos.spaces(cfg.env.task), torch.device("cpu"), False, None,
                                             sft.metadata_from_demos(demos))
    out = sft.train(cfg)
    assert np.isfinite(out["sft/loss"])
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["iter_000030", "iter_000060"]

    exported_policy, exported = Gr00tPolicy.from_pretrained(str(tmp_path / "run" / "gr00t"))
    # it fits the demonstrations: lower loss than the initial model on the same fixed noise
    assert _fixed_noise_loss(exported_policy, exported, demos) < 0.95 * _fixed_noise_loss(policy, initial, demos)
    # the RL-format checkpoint holds the same trainable tensors as the export
    restored = {n: p.clone() for n, p in initial.items()}
    load_params_into(checkpoints[-1], policy, restored)
    for name, tensor in restored.items():
        if policy.is_trainable(name):
            torch.testing.assert_close(tensor, exported[name], rtol=0, atol=0)


def test_gr00t_image_size_sets_a_presets_input_and_the_checkpoint_and_export_keep_it(tmp_path):
    """--gr00t-image-size 56 on gr00t-tiny: 4 x 4 patches = 16 image tokens per view (224: 256). What eval.py
    rebuilds from the checkpoint's config takes its params, and the export loads at the same size."""
    import json

    from algos.checkpoint import find_checkpoint
    from algos.config import config_from_dict
    from algos.run import Spaces
    from models.gr00t import Gr00tPolicy

    root = _write_dataset(tmp_path / "ds", episodes=1, length=6)
    cfg = sft.SFTConfig(dataset=str(root), num_iterations=2, batch_size=2, gr00t_image_size=56,
                        run_dir=str(tmp_path / "run"), env=TaskConfig(image_size=32), device="cpu")
    sft.train(cfg)
    ckpt = find_checkpoint(tmp_path / "run")
    state = json.loads((ckpt / "state.json").read_text())
    train_cfg = config_from_dict(sft.SFTConfig, state["config"])
    assert train_cfg.gr00t_image_size == 56
    spaces = Spaces(train_cfg.env.task, 8, 7, 2, 32)
    policy, params, _ = sft.make_sft_policy(train_cfg, spaces, torch.device("cpu"), False, state["policy"]["base"])
    assert policy.cfg.image_size == 56 and policy.cfg.tokens_per_view == 16
    load_params_into(ckpt, policy, params)  # the shapes of a 56 px model
    exported, _ = Gr00tPolicy.from_pretrained(str(tmp_path / "run" / "gr00t"))
    assert exported.cfg.image_size == 56 and exported.cfg.tokens_per_view == 16
    # bad sizes, and models whose size is not a preset's to set
    for size in (30, 0):
        with pytest.raises(ConfigError, match=f"--gr00t-image-size must be a positive multiple of 14.*got {size}"):
            sft.train(dataclasses.replace(cfg, gr00t_image_size=size))
    with pytest.raises(ConfigError, match="keeps the size it was trained at"):
        sft.make_sft_policy(dataclasses.replace(cfg, policy=str(tmp_path / "run" / "gr00t")), spaces,
                            torch.device("cpu"), False)
    with pytest.raises(ConfigError, match="--policy mlp has no images"):
        sft.make_sft_policy(dataclasses.replace(cfg, policy="mlp"), spaces, torch.device("cpu"), False)


def test_color_jitter_in_gr00t_ranges():
    torch.manual_seed(0)
    gray = torch.full((50, 2, 8, 8, 3), 100, dtype=torch.uint8)
    out = sft.color_jitter(gray)
    assert out.shape == gray.shape and out.dtype == torch.uint8
    # on a gray image contrast, saturation and hue change nothing: each view is 100 x its brightness factor
    # (in [0.7, 1.3], then truncated to an integer), the same for every pixel and channel, and drawn anew for each
    # view of each frame
    per_view = out.flatten(2).float()
    assert torch.equal(per_view.amin(-1), per_view.amax(-1))
    assert per_view.min() >= 69 and per_view.max() <= 130 and len(per_view[:, :, 0].unique()) > 20
    torch.manual_seed(0)
    assert torch.equal(sft.color_jitter(gray), out)  # torch's global RNG decides (checkpoints save it)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_random_crop_shift_on_the_gpu_equals_the_cpu():
    # SFT crops where the model runs; the same generator state gives the same crop there
    rgb = torch.randint(0, 256, (16, 2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    on_cpu = sft.random_crop_shift(rgb, 0.95, torch.Generator().manual_seed(1))
    on_gpu = sft.random_crop_shift(rgb.cuda(), 0.95, torch.Generator().manual_seed(1))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)


def test_sft_with_augmentations_augments_every_batch(tmp_path, monkeypatch):
    root = _write_dataset(tmp_path / "ds", episodes=1, length=8)
    calls, crop, jitter = [], sft.random_crop_shift, sft.color_jitter
    monkeypatch.setattr(sft, "random_crop_shift",
                        lambda rgb, scale, g: calls.append(("crop", rgb.shape, scale)) or crop(rgb, scale, g))
    monkeypatch.setattr(sft, "color_jitter", lambda rgb: calls.append(("jitter", rgb.shape)) or jitter(rgb))
    out = sft.train(sft.SFTConfig(dataset=str(root), num_iterations=2, batch_size=4, log_every=1, random_crop=True,
                                  color_jitter=True, env=TaskConfig(image_size=32), device="cpu", seed=3,
                                  run_dir=str(tmp_path / "run")))
    shape = (4, 2, 32, 32, 3)
    assert np.isfinite(out["sft/loss"]) and calls == [("crop", shape, 0.95), ("jitter", shape)] * 2


def test_sft_compile_trains_through_the_compiled_blocks(tmp_path, monkeypatch):
    """--compile hands the policy to models.gr00t_fast.accelerate (whose compiled gradients equal eager ones:
    tests/test_gr00t_fast.py) before the first step; without it the policy stays plain."""
    import models.gr00t_fast

    calls = []
    monkeypatch.setattr(models.gr00t_fast, "accelerate", lambda policy, **kw: calls.append(kw) or policy)
    root = _write_dataset(tmp_path / "ds", episodes=1, length=4)
    for compile_ in (False, True):
        sft.train(sft.SFTConfig(dataset=str(root), num_iterations=1, batch_size=2, compile=compile_,
                                env=TaskConfig(image_size=32), device="cpu", run_dir=str(tmp_path / f"run{compile_}")))
    assert calls == [{"compile": True, "cuda_graphs": False}]


def test_bad_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        sft.train(sft.SFTConfig(dataset=str(tmp_path / "missing"), device="cpu"))
    with pytest.raises(ConfigError, match="must be a GR00T preset"):
        root = _write_dataset(tmp_path / "ds", episodes=1, length=3)
        sft.train(sft.SFTConfig(dataset=str(root), policy="mlp", run_dir=str(tmp_path / "r"),
                                env=TaskConfig(image_size=32), device="cpu"))
    with pytest.raises(ConfigError, match="has 32x32 views but --env.image-size is 224; pass --env.image-size 32"):
        sft.train(sft.SFTConfig(dataset=str(root), run_dir=str(tmp_path / "r2"), device="cpu"))
    with pytest.raises(ConfigError, match="--num-episodes must be >= 1, got 0"):
        sft.train(sft.SFTConfig(dataset=str(root), num_episodes=0, device="cpu"))
    with pytest.raises(ConfigError, match="has episodes 0 to 0; asked for episodes 0 to 1"):
        sft.train(sft.SFTConfig(dataset=str(root), num_episodes=2, run_dir=str(tmp_path / "r3"),
                                env=TaskConfig(image_size=32), device="cpu"))


def test_max_minutes_stops_early_and_still_exports(tmp_path, capsys):
    root = _write_dataset(tmp_path / "ds", episodes=1, length=6)
    cfg = sft.SFTConfig(dataset=str(root), num_iterations=50, batch_size=4, max_minutes=1e-9, save_every=20,
                        run_dir=str(tmp_path / "run"), env=TaskConfig(image_size=32), device="cpu")
    out = sft.train(cfg)
    assert np.isfinite(out["sft/loss"])  # the last step is logged
    assert [c.name for c in (tmp_path / "run" / "checkpoints").iterdir()] == ["iter_000001"]
    assert (tmp_path / "run" / "gr00t" / "config.json").is_file()
    assert "--max-minutes 1e-09 reached; stopping" in capsys.readouterr().out


class TwoCameraToyEnv(ToyEnv):
    """The toy env seen through two 32x32 cameras with an 8-d state and 7-d actions: the demonstrations' spaces."""

    num_views, image_size, state_dim, action_dim = 2, 32, 8, 7
    instruction = "stack the blocks"

    def _obs(self) -> dict[str, torch.Tensor]:
        state = torch.nn.functional.pad(torch.stack([self.x, self.v], -1), (0, 6))
        rgb = torch.zeros(self.num_envs, 2, 32, 32, 3, dtype=torch.uint8)
        return {"rgb": rgb.to(self.device), "state": state.to(self.device)}


def test_eval_runs_an_sft_checkpoint_on_the_task_of_its_demonstrations(tmp_path, monkeypatch):
    """An SFT run steps no env; eval.py builds the one its --env flags name (task, image size, time limit), with
    the default number of envs, and evaluates the fine-tuned model there."""
    import eval as eval_script

    root = _write_dataset(tmp_path / "ds", episodes=1, length=6)
    sft.train(sft.SFTConfig(dataset=str(root), num_iterations=2, batch_size=4, run_dir=str(tmp_path / "run"),
                            env=TaskConfig(task="two-camera task", image_size=32, max_episode_steps=5),
                            device="cpu"))
    built = []

    def make_env(env_cfg):
        built.append(env_cfg)
        return TwoCameraToyEnv(env_cfg)

    summary = eval_script.evaluate(eval_script.EvalConfig(checkpoint=str(tmp_path / "run"), num_episodes=3,
                                                          num_videos=0, device="cpu"), make_env=make_env)
    (env_cfg,) = built
    assert (env_cfg.task, env_cfg.image_size, env_cfg.max_episode_steps, env_cfg.num_envs) == \
        ("two-camera task", 32, 5, 2)
    assert summary["num_episodes"] == 3 and all(e["length"] == 5 for e in summary["episodes"])
    # receding horizon: 2 of each 16-action chunk; env 0 plays 2 episodes of 5 steps, so 10 steps take 5 chunks
    from models.gr00t import Gr00tPolicy

    samples, sample = [], Gr00tPolicy.sample
    monkeypatch.setattr(Gr00tPolicy, "sample", lambda *a, **k: samples.append(1) or sample(*a, **k))
    cfg = eval_script.EvalConfig(checkpoint=str(tmp_path / "run"), num_episodes=3, num_videos=0, device="cpu",
                                 action_exec_horizon=2)
    summary = eval_script.evaluate(cfg, make_env=TwoCameraToyEnv)
    assert len(samples) == 5 and summary["action_exec_horizon"] == 2 and summary["num_episodes"] == 3
    closed = []
    monkeypatch.setattr(TwoCameraToyEnv, "close", lambda self: closed.append(True))
    with pytest.raises(ConfigError, match="--action-exec-horizon 17 exceeds the policy's chunk of 16 actions"):
        eval_script.evaluate(dataclasses.replace(cfg, action_exec_horizon=17), make_env=TwoCameraToyEnv)
    assert closed == [True]  # the env is closed on the way out


def test_open_loop_errors_hand_computed():
    from benchmarks import sft_open_loop

    expert = torch.zeros(1, 4, 7)
    expert[..., 0] = 0.04  # 2 cm moves along x
    expert[..., 6] = torch.tensor([1.0, 1.0, -1.0, -1.0])  # open, open, close, close
    predicted = expert.clone()
    predicted[..., 0] += 0.01  # 5 mm off along x
    predicted[..., 3] += 0.02  # 0.01 rad = 0.573 deg off in roll
    predicted[0, 3, 6] = 0.5  # opens on the last step, where the expert closes
    errors = sft_open_loop.chunk_errors(predicted, expert)
    expected = {"translation_mm": 5.0, "first_move_mm": 5.0, "rotation_deg": 0.01 * 180 / np.pi,
                "gripper_agreement": 0.75, "expert_move_mm": 20.0}
    for name, value in expected.items():
        assert errors[name].tolist() == pytest.approx([value], rel=1e-5), name


def test_open_loop_lines_each_frame_up_with_its_expert_window_and_phase(tmp_path, monkeypatch):
    """A model that returns exactly the expert's recorded window of each frame it is shown has zero error in every
    phase; the real (barely trained) model gives finite errors, the same on a second run."""
    from benchmarks import sft_open_loop
    from models.gr00t import Gr00tPolicy

    rng = np.random.default_rng(0)
    writer = LeRobotWriter(tmp_path / "ds", fps=20, image_size=32)
    rounds_phases = [([0, 0, 0, 0, 1, 1], [0, 0, 1, 2, 0, 1]), ([0, 0, 0, 0, 0], [0, 1, 1, 1, 2])]
    offset = 0
    for rounds, phases in rounds_phases:
        length = len(rounds)
        state = rng.uniform(-1, 1, (length, 8)).astype(np.float32)
        state[:, 0] = (offset + np.arange(length)) / 100  # the frame's index, for the model below
        images = {k: rng.integers(0, 255, (length, 32, 32, 3)).astype(np.uint8) for k in ("image", "wrist_image")}
        writer.add_episode(images, state, rng.uniform(-0.04, 0.04, (length, 7)).astype(np.float32), "stack",
                           labels={"leanvla.expert_round": np.array(rounds), "leanvla.expert_phase": np.array(phases)})
        offset += length
    root = writer.close()
    cfg = sft.SFTConfig(dataset=str(root), policy="gr00t-tiny", num_iterations=1, batch_size=4, log_every=1,
                        run_dir=str(tmp_path / "run"), env=TaskConfig(image_size=32), device="cpu")
    sft.train(cfg)
    demos = sft.Demonstrations.load(root)

    def expert_windows(self, params, obs, instruction="", generator=None, deterministic=False):
        frames = (obs["state"][:, 0] * 100).round().long()
        return {"actions": demos.batch(frames, horizon=self.cfg.action_horizon)["actions"]}

    with monkeypatch.context() as patch:
        patch.setattr(Gr00tPolicy, "sample", expert_windows)
        rows = sft_open_loop.main(sft_open_loop.Args(tmp_path / "run", stride=2, device="cpu", out=tmp_path / "a"))
    # frames 0, 2, 4, 6, 8, 10: episode 0's 0, 2, 4 and episode 1's 0, 2, 4
    assert [(r["phase"], r["frames"]) for r in rows] == [("round 1 approach", 2), ("round 1 descend", 2),
                                                         ("round 2 approach", 1), ("round 1 close", 1),
                                                         ("every frame", 6)]
    for r in rows:
        assert r["translation_mm"] == r["first_move_mm"] == r["rotation_deg"] == 0.0 and r["gripper_agreement"] == 1
        assert r["expert_move_mm"] > 0
    assert "| round 1 approach | 2 | 0.0 | 0.0 | 0.00 | 1.000 |" in (tmp_path / "a" / "results.md").read_text()

    with monkeypatch.context() as patch:  # episode 1 alone (frames 6-10; its frames 0, 2, 4), which the run trained on
        patch.setattr(Gr00tPolicy, "sample", expert_windows)
        rows = sft_open_loop.main(sft_open_loop.Args(tmp_path / "run", first_episode=1, stride=2, device="cpu",
                                                     out=tmp_path / "e1"))
        assert [(r["phase"], r["frames"]) for r in rows] == [("round 1 approach", 1), ("round 1 descend", 1),
                                                             ("round 1 close", 1), ("every frame", 3)]
        assert all(r["translation_mm"] == 0.0 for r in rows)
        assert "every 2th frame of episodes 1 to 1 (trained on)" in (tmp_path / "e1" / "results.md").read_text()
    sft.train(dataclasses.replace(cfg, num_episodes=1, run_dir=str(tmp_path / "run_ep0")))
    sft_open_loop.main(sft_open_loop.Args(tmp_path / "run_ep0", first_episode=1, device="cpu", out=tmp_path / "h"))
    assert "of episodes 1 to 1 (held out)" in (tmp_path / "h" / "results.md").read_text()

    first = sft_open_loop.main(sft_open_loop.Args(tmp_path / "run", stride=2, device="cpu", out=tmp_path / "b"))
    again = sft_open_loop.main(sft_open_loop.Args(tmp_path / "run", stride=2, device="cpu", out=tmp_path / "c"))
    assert first == again and all(np.isfinite(r["translation_mm"]) and r["translation_mm"] > 0 for r in first)
