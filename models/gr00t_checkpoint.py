"""GR00T N1.5 checkpoints in the official layout (Isaac-GR00T's `save_pretrained`), read and written by name.

    directory/
      config.json                      GR00T_N1_5_Config
      model.safetensors.index.json     weight map of the shards (or one model.safetensors)
      model-0000i-of-0000n.safetensors the official tensors by their official names: the backbone in bf16, the
                                       action head in fp32 (SigLIP's pooling head included, the tied LM head not)
      experiment_cfg/metadata.json     normalisation statistics and modality layout per embodiment
      leanvla_rl.safetensors           what only leanvla reads: the RL value head (absent from official ones)
      leanvla_config.json              leanvla's whole Gr00tConfig (sizes of the small presets, the RL head)

NVIDIA's code reads the first four and ignores the rest. A hub id (`nvidia/GR00T-N1.5-3B`,
`RLinf/RLinf-Gr00t-SFT-Stack-cube`) is fetched with huggingface_hub; a local directory is read as is. Writing is
atomic: a temporary directory beside the target, renamed into place.
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
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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
RL_FILE = "leanvla_rl.safetensors"
LEANVLA_CONFIG_FILE = "leanvla_config.json"
# The LM head: tied to the token embedding and never computed (GR00T uses hidden states, not logits). Official
# checkpoints leave it out; one that holds it instead of the embedding is read as the embedding.
LM_HEAD = "backbone.eagle_model.language_model.lm_head.weight"
EMBED_TOKENS = "backbone.eagle_model.language_model.model.embed_tokens.weight"
SIGLIP_HEAD_PREFIX = "backbone.eagle_model.vision_model.vision_model.head."
VALUE_HEAD_PREFIX = "value_head."
RLINF_VALUE_HEAD_PREFIX = "action_head.value_head."
# The official checkpoint's dtypes by name prefix: the Eagle backbone in bf16, the action head in fp32.
OFFICIAL_DTYPES = {"backbone.": torch.bfloat16, "action_head.": torch.float32}


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
    """config.json as Isaac-GR00T writes it (GR00T_N1_5_Config). The tune_* flags say which parts this model's
    training here updated, as NVIDIA's fine-tuning writes them."""
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
        "transformers_version": transformers.__version__,
    }


def leanvla_config(cfg: Gr00tConfig) -> dict:
    """leanvla_config.json: every field of the Gr00tConfig (config.json cannot express the small presets' sizes)."""
    return dataclasses.asdict(cfg)


def config_mismatches(cfg: Gr00tConfig, config_json: dict, leanvla_json: dict | None = None) -> list[str]:
    """Where a checkpoint disagrees with `cfg` on a size: its leanvla_config.json if it has one (or the `leanvla`
    section that config.json held in earlier exports), else config.json's official keys."""
    theirs = leanvla_json if leanvla_json is not None else config_json.get("leanvla")
    if theirs is not None:
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
    embedding and is dropped; the value head comes from leanvla_rl.safetensors, or from RLinf's
    action_head.value_head.* in the shards."""
    tensors = read_checkpoint_tensors(directory, device)
    lm_head = tensors.pop(LM_HEAD, None)
    if EMBED_TOKENS not in tensors and lm_head is not None:  # tied: either name may be the one saved
        tensors[EMBED_TOKENS] = lm_head
    tensors = {VALUE_HEAD_PREFIX + k.removeprefix(RLINF_VALUE_HEAD_PREFIX)  # RLinf keeps it in the action head
               if k.startswith(RLINF_VALUE_HEAD_PREFIX) else k: v for k, v in tensors.items()}
    if (directory / RL_FILE).is_file():
        tensors.update(load_file(directory / RL_FILE, device=str(device)))
    return tensors


def official_dtype(name: str) -> torch.dtype:
    return next(dtype for prefix, dtype in OFFICIAL_DTYPES.items() if name.startswith(prefix))


def export_tensors(params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Params -> (the official checkpoint's tensors in its dtypes, leanvla's RL-only tensors: the value head)."""
    model = {n: t.detach().to(official_dtype(n)) for n, t in params.items() if not n.startswith(VALUE_HEAD_PREFIX)}
    rl = {n: t.detach() for n, t in params.items() if n.startswith(VALUE_HEAD_PREFIX)}
    return model, rl


def read_optional_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_json(directory: Path, name: str | Path, what: str) -> dict:
    """directory/name as JSON; a missing file is an error that says what the file holds."""
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {name} ({what})")
    return json.loads(path.read_text())


def write_checkpoint_dir(directory: Path, tensors: dict[str, torch.Tensor], config_json: dict, metadata_json: dict,
                         max_shard_bytes: int, rl_tensors: dict[str, torch.Tensor] | None = None,
                         leanvla_json: dict | None = None) -> None:
    """Sharded safetensors + index, config.json, experiment_cfg/metadata.json, and leanvla's own two files, written
    beside `directory` and renamed into place, so a crash never leaves a torn checkpoint under that name."""
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
        if rl_tensors:
            save_file({k: t.to("cpu").contiguous() for k, t in rl_tensors.items()}, tmp / RL_FILE,
                      metadata={"format": "pt"})
        if leanvla_json is not None:
            (tmp / LEANVLA_CONFIG_FILE).write_text(json.dumps(leanvla_json, indent=2))
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

