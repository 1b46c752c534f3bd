"""LeRobot v2 writer/reader round trip on small synthetic episodes."""

import json

import numpy as np
import pytest

from envs.lerobot import LeRobotDataset, LeRobotWriter


def _episode(rng, length, size=32):
    # flat colour blocks survive video compression nearly exactly
    images = {k: np.repeat(rng.integers(0, 4, (length, 1, 1, 3)) * 60, size, 1).repeat(size, 2).astype(np.uint8)
              for k in ("image", "wrist_image")}
    return images, rng.normal(size=(length, 8)).astype(np.float32), rng.normal(size=(length, 7)).astype(np.float32)


@pytest.mark.parametrize("workers", [1, 3])
def test_round_trip(tmp_path, workers):
    rng = np.random.default_rng(0)
    writer = LeRobotWriter(tmp_path / "ds", fps=20, image_size=32, workers=workers)
    episodes = [_episode(rng, 5), _episode(rng, 7), _episode(rng, 3), _episode(rng, 6), _episode(rng, 4)]
    for images, state, action in episodes:
        writer.add_episode(images, state, action, "stack the blocks")
    root = writer.close()
    assert not (tmp_path / "ds.tmp").exists()

    dataset = LeRobotDataset(root)
    assert len(dataset) == 5 and dataset.info["total_frames"] == 25 and dataset.info["total_tasks"] == 1
    for i, (images, state, action) in enumerate(episodes):
        ep = dataset.episode(i)
        np.testing.assert_array_equal(ep.state, state)
        np.testing.assert_array_equal(ep.action, action)
        assert ep.task == "stack the blocks"
        for key in images:
            assert ep.images[key].shape == images[key].shape
            assert np.abs(ep.images[key].astype(int) - images[key]).max() <= 8
    stats = json.loads((root / "meta" / "stats.json").read_text())
    all_actions = np.concatenate([a for _, _, a in episodes])
    np.testing.assert_allclose(stats["action"]["max"], all_actions.max(0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["q01"], np.quantile(all_actions.astype(np.float64), 0.01, axis=0), rtol=1e-6)


def test_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    writer = LeRobotWriter(tmp_path / "ds", fps=20, image_size=32)
    images, state, action = _episode(rng, 4)
    with pytest.raises(ValueError, match=r"images\['image'\] must be uint8 \[4, 32, 32, 3\]"):
        writer.add_episode({**images, "image": images["image"][:, :16]}, state, action, "t")
    with pytest.raises(ValueError, match=r"state must be \[4, 8\]"):
        writer.add_episode(images, state[:, :7], action, "t")
    with pytest.raises(ValueError, match="no episodes"):
        writer.close()
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        LeRobotWriter(tmp_path / "exists", fps=20, image_size=32)
    with pytest.raises(FileNotFoundError, match="not a LeRobot dataset"):
        LeRobotDataset(tmp_path / "exists")


def test_a_failed_video_encoding_is_raised_and_publishes_nothing(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    def fail(path, *args, **kwargs):
        raise OSError(f"disk full while writing {path}")

    writer = LeRobotWriter(tmp_path / "ds", fps=20, image_size=32, workers=2)
    monkeypatch.setattr(imageio, "mimwrite", fail)
    writer.add_episode(*_episode(np.random.default_rng(2), 4), "t")  # encoded in the background
    with pytest.raises(OSError, match="disk full while writing .*episode_000000.mp4"):
        writer.close()
    assert not (tmp_path / "ds").exists()


def test_label_columns_round_trip_and_stay_the_same_in_every_episode(tmp_path):
    rng = np.random.default_rng(3)
    writer = LeRobotWriter(tmp_path / "ds", fps=20, image_size=32)
    phases = [np.array([0, 0, 1, 2]), np.array([0, 1, 1])]
    for phase in phases:
        writer.add_episode(*_episode(rng, len(phase)), "t", labels={"leanvla.phase": phase})
    images, state, action = _episode(rng, 3)
    with pytest.raises(ValueError, match=r"labels must be \['leanvla.phase'\] as in the first episode"):
        writer.add_episode(images, state, action, "t")
    with pytest.raises(ValueError, match=r"labels\['leanvla.phase'\] must have shape \[3\], got \[2\]"):
        writer.add_episode(images, state, action, "t", labels={"leanvla.phase": np.zeros(2, np.int64)})
    with pytest.raises(ValueError, match="named leanvla.<name>"):
        writer.add_episode(images, state, action, "t", labels={"phase": np.zeros(3, np.int64)})
    root = writer.close()
    dataset = LeRobotDataset(root)
    assert dataset.info["total_episodes"] == 2  # the refused episodes left nothing behind
    assert dataset.info["features"]["leanvla.phase"] == {"dtype": "int64", "shape": [1], "names": None}
    for i, phase in enumerate(phases):
        np.testing.assert_array_equal(dataset.episode(i).labels["leanvla.phase"], phase)
        np.testing.assert_array_equal(dataset.labels(i)["leanvla.phase"], phase)


def test_videos_are_decoded_by_an_ffmpeg_started_without_a_preexec_fn():
    # With a preexec_fn Python forks the whole process for each ffmpeg, a cost that grows with the frames SFT's loader
    # already holds (benchmarks/demo_loading.py); envs.lerobot turns imageio-ffmpeg's off.
    import os

    from imageio_ffmpeg._utils import _popen_kwargs

    assert os.environ["IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"] == "1"
    assert _popen_kwargs(prevent_sigint=True)["preexec_fn"] is None
