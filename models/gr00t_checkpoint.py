"""GR00T N1.5 checkpoints in the official layout (Isaac-GR00T's `save_pretrained`), read and written by name.

    directory/
      config.json                      GR00T_N1_5_Config (+ this project's whole Gr00tConfig under "leanvla")
      model.safetensors.index.json     weight map of the shards (or one model.safetensors)
      model-0000i-of-0000n.safetensors the tensors, by their official names
      experiment_cfg/metadata.json     normalisation statistics and modality layout per embodiment

A hub id (`nvidia/GR00T-N1.5-3B`, `RLinf/RLinf-Gr00t-SFT-Stack-cube`) is fetched with huggingface_hub; a local
directory is read as is. Writing is atomic: a temporary directory beside the target, renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from models.gr00t import Gr00tConfig

# Fields that fix tensor shapes; a checkpoint's `leanvla` config must agree on them.
SIZE_FIELDS = ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads", "vision_intermediate",
               "llm_hidden", "llm_layers", "llm_heads", "llm_kv_heads", "llm_head_dim", "llm_intermediate",
               "vocab_size", "vl_layers", "vl_heads", "vl_head_dim", "dit_layers", "dit_heads", "dit_head_dim",
               "hidden_size", "action_dim", "action_horizon", "max_state_dim", "num_future_tokens", "max_seq_len",
               "num_embodiments", "value_hidden")

INDEX_FILE = "model.safetensors.index.json"
METADATA_FILE = Path("experiment_cfg") / "metadata.json"
LM_HEAD = "backbone.eagle_model.language_model.lm_head.weight"
EMBED_TOKENS = "backbone.eagle_model.language_model.model.embed_tokens.weight"
# Official keys the computation never reads: SigLIP's attention-pooling head, and the LM head (tied to the
# token embedding; GR00T uses hidden states, not logits). Accepted on load and dropped.
UNUSED_OFFICIAL_KEYS = re.compile(r"^backbone\.eagle_model\.vision_model\.vision_model\.head\.|^" + re.escape(LM_HEAD)
                                  + "$")
VALUE_HEAD_PREFIX = "value_head."
RLINF_VALUE_HEAD_PREFIX = "action_head.value_head."


def resolve_checkpoint(path_or_hub_id: str) -> Path:
    """A local directory as is; otherwise `owner/name` is fetched with huggingface_hub's snapshot_download."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; a GR00T checkpoint is a directory (config.json, safetensors, "
                             f"experiment_cfg/metadata.json)")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_hub_id):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id=path_or_hub_id, repo_type="model"))
        except Exception as e:  # offline, unknown repo, gated, ...
            raise RuntimeError(f"could not download {path_or_hub_id!r} from the Hugging Face hub "
                               f"({type(e).__name__}: {e}). Without network access, download it elsewhere and "
                               f"pass the local directory.") from e
    raise FileNotFoundError(f"no checkpoint directory at {path_or_hub_id!r} (and it is not a hub id owner/name)")


def official_config(cfg: Gr00tConfig) -> dict:
    """config.json as Isaac-GR00T writes it (GR00T_N1_5_Config), plus this project's full config under 'leanvla'."""
    block = {"dropout": 0.2, "final_dropout": True, "positional_embeddings": None}
    return {
        "action_dim": cfg.action_dim,
        "action_head_cfg": {
            "action_dim": cfg.action_dim, "action_horizon": cfg.action_horizon, "add_pos_embed": True,
            "backbone_embedding_dim": cfg.llm_hidden,
            "diffusion_model_cfg": {"attention_head_dim": cfg.dit_head_dim, "cross_attention_dim": cfg.llm_hidden,
                                    "interleave_self_attention": True, "norm_type": "ada_norm",
                                    "num_attention_heads": cfg.dit_heads, "num_layers": cfg.dit_layers,
                                    "output_dim": cfg.hidden_size, **block},
            "hidden_size": cfg.hidden_size, "input_embedding_dim": cfg.dit_dim, "max_action_dim": cfg.action_dim,
            "max_state_dim": cfg.max_state_dim, "model_dtype": "float32", "noise_beta_alpha": cfg.noise_beta_alpha,
            "noise_beta_beta": cfg.noise_beta_beta, "noise_s": cfg.noise_s,
            "num_inference_timesteps": cfg.num_inference_steps, "num_target_vision_tokens": cfg.num_future_tokens,
            "num_timestep_buckets": cfg.num_timestep_buckets, "tune_diffusion_model": cfg.tune_diffusion_model,
            "tune_projector": cfg.tune_projector, "use_vlln": True,
            "vl_self_attention_cfg": {"attention_head_dim": cfg.vl_head_dim, "num_attention_heads": cfg.vl_heads,
                                      "num_layers": cfg.vl_layers, **block},
        },
        "action_horizon": cfg.action_horizon,
        "architectures": ["GR00T_N1_5"],
        "attn_implementation": None,
        "backbone_cfg": {"eagle_path": "NVEagle/eagle_er-qwen3_1_7B-Siglip2_400M_stage1_5_128gpu_er_v7_1mlp_nops",
                         "load_bf16": False, "project_to_dim": None, "reproject_vision": False,
                         "select_layer": cfg.llm_layers, "tune_llm": cfg.tune_llm, "tune_visual": cfg.tune_visual,
                         "use_flash_attention": True},
        "compute_dtype": "bfloat16",
        "hidden_size": cfg.llm_hidden,
        "model_dtype": "float32",
        "model_type": "gr00t_n1_5",
        "torch_dtype": "bfloat16",
        "leanvla": dataclasses.asdict(cfg),
    }


def config_mismatches(cfg: Gr00tConfig, config_json: dict) -> list[str]:
    """Where a checkpoint's config.json disagrees with `cfg` on a size (its `leanvla` section, else official keys)."""
    if "leanvla" in config_json:
        theirs = config_json["leanvla"]
        return [f"{f}: checkpoint {theirs[f]!r}, policy {getattr(cfg, f)!r}" for f in SIZE_FIELDS
                if f in theirs and _plain(theirs[f]) != _plain(getattr(cfg, f))]
    head = config_json.get("action_head_cfg", {})
    dit, vl = head.get("diffusion_model_cfg", {}), head.get("vl_self_attention_cfg", {})
    checks = [("action_horizon", head.get("action_horizon"), cfg.action_horizon),
              ("action_dim", head.get("action_dim"), cfg.action_dim),
              ("max_state_dim", head.get("max_state_dim"), cfg.max_state_dim),
              ("hidden_size", head.get("hidden_size"), cfg.hidden_size),
              ("input_embedding_dim", head.get("input_embedding_dim"), cfg.dit_dim),
              ("backbone_embedding_dim", head.get("backbone_embedding_dim"), cfg.llm_hidden),
              ("num_target_vision_tokens", head.get("num_target_vision_tokens"), cfg.num_future_tokens),
              ("dit num_layers", dit.get("num_layers"), cfg.dit_layers),
              ("dit num_attention_heads", dit.get("num_attention_heads"), cfg.dit_heads),
              ("vl_self_attention num_layers", vl.get("num_layers"), cfg.vl_layers),
              ("select_layer", config_json.get("backbone_cfg", {}).get("select_layer"), cfg.llm_layers)]
    out = [f"{name}: checkpoint {theirs!r}, policy {ours!r}" for name, theirs, ours in checks
           if theirs is not None and theirs != ours]
    if config_json.get("backbone_cfg", {}).get("project_to_dim") is not None:
        out.append("backbone_cfg.project_to_dim is set (GR00T N1.5 has none)")
    return out


def _plain(x):
    return list(x) if isinstance(x, (tuple, list)) else x


def read_checkpoint_tensors(directory: Path, device: torch.device) -> dict[str, torch.Tensor]:
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory} has neither {INDEX_FILE} nor model.safetensors")
    tensors = {}
    for name in files:
        with safe_open(directory / name, framework="pt", device=str(device)) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def read_model_tensors(directory: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the model's parameter names: the LM head (tied) stands in for a missing token
    embedding, RLinf's action_head.value_head.* become value_head.*, and the official keys the computation never
    reads (UNUSED_OFFICIAL_KEYS) are dropped."""
    tensors = read_checkpoint_tensors(directory, device)
    if EMBED_TOKENS not in tensors and LM_HEAD in tensors:  # tied: either name may be the one saved
        tensors[EMBED_TOKENS] = tensors[LM_HEAD]
    tensors = {VALUE_HEAD_PREFIX + k.removeprefix(RLINF_VALUE_HEAD_PREFIX)  # RLinf keeps it in the action head
               if k.startswith(RLINF_VALUE_HEAD_PREFIX) else k: v for k, v in tensors.items()}
    return {k: v for k, v in tensors.items() if not UNUSED_OFFICIAL_KEYS.search(k)}


def read_json(directory: Path, name: str | Path, what: str) -> dict:
    """directory/name as JSON; a missing file is an error that says what the file holds."""
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {name} ({what})")
    return json.loads(path.read_text())


def write_checkpoint_dir(directory: Path, tensors: dict[str, torch.Tensor], config_json: dict, metadata_json: dict,
                         max_shard_bytes: int) -> None:
    """Sharded safetensors + index, config.json, experiment_cfg/metadata.json, written beside `directory` and
    renamed into place, so a crash never leaves a torn checkpoint under that name."""
    directory = directory.expanduser().absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.detach().to("cpu").contiguous()
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2))
        (tmp / METADATA_FILE).parent.mkdir()
        (tmp / METADATA_FILE).write_text(json.dumps(metadata_json, indent=2))
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

