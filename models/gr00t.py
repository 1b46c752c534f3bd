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

Efficiency, in the model itself: the frozen backbone runs once per observation; its features are returned by
`sample` and reused by `evaluate` (no second backbone pass in training); the cross-attention K/V of the VL tokens
are computed once per call and shared by every denoising step; no LLM logits are computed; bf16 autocast on GPU.
The GPU fast path (fused GEMM epilogues, regional torch.compile, CUDA graphs) is `models/gr00t_fast.py`, applied
only on request; checkpoint I/O in the official layout is `models/gr00t_checkpoint.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.func import functional_call
from transformers import Qwen3Config, Qwen3Model, SiglipVisionConfig, SiglipVisionModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

from models.gr00t_checkpoint import (
    LEANVLA_CONFIG_FILE,
    METADATA_FILE,
    SIGLIP_HEAD_PREFIX,
    VALUE_HEAD_PREFIX,
    config_mismatches,
    export_tensors,
    leanvla_config,
    official_config,
    read_json,
    read_model_tensors,
    read_optional_json,
    resolve_checkpoint,
    write_checkpoint_dir,
)
from models.gr00t_processor import (
    BUILTIN_TOKENIZER,
    SPECIAL_TOKENS,
    Gr00tMetadata,
    Gr00tProcessor,
    Instruction,
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
    """diffusers' Attention (to_q / to_k / to_v / to_out.0, biases), scaled dot-product attention. `key_mask`
    [N, Lk] (False: a padding token, not attended to) or None (no padding)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(context_dim or dim, inner)
        self.to_v = nn.Linear(context_dim or dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "n l (h d) -> n h l d", h=self.heads)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self.to_k(context)), self._split(self.to_v(context))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        k, v = kv if kv is not None else self.kv(x)
        q = self._split(self.to_q(x))
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask)
        return self.to_out[0](rearrange(out, "n h l d -> n l (h d)"))


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The dtype that x's matmuls run in: autocast's on x's device when autocast is on there, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


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
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, key_mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        h = self.norm1(x, temb) if self.ada_norm else self.norm1(x)
        x = x + self.attn1(h, kv, key_mask)
        return x + self.ff(self.norm3(x))


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

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, kv: list,
                vl_mask: torch.Tensor | None = None) -> torch.Tensor:
        """vl_mask [N, L]: the VL tokens that cross-attention may attend to (None: all)."""
        temb = self.timestep_encoder(timesteps)
        for blk, blk_kv in zip(self.transformer_blocks, kv):
            x = blk(x, temb, blk_kv, vl_mask if blk_kv is not None else None)
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=1)
        return self.proj_out_2(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])


class SelfAttentionTransformer(nn.Module):
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(cfg.llm_hidden, cfg.vl_heads, cfg.vl_head_dim) for _ in range(cfg.vl_layers)])

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.transformer_blocks:
            x = blk(x, key_mask=key_mask)
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

    def condition(self, features: torch.Tensor, state: torch.Tensor, slot: int, mask: torch.Tensor | None = None):
        """Backbone features [N, L, D], normalised state [N, S] -> VL tokens, state token, cross-attention K/V.
        `mask` [N, L]: the real tokens of left-padded prompts (None: no padding). NVIDIA's action head attends to
        padding too; masked here, a row's actions do not depend on the other prompts of its batch."""
        vl = self.vl_self_attention(self.vlln(features), mask)
        state_token = self.state_encoder(state[:, None], slot)
        return vl, state_token, self.model.cross_kv(vl)

    def velocity(self, x: torch.Tensor, timesteps: torch.Tensor, state_token: torch.Tensor, kv: list,
                 slot: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted flow velocity [N, H, A] at the noisy chunk x [N, H, A], discretised time [N]."""
        n, horizon = x.shape[:2]
        a = self.action_encoder(x, timesteps, slot) + self.position_embedding.weight[:horizon]
        tokens = torch.cat([state_token.to(a.dtype), self.future_tokens.weight.to(a.dtype).expand(n, -1, -1), a], 1)
        out = self.model(tokens, timesteps, kv, mask)
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
def siglip_config(cfg: Gr00tConfig) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        vision_use_head=True,  # the attention-pooling head: in the official checkpoint, never computed by GR00T
        attn_implementation="sdpa")


class _VisionTower(nn.Module):  # backbone.eagle_model.vision_model.vision_model.*
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(siglip_config(cfg))


class _LanguageModel(nn.Module):  # backbone.eagle_model.language_model.model.* (lm_head: never computed)
    def __init__(self, cfg: Gr00tConfig):
        super().__init__()
        self.model = Qwen3Model(Qwen3Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_intermediate,
            num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
            num_key_value_heads=cfg.llm_kv_heads, head_dim=cfg.llm_head_dim, rms_norm_eps=1e-6,
            rope_theta=cfg.rope_theta, max_position_embeddings=40960, hidden_act="silu", attention_bias=False,
            tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa"))


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
    def observe(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, image_positions: torch.Tensor,
                prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images [N*V, 3, S, S] and the prompt -> backbone features [N, L, D] (the LLM's normed last state).

        One prompt for the batch: input_ids [L], image_positions [V*P]. One prompt per row: input_ids [N, L],
        image_positions [N, V*P], and prompt_mask [N, L] (False: padding) where they were left-padded (None: the
        prompts have one length)."""
        eagle, siglip = self.backbone.eagle_model, self.backbone.eagle_model.vision_model.vision_model
        # SigLIP's last hidden state; its pooling head, which GR00T does not use, is not run
        vit = siglip.post_layernorm(siglip.encoder(inputs_embeds=siglip.embeddings(pixel_values)).last_hidden_state)
        vit = eagle.mlp1(vit)                                               # [N*V, P, D]
        lm = eagle.language_model.model
        n = pixel_values.shape[0] // self.cfg.num_views
        vit = rearrange(vit, "(n v) p d -> n (v p) d", n=n)
        if input_ids.ndim == 1:
            embeds = lm.embed_tokens(input_ids).unsqueeze(0).repeat(n, 1, 1)  # [N, L, D]
            embeds[:, image_positions] = vit.to(embeds.dtype)
        else:
            embeds = lm.embed_tokens(input_ids)
            embeds[torch.arange(n, device=embeds.device)[:, None], image_positions] = vit.to(embeds.dtype)
        # Without padding, plain causal attention: passing the mask mapping skips transformers' mask construction,
        # which would build an explicit mask (no flash kernel) under CUDA graphs.
        attention = causal_padding_mask(prompt_mask) if prompt_mask is not None else None
        return lm(inputs_embeds=embeds, attention_mask={"full_attention": attention}, use_cache=False).last_hidden_state

    # -- action head --
    def _timesteps(self, steps: torch.Tensor) -> torch.Tensor:
        return steps * self.cfg.num_timestep_buckets // self.cfg.num_inference_steps  # int(k / K * buckets)

    def value(self, vl: torch.Tensor, mask: torch.Tensor | None, state_token: torch.Tensor) -> torch.Tensor:
        """The value MLP on the mean of the real VL tokens (mask [N, L]; None: all) and the state token."""
        pooled = vl.mean(1) if mask is None else (vl * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        x = torch.cat([pooled, state_token[:, 0].to(pooled.dtype)], dim=-1)
        return self.value_head(x.detach() if self.cfg.value_detach_input else x).float()

    def act(self, features: torch.Tensor, mask: torch.Tensor | None, state: torch.Tensor, noise: torch.Tensor,
            sde_steps: torch.Tensor, horizon: int, dims: int, noise_level: float):
        """Denoise noise[:, 0] with the per-step noise noise[:, k + 1]; rows' stochastic steps are `sde_steps`
        [N, M] (-1: none). `mask` [N, L]: the real tokens of padded prompts (None: no padding). Returns the chain
        [N, K+1, H, A], its log-prob [N] and the value [N]."""
        head, slot, n = self.action_head, self.cfg.slot, noise.shape[0]
        num_steps = noise.shape[1] - 1
        vl, state_token, kv = head.condition(features, state, slot, mask)
        x = noise[:, 0]
        chain, logprob = [x], torch.zeros(n, device=x.device)
        for k in range(num_steps):
            step = torch.full((n,), k, dtype=torch.long, device=x.device)
            v = head.velocity(x, self._timesteps(step), state_token, kv, slot, mask).float()
            mean, std = flow_step(x, v, step / num_steps, 1 / num_steps, noise_level, (sde_steps == k).any(-1))
            x = mean + std * noise[:, k + 1]
            logprob = logprob + step_logprob(x, mean, std, horizon, dims)
            chain.append(x)
        return torch.stack(chain, 1), logprob, self.value(vl, mask, state_token)

    def sample(self, pixel_values, input_ids, image_positions, prompt_mask, state, noise, sde_steps, **rl):
        features = self.observe(pixel_values, input_ids, image_positions, prompt_mask)
        return (features, *self.act(features, prompt_mask, state, noise, sde_steps, **rl))

    def evaluate(self, features: torch.Tensor, mask: torch.Tensor | None, state: torch.Tensor, chain: torch.Tensor,
                 sde_steps: torch.Tensor, horizon: int, dims: int, noise_level: float):
        """Log-prob [N] of the stored chain's stochastic steps under the current params, and the value [N]."""
        head, slot, n = self.action_head, self.cfg.slot, chain.shape[0]
        num_steps = chain.shape[1] - 1
        vl, state_token, kv = head.condition(features, state, slot, mask)
        rows = torch.arange(n, device=chain.device)
        logprob = torch.zeros(n, device=chain.device)
        for m in range(sde_steps.shape[1]):
            step = sde_steps[:, m]
            live, step = step >= 0, step.clamp_min(0)
            x, x_next = chain[rows, step], chain[rows, step + 1]
            v = head.velocity(x, self._timesteps(step), state_token, kv, slot, mask).float()
            mean, std = flow_step(x, v, step / num_steps, 1 / num_steps, noise_level, live)
            logprob = logprob + step_logprob(x_next, mean, std, horizon, dims)
        return logprob, self.value(vl, mask, state_token)

    def flow_matching_loss(self, features, mask, state, actions, action_mask, noise, t):
        """GR00T's training loss: velocity MSE at x_t = (1 - t) noise + t action, over the valid dims."""
        head, slot = self.action_head, self.cfg.slot
        _, state_token, kv = head.condition(features, state, slot, mask)
        t3 = t.view(-1, 1, 1)
        x_t = (1 - t3) * noise + t3 * actions
        timesteps = (t * self.cfg.num_timestep_buckets).long()
        v = head.velocity(x_t, timesteps, state_token, kv, slot, mask).float()
        return ((v - (actions - noise)).square() * action_mask).sum() / action_mask.sum()

    def observe_value(self, pixel_values, input_ids, image_positions, prompt_mask, state):
        features = self.observe(pixel_values, input_ids, image_positions, prompt_mask)
        vl, state_token, _ = self.action_head.condition(features, state, self.cfg.slot, prompt_mask)
        return self.value(vl, prompt_mask, state_token)


def causal_padding_mask(prompt_mask: torch.Tensor) -> torch.Tensor:
    """[N, L] real tokens of left-padded prompts -> [N, 1, L, L] bool: each token attends to the real tokens up to
    itself. A padding token attends to itself alone, so that its (unused) state stays finite: a row of nothing but
    masked keys would be NaN, and NaN values leak through zero attention weights."""
    length = prompt_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=prompt_mask.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=prompt_mask.device)
    return (causal & (prompt_mask[:, None, :] | itself))[:, None]


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


def padding_mask(backbone_mask: torch.Tensor) -> torch.Tensor | None:
    """A stored backbone_mask [N, L] as the model takes it: None where no row has padding (the unmasked kernels,
    as `sample` ran them for a batch of one prompt)."""
    return None if bool(backbone_mask.all()) else backbone_mask


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
                 tokenizer: PromptTokenizer | str | None = None, max_shard_bytes: int = 5 * 2**30):
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
        # what `sample` runs after its random draws; gr00t_fast.accelerate replays it from a CUDA graph
        self.sample_fn: Callable[..., dict[str, torch.Tensor]] = self.sample_core

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
        if name.startswith(SIGLIP_HEAD_PREFIX):  # never computed: kept only to write the official layout back
            return False
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

    # GR00T normalises by the checkpoint's metadata (dataset statistics): no running statistics to update
    normalizer_names: tuple[str, ...] = ()

    def update_normalizer(self, params, states, all_reduce_sum=None) -> None:
        """Nothing to do: the normalisation statistics are fixed by the metadata."""

    def init(self, seed: int) -> dict[str, torch.Tensor]:
        """Random params: transformers' init for SigLIP / Qwen3, the official one for the action head."""
        return self._as_params(self._random_tensors(seed, lambda: Gr00tModel(self.cfg)))

    def _random_tensors(self, seed: int, build: Callable[[], nn.Module], prefix: str = "") -> dict[str, torch.Tensor]:
        # Drawn on the CPU whatever the device: a GPU's random streams differ from the CPU's (and between GPU models),
        # and a run's checkpoints store only its trainable params, redrawing the frozen ones from the seed wherever
        # the run is resumed or evaluated.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
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
        """Params from a checkpoint in the official layout (hub id or local dir), in any of its dtype layouts;
        strict on names and shapes.

        The value head comes from leanvla_rl.safetensors, or RLinf's action_head.value_head.* (renamed value_head.*);
        a checkpoint without one (every official one) gets a fresh one (seed 0). The tied LM head is dropped. A
        checkpoint without SigLIP's pooling head, which GR00T never computes, gets a seeded one, so that `save`
        writes the whole official layout."""
        directory = resolve_checkpoint(path_or_hub_id)
        mismatches = config_mismatches(self.cfg, read_json(directory, "config.json", "the model config"),
                                       read_optional_json(directory / LEANVLA_CONFIG_FILE))
        if mismatches:
            raise ValueError(f"checkpoint {directory} does not match the policy's config: " + "; ".join(mismatches))
        tensors = read_model_tensors(directory, self.device)
        c = self.cfg
        for prefix, build in ((VALUE_HEAD_PREFIX, lambda: ValueHead(c.llm_hidden + c.dit_dim, c.value_hidden)),
                              (SIGLIP_HEAD_PREFIX, lambda: SiglipMultiheadAttentionPoolingHead(siglip_config(c)))):
            if not any(k.startswith(prefix) for k in tensors):
                tensors.update(self._random_tensors(0, build, prefix))
        self._check_tensors(tensors, str(directory))
        metadata_json = read_json(directory, METADATA_FILE, "normalisation statistics")
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
        """Export in the official layout, which NVIDIA's code loads unchanged: config.json, the official tensors
        (backbone bf16, action head fp32) in sharded safetensors + model.safetensors.index.json,
        experiment_cfg/metadata.json. What only leanvla reads goes beside them: the value head in
        leanvla_rl.safetensors, the whole Gr00tConfig in leanvla_config.json. Atomic."""
        self._check_tensors(params, "params")
        if not self.metadata_json:
            raise RuntimeError("cannot save without normalisation metadata (experiment_cfg/metadata.json): load a "
                               "checkpoint or pass metadata= first")
        model_tensors, rl_tensors = export_tensors(params)
        write_checkpoint_dir(Path(path), model_tensors, official_config(self.cfg), self.metadata_json,
                             self.max_shard_bytes, rl_tensors, leanvla_config(self.cfg))

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, device: str | torch.device = "cpu", **overrides):
        """(policy, params) with the config read from the checkpoint: its leanvla_config.json, or the official 3B
        sizes for checkpoints written by Isaac-GR00T / RLinf. `overrides` set runtime options (e.g. noise_level)."""
        directory = resolve_checkpoint(path_or_hub_id)
        fields = {f.name for f in dataclasses.fields(Gr00tConfig)}
        leanvla_json = (read_optional_json(directory / LEANVLA_CONFIG_FILE)  # earlier exports: config.json's section
                        or read_json(directory, "config.json", "the model config").get("leanvla", {}))
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in leanvla_json.items() if k in fields}
        saved["normalization_overrides"] = tuple(tuple(p) for p in saved.get("normalization_overrides", ()))
        policy_kwargs = {k: overrides.pop(k) for k in ("compute_dtype", "tokenizer") if k in overrides}
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

    def sample_core(self, params, rgb, state, input_ids, image_positions, prompt_mask, noise, sde_steps) -> dict:
        """The whole of `sample` after the random draws: a pure function of tensors (CUDA-graphable)."""
        proc = self.processor
        with self._autocast():
            pixels = proc.pixel_values(rgb)
            state_norm = proc.normalize_state(state)
            features, chain, logprob, value = functional_call(
                self.model, params, ("sample", pixels, input_ids, image_positions, prompt_mask, state_norm, noise,
                                     sde_steps), self._rl_kwargs())
        mask = prompt_mask if prompt_mask is not None else torch.ones(features.shape[:2], dtype=torch.bool,
                                                                      device=features.device)
        return {"actions": proc.env_actions(chain[:, -1]), "logprob": logprob, "value": value,
                "backbone_features": features, "backbone_mask": mask, "state_norm": state_norm, "chain": chain,
                "sde_steps": sde_steps}

    @torch.no_grad()
    def sample(self, params: dict[str, torch.Tensor], obs: dict[str, torch.Tensor], instruction: Instruction = "",
               generator: torch.Generator | None = None, deterministic: bool = False) -> dict[str, torch.Tensor]:
        """Act on a batch: obs = {"rgb": uint8 [N, V, H, W, 3], "state": float [N, S]}; `instruction` one string
        for the batch, or one per row (left-padded to the longest, as the official processor batches prompts).

        Returns actions [N, T, A_env] (env units), logprob [N] (Flow-SDE chain; 0 when deterministic), value [N],
        state [N, S] (obs['state'] as given), and what `evaluate` needs: backbone_features [N, L, D], backbone_mask
        [N, L], state_norm [N, max_state_dim], chain [N, K+1, H, action_dim] (x_0 noise ... x_K action), sde_steps
        [N, M] (stochastic steps, -1: none).
        """
        proc = self.processor
        rgb, state = obs["rgb"].to(self.device), obs["state"].to(self.device)
        proc.check_rgb(rgb)
        proc.check_state(state)
        if rgb.shape[0] != state.shape[0]:
            raise ValueError(f"obs['rgb'] has {rgb.shape[0]} rows, obs['state'] {state.shape[0]}")
        n, c, steps = rgb.shape[0], self.cfg, self.cfg.num_inference_steps
        input_ids, image_positions, prompt_mask = proc.prompts(instruction, n)
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
        out = self.sample_fn(params, rgb, state, input_ids, image_positions, prompt_mask, noise, sde_steps)
        return {**out, "state": state}

    def _evaluate_core(self, params, features, mask, state_norm, chain, sde_steps):
        with self._autocast():
            return functional_call(self.model, params, ("evaluate", features, mask, state_norm, chain, sde_steps),
                                   self._rl_kwargs())

    def evaluate(self, params: dict[str, torch.Tensor],
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Differentiable log-prob [N] and value [N] of `sample`'s output rows under `params`; entropy None (the
        Flow-SDE noise is fixed, so its entropy does not depend on the params)."""
        logprob, value = self._evaluate_core(params, batch["backbone_features"], padding_mask(batch["backbone_mask"]),
                                             batch["state_norm"], batch["chain"], batch["sde_steps"])
        return logprob, value, None

    @torch.no_grad()
    def value(self, params: dict[str, torch.Tensor], obs: dict[str, torch.Tensor],
              instruction: Instruction = "") -> torch.Tensor:
        proc = self.processor
        rgb, state = obs["rgb"].to(self.device), obs["state"].to(self.device)
        proc.check_rgb(rgb)
        proc.check_state(state)
        input_ids, image_positions, prompt_mask = proc.prompts(instruction, rgb.shape[0])
        with self._autocast():
            return functional_call(self.model, params, ("observe_value", proc.pixel_values(rgb), input_ids,
                                                        image_positions, prompt_mask, proc.normalize_state(state)))

    # -- supervised fine-tuning --
    def sft_loss(self, params: dict[str, torch.Tensor], batch: dict[str, Any],
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """GR00T's flow-matching loss on demonstrations: batch = {"rgb", "state", "instruction" (one string, or one
        per row), "actions": [N, action_horizon, A_env] env units} (or cached "backbone_features"/"backbone_mask"/
        "state_norm" instead of rgb/state). Time t = (s - Beta(1.5, 1)) / s, s = 0.999."""
        proc, c = self.processor, self.cfg
        actions = batch["actions"].to(self.device)
        if actions.ndim != 3 or actions.shape[1] != c.action_horizon:
            raise ValueError(f"batch['actions'] must be [N, {c.action_horizon}, {proc.action_dim}], "
                             f"got {tuple(actions.shape)}")
        n = actions.shape[0]
        with self._autocast():
            if "backbone_features" in batch:
                features, state_norm = batch["backbone_features"], batch["state_norm"]
                mask = padding_mask(batch["backbone_mask"])
            else:
                rgb, state = batch["rgb"].to(self.device), batch["state"].to(self.device)
                proc.check_rgb(rgb)
                proc.check_state(state)
                input_ids, image_positions, mask = proc.prompts(batch.get("instruction", ""), n)
                state_norm = proc.normalize_state(state)
                with torch.set_grad_enabled(torch.is_grad_enabled() and (c.tune_llm or c.tune_visual)):
                    features = functional_call(self.model, params, ("observe", proc.pixel_values(rgb), input_ids,
                                                                    image_positions, mask))
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
