"""GR00T N1.5's processor, batched on the policy's device: images, prompt, normalisation, action mapping.

    proc = Gr00tProcessor(cfg, Gr00tMetadata(entry), tokenizer, device)   # entry: one embodiment of metadata.json
    pixels = proc.pixel_values(obs["rgb"])         # uint8 [N, V, H, W, 3] -> float [N*V, 3, S, S] in [-1, 1]
    ids, image_positions = proc.prompt("stack the cubes")   # token ids [L] and where the image tokens sit
    state = proc.normalize_state(obs["state"])     # [N, S] -> [N, max_state_dim], zero-padded
    actions = proc.env_actions(chunk)              # [N, horizon, 32] normalised -> [N, T, A_env] env units

It mirrors the official eval pipeline (Isaac-GR00T 1259d624): VideoCrop(0.95) as a centre crop, VideoResize(224,
bilinear, antialias) to uint8, the Eagle processor's rescale + normalise to [-1, 1]; the Eagle chat prompt with
`<image k><img>` + 256 `<IMG_CONTEXT>` + `</img>` per view; StateActionTransform's min_max / q99 / mean_std /
binary normalisation; GR00TTransform's padding to max_state_dim / max_action_dim.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

# Qwen3's special tokens followed by Eagle's, in id order (Qwen3 + Eagle: 151643 ... 151679).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
    # Eagle 2.5's additions to the Qwen3 vocabulary
    "<IMG_CONTEXT>", "<img>", "</img>", "<box>", "</box>", "<quad>", "</quad>", "<ref>", "</ref>", "<interval>",
    "</interval>",
)
EAGLE_TOKENS = SPECIAL_TOKENS[SPECIAL_TOKENS.index("<IMG_CONTEXT>"):]
IMAGE_TOKEN = "<IMG_CONTEXT>"
BUILTIN_TOKENIZER = "builtin"
DEFAULT_INSTRUCTION = "Perform the default behavior."  # GR00TTransform.default_instruction
PAD_TOKEN = "<|endoftext|>"  # Qwen's padding token
Instruction = str | Sequence[str]
"""One instruction for a whole batch, or one per row."""
NORMALIZATION_MODES = ("min_max", "q99", "mean_std", "binary")
GRIPPER_MODES = ("sign", "libero", "none")


# ---------------------------------------------------------------------------------------------------------------
# Prompt and tokenizer
# ---------------------------------------------------------------------------------------------------------------
class PromptTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def token_id(self, token: str) -> int: ...


def chat_prompt(instruction: str, num_views: int, tokens_per_view: int) -> str:
    """The Eagle chat prompt for one user turn with `num_views` images followed by the instruction.

    Eagle's chat template renders `<image-k>` per image; its processor expands each into
    `<image k><img>` + tokens_per_view x `<IMG_CONTEXT>` + `</img>`.
    """
    images = "".join(f"<image {k + 1}><img>{IMAGE_TOKEN * tokens_per_view}</img>" for k in range(num_views))
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{images}{instruction}<|im_end|>\n<|im_start|>assistant\n")


def formalize_language(text: str) -> str:
    """GR00TTransform.formalize_language: lower case, punctuation removed."""
    return re.sub(r"[^\w\s]", "", text.lower())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class BuiltinTokenizer:
    """The project's own tokenizer for small offline configs: byte-level BPE over the 256 bytes (no merges, so one
    token per byte) plus Qwen3/Eagle's special tokens, in their official order, at the top of the vocabulary
    (for vocab_size 151680 they get their official ids, <IMG_CONTEXT> = 151669). Built in code from the
    `tokenizers` library: deterministic, no download; the same chat layout and image-context token as the real one.
    """

    def __init__(self, vocab_size: int = 256 + len(SPECIAL_TOKENS)):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        self.offset = vocab_size - 256 - len(SPECIAL_TOKENS)  # special ids: 256 + i in the tokenizer, + offset out
        if self.offset < 0:
            raise ValueError(f"vocab_size {vocab_size} cannot hold 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        for i, t in enumerate(SPECIAL_TOKENS):
            assert tok.token_to_id(t) == 256 + i, t
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return [i if i < 256 else i + self.offset for i in self._tok.encode(text, add_special_tokens=False).ids]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i if i < 256 else i - self.offset for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        return i if i < 256 else i + self.offset


class HFTokenizer:
    """A Qwen tokenizer from the hub or a local directory, with Eagle's tokens added when missing
    (e.g. `Qwen/Qwen3-1.7B` gets `<IMG_CONTEXT>` = 151669 ... as Eagle 2.5 has them)."""

    def __init__(self, source: str):
        from transformers import AddedToken, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source)
        except Exception as e:  # offline hub, missing files, ...: say which source failed
            raise RuntimeError(f"could not load the GR00T tokenizer from {source!r}: {e}. Pass a local directory "
                               f"with the Qwen/Eagle tokenizer files, or 'builtin' for small configs.") from e
        missing = [t for t in EAGLE_TOKENS if t not in tok.get_vocab()]
        if missing:
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        return int(self._tok.convert_tokens_to_ids(token))


def load_tokenizer(source: str, vocab_size: int) -> PromptTokenizer:
    """'builtin' -> the project's tokenizer; anything else -> a hub id or a local directory."""
    return BuiltinTokenizer(vocab_size) if source == BUILTIN_TOKENIZER else HFTokenizer(source)


# ---------------------------------------------------------------------------------------------------------------
# Metadata (experiment_cfg/metadata.json, one embodiment's entry) and normalisation
# ---------------------------------------------------------------------------------------------------------------
STAT_NAMES = ("max", "min", "mean", "std", "q01", "q99")


def metadata_from_data(embodiment_tag: str, state: dict[str, Any], action: dict[str, Any],
                       video: dict[str, tuple[int, int]], fps: float = 20.0) -> dict:
    """Build one embodiment's metadata entry, in the official schema, from data.

    state / action: key -> array [num_frames, dims] (key order = concatenation order in the env's vectors);
    video: key -> (width, height). Statistics as Isaac-GR00T computes them: min, max, mean, population std,
    and the 1st / 99th percentiles (linear interpolation).
    """
    def stats(x) -> dict[str, list[float]]:
        x = torch.as_tensor(x, dtype=torch.float64)
        x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
        q = torch.quantile(x, torch.tensor([0.01, 0.99], dtype=torch.float64), dim=0)
        return {"max": x.amax(0).tolist(), "min": x.amin(0).tolist(), "mean": x.mean(0).tolist(),
                "std": x.std(0, correction=0).tolist(), "q01": q[0].tolist(), "q99": q[1].tolist()}

    state_stats = {k: stats(v) for k, v in state.items()}
    action_stats = {k: stats(v) for k, v in action.items()}

    def modality(stats_: dict) -> dict:
        return {k: {"absolute": True, "rotation_type": None, "shape": [len(s["min"])], "continuous": True}
                for k, s in stats_.items()}

    return {
        "statistics": {"state": state_stats, "action": action_stats},
        "modalities": {
            "video": {k: {"resolution": [int(w), int(h)], "channels": 3, "fps": float(fps)}
                      for k, (w, h) in video.items()},
            "state": modality(state_stats),
            "action": modality(action_stats),
        },
        "embodiment_tag": embodiment_tag,
    }


@dataclass
class AffineNormalizer:
    """Per-dimension normalisation of a concatenated state or action vector.

    min_max, q99 and mean_std are affine maps (q99 then clipped to [-1, 1]); binary is x > 0.5. Degenerate
    statistics (min == max, q01 == q99, std == 0) behave as StateActionTransform's Normalizer: min_max -> 0,
    q99 and mean_std -> identity.
    """
    scale: torch.Tensor
    offset: torch.Tensor
    clip: torch.Tensor       # bool [D]: q99 dims, clipped to [-1, 1] after the affine map
    binary: torch.Tensor     # bool [D]
    inv_scale: torch.Tensor
    inv_offset: torch.Tensor

    @classmethod
    def from_stats(cls, stats: dict[str, dict[str, list[float]]], modes: dict[str, str]) -> AffineNormalizer:
        cols: dict[str, list[torch.Tensor]] = {n: [] for n in ("scale", "offset", "clip", "binary", "iscale", "ioff")}
        for key, mode in modes.items():
            s = {n: torch.tensor(stats[key][n], dtype=torch.float64) for n in STAT_NAMES if n in stats[key]}
            if mode in ("min_max", "q99"):
                lo, hi = (s["min"], s["max"]) if mode == "min_max" else (s["q01"], s["q99"])
                ok = lo != hi
                span = torch.where(ok, hi - lo, torch.ones_like(hi))
                if mode == "min_max":  # degenerate dims -> 0
                    scale, offset = torch.where(ok, 2 / span, 0.0), torch.where(ok, -2 * lo / span - 1, 0.0)
                else:  # degenerate dims -> identity (then clipped, as the official code clips the whole vector)
                    scale, offset = torch.where(ok, 2 / span, 1.0), torch.where(ok, -2 * lo / span - 1, 0.0)
                iscale, ioff = (hi - lo) / 2, (hi + lo) / 2
            elif mode == "mean_std":
                ok = s["std"] != 0
                std = torch.where(ok, s["std"], torch.ones_like(s["std"]))
                scale, offset = torch.where(ok, 1 / std, 1.0), torch.where(ok, -s["mean"] / std, 0.0)
                iscale, ioff = s["std"], s["mean"]
            elif mode == "binary":
                n = len(stats[key]["min"])
                scale, offset, iscale, ioff = (torch.zeros(n, dtype=torch.float64) for _ in range(4))
            else:
                raise ValueError(f"unknown normalisation mode {mode!r} for {key!r}; expected one of "
                                 f"{NORMALIZATION_MODES}")
            n = scale.numel()
            cols["scale"].append(scale)
            cols["offset"].append(offset)
            cols["clip"].append(torch.full((n,), mode == "q99"))
            cols["binary"].append(torch.full((n,), mode == "binary"))
            cols["iscale"].append(iscale)
            cols["ioff"].append(ioff)
        cat = {k: torch.cat(v) for k, v in cols.items()}
        return cls(cat["scale"].float(), cat["offset"].float(), cat["clip"], cat["binary"],
                   cat["iscale"].float(), cat["ioff"].float())

    def to(self, device: torch.device | str) -> AffineNormalizer:
        return AffineNormalizer(*(getattr(self, f).to(device) for f in
                                  ("scale", "offset", "clip", "binary", "inv_scale", "inv_offset")))

    @property
    def dim(self) -> int:
        return self.scale.numel()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.scale + self.offset
        y = torch.where(self.clip, y.clamp(-1, 1), y)
        return torch.where(self.binary, (x > 0.5).to(y.dtype), y)

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        x = y * self.inv_scale + self.inv_offset
        return torch.where(self.binary, (y > 0.5).to(x.dtype), x)


@dataclass
class Gr00tMetadata:
    """One embodiment's entry of experiment_cfg/metadata.json, kept verbatim (`entry`) so saving is lossless."""
    entry: dict

    @property
    def embodiment_tag(self) -> str:
        return self.entry["embodiment_tag"]

    def keys(self, modality: str, order: tuple[str, ...] | None = None) -> tuple[str, ...]:
        available = tuple(self.entry["modalities"][modality])
        if order is None:
            return available
        unknown = [k for k in order if k not in available]
        if unknown:
            raise ValueError(f"{modality} keys {unknown} are not in the metadata (it has {list(available)})")
        return tuple(order)

    def dims(self, modality: str, keys: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(int(math.prod(self.entry["modalities"][modality][k]["shape"])) for k in keys)

    def resolution(self) -> tuple[int, int] | None:
        """(height, width) shared by every view, or None when the metadata has no video entry."""
        res = {tuple(v["resolution"]) for v in self.entry["modalities"].get("video", {}).values()}
        if len(res) > 1:
            raise ValueError(f"views of different resolutions are not supported: {sorted(res)}")
        return (res.pop()[::-1]) if res else None

    def normalizer(self, modality: str, keys: tuple[str, ...], default_mode: str,
                   overrides: dict[str, str]) -> AffineNormalizer:
        stats = self.entry["statistics"][modality]
        missing = [k for k in keys if k not in stats]
        if missing:
            raise ValueError(f"metadata has no {modality} statistics for {missing}")
        return AffineNormalizer.from_stats(stats, {k: overrides.get(f"{modality}.{k}", default_mode) for k in keys})


def select_metadata(metadata_json: dict, embodiment_tag: str) -> Gr00tMetadata:
    if embodiment_tag not in metadata_json:
        raise ValueError(f"metadata.json has no entry for embodiment tag {embodiment_tag!r} "
                         f"(it has {sorted(metadata_json)})")
    return Gr00tMetadata(metadata_json[embodiment_tag])


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------
def pixel_values(rgb: torch.Tensor, image_size: int, crop_scale: float = 0.95) -> torch.Tensor:
    """uint8 [N, V, H, W, 3] -> float32 [N*V, 3, image_size, image_size] in [-1, 1].

    Eval-mode VideoCrop (centre crop to int(scale * size), offsets as torchvision's CenterCrop), VideoResize
    (bilinear, antialiased) back to uint8 values, then the Eagle image processor's x / 255 and (x - 0.5) / 0.5.
    """
    n, v, h, w, _ = rgb.shape
    x = rgb.reshape(n * v, h, w, 3).permute(0, 3, 1, 2).float()
    ch, cw = int(h * crop_scale), int(w * crop_scale)
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    x = x[:, :, top:top + ch, left:left + cw]
    if (ch, cw) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)  # the official resize returns uint8 frames
    x = x * (1 / 255)
    return (x - 0.5) / 0.5


# ---------------------------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------------------------
class Gr00tProcessor:
    """Everything between the env's tensors and the model's, for one embodiment, on one device."""

    def __init__(self, cfg, metadata: Gr00tMetadata, tokenizer: PromptTokenizer | Callable[[], PromptTokenizer],
                 device: torch.device | str):
        self.cfg, self.metadata, self.device = cfg, metadata, torch.device(device)
        self.state_keys = metadata.keys("state", cfg.state_keys)
        self.action_keys = metadata.keys("action", cfg.action_keys)
        self.state_dim = sum(metadata.dims("state", self.state_keys))
        self.action_dim = sum(metadata.dims("action", self.action_keys))
        if self.state_dim > cfg.max_state_dim:
            raise ValueError(f"state has {self.state_dim} dims, more than max_state_dim={cfg.max_state_dim}")
        if self.action_dim > cfg.action_dim:
            raise ValueError(f"action has {self.action_dim} dims, more than the model's {cfg.action_dim}")
        if cfg.gripper not in GRIPPER_MODES:
            raise ValueError(f"unknown gripper mode {cfg.gripper!r}; expected one of {GRIPPER_MODES}")
        overrides = dict(cfg.normalization_overrides)
        self.state_norm = metadata.normalizer("state", self.state_keys, cfg.state_normalization, overrides).to(device)
        self.action_norm = metadata.normalizer("action", self.action_keys, cfg.action_normalization,
                                               overrides).to(device)
        self.resolution = metadata.resolution()
        num_views = len(metadata.entry["modalities"].get("video", {})) or cfg.num_views
        if num_views != cfg.num_views:
            raise ValueError(f"metadata has {num_views} video views, the config expects {cfg.num_views}")
        self.tokenizer = tokenizer
        self._prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._padded: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    # -- text --
    def prompt(self, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [L] of the chat prompt and the positions [V * tokens_per_view] of its image tokens (cached)."""
        if instruction not in self._prompts:
            if not hasattr(self.tokenizer, "encode"):  # a loader: load on first use (hub / disk)
                self.tokenizer = self.tokenizer()
            text = formalize_language(instruction) if self.cfg.formalize_language else instruction
            text = text or DEFAULT_INSTRUCTION
            image_id = self.tokenizer.token_id(IMAGE_TOKEN)
            if image_id != self.cfg.image_token_id:
                raise ValueError(f"the tokenizer's {IMAGE_TOKEN} is id {image_id}, the config expects "
                                 f"{self.cfg.image_token_id}")
            ids = self.tokenizer.encode(chat_prompt(text, self.cfg.num_views, self.cfg.tokens_per_view))
            positions = [i for i, t in enumerate(ids) if t == image_id]
            expected = self.cfg.num_views * self.cfg.tokens_per_view
            if len(positions) != expected:
                raise ValueError(f"the prompt has {len(positions)} image tokens, expected {expected}")
            if max(ids) >= self.cfg.vocab_size:
                raise ValueError(f"token id {max(ids)} is outside the model's vocabulary ({self.cfg.vocab_size})")
            self._prompts[instruction] = (torch.tensor(ids, device=self.device),
                                          torch.tensor(positions, device=self.device))
        return self._prompts[instruction]

    def prompts(self, instruction: Instruction, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The prompts of a batch of n rows: (token ids, image-token positions, padding mask).

        One string, or n equal ones: ids [L], positions [V * tokens_per_view], mask None. n strings that differ:
        ids [n, L] left-padded with the pad token to the longest prompt, positions [n, V * tokens_per_view], as the
        official Eagle processor batches prompts, and mask [n, L] bool (False on padding), or None where every
        prompt has the same length (nothing padded)."""
        if isinstance(instruction, str):
            return (*self.prompt(instruction), None)
        if len(instruction) != n:
            raise ValueError(f"got {len(instruction)} instructions for a batch of {n} rows (one per row, or one str)")
        if len(set(instruction)) == 1:
            return (*self.prompt(instruction[0]), None)
        key = tuple(instruction)
        if key not in self._padded:
            rows = [self.prompt(text) for text in instruction]
            length = max(len(ids) for ids, _ in rows)
            pad = self.tokenizer.token_id(PAD_TOKEN)
            ids = torch.full((n, length), pad, dtype=torch.long, device=self.device)
            mask = torch.zeros((n, length), dtype=torch.bool, device=self.device)
            positions = []
            for i, (row_ids, row_positions) in enumerate(rows):
                shift = length - len(row_ids)
                ids[i, shift:], mask[i, shift:] = row_ids, True
                positions.append(row_positions + shift)
            if len(self._padded) >= 64:  # instruction lists vary little (one per env, tasks fixed): a small cache
                self._padded.pop(next(iter(self._padded)))
            self._padded[key] = (ids, torch.stack(positions), None if bool(mask.all()) else mask)
        return self._padded[key]

    # -- images --
    def check_rgb(self, rgb: torch.Tensor) -> None:
        if rgb.dtype != torch.uint8 or rgb.ndim != 5 or rgb.shape[-1] != 3:
            raise ValueError(f"obs['rgb'] must be uint8 [N, V, H, W, 3], got {tuple(rgb.shape)} {rgb.dtype}")
        if rgb.shape[1] != self.cfg.num_views:
            raise ValueError(f"obs['rgb'] has {rgb.shape[1]} views, the policy expects {self.cfg.num_views}")
        if self.resolution is not None and tuple(rgb.shape[2:4]) != self.resolution:
            raise ValueError(f"obs['rgb'] images are {rgb.shape[2]}x{rgb.shape[3]} (HxW); the checkpoint's metadata "
                             f"expects {self.resolution[0]}x{self.resolution[1]}")

    def pixel_values(self, rgb: torch.Tensor) -> torch.Tensor:
        return pixel_values(rgb, self.cfg.image_size, self.cfg.crop_scale)

    # -- state / action --
    def check_state(self, state: torch.Tensor) -> None:
        if state.ndim != 2 or state.shape[1] != self.state_dim:
            raise ValueError(f"obs['state'] must be [N, {self.state_dim}] ({', '.join(self.state_keys)}), "
                             f"got {tuple(state.shape)}")

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        """[N, S] env units -> [N, max_state_dim] normalised, zero-padded (GR00TTransform._prepare_state)."""
        return F.pad(self.state_norm.normalize(state.float()), (0, self.cfg.max_state_dim - self.state_dim))

    def normalize_actions(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, H, A_env] env units -> ([N, H, action_dim] normalised and padded, bool mask of the real dims)."""
        if actions.shape[-1] != self.action_dim:
            raise ValueError(f"actions must have {self.action_dim} dims ({', '.join(self.action_keys)}), "
                             f"got {tuple(actions.shape)}")
        pad = self.cfg.action_dim - self.action_dim
        mask = torch.zeros(actions.shape[:-1] + (self.cfg.action_dim,), dtype=torch.bool, device=actions.device)
        mask[..., :self.action_dim] = True
        return F.pad(self.action_norm.normalize(actions.float()), (0, pad)), mask

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """[N, H, action_dim] normalised, padded -> [N, H, A_env] env units."""
        return self.action_norm.unnormalize(actions[..., :self.action_dim].float())

    def env_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """The model's normalised chunk -> the executed part in env units, gripper post-processed."""
        out = self.unnormalize_actions(actions[:, :self.cfg.executed_actions])
        return postprocess_gripper(out, self.cfg.gripper)


def postprocess_gripper(actions: torch.Tensor, mode: str) -> torch.Tensor:
    """The gripper is the last action dim. 'sign': keep its sign (Isaac Lab's BinaryJointPositionAction closes
    on negative values; as RLinf for stack-cube); 'libero': [0, 1] -> [+1, -1] then sign; 'none': as is."""
    if mode == "none":
        return actions
    g = actions[..., -1]
    g = torch.sign(1 - 2 * g) if mode == "libero" else torch.sign(g)
    return torch.cat([actions[..., :-1], g.unsqueeze(-1)], dim=-1)
