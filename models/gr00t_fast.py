"""The GPU fast path of GR00T N1.5, kept apart from the model so that `models/gr00t.py` reads as the architecture.

    policy = accelerate(Gr00tPolicy("gr00t-n1.5-3b", "cuda", metadata), compile=True, cuda_graphs=True)

`accelerate` is the one entry point (train.py's `--compile` / `--cuda-graphs`); a policy never passed to it runs
the plain model. What it applies, each measured in docs/performance.md:
  fused layers   the MLP input GEMM with its bias + GELU epilogue (cuBLASLt), and each block's closing residual add
                 inside the block's last GEMM (cuBLAS beta = 1, via the custom op `leanvla::add_matmul_`). The model's
                 blocks and transformers' SigLIP / Qwen3 layers are swapped for subclasses with these forwards: same
                 modules, same parameter names. Only `sample` on CUDA takes the fused ops (they have no backward):
                 with autograd on, and on the CPU, every layer computes exactly what the plain one does.
  compile        regional torch.compile: each repeated transformer block and the three norms over all of an
                 observation's tokens, sizes symbolic; layer / RMS norms of rows up to 2048 wide as one-pass kernels.
  CUDA graphs    `sample` after its random draws replayed from a graph captured once per input signature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from models.gr00t import GELUProj, Gr00tModel, Gr00tPolicy, TransformerBlock, compute_dtype_of


def accelerate(policy: Gr00tPolicy, *, compile: bool = False, cuda_graphs: bool = False,
               compile_mode: str = "default") -> Gr00tPolicy:
    """Put `policy` on the fast path, in place (returned for chaining): the fused layers always; with `compile` the
    regional torch.compile of its blocks; with `cuda_graphs` (CUDA only) `sample` replayed from CUDA graphs.
    Compiled blocks run inside the graph: inductor's kernels are capturable."""
    if cuda_graphs and policy.device.type != "cuda":
        raise ValueError("cuda_graphs=True needs a CUDA device")
    if compile and compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
    use_fused_layers(policy.model)
    if compile:
        compile_blocks(policy.model, compile_mode)
    if cuda_graphs:
        policy.sample_fn = CudaGraphed(policy.sample_core)
    return policy


# ---------------------------------------------------------------------------------------------------------------
# Fused ops: GEMM epilogues for `sample` on CUDA
# ---------------------------------------------------------------------------------------------------------------
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
def add_matmul_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """out += x @ weight.T in place: one GEMM that reads out as its C (beta = 1)."""
    out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())


@add_matmul_.register_fake
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
    add_matmul_(out, x.to(dtype), linear.weight.to(dtype))
    return out

# ---------------------------------------------------------------------------------------------------------------
# The fused layers: subclasses with the same parameters, swapped in by class
# ---------------------------------------------------------------------------------------------------------------
class FusedGELUProj(GELUProj):
    """GELUProj as one GEMM with a bias + GELU epilogue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu_tanh(self.proj, x)


class FusedTransformerBlock(TransformerBlock):
    """TransformerBlock with its closing residual add in the feed-forward's output GEMM."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, key_mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        h = self.norm1(x, temb) if self.ada_norm else self.norm1(x)
        x = x + self.attn1(h, kv, key_mask)
        return add_linear(x, self.ff.net[2], self.ff.net[0](self.norm3(x)))


class FusedSiglipEncoderLayer(SiglipEncoderLayer):
    """transformers' SigLIP encoder layer, its MLP's fc1 + GELU one fused GEMM and its closing residual add the fc2
    GEMM's."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask,
                                 **kwargs)
        hidden_states = hidden_states + attn
        mlp = self.mlp
        return add_linear(hidden_states, mlp.fc2, linear_gelu_tanh(mlp.fc1, self.layer_norm2(hidden_states)))


class FusedQwen3DecoderLayer(Qwen3DecoderLayer):
    """transformers' Qwen3 decoder layer, its closing residual add the down_proj GEMM's."""

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = hidden_states + attn
        mlp, x = self.mlp, self.post_attention_layernorm(hidden_states)
        return add_linear(hidden_states, mlp.down_proj, mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


FUSED_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    GELUProj: FusedGELUProj, TransformerBlock: FusedTransformerBlock,
    SiglipEncoderLayer: FusedSiglipEncoderLayer, Qwen3DecoderLayer: FusedQwen3DecoderLayer}


def use_fused_layers(model: nn.Module) -> None:
    """Swap every layer of a class in FUSED_LAYERS for its fused subclass, in place. A subclass that only overrides
    `forward` keeps the module's attributes, so submodules, parameter names and state dicts stay as they were."""
    for module in model.modules():
        fused = FUSED_LAYERS.get(type(module))
        if fused is not None:
            module.__class__ = fused


# ---------------------------------------------------------------------------------------------------------------
# Regional torch.compile
# ---------------------------------------------------------------------------------------------------------------
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
    slower (292 against 304 samples/s at batch 64) and took 5x the warm-up; the fused layers put that add into
    the block's last GEMM instead (`add_linear`). Dynamo inlines nn modules and takes their parameters as graph
    inputs, so blocks of one class share one compiled code and read the params dict that functional_call swaps in.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    eagle, head = model.backbone.eagle_model, model.action_head
    blocks = [*eagle.vision_model.vision_model.encoder.layers,    # SigLIP encoder layers
              *eagle.language_model.model.layers,                 # Qwen3 decoder layers
              *head.vl_self_attention.transformer_blocks, *head.model.transformer_blocks]  # TransformerBlocks
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
# CUDA graphs for a pure function of tensors
# ---------------------------------------------------------------------------------------------------------------
class CudaGraphed:
    """Replays a CUDA graph of fn(params, *args) (args: tensors, or None) captured once per input signature.

    The graph reads params at the addresses it was captured with: updating them in place (optimizer.step) is seen
    by later replays; a params dict with other tensors is captured anew. Outputs are cloned out of the graph.
    """

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], warmup: int = 2, max_graphs: int = 8):
        self.fn, self.warmup, self.max_graphs = fn, warmup, max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def __call__(self, params: dict[str, torch.Tensor], *args: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (tuple(None if a is None else (a.shape, a.dtype) for a in args),
               tuple(t.data_ptr() for t in params.values()))
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:  # e.g. params replaced (not updated in place) every step
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = self._capture(params, args)
        graph, static_args, static_out = self.graphs[key]
        for s, a in zip(static_args, args):
            if a is not None:
                s.copy_(a)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}

    def _capture(self, params, args):
        static_args = [None if a is None else a.clone() for a in args]
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

