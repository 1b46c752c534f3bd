"""GR00T N1.5 as a stateless policy: one file, sizes in one dataclass, weights by the official checkpoint's names.

    policy = Gr00tPolicy("gr00t-n1.5-3b", device="cuda")
    params = policy.load("nvidia/GR00T-N1.5-3B")            # or a local dir; or policy.init(seed) + metadata
    out = policy.sample(params, obs, instruction, generator)    # actions [N, T, A_env], logprob [N], value [N], ...
    logprob, value, entropy = policy.evaluate(params, out)      # differentiable; equals out["logprob"] for same params

The architecture of Isaac-GR00T 1259d624 (`gr00t/model`), re-implemented:
  backbone     Eagle 2.5: SigLIP vision tower (224 px, patch 14 -> 256 tokens per view), a linear projector
               1152 -> 2048, the Qwen3 LLM truncated to its first 12 layers plus its final norm. Image features
               replace the `<IMG_CONTEXT>` tokens of the chat prompt; the output is the normed last hidden state.
  action head  layer norm + 4-layer self-attention over the VL tokens; per-embodiment (32 slots) state encoder,
               action encoder (with the flow time) and decoder; a 16-layer DiT over [state, 32 future tokens,
               16 action tokens] with AdaLN on the flow time, alternating cross-attention to the VL tokens (even
               blocks) and self-attention (odd blocks); flow matching, 4 Euler steps from noise (t=0) to action.
  RL head      Flow-SDE (RLinf, πRL): Euler steps made Gaussian with noise level a; a value MLP on the masked mean
               of the VL tokens and the state embedding.

Efficiency: the frozen backbone runs once per observation; its features are returned by `sample` and reused by
`evaluate` (no second backbone pass in training); the cross-attention K/V of the VL tokens are computed once per
call and shared by every denoising step; no LLM logits are computed; bf16 autocast on GPU; optional CUDA graphs
and regional torch.compile (each repeated transformer block compiled once per block class, the rest eager). On
CUDA, `sample` runs each MLP's input GEMM with its bias + GELU epilogue and puts each block's closing residual add
into its last GEMM (linear_gelu_tanh, add_linear); training keeps the plain ops, which have a backward.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call
from transformers import Qwen3Config, Qwen3Model, SiglipVisionConfig, SiglipVisionModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from models.gr00t_processor import (
    BUILTIN_TOKENIZER,
    SPECIAL_TOKENS,
    Gr00tMetadata,
    Gr00tProcessor,
    PromptTokenizer,
    load_tokenizer,
    select_metadata,
)

# Embodiment tag -> slot of the per-embodiment state encoder / action encoder / decoder.
# Official N1.5 (gr00t/data/embodiment_tags.py) plus RLinf's fine-tuned Franka tags.
EMBODIMENT_SLOTS = {"new_embodiment": 31, "oxe_droid": 17, "agibot_genie1": 26, "gr1": 24,
                    "isaaclab_franka": 31, "libero_franka": 31}


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gr00tConfig:
    """Every size and option of the model, the RL head and the processor. Defaults are the official 3B sizes."""
    # backbone: SigLIP vision tower
    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 1152
    vision_layers: int = 27
    vision_heads: int = 16
    vision_intermediate: int = 4304
    # backbone: Qwen3 LLM, truncated to `llm_layers` layers (official select_layer) + its final norm
    llm_hidden: int = 2048
    llm_layers: int = 12
    llm_heads: int = 16
    llm_kv_heads: int = 8
    llm_head_dim: int = 128
    llm_intermediate: int = 6144
    vocab_size: int = 151680
    rope_theta: float = 1_000_000.0
    image_token_id: int = 151669
    tokenizer: str = "Qwen/Qwen3-1.7B"
    """Hub id or local dir of a Qwen tokenizer (Eagle's tokens are added), or 'builtin' (the project's own)."""
    # action head
    vl_layers: int = 4
    vl_heads: int = 32
    vl_head_dim: int = 64
    dit_layers: int = 16
    dit_heads: int = 32
    dit_head_dim: int = 48
    hidden_size: int = 1024
    action_dim: int = 32
    action_horizon: int = 16
    max_state_dim: int = 64
    num_future_tokens: int = 32
    max_seq_len: int = 1024
    num_embodiments: int = 32
    num_inference_steps: int = 4
    num_timestep_buckets: int = 1000
    noise_beta_alpha: float = 1.5
    noise_beta_beta: float = 1.0
    noise_s: float = 0.999
    # value head (RLinf: 3584 -> 1024 -> 512 -> 256 -> 1, ReLU)
    value_hidden: tuple[int, ...] = (1024, 512, 256)
    value_detach_input: bool = True
    """Value loss does not train the VL self-attention / state encoder (RLinf's detach_critic_input)."""
    # RL head: Flow-SDE
    noise_level: float = 0.5
    sde_steps: Literal["one", "all"] = "one"
    """'one': one random denoising step per `sample` call is stochastic (RLinf); 'all': every step."""
    executed_actions: int = 16
    """T: actions of the predicted chunk executed per decision (RLinf stack-cube: 16)."""
    # processor
    num_views: int = 2
    crop_scale: float = 0.95
    embodiment_tag: str = "new_embodiment"
    embodiment_slot: int | None = None
    """Overrides EMBODIMENT_SLOTS[embodiment_tag]."""
    state_keys: tuple[str, ...] | None = None
    """Concatenation order of the state keys in obs['state']; None: the metadata's order."""
    action_keys: tuple[str, ...] | None = None
    state_normalization: str = "min_max"
    action_normalization: str = "min_max"
    normalization_overrides: tuple[tuple[str, str], ...] = ()
    """Per-key modes, e.g. (("action.gripper", "binary"),)."""
    gripper: str = "sign"
    """Gripper post-processing: 'sign' (Isaac Lab, RLinf stack-cube), 'libero' ([0,1] -> [+1,-1]), 'none'."""
    formalize_language: bool = False
    # trainable parts (the official flags)
    tune_llm: bool = False
    tune_visual: bool = False
    tune_projector: bool = True
    tune_diffusion_model: bool = True

    def __post_init__(self):
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vl_heads * self.vl_head_dim != self.llm_hidden:
            problems.append(f"vl_heads * vl_head_dim = {self.vl_heads * self.vl_head_dim} != llm_hidden "
                            f"{self.llm_hidden}")
        if not 1 <= self.executed_actions <= self.action_horizon:
            problems.append(f"executed_actions {self.executed_actions} not in [1, {self.action_horizon}]")
        if not self.noise_level > 0:
            problems.append(f"noise_level {self.noise_level} must be > 0 (for deterministic actions: "
                            "sample(deterministic=True))")
        if self.sde_steps not in ("one", "all"):
            problems.append(f"sde_steps {self.sde_steps!r} is not 'one' or 'all'")
        if self.num_inference_steps < 1:
            problems.append("num_inference_steps must be >= 1")
        if self.action_horizon > self.max_seq_len:
            problems.append(f"action_horizon {self.action_horizon} > max_seq_len {self.max_seq_len}")
        if self.embodiment_slot is None and self.embodiment_tag not in EMBODIMENT_SLOTS:
            problems.append(f"unknown embodiment tag {self.embodiment_tag!r} (known: {sorted(EMBODIMENT_SLOTS)}); "
                            f"set embodiment_slot")
        if not 0 <= self.slot < self.num_embodiments:
            problems.append(f"embodiment slot {self.slot} not in [0, {self.num_embodiments})")
        if problems:
            raise ValueError("invalid Gr00tConfig: " + "; ".join(problems))

    @property
    def slot(self) -> int:
        return self.embodiment_slot if self.embodiment_slot is not None else EMBODIMENT_SLOTS.get(
            self.embodiment_tag, -1)

    @property
    def tokens_per_view(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def dit_dim(self) -> int:  # the official input_embedding_dim
        return self.dit_heads * self.dit_head_dim

    @classmethod
    def preset(cls, name: str, **overrides) -> Gr00tConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown GR00T preset {name!r}; known presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


_TINY_VOCAB = 256 + len(SPECIAL_TOKENS)
PRESETS: dict[str, Gr00tConfig] = {
    "gr00t-n1.5-3b": Gr00tConfig(),
    # Same code, a few layers of reduced width: quick GPU runs, offline (the project's tokenizer).
    "gr00t-small": Gr00tConfig(
        vision_hidden=384, vision_layers=6, vision_heads=6, vision_intermediate=1536,
        llm_hidden=512, llm_layers=4, llm_heads=8, llm_kv_heads=4, llm_head_dim=64, llm_intermediate=1536,
        vocab_size=_TINY_VOCAB, image_token_id=_TINY_VOCAB - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(
            "<IMG_CONTEXT>"), tokenizer=BUILTIN_TOKENIZER,
        vl_layers=2, vl_heads=8, vl_head_dim=64, dit_layers=8, dit_heads=8, dit_head_dim=48, hidden_size=256,
        value_hidden=(256, 128)),
    # CPU tests: the real 224 px / 256-token-per-view layout, tiny widths.
    "gr00t-tiny": Gr00tConfig(
        vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
        llm_hidden=64, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_head_dim=16, llm_intermediate=128,
        vocab_size=_TINY_VOCAB, image_token_id=_TINY_VOCAB - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(
            "<IMG_CONTEXT>"), tokenizer=BUILTIN_TOKENIZER,
        vl_layers=1, vl_heads=2, vl_head_dim=32, dit_layers=2, dit_heads=2, dit_head_dim=16, hidden_size=32,
        num_future_tokens=4, max_seq_len=64, value_hidden=(32, 16)),
}

# Fields that fix tensor shapes; a checkpoint's `leanvla` config must agree on them.
SIZE_FIELDS = ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads", "vision_intermediate",
               "llm_hidden", "llm_layers", "llm_heads", "llm_kv_heads", "llm_head_dim", "llm_intermediate",
               "vocab_size", "vl_layers", "vl_heads", "vl_head_dim", "dit_layers", "dit_heads", "dit_head_dim",
               "hidden_size", "action_dim", "action_horizon", "max_state_dim", "num_future_tokens", "max_seq_len",
               "num_embodiments", "value_hidden")


# ---------------------------------------------------------------------------------------------------------------
# Action head modules (names and shapes as the official checkpoint; dropout omitted: RL runs it disabled)
# ---------------------------------------------------------------------------------------------------------------
class CategorySpecificLinear(nn.Module):
    """One linear map per embodiment slot: W [slots, in, out], b [slots, out]."""

    def __init__(self, num_categories: int, in_dim: int, out_dim: int):
        super().__init__()
        self.W = nn.Parameter(0.02 * torch.randn(num_categories, in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(num_categories, out_dim))

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        return x @ self.W[slot] + self.b[slot]  # every row has the same embodiment: one matmul, not a bmm


class CategorySpecificMLP(nn.Module):
    def __init__(self, num_categories: int, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layer1 = CategorySpecificLinear(num_categories, in_dim, hidden_dim)
        self.layer2 = CategorySpecificLinear(num_categories, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        return self.layer2(F.relu(self.layer1(x, slot)), slot)


_LOG_10000_F32 = float(torch.tensor(10000.0).log())  # the official encoding computes log(10000) in float32


def sinusoidal_encoding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[...] -> [..., dim] = [sin, cos] of t * 10000^(-i/half) (the action encoder's time encoding)."""
    half = dim // 2
    exponent = -torch.arange(half, dtype=torch.float32, device=timesteps.device) * (_LOG_10000_F32 / half)
    freqs = timesteps.float().unsqueeze(-1) * exponent.exp()
    return torch.cat([freqs.sin(), freqs.cos()], dim=-1)


class MultiEmbodimentActionEncoder(nn.Module):
    def __init__(self, action_dim: int, hidden: int, num_embodiments: int):
        super().__init__()
        self.W1 = CategorySpecificLinear(num_embodiments, action_dim, hidden)
        self.W2 = CategorySpecificLinear(num_embodiments, 2 * hidden, hidden)
        self.W3 = CategorySpecificLinear(num_embodiments, hidden, hidden)
        self.hidden = hidden

    def forward(self, actions: torch.Tensor, timesteps: torch.Tensor, slot: int) -> torch.Tensor:
        """actions [N, H, A], timesteps [N] (discretised flow time) -> [N, H, hidden]."""
        a = self.W1(actions, slot)
        tau = sinusoidal_encoding(timesteps[:, None].expand(-1, actions.shape[1]), self.hidden).to(a.dtype)
        x = F.silu(self.W2(torch.cat([a, tau], dim=-1), slot))
        return self.W3(x, slot)


def timestep_embedding(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers' Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1): [N] -> [N, dim] = [cos, sin]."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - 1)
    emb = timesteps[:, None].float() * exponent.exp()[None, :]
    return torch.cat([emb.cos(), emb.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEncoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        proj = timestep_embedding(timesteps, 256)
        return self.timestep_embedder(proj.to(self.timestep_embedder.linear_1.weight.dtype))


class Attention(nn.Module):
    """diffusers' Attention (to_q / to_k / to_v / to_out.0, biases), scaled dot-product attention, no mask."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(context_dim or dim, inner)
        self.to_v = nn.Linear(context_dim or dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self.to_k(context)), self._split(self.to_v(context))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        k, v = kv if kv is not None else self.kv(x)
        q = self._split(self.to_q(x))
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.to_out[0](out.transpose(1, 2).flatten(2))


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The dtype that x's matmuls run in: autocast's on x's device when autocast is on there, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def linear_gelu_tanh(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(linear(x)), the MLP input of SigLIP and of the DiT / VL blocks. On CUDA without autograd (`sample`)
    it is one cuBLASLt GEMM whose epilogue adds the bias and applies GELU (tanh form), instead of a GEMM and a pass
    over its [..., 4 x hidden] output; torch.compile keeps the op (inductor calls ATen for it). The op has no
    backward, so training takes the plain path (as does the RL update's `evaluate`, and `recompute_logprob`,
    which runs with autograd for that reason). It rounds to bf16 once more: on the GPU a rollout's log-probs and
    the update's differ by that rounding, as they do by batch shape (--recompute-logprob measures the gap)."""
    if not x.is_cuda or torch.is_grad_enabled():
        return F.gelu(linear(x), approximate="tanh")
    dtype = compute_dtype_of(x)
    out = torch._addmm_activation(linear.bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype),
                                  linear.weight.to(dtype).t(), use_gelu=True)
    return out.view(*x.shape[:-1], out.shape[-1])


@torch.library.custom_op("leanvla::add_matmul_", mutates_args=("out",))
def _add_matmul_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """out += x @ weight.T in place: one GEMM that reads out as its C (beta = 1)."""
    out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())


@_add_matmul_.register_fake
def _add_matmul_fake(out, x, weight) -> None:  # shapes for tracing: nothing to return
    return None


def add_linear(residual: torch.Tensor, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """residual + linear(x), a block's closing residual add. On CUDA without autograd (`sample`), with the residual
    in the compute dtype, the GEMM accumulates into residual + bias (cuBLAS beta = 1) rather than writing its output
    for an add to read again; compiled, inductor computes residual + bias in the kernel that makes the residual, and
    the GEMM updates that buffer in place. In bf16 it rounds differently from the plain path: like linear_gelu_tanh,
    a difference between a rollout's and the update's numbers on the GPU. Training, the CPU (where `sample` and
    `evaluate` then agree exactly) and fp32 residuals under autocast (the VL blocks) take the plain path."""
    dtype = compute_dtype_of(x)
    if not x.is_cuda or torch.is_grad_enabled() or residual.dtype != dtype:
        return residual + linear(x)
    # a copy to update, not the caller's tensor; "+ 0", not clone(): inductor fuses this add into the kernel that
    # makes the residual (and its norm), where it gave a clone a kernel of its own (Qwen3 on an H100)
    out = residual + (linear.bias.to(dtype) if linear.bias is not None else 0)
    _add_matmul_(out, x.to(dtype), linear.weight.to(dtype))
    return out


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu_tanh(self.proj, x)


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn='gelu-approximate'): net.0.proj, (net.1 dropout), net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, scaled and shifted by the flow-time embedding."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class TransformerBlock(nn.Module):
    """diffusers-style BasicTransformerBlock as GR00T uses it: [norm1 -> attn1] + x, [norm3 -> ff] + x."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, ada_norm: bool = False):
        super().__init__()
        self.ada_norm = ada_norm
        self.norm1 = AdaLayerNorm(dim) if ada_norm else nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=not ada_norm)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.norm1(x, temb) if self.ada_norm else self.norm1(x)
        x = x + self.attn1(h, kv)
        return add_linear(x, self.ff.net[2], self.ff.net[0](self.norm3(x)))


class DiT(nn.Module):
    """The flow-matching transformer: AdaLN on the flow time; even blocks cross-attend to the VL tokens."""

    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        dim = cfg.dit_dim
        self.timestep_encoder = TimestepEncoder(dim)
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(dim, cfg.dit_heads, cfg.dit_head_dim, cfg.llm_hidden if i % 2 == 0 else None,
                             ada_norm=True) for i in range(cfg.dit_layers)])
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, cfg.hidden_size)

    def cross_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """K/V of the VL tokens for each cross-attention block: computed once, shared by all denoising steps.
        The tokens are cast to the compute dtype once, here: under autocast they leave the VL blocks in fp32, and each
        of the 2 x 8 projections would cast (and in training, save) its own copy."""
        context = context.to(compute_dtype_of(context))
        return [blk.attn1.kv(context) if i % 2 == 0 else None for i, blk in enumerate(self.transformer_blocks)]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, kv: list) -> torch.Tensor:
        temb = self.timestep_encoder(timesteps)
        for blk, blk_kv in zip(self.transformer_blocks, kv):
            x = blk(x, temb, blk_kv)
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=1)
        return self.proj_out_2(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])


class SelfAttentionTransformer(nn.Module):
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(cfg.llm_hidden, cfg.vl_heads, cfg.vl_head_dim) for _ in range(cfg.vl_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.transformer_blocks:
            x = blk(x)
        return x


class FlowMatchingActionHead(nn.Module):
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        e, d = cfg.num_embodiments, cfg.dit_dim
        self.model = DiT(cfg)
        self.state_encoder = CategorySpecificMLP(e, cfg.max_state_dim, cfg.hidden_size, d)
        self.action_encoder = MultiEmbodimentActionEncoder(cfg.action_dim, d, e)
        self.action_decoder = CategorySpecificMLP(e, cfg.hidden_size, cfg.hidden_size, cfg.action_dim)
        self.future_tokens = nn.Embedding(cfg.num_future_tokens, d)
        self.vlln = nn.LayerNorm(cfg.llm_hidden)
        self.vl_self_attention = SelfAttentionTransformer(cfg)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, d)
        nn.init.normal_(self.future_tokens.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def condition(self, features: torch.Tensor, state: torch.Tensor, slot: int):
        """Backbone features [N, L, D], normalised state [N, S] -> VL tokens, state token, cross-attention K/V."""
        vl = self.vl_self_attention(self.vlln(features))
        state_token = self.state_encoder(state[:, None], slot)
        return vl, state_token, self.model.cross_kv(vl)

    def velocity(self, x: torch.Tensor, timesteps: torch.Tensor, state_token: torch.Tensor, kv: list,
                 slot: int) -> torch.Tensor:
        """Predicted flow velocity [N, H, A] at the noisy chunk x [N, H, A], discretised time [N]."""
        n, horizon = x.shape[:2]
        a = self.action_encoder(x, timesteps, slot) + self.position_embedding.weight[:horizon]
        tokens = torch.cat([state_token.to(a.dtype), self.future_tokens.weight.to(a.dtype).expand(n, -1, -1), a], 1)
        out = self.model(tokens, timesteps, kv)
        return self.action_decoder(out[:, -horizon:], slot)  # the decoder is row-wise: decode only the actions


class ValueHead(nn.Module):
    """RLinf's ValueHead: ReLU MLP, Kaiming-normal (fan_out) hidden layers, N(0, 0.02) output layer."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            in_dim = h
        layers.append(nn.Linear(in_dim, 1))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                if m is self.mlp[-1]:
                    nn.init.normal_(m.weight, std=0.02)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Backbone: transformers' SigLIP and Qwen3, nested so that parameter names are the official ones
# ---------------------------------------------------------------------------------------------------------------
class _SiglipEncoderLayer(SiglipEncoderLayer):
    """transformers' SigLIP encoder layer (same parameter names), its MLP's fc1 + GELU one fused GEMM and its closing
    residual add the fc2 GEMM's."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask,
                                 **kwargs)
        hidden_states = hidden_states + attn
        mlp = self.mlp
        return add_linear(hidden_states, mlp.fc2, linear_gelu_tanh(mlp.fc1, self.layer_norm2(hidden_states)))


class _Qwen3DecoderLayer(Qwen3DecoderLayer):
    """transformers' Qwen3 decoder layer (same parameter names), its closing residual add the down_proj GEMM's."""

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = hidden_states + attn
        mlp, x = self.mlp, self.post_attention_layernorm(hidden_states)
        return add_linear(hidden_states, mlp.down_proj, mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


class _VisionTower(nn.Module):  # backbone.eagle_model.vision_model.vision_model.*
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
            num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads, image_size=cfg.image_size,
            patch_size=cfg.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
            vision_use_head=False,  # the attention-pooling head: in the official model, never used by GR00T
            attn_implementation="sdpa"))
        layers = self.vision_model.encoder.layers
        for i, layer in enumerate(layers):
            layers[i] = _SiglipEncoderLayer(layer.mlp.config)


class _LanguageModel(nn.Module):  # backbone.eagle_model.language_model.model.* (lm_head: never computed)
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        self.model = Qwen3Model(Qwen3Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_intermediate,
            num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
            num_key_value_heads=cfg.llm_kv_heads, head_dim=cfg.llm_head_dim, rms_norm_eps=1e-6,
            rope_theta=cfg.rope_theta, max_position_embeddings=40960, hidden_act="silu", attention_bias=False,
            tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa"))
        layers = self.model.layers
        for i, layer in enumerate(layers):
            layers[i] = _Qwen3DecoderLayer(self.model.config, i)


class EagleModel(nn.Module):
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        self.vision_model = _VisionTower(cfg)
        self.mlp1 = nn.Sequential(nn.Linear(cfg.vision_hidden, cfg.llm_hidden))
        self.language_model = _LanguageModel(cfg)


class EagleBackbone(nn.Module):
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        self.eagle_model = EagleModel(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Flow-SDE: pure functions of tensors
# ---------------------------------------------------------------------------------------------------------------
def flow_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, dt: float, noise_level: float,
              stochastic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step from flow time t [N] to t + dt as a Gaussian: returns (mean [N, H, A], std [N, 1, 1]).

    GR00T's flow runs from noise (t=0) to action (t=1): x1 = x + (1 - t) v predicts the action, x0 = x - t v the
    noise. Deterministic rows take the ODE step x + dt v (std 0). Stochastic rows take the Flow-SDE step of RLinf /
    πRL with sigma_t = a sqrt((1 - t) / t) (t = 0 replaced by dt):
        mean = x0 (1 - t - dt - sigma_t^2 dt / (2 (1 - t))) + x1 (t + dt),   std = sqrt(dt) sigma_t.
    """
    t = t.view(-1, 1, 1)
    sigma = noise_level * torch.sqrt((1 - t) / torch.where(t == 0, torch.full_like(t, dt), t))
    x0, x1 = x - v * t, x + v * (1 - t)
    sde_mean = x0 * (1 - (t + dt) - sigma.square() * dt / (2 * (1 - t))) + x1 * (t + dt)
    live = stochastic.view(-1, 1, 1)
    mean = torch.where(live, sde_mean, x + v * dt)
    std = torch.where(live, math.sqrt(dt) * sigma, torch.zeros_like(sigma))
    return mean, std


def step_logprob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, horizon: int,
                 dims: int) -> torch.Tensor:
    """log N(x_next; mean, std^2) summed over the executed actions [:horizon] and valid dims [:dims]; 0 where std=0."""
    live = std > 0
    s = torch.where(live, std, torch.ones_like(std))
    z = (x_next[:, :horizon, :dims] - mean[:, :horizon, :dims]) / s
    lp = -0.5 * z.square() - s.log() - 0.5 * math.log(2 * math.pi)
    return (lp * live).sum((1, 2))


# ---------------------------------------------------------------------------------------------------------------
# The model: a shape-only skeleton; every entry point is reached through functional_call(model, params, (op, ...))
# ---------------------------------------------------------------------------------------------------------------
class Gr00tModel(nn.Module):
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = EagleBackbone(cfg)
        self.action_head = FlowMatchingActionHead(cfg)
        self.value_head = ValueHead(cfg.llm_hidden + cfg.dit_dim, cfg.value_hidden)

    def forward(self, op: str, *args, **kwargs):
        return getattr(self, op)(*args, **kwargs)

    # -- backbone --
    def observe(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                image_positions: torch.Tensor) -> torch.Tensor:
        """Images [N*V, 3, S, S] + one prompt [L] -> backbone features [N, L, D] (the LLM's normed last state)."""
        eagle = self.backbone.eagle_model
        vit = eagle.vision_model.vision_model(pixel_values=pixel_values).last_hidden_state
        vit = eagle.mlp1(vit)                                               # [N*V, P, D]
        lm = eagle.language_model.model
        text = lm.embed_tokens(input_ids)                                    # [L, D]
        n = pixel_values.shape[0] // self.cfg.num_views
        embeds = text.unsqueeze(0).repeat(n, 1, 1)
        embeds[:, image_positions] = vit.reshape(n, -1, vit.shape[-1]).to(embeds.dtype)
        # One prompt for the batch, so no padding: plain causal attention. Passing the mask mapping skips
        # transformers' mask construction, which would build an explicit mask (no flash kernel) under CUDA graphs.
        return lm(inputs_embeds=embeds, attention_mask={"full_attention": None}, use_cache=False).last_hidden_state

    # -- action head --
    def _timesteps(self, steps: torch.Tensor) -> torch.Tensor:
        return steps * self.cfg.num_timestep_buckets // self.cfg.num_inference_steps  # int(k / K * buckets)

    def value(self, vl: torch.Tensor, mask: torch.Tensor, state_token: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(vl.dtype)
        pooled = (vl * m).sum(1) / m.sum(1).clamp_min(1)
        x = torch.cat([pooled, state_token[:, 0].to(pooled.dtype)], dim=-1)
        return self.value_head(x.detach() if self.cfg.value_detach_input else x).float()

    def act(self, features: torch.Tensor, mask: torch.Tensor, state: torch.Tensor, noise: torch.Tensor,
            sde_steps: torch.Tensor, horizon: int, dims: int, noise_level: float):
        """Denoise noise[:, 0] with the per-step noise noise[:, k + 1]; rows' stochastic steps are `sde_steps`
        [N, M] (-1: none). Returns the chain [N, K+1, H, A], its log-prob [N] and the value [N]."""
        head, slot, n = self.action_head, self.cfg.slot, noise.shape[0]
        num_steps = noise.shape[1] - 1
        vl, state_token, kv = head.condition(features, state, slot)
        x = noise[:, 0]
        chain, logprob = [x], torch.zeros(n, device=x.device)
        for k in range(num_steps):
            step = torch.full((n,), k, dtype=torch.long, device=x.device)
            v = head.velocity(x, self._timesteps(step), state_token, kv, slot).float()
            mean, std = flow_step(x, v, step / num_steps, 1 / num_steps, noise_level, (sde_steps == k).any(-1))
            x = mean + std * noise[:, k + 1]
            logprob = logprob + step_logprob(x, mean, std, horizon, dims)
            chain.append(x)
        return torch.stack(chain, 1), logprob, self.value(vl, mask, state_token)

    def sample(self, pixel_values, input_ids, image_positions, state, noise, sde_steps, **rl):
        features = self.observe(pixel_values, input_ids, image_positions)
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        return (features, mask, *self.act(features, mask, state, noise, sde_steps, **rl))

    def evaluate(self, features: torch.Tensor, mask: torch.Tensor, state: torch.Tensor, chain: torch.Tensor,
                 sde_steps: torch.Tensor, horizon: int, dims: int, noise_level: float):
        """Log-prob [N] of the stored chain's stochastic steps under the current params, and the value [N]."""
        head, slot, n = self.action_head, self.cfg.slot, chain.shape[0]
        num_steps = chain.shape[1] - 1
        vl, state_token, kv = head.condition(features, state, slot)
        rows = torch.arange(n, device=chain.device)
        logprob = torch.zeros(n, device=chain.device)
        for m in range(sde_steps.shape[1]):
            step = sde_steps[:, m]
            live, step = step >= 0, step.clamp_min(0)
            x, x_next = chain[rows, step], chain[rows, step + 1]
            v = head.velocity(x, self._timesteps(step), state_token, kv, slot).float()
            mean, std = flow_step(x, v, step / num_steps, 1 / num_steps, noise_level, live)
            logprob = logprob + step_logprob(x_next, mean, std, horizon, dims)
        return logprob, self.value(vl, mask, state_token)

    def flow_matching_loss(self, features, mask, state, actions, action_mask, noise, t):
        """GR00T's training loss: velocity MSE at x_t = (1 - t) noise + t action, over the valid dims."""
        head, slot = self.action_head, self.cfg.slot
        _, state_token, kv = head.condition(features, state, slot)
        t3 = t.view(-1, 1, 1)
        x_t = (1 - t3) * noise + t3 * actions
        timesteps = (t * self.cfg.num_timestep_buckets).long()
        v = head.velocity(x_t, timesteps, state_token, kv, slot).float()
        return ((v - (actions - noise)).square() * action_mask).sum() / action_mask.sum()

    def observe_value(self, pixel_values, input_ids, image_positions, state):
        features = self.observe(pixel_values, input_ids, image_positions)
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        vl, state_token, _ = self.action_head.condition(features, state, self.cfg.slot)
        return self.value(vl, mask, state_token)


def _build_skeleton(cfg: Gr00tConfig, device: torch.device) -> Gr00tModel:
    """The model on the meta device (no memory) with its few non-persistent buffers made real on `device`."""
    with torch.device("meta"):
        model = Gr00tModel(cfg)
    emb = model.backbone.eagle_model.vision_model.vision_model.embeddings
    emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=device).expand(1, -1),
                        persistent=False)
    lm = model.backbone.eagle_model.language_model.model
    lm.rotary_emb = Qwen3RotaryEmbedding(lm.config, device=device)
    assert not [n for n, b in model.named_buffers() if b.is_meta]
    return model


# torch.compile modes for the blocks; the ones that add inductor's own CUDA graphs would nest in `CudaGraphed`'s.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# Widest row that inductor normalises in one pass (SigLIP 1152, Qwen3 2048; inductor's own limit is 1024).
PERSISTENT_ROW_NUMEL = 2048
_OnePassRowNorms = None  # the InductorChoices subclass below, made on first use: importing inductor takes seconds


def use_one_pass_row_norms() -> None:
    """Let inductor generate layer / RMS norms over rows of up to PERSISTENT_ROW_NUMEL elements as persistent
    reductions: one program holds a whole row in registers, reads it once and writes the result. Above 1024
    elements inductor otherwise loops over the row, once for the statistics and again to normalise. On an H100
    (batch-64 `sample` of the 3B model) the two norms of every SigLIP and VL block took 6.9 ms per call, not 11.2;
    Qwen3's (2048) were already as fast. Installed through inductor's override point for its heuristics: as the
    calling thread's choices handler (torch.compile generates code there), and as `inductor_choices_class` in
    inductor's config, which keys its FX graph cache, so that graphs compiled with and without it never mix."""
    global _OnePassRowNorms
    from torch._inductor.virtualized import V

    if _OnePassRowNorms is None:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint

        class _OnePassRowNorms(InductorChoices):  # global: pickled by name into the cache key
            @staticmethod
            def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
                if (torch._inductor.config.triton.persistent_reductions and not cooperative_reduction
                        and features.get_reduction_hint() == ReductionHint.INNER
                        and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_NUMEL)):
                    return True
                return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    torch._inductor.config.inductor_choices_class = _OnePassRowNorms
    V.set_choices_handler(_OnePassRowNorms())


def compile_blocks(model: Gr00tModel, mode: str = "default") -> list[nn.Module]:
    """Regional compilation: torch.compile each repeated transformer block in place, and the three norms over all
    of an observation's tokens; everything else stays eager.
    `mode` "max-autotune-no-cudagraphs" also benchmarks GEMM kernels (Triton templates with fused epilogues
    against cuBLAS) while compiling: slower to compile.

    Compiling all of `sample` made one graph of every layer, the DiT unrolled over the denoising steps (the 3B model
    did not finish compiling in 290 s on an H100). One graph per stack of blocks (all SigLIP layers, all Qwen3
    layers, ...) would fuse each block's closing residual add into the next block's norm, but on an H100 it was
    slower (292 against 304 samples/s at batch 64) and took 5x the warm-up; `add_linear` now puts that add into
    the block's last GEMM instead. Dynamo inlines nn modules and takes their parameters as graph inputs, so blocks
    of one class share one compiled code and read the params dict that functional_call swaps in.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    eagle, head = model.backbone.eagle_model, model.action_head
    blocks = [*eagle.vision_model.vision_model.encoder.layers,    # transformers' SiglipEncoderLayer, subclassed
              *eagle.language_model.model.layers,                 # transformers' Qwen3DecoderLayer, subclassed
              *head.vl_self_attention.transformer_blocks, *head.model.transformer_blocks]  # TransformerBlock
    # dynamic=True: batch size (rollout, minibatches) and prompt length vary, so trace sizes symbolically from the
    # first call rather than compiling each block once per size. What still recompiles is discrete: block variant
    # (TransformerBlock: VL, DiT self- and cross-attention), grad mode, param dtypes (fp32 training / bf16 inference
    # params), batch 1 (dynamo specializes sizes 0 and 1). That can pass dynamo's default of 8 graphs per code
    # object, after which the block silently runs eager: raise the limit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # The norms that run once per observation over all its tokens: eager, each is several passes over [N, L, D] in
    # fp32 (Qwen3's RMSNorm five kernels, a LayerNorm under autocast a cast and the norm); compiled, one kernel.
    norms = [eagle.vision_model.vision_model.post_layernorm, eagle.language_model.model.norm, head.vlln]
    use_one_pass_row_norms()
    for module in blocks + norms:
        module.compile(dynamic=True, mode=mode)
    return blocks + norms


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints in the official layout
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs for a pure function of tensors
# ---------------------------------------------------------------------------------------------------------------
class CudaGraphed:
    """Replays a CUDA graph of fn(params, *args) (args: tensors) captured once per input signature.

    The graph reads params at the addresses it was captured with: updating them in place (optimizer.step) is seen
    by later replays; a params dict with other tensors is captured anew. Outputs are cloned out of the graph.
    """

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], warmup: int = 2, max_graphs: int = 8):
        self.fn, self.warmup, self.max_graphs = fn, warmup, max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def __call__(self, params: dict[str, torch.Tensor], *args: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (tuple((a.shape, a.dtype) for a in args), tuple(t.data_ptr() for t in params.values()))
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:  # e.g. params replaced (not updated in place) every step
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = self._capture(params, args)
        graph, static_args, static_out = self.graphs[key]
        for s, a in zip(static_args, args):
            s.copy_(a)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}

    def _capture(self, params, args):
        static_args = [a.clone() for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(params, *static_args)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(params, *static_args)
        return graph, static_args, static_out


# ---------------------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------------------
class Gr00tPolicy:
    """GR00T N1.5 as a stateless policy: every method takes the params dict (official key names + value_head.*).

    The policy holds the shape-only module, the processor (normalisation statistics of the checkpoint's
    embodiment, tokenizer) and the compute settings; the weights live only in the params dict.
    """

    def __init__(self, cfg: Gr00tConfig | str = "gr00t-n1.5-3b", device: str | torch.device = "cpu",
                 metadata: Gr00tMetadata | dict | None = None, *, compute_dtype: torch.dtype | None = None,
                 tokenizer: PromptTokenizer | str | None = None, cuda_graphs: bool = False, compile: bool = False,
                 compile_mode: str = "default", max_shard_bytes: int = 5 * 2**30):
        self.cfg = Gr00tConfig.preset(cfg) if isinstance(cfg, str) else cfg
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = _build_skeleton(self.cfg, self.device)
        self.param_shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        self.tokenizer = tokenizer if tokenizer is not None else self.cfg.tokenizer
        self.max_shard_bytes = max_shard_bytes
        self.metadata_json: dict = {}
        self._processor: Gr00tProcessor | None = None
        if metadata is not None:
            self.set_metadata(metadata)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        if compile:  # compiled blocks inside the CUDA graph: inductor's kernels are capturable
            compile_blocks(self.model, compile_mode)
        self._sample_fn = CudaGraphed(self._sample_core) if cuda_graphs else self._sample_core

    # -- metadata and processor --
    def set_metadata(self, metadata: Gr00tMetadata | dict) -> None:
        """Normalisation statistics and modality layout: a Gr00tMetadata, one embodiment's entry, or a whole
        metadata.json dict (then the entry of cfg.embodiment_tag is used)."""
        if isinstance(metadata, dict):
            metadata = (Gr00tMetadata(metadata) if "statistics" in metadata
                        else select_metadata(metadata, self.cfg.embodiment_tag))
        if metadata.embodiment_tag != self.cfg.embodiment_tag:  # its statistics belong to another slot
            raise ValueError(f"metadata is for embodiment {metadata.embodiment_tag!r}, the config for "
                             f"{self.cfg.embodiment_tag!r}")
        self.metadata_json = {**self.metadata_json, metadata.embodiment_tag: metadata.entry}
        self._processor = Gr00tProcessor(self.cfg, metadata, self._get_tokenizer, self.device)

    def _get_tokenizer(self) -> PromptTokenizer:
        if isinstance(self.tokenizer, str):  # loaded on first use: the hub may be needed
            self.tokenizer = load_tokenizer(self.tokenizer, self.cfg.vocab_size)
        return self.tokenizer

    @property
    def processor(self) -> Gr00tProcessor:
        if self._processor is None:
            raise RuntimeError("no normalisation metadata: load a checkpoint, or pass metadata= (see "
                               "models.gr00t_processor.metadata_from_data)")
        return self._processor

    @property
    def action_horizon(self) -> int:
        """T: env steps per decision (the executed part of the predicted chunk)."""
        return self.cfg.executed_actions

    @property
    def action_dim(self) -> int:
        """The env's action dims (sum of the metadata's action keys)."""
        return self.processor.action_dim

    # -- params --
    def is_trainable(self, name: str) -> bool:
        c = self.cfg
        if name.startswith(VALUE_HEAD_PREFIX):
            return True
        if name.startswith("backbone.eagle_model.language_model."):
            return c.tune_llm
        if name.startswith(("backbone.eagle_model.vision_model.", "backbone.eagle_model.mlp1.")):
            return c.tune_visual
        if name.startswith("action_head.model."):
            return c.tune_diffusion_model
        if name.startswith(("action_head.state_encoder.", "action_head.action_encoder.",
                            "action_head.action_decoder.", "action_head.position_embedding.")):
            return c.tune_projector
        if name.startswith("action_head."):  # vlln, vl_self_attention, future_tokens: always trained officially
            return True
        raise KeyError(f"{name!r} is not a GR00T parameter")

    def is_value_param(self, name: str) -> bool:
        return name.startswith(VALUE_HEAD_PREFIX)

    def init(self, seed: int) -> dict[str, torch.Tensor]:
        """Random params: transformers' init for SigLIP / Qwen3, the official one for the action head."""
        return self._as_params(self._random_tensors(seed, lambda: Gr00tModel(self.cfg)))

    def _random_tensors(self, seed: int, build: Callable[[], nn.Module], prefix: str = "") -> dict[str, torch.Tensor]:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with torch.device(self.device):
                module = build()
        return {prefix + n: p.detach() for n, p in module.named_parameters()}

    def _as_params(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trainable tensors in float32 with requires_grad; frozen ones in the compute dtype; model order."""
        out = {}
        for name in self.param_shapes:
            train = self.is_trainable(name)
            t = tensors[name].detach().to(self.device, torch.float32 if train else self.compute_dtype)
            out[name] = t.requires_grad_(train)
        return out

    def inference_params(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of `params` for acting only (evaluation, deployment): every float tensor in the compute dtype,
        without grad. `sample` then casts nothing per call; with `params` it casts the fp32 trainable weights on
        every call (1.07 B of them at the 3B size). Updates to `params` do not reach the copy."""
        return {n: t.detach().to(self.compute_dtype) if t.is_floating_point() else t.detach()
                for n, t in params.items()}

    def load(self, path_or_hub_id: str) -> dict[str, torch.Tensor]:
        """Params from a checkpoint in the official layout (hub id or local dir); strict on names and shapes.

        Accepted beyond the model's keys: SigLIP's unused pooling head and the tied LM head (dropped); RLinf's
        action_head.value_head.* (renamed value_head.*). A checkpoint without a value head (every official one)
        gets a fresh one (seed 0)."""
        directory = resolve_checkpoint(path_or_hub_id)
        config_file = directory / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{directory} has no config.json")
        mismatches = config_mismatches(self.cfg, json.loads(config_file.read_text()))
        if mismatches:
            raise ValueError(f"checkpoint {directory} does not match the policy's config: " + "; ".join(mismatches))
        tensors = read_checkpoint_tensors(directory, self.device)
        if EMBED_TOKENS not in tensors and LM_HEAD in tensors:  # tied: either name may be the one saved
            tensors[EMBED_TOKENS] = tensors[LM_HEAD]
        tensors = {VALUE_HEAD_PREFIX + k.removeprefix(RLINF_VALUE_HEAD_PREFIX)  # RLinf keeps it in the action head
                   if k.startswith(RLINF_VALUE_HEAD_PREFIX) else k: v for k, v in tensors.items()}
        tensors = {k: v for k, v in tensors.items() if not UNUSED_OFFICIAL_KEYS.search(k)}
        if not any(k.startswith(VALUE_HEAD_PREFIX) for k in tensors):
            tensors.update(self._random_tensors(0, lambda: ValueHead(self.cfg.llm_hidden + self.cfg.dit_dim,
                                                                      self.cfg.value_hidden), VALUE_HEAD_PREFIX))
        self._check_tensors(tensors, str(directory))
        metadata_file = directory / METADATA_FILE
        if not metadata_file.exists():
            raise FileNotFoundError(f"{directory} has no {METADATA_FILE} (normalisation statistics)")
        metadata_json = json.loads(metadata_file.read_text())
        self.set_metadata(select_metadata(metadata_json, self.cfg.embodiment_tag))
        self.metadata_json = metadata_json  # every embodiment's entry, written back by save
        return self._as_params(tensors)

    def _check_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        missing = [k for k in self.param_shapes if k not in tensors]
        unexpected = sorted(k for k in tensors if k not in self.param_shapes)
        wrong = [f"{k}: checkpoint {tuple(t.shape)}, model {self.param_shapes[k]}"
                 for k, t in tensors.items() if k in self.param_shapes and tuple(t.shape) != self.param_shapes[k]]
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong:
            problems.append(f"wrong shapes ({len(wrong)}): {'; '.join(wrong)}")
        if problems:
            raise ValueError(f"checkpoint {source} does not fit GR00T ({self.cfg.embodiment_tag}): "
                             + " | ".join(problems))

    def save(self, params: dict[str, torch.Tensor], path: str) -> None:
        """The official layout: config.json, sharded safetensors + model.safetensors.index.json,
        experiment_cfg/metadata.json (value_head.* ride along in the shards). Atomic."""
        self._check_tensors(params, "params")
        if not self.metadata_json:
            raise RuntimeError("cannot save without normalisation metadata (experiment_cfg/metadata.json): load a "
                               "checkpoint or pass metadata= first")
        write_checkpoint_dir(Path(path), params, official_config(self.cfg), self.metadata_json,
                             self.max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, device: str | torch.device = "cpu", **overrides):
        """(policy, params) with the config read from the checkpoint: its `leanvla` section, or the official 3B
        sizes for checkpoints written by Isaac-GR00T / RLinf. `overrides` set runtime options (e.g. noise_level)."""
        directory = resolve_checkpoint(path_or_hub_id)
        config_json = json.loads((directory / "config.json").read_text())
        fields = {f.name for f in dataclasses.fields(Gr00tConfig)}
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in config_json.get("leanvla", {}).items()
                 if k in fields}
        saved["normalization_overrides"] = tuple(tuple(p) for p in saved.get("normalization_overrides", ()))
        policy_kwargs = {k: overrides.pop(k) for k in ("compute_dtype", "tokenizer", "cuda_graphs", "compile",
                                                          "compile_mode")
                         if k in overrides}
        cfg = dataclasses.replace(Gr00tConfig(), **{**saved, **overrides})
        policy = cls(cfg, device, **policy_kwargs)
        return policy, policy.load(str(directory))

    # -- acting --
    def _autocast(self):
        # No cast cache: inside a caller's autocast region (train loops wrap `sample` in one) the cache would keep
        # the bf16 copies of the fp32 trainable params across calls, and a CUDA graph captured on a cache hit reads
        # those stale copies instead of casting the params that optimizer.step() updates in place.
        return torch.autocast(self.device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32, cache_enabled=False)

    def _rl_kwargs(self) -> dict[str, Any]:
        return {"horizon": self.cfg.executed_actions, "dims": self.processor.action_dim,
                "noise_level": self.cfg.noise_level}

    def _sample_core(self, params, rgb, state, input_ids, image_positions, noise, sde_steps) -> dict:
        """The whole of `sample` after the random draws: a pure function of tensors (CUDA-graphable)."""
        proc = self.processor
        with self._autocast():
            pixels = proc.pixel_values(rgb)
            state_norm = proc.normalize_state(state)
            features, mask, chain, logprob, value = functional_call(
                self.model, params, ("sample", pixels, input_ids, image_positions, state_norm, noise, sde_steps),
                self._rl_kwargs())
        return {"actions": proc.env_actions(chain[:, -1]), "logprob": logprob, "value": value,
                "backbone_features": features, "backbone_mask": mask, "state_norm": state_norm, "chain": chain,
                "sde_steps": sde_steps}

    @torch.no_grad()
    def sample(self, params: dict[str, torch.Tensor], obs: dict[str, torch.Tensor], instruction: str = "",
               generator: torch.Generator | None = None, deterministic: bool = False) -> dict[str, torch.Tensor]:
        """Act on a batch: obs = {"rgb": uint8 [N, V, H, W, 3], "state": float [N, S]}.

        Returns actions [N, T, A_env] (env units), logprob [N] (Flow-SDE chain; 0 when deterministic), value [N],
        and what `evaluate` needs: backbone_features [N, L, D], backbone_mask [N, L], state_norm [N, max_state_dim],
        chain [N, K+1, H, action_dim] (x_0 noise ... x_K action), sde_steps [N, M] (stochastic steps, -1: none).
        """
        proc = self.processor
        rgb, state = obs["rgb"].to(self.device), obs["state"].to(self.device)
        proc.check_rgb(rgb)
        proc.check_state(state)
        if rgb.shape[0] != state.shape[0]:
            raise ValueError(f"obs['rgb'] has {rgb.shape[0]} rows, obs['state'] {state.shape[0]}")
        n, c, steps = rgb.shape[0], self.cfg, self.cfg.num_inference_steps
        input_ids, image_positions = proc.prompt(instruction)
        gen_device = generator.device if generator is not None else self.device
        noise = torch.randn((n, steps + 1, c.action_horizon, c.action_dim), generator=generator,
                            device=gen_device).to(self.device)
        if deterministic:
            sde_steps = torch.full((n, 1), -1, dtype=torch.long, device=self.device)
        elif c.sde_steps == "one":  # one random step per call, shared by the batch (RLinf)
            step = torch.randint(0, steps, (1, 1), generator=generator, device=gen_device).to(self.device)
            sde_steps = step.expand(n, 1).clone()
        else:
            sde_steps = torch.arange(steps, device=self.device).expand(n, steps).clone()
        return self._sample_fn(params, rgb, state, input_ids, image_positions, noise, sde_steps)

    def _evaluate_core(self, params, features, mask, state_norm, chain, sde_steps):
        with self._autocast():
            return functional_call(self.model, params, ("evaluate", features, mask, state_norm, chain, sde_steps),
                                   self._rl_kwargs())

    def evaluate(self, params: dict[str, torch.Tensor],
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Differentiable log-prob [N] and value [N] of `sample`'s output rows under `params`; entropy None (the
        Flow-SDE noise is fixed, so its entropy does not depend on the params)."""
        logprob, value = self._evaluate_core(params, batch["backbone_features"], batch["backbone_mask"],
                                             batch["state_norm"], batch["chain"], batch["sde_steps"])
        return logprob, value, None

    @torch.no_grad()
    def value(self, params: dict[str, torch.Tensor], obs: dict[str, torch.Tensor],
              instruction: str = "") -> torch.Tensor:
        proc = self.processor
        rgb, state = obs["rgb"].to(self.device), obs["state"].to(self.device)
        proc.check_rgb(rgb)
        proc.check_state(state)
        input_ids, image_positions = proc.prompt(instruction)
        with self._autocast():
            return functional_call(self.model, params, ("observe_value", proc.pixel_values(rgb), input_ids,
                                                        image_positions, proc.normalize_state(state)))

    # -- supervised fine-tuning --
    def sft_loss(self, params: dict[str, torch.Tensor], batch: dict[str, Any],
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """GR00T's flow-matching loss on demonstrations: batch = {"rgb", "state", "instruction",
        "actions": [N, action_horizon, A_env] env units} (or cached "backbone_features"/"backbone_mask"/
        "state_norm" instead of rgb/state). Time t = (s - Beta(1.5, 1)) / s, s = 0.999."""
        proc, c = self.processor, self.cfg
        actions = batch["actions"].to(self.device)
        if actions.ndim != 3 or actions.shape[1] != c.action_horizon:
            raise ValueError(f"batch['actions'] must be [N, {c.action_horizon}, {proc.action_dim}], "
                             f"got {tuple(actions.shape)}")
        n = actions.shape[0]
        with self._autocast():
            if "backbone_features" in batch:
                features, mask, state_norm = batch["backbone_features"], batch["backbone_mask"], batch["state_norm"]
            else:
                rgb, state = batch["rgb"].to(self.device), batch["state"].to(self.device)
                proc.check_rgb(rgb)
                proc.check_state(state)
                input_ids, image_positions = proc.prompt(batch.get("instruction", ""))
                state_norm = proc.normalize_state(state)
                with torch.set_grad_enabled(torch.is_grad_enabled() and (c.tune_llm or c.tune_visual)):
                    features = functional_call(self.model, params, ("observe", proc.pixel_values(rgb), input_ids,
                                                                    image_positions))
                mask = torch.ones(features.shape[:2], dtype=torch.bool, device=self.device)
            target, action_mask = proc.normalize_actions(actions)
            gen_device = generator.device if generator is not None else self.device
            noise = torch.randn(target.shape, generator=generator, device=gen_device).to(self.device)
            u = torch.rand(n, generator=generator, device=gen_device).to(self.device)
            if c.noise_beta_beta == 1.0:  # Beta(a, 1) by inversion: its CDF is x^a
                beta = u ** (1 / c.noise_beta_alpha)
            else:
                beta = torch.distributions.Beta(c.noise_beta_alpha, c.noise_beta_beta).sample((n,)).to(self.device)
            t = (c.noise_s - beta) / c.noise_s
            return functional_call(self.model, params, ("flow_matching_loss", features, mask, state_norm, target,
                                                        action_mask, noise, t))
