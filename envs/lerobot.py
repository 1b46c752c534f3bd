"""LeRobot v2 datasets (parquet + mp4 + meta), the format GR00T fine-tuning reads: write demos, read them back.

Layout (LeRobot `codebase_version` v2.1, with GR00T's `meta/modality.json`):

    meta/info.json          features, fps, counts, path templates
    meta/episodes.jsonl     one line per episode: index, tasks, length
    meta/tasks.jsonl        one line per task string
    meta/modality.json      GR00T's view: which slices of state/action are which key, which videos
    meta/stats.json         per-feature min / max / mean / std / q01 / q99 (normalisation statistics)
    meta/recording.json     (leanvla) how the episodes were made: task, seed, action noise, expert success
    data/chunk-000/episode_000000.parquet             one row per frame (plus leanvla.* label columns, if any)
    videos/chunk-000/<video key>/episode_000000.mp4   one file per camera per episode

The stack-cube keys follow RLinf's GR00T data config for Isaac Lab stack-cube (its Libero layout): videos
`image` (table camera) and `wrist_image`; state x, y, z, roll, pitch, yaw, gripper; the same for actions. Our
state's orientation is an axis-angle vector (three numbers, `envs.tasks.axis_angle`), stored under roll/pitch/yaw
slots.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CODEBASE_VERSION = "v2.1"
CHUNK_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"

STATE_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper_left", "gripper_right"]
ACTION_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
STATE_SLICES = {"x": (0, 1), "y": (1, 2), "z": (2, 3), "roll": (3, 4), "pitch": (4, 5), "yaw": (5, 6), "gripper": (6, 8)}
ACTION_SLICES = {"x": (0, 1), "y": (1, 2), "z": (2, 3), "roll": (3, 4), "pitch": (4, 5), "yaw": (5, 6), "gripper": (6, 7)}
VIDEO_KEYS = {"image": "observation.images.image", "wrist_image": "observation.images.wrist_image"}

# imageio-ffmpeg starts every ffmpeg with preexec_fn=os.setpgrp (to keep Ctrl-C from the child), and with a
# preexec_fn Python must fork() where it would vfork(): a fork copies the page tables, so each video costs more the
# more memory the process holds, and SFT's loader holds every decoded frame (tens of GB). imageio-ffmpeg's own switch
# turns that off (benchmarks/demo_loading.py measures both).
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")


def _stats(x: np.ndarray) -> dict[str, list[float]]:
    x = x.astype(np.float64)
    return {
        "min": x.min(0).tolist(),
        "max": x.max(0).tolist(),
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
    }


class LeRobotWriter:
    """Append whole episodes; `close()` writes the meta files. Writes into `<root>.tmp` and renames at close,
    so an interrupted recording never leaves a dataset that looks complete. Videos are encoded in `workers`
    background threads (ffmpeg runs outside the GIL), so the simulation goes on while they encode."""

    def __init__(self, root: str | Path, fps: int, image_size: int, robot_type: str = "franka", overwrite: bool = False,
                 workers: int | None = None):
        self.root = Path(root)
        if self.root.exists():
            if not overwrite:
                raise FileExistsError(f"Dataset {self.root} exists; pass overwrite=True (--overwrite) to replace it")
        self.tmp = self.root.with_name(self.root.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        (self.tmp / "meta").mkdir(parents=True)
        self.fps, self.image_size, self.robot_type = fps, image_size, robot_type
        self.episodes: list[dict] = []
        self.tasks: dict[str, int] = {}
        self.total_frames = 0
        self.label_names: list[str] = []
        self._states: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        workers = workers or os.cpu_count() or 1
        self._encoders = ThreadPoolExecutor(workers)
        self._encoding: deque[Future] = deque()
        self._max_encoding = 4 * workers  # videos waiting or being encoded at most (bounds the frames held)

    def add_episode(self, images: dict[str, np.ndarray], state: np.ndarray, action: np.ndarray, task: str,
                    reward: np.ndarray | None = None, labels: dict[str, np.ndarray] | None = None) -> None:
        """images: {"image", "wrist_image"} → uint8 [T, H, W, 3]; state [T, 8]; action [T, 7]; `labels`: more
        per-frame int64 columns [T] (e.g. `leanvla.expert_phase`), the same names in every episode. The images are
        encoded in the background: do not modify them after the call."""
        import imageio.v2 as imageio
        import pyarrow as pa
        import pyarrow.parquet as pq

        length = len(state)
        if length == 0:
            raise ValueError("an episode needs at least one frame")
        if set(images) != set(VIDEO_KEYS):
            raise ValueError(f"images must have keys {sorted(VIDEO_KEYS)}, got {sorted(images)}")
        for key, frames in images.items():
            if frames.shape != (length, self.image_size, self.image_size, 3) or frames.dtype != np.uint8:
                raise ValueError(f"images[{key!r}] must be uint8 [{length}, {self.image_size}, {self.image_size}, 3], "
                                 f"got {frames.dtype} {list(frames.shape)}")
        if state.shape != (length, len(STATE_NAMES)) or action.shape != (length, len(ACTION_NAMES)):
            raise ValueError(f"state must be [{length}, {len(STATE_NAMES)}] and action [{length}, {len(ACTION_NAMES)}], "
                             f"got {list(state.shape)} and {list(action.shape)}")
        labels = labels or {}
        for name in labels:
            if not name.startswith("leanvla."):
                raise ValueError(f"label columns are named leanvla.<name> (apart from LeRobot's own), got {name!r}")
        if self.episodes and sorted(labels) != self.label_names:
            raise ValueError(f"labels must be {self.label_names} as in the first episode, got {sorted(labels)}")
        for name, column in labels.items():
            if column.shape != (length,):
                raise ValueError(f"labels[{name!r}] must have shape [{length}], got {list(column.shape)}")
        self.label_names = sorted(labels)
        index = len(self.episodes)
        chunk = index // CHUNK_SIZE
        task_index = self.tasks.setdefault(task, len(self.tasks))
        reward = np.zeros(length, np.float32) if reward is None else reward.astype(np.float32)
        done = np.zeros(length, bool)
        done[-1] = True
        table = pa.table({
            "observation.state": pa.array(list(state.astype(np.float32)), type=pa.list_(pa.float32())),
            "action": pa.array(list(action.astype(np.float32)), type=pa.list_(pa.float32())),
            "timestamp": pa.array(np.arange(length, dtype=np.float32) / self.fps),
            "frame_index": pa.array(np.arange(length, dtype=np.int64)),
            "episode_index": pa.array(np.full(length, index, dtype=np.int64)),
            "index": pa.array(np.arange(self.total_frames, self.total_frames + length, dtype=np.int64)),
            "task_index": pa.array(np.full(length, task_index, dtype=np.int64)),
            "annotation.human.action.task_description": pa.array(np.full(length, task_index, dtype=np.int64)),
            "next.reward": pa.array(reward),
            "next.done": pa.array(done),
            **{name: pa.array(labels[name].astype(np.int64)) for name in self.label_names},
        })
        path = self.tmp / DATA_PATH.format(episode_chunk=chunk, episode_index=index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        for short, key in VIDEO_KEYS.items():
            video = self.tmp / VIDEO_PATH.format(episode_chunk=chunk, video_key=key, episode_index=index)
            video.parent.mkdir(parents=True, exist_ok=True)
            # yuv444 keeps colours exact enough for training; libx264 at high quality
            self._encoding.append(self._encoders.submit(
                imageio.mimwrite, video, images[short], fps=self.fps, codec="libx264", quality=9, macro_block_size=1,
                pixelformat="yuv444p"))
        while len(self._encoding) > self._max_encoding:
            self._encoding.popleft().result()
        self.episodes.append({"episode_index": index, "tasks": [task], "length": length})
        self.total_frames += length
        self._states.append(state)
        self._actions.append(action)

    def close(self, recording: dict | None = None) -> Path:
        """Finish the dataset: wait for the videos, write meta/, move it into place. `recording`: how the episodes
        were made (meta/recording.json, beside LeRobot's own files, which keep their standard content)."""
        try:  # every video written (an encoding error is raised here)
            while self._encoding:
                self._encoding.popleft().result()
        finally:
            self._encoders.shutdown(cancel_futures=True)
        if not self.episodes:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ValueError("no episodes were added")
        meta = self.tmp / "meta"
        video_feature = {"dtype": "video", "shape": [self.image_size, self.image_size, 3],
                         "names": ["height", "width", "channel"],
                         "info": {"video.fps": float(self.fps), "video.codec": "h264", "video.pix_fmt": "yuv444p"}}
        features = {
            "observation.state": {"dtype": "float32", "shape": [len(STATE_NAMES)], "names": STATE_NAMES},
            "action": {"dtype": "float32", "shape": [len(ACTION_NAMES)], "names": ACTION_NAMES},
            **{key: video_feature for key in VIDEO_KEYS.values()},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
            "annotation.human.action.task_description": {"dtype": "int64", "shape": [1], "names": None},
            "next.reward": {"dtype": "float32", "shape": [1], "names": None},
            "next.done": {"dtype": "bool", "shape": [1], "names": None},
            **{name: {"dtype": "int64", "shape": [1], "names": None} for name in self.label_names},
        }
        n = len(self.episodes)
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type, "total_episodes": n,
            "total_frames": self.total_frames, "total_tasks": len(self.tasks), "total_videos": n * len(VIDEO_KEYS),
            "total_chunks": (n - 1) // CHUNK_SIZE + 1, "chunks_size": CHUNK_SIZE, "fps": self.fps,
            "splits": {"train": f"0:{n}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH, "features": features,
        }
        modality = {
            "state": {k: {"start": a, "end": b} for k, (a, b) in STATE_SLICES.items()},
            "action": {k: {"start": a, "end": b} for k, (a, b) in ACTION_SLICES.items()},
            "video": {k: {"original_key": v} for k, v in VIDEO_KEYS.items()},
            "annotation": {"human.action.task_description": {"original_key": "task_index"}},
        }
        stats = {"observation.state": _stats(np.concatenate(self._states)), "action": _stats(np.concatenate(self._actions))}
        (meta / "info.json").write_text(json.dumps(info, indent=2))
        (meta / "modality.json").write_text(json.dumps(modality, indent=2))
        (meta / "stats.json").write_text(json.dumps(stats, indent=2))
        (meta / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.episodes))
        if recording is not None:
            (meta / "recording.json").write_text(json.dumps(recording, indent=2))
        (meta / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n" for t, i in self.tasks.items()))
        if self.root.exists():
            shutil.rmtree(self.root)
        self.tmp.rename(self.root)
        return self.root


@dataclass
class Episode:
    images: dict[str, np.ndarray]  # video key (short) → uint8 [T, H, W, 3]
    state: np.ndarray  # float32 [T, S]
    action: np.ndarray  # float32 [T, A]
    task: str
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # `leanvla.*` column → int64 [T]


class LeRobotDataset:
    """Reads a LeRobot v2 dataset with a GR00T `modality.json` (ours, or e.g. RLinf/IsaacLab-Stack-Cube-Data)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{self.root} is not a LeRobot dataset: {info_path} is missing")
        self.info = json.loads(info_path.read_text())
        self.modality = json.loads((self.root / "meta" / "modality.json").read_text())
        self.episodes = [json.loads(l) for l in (self.root / "meta" / "episodes.jsonl").read_text().splitlines() if l]
        self.tasks = {}
        for line in (self.root / "meta" / "tasks.jsonl").read_text().splitlines():
            if line:
                row = json.loads(line)
                self.tasks[row["task_index"]] = row["task"]
        stats_path = self.root / "meta" / "stats.json"
        self.stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
        self.fps = self.info["fps"]

    def __len__(self) -> int:
        return len(self.episodes)

    def _table(self, i: int):
        """Episode i's parquet table, its episode index and its chunk."""
        import pyarrow.parquet as pq

        index = self.episodes[i]["episode_index"]
        chunk = index // self.info["chunks_size"]
        return pq.read_table(self.root / self.info["data_path"].format(episode_chunk=chunk, episode_index=index)), \
            index, chunk

    def episode(self, i: int) -> Episode:
        import imageio.v2 as imageio

        table, index, chunk = self._table(i)
        state = np.stack(table.column("observation.state").to_numpy(zero_copy_only=False)).astype(np.float32)
        action = np.stack(table.column("action").to_numpy(zero_copy_only=False)).astype(np.float32)
        images = {}
        for short, spec in self.modality.get("video", {}).items():
            key = spec["original_key"]
            path = self.root / self.info["video_path"].format(episode_chunk=chunk, video_key=key, episode_index=index)
            images[short] = np.stack(imageio.mimread(path, memtest=False))
            if len(images[short]) != len(state):
                raise ValueError(f"{path} has {len(images[short])} frames but the episode has {len(state)}")
        task = self.tasks[int(table.column("task_index")[0].as_py())]
        return Episode(images=images, state=state, action=action, task=task, labels=self._labels(table))

    def labels(self, i: int) -> dict[str, np.ndarray]:
        """Episode i's per-frame label columns (the writer's `labels`) alone, without decoding its videos."""
        return self._labels(self._table(i)[0])

    @staticmethod
    def _labels(table) -> dict[str, np.ndarray]:
        return {name: table.column(name).to_numpy() for name in table.column_names if name.startswith("leanvla.")}

