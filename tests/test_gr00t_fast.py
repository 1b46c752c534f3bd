"""GR00T's GPU fast path (models/gr00t_fast.py): the fused layers compute what the plain ones do and keep their
parameter names; regional compile changes no result; the CUDA paths (skipped without a GPU; on the GPU machine:
pytest tests/test_gr00t_fast.py -k cuda) match eager and the CPU."""

import re

import pytest
import torch
from torch._dynamo.utils import counters
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from models.gr00t import GELUProj, Gr00tConfig, Gr00tPolicy, TransformerBlock
from models.gr00t_fast import (
    FusedGELUProj,
    FusedQwen3DecoderLayer,
    FusedSiglipEncoderLayer,
    FusedTransformerBlock,
    accelerate,
    add_linear,
    add_matmul_,
    linear_gelu_tanh,
    use_fused_layers,
    use_one_pass_row_norms,
)
from tests.test_gr00t import INSTRUCTION, gen, make_obs, reference_model
from tests.test_gr00t_processor import make_metadata


@pytest.fixture(scope="module")
def policy():
    return Gr00tPolicy(Gr00tConfig.preset("gr00t-tiny"), metadata=make_metadata())


@pytest.fixture(scope="module")
def params(policy):
    return policy.init(seed=0)


def test_a_plain_policy_runs_the_plain_layers(policy):
    """Without `accelerate` the model is the plain one: transformers' own SigLIP and Qwen3 layers, the plain
    blocks; the fused subclasses only appear when asked for."""
    kinds = {type(m) for m in policy.model.modules()}
    assert {SiglipEncoderLayer, Qwen3DecoderLayer, TransformerBlock, GELUProj} <= kinds
    assert not kinds & {FusedSiglipEncoderLayer, FusedQwen3DecoderLayer, FusedTransformerBlock, FusedGELUProj}


def test_fused_layers_keep_the_parameter_names_and_compute_what_the_plain_layers_do(policy, params):
    """use_fused_layers swaps each layer's class in place: the same parameter names and shapes, and on the CPU (where
    the fused ops take the plain path) exactly the plain layers' results, with and without autograd."""
    cfg = policy.cfg
    plain = reference_model(policy, params)
    fused = reference_model(policy, params)
    use_fused_layers(fused)
    assert {n: tuple(p.shape) for n, p in fused.named_parameters()} == \
        {n: tuple(p.shape) for n, p in plain.named_parameters()}
    kinds = {type(m) for m in fused.modules()}
    assert {FusedSiglipEncoderLayer, FusedQwen3DecoderLayer, FusedTransformerBlock, FusedGELUProj} <= kinds
    assert not kinds & {SiglipEncoderLayer, Qwen3DecoderLayer, TransformerBlock, GELUProj}
    pairs = [(m.backbone.eagle_model.vision_model.vision_model.encoder.layers[0],
              m.backbone.eagle_model.language_model.model.layers[0], m.action_head.model.transformer_blocks[0],
              m.action_head.vl_self_attention.transformer_blocks[0]) for m in (fused, plain)]
    x, h = torch.randn(2, 9, cfg.vision_hidden), torch.randn(2, 9, cfg.llm_hidden)
    a, temb = torch.randn(2, 5, cfg.dit_dim), torch.randn(2, cfg.dit_dim)
    kv = pairs[1][2].attn1.kv(h)
    rope = plain.backbone.eagle_model.language_model.model.rotary_emb(h, torch.arange(9)[None])
    def outputs(siglip, qwen3, dit, vl):
        return [siglip(x, None), qwen3(h, position_embeddings=rope, attention_mask=None), dit(a, temb, kv), vl(h)]

    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for got, want in zip(outputs(*pairs[0]), outputs(*pairs[1])):
                assert torch.equal(got, want)


def test_add_matmul_updates_the_residual_buffer_in_place_in_compiled_code():
    """add_linear's CUDA path (a block's residual + bias, then the GEMM accumulating into it), compiled here on the
    CPU: inductor writes residual + bias from the kernel that makes the residual, and the GEMM updates that buffer
    in place (no copy of it), with the plain result."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    fc1, fc2, norm = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64), torch.nn.LayerNorm(64)

    def block(x, attn):
        h = x + attn
        out = h + fc2.bias
        add_matmul_(out, torch.relu(fc1(norm(h))), fc2.weight)
        return out

    x, attn = torch.randn(2, 8, 5, 64).unbind(0)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(block, dynamic=True), x, attn)
        ref = (x + attn) + fc2(torch.relu(fc1(norm(x + attn))))
    torch.testing.assert_close(out, ref)
    call = codes[-1][codes[-1].index("def call"):]
    updated = re.search(r"add_matmul_\.default\((buf\d+),", call).group(1)
    assert re.search(rf"return \({updated}, \)", call) and "clone" not in call and "copy_" not in call
    torch._dynamo.reset()


# -- regional torch.compile -------------------------------------------------------------------------------------
def test_compile_compiles_the_blocks_and_changes_no_result(policy, params, monkeypatch):
    """accelerate(compile=True) compiles each repeated block in place (inductor, CPU here): sample, evaluate and
    gradients as eager; the params dict is read at every call (other values: other results, no recompile); other
    batch sizes reuse the graphs traced with symbolic sizes. Cold compile ~2.5 min on 2 CPU cores, ~40 s with
    inductor's cache."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)  # never silently eager
    compiled = accelerate(Gr00tPolicy(policy.cfg, metadata=make_metadata()), compile=True)
    blocks = [m for m in compiled.model.modules() if m._compiled_call_impl is not None]
    c = policy.cfg
    assert len(blocks) == c.vision_layers + c.llm_layers + c.vl_layers + c.dit_layers + 3  # + the three norms
    assert {type(b) for b in blocks} == {FusedSiglipEncoderLayer, FusedQwen3DecoderLayer, FusedTransformerBlock,
                                         torch.nn.LayerNorm, Qwen3RMSNorm}

    def graphs():
        return counters["stats"]["unique_graphs"]

    def assert_same(a, b):
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")

    def evaluate(pol, p, batch):
        for t in p.values():
            t.grad = None
        logprob, value, _ = pol.evaluate(p, batch)
        (-logprob.mean() + value.square().mean()).backward()
        got = {"logprob": logprob, "value": value, **{k: t.grad for k, t in p.items() if t.grad is not None}}
        for t in p.values():
            t.grad = None
        return got

    def check(p, obs):
        ref = policy.sample(p, obs, INSTRUCTION, gen(3))
        assert_same(compiled.sample(p, obs, INSTRUCTION, gen(3)), ref)
        ref_grads = evaluate(policy, p, ref)
        trainable = {k for k in p if k.startswith(("action_head.", "value_head."))}
        assert ref_grads.keys() == {"logprob", "value"} | trainable
        assert_same(evaluate(compiled, p, ref), ref_grads)
        return ref

    # batches 3 and 5: a batch of 2 equals the tiny head counts, and dynamo's duck sizing would tie the two sizes
    # and specialize the batch (one more graph for other sizes, harmless but not what is asserted here)
    start = graphs()
    first = check(params, make_obs(3, seed=1))
    compiled_graphs = graphs()
    assert compiled_graphs > start                                   # the blocks did compile
    other = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
    with torch.no_grad():                                             # one weight in each kind of block
        for name in ("backbone.eagle_model.vision_model.vision_model.encoder.layers.0.mlp.fc1.weight",
                     "backbone.eagle_model.language_model.model.layers.1.mlp.down_proj.weight",
                     "action_head.vl_self_attention.transformer_blocks.0.ff.net.2.weight",
                     "action_head.model.transformer_blocks.0.ff.net.2.weight",
                     "action_head.model.transformer_blocks.1.attn1.to_v.weight"):
            other[name].mul_(3.0)
    changed = check(other, make_obs(3, seed=1))
    assert not torch.allclose(changed["actions"], first["actions"], atol=1e-3)
    assert graphs() == compiled_graphs                               # same shapes, new params: no recompile
    check(params, make_obs(5, seed=2))                                # another batch size
    assert graphs() == compiled_graphs                               # traced with symbolic sizes: no recompile


def test_bad_fast_path_options_are_clear_errors():
    with pytest.raises(ValueError, match="compile mode 'reduce-overhead' is not one of default, max-autotune"):
        accelerate(Gr00tPolicy("gr00t-tiny", metadata=make_metadata()), compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        accelerate(Gr00tPolicy("gr00t-tiny", metadata=make_metadata()), cuda_graphs=True)


# -- GPU (skipped on CPU-only machines; run on the GPU box: pytest tests/test_gr00t.py -k cuda) --------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager_and_sees_in_place_updates():
    cfg, meta = Gr00tConfig.preset("gr00t-tiny"), make_metadata()
    eager = accelerate(Gr00tPolicy(cfg, "cuda", metadata=meta))  # the same fused layers, not graphed
    graphed = accelerate(Gr00tPolicy(cfg, "cuda", metadata=meta), cuda_graphs=True)
    params = eager.init(seed=0)
    obs = {k: v.cuda() for k, v in make_obs().items()}

    def both():
        # inside an outer autocast region, as the training loops call it (its cast cache must not leak in)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a = eager.sample(params, obs, INSTRUCTION, torch.Generator("cuda").manual_seed(0))
            b = graphed.sample(params, obs, INSTRUCTION, torch.Generator("cuda").manual_seed(0))
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-3, rtol=1e-3)
        return b

    first = both()
    assert first["backbone_features"].dtype == torch.bfloat16 and first["actions"].dtype == torch.float32
    with torch.no_grad():
        params["action_head.model.proj_out_2.bias"].add_(1.0)      # an optimizer step updates in place
        params["action_head.model.proj_out_2.weight"].mul_(1.5)
    second = both()
    assert not torch.equal(first["chain"], second["chain"])
    logprob, value, _ = graphed.evaluate(params, second)
    torch.testing.assert_close(logprob, second["logprob"], atol=1e-3, rtol=1e-4)
    (-logprob.mean() + value.square().mean()).backward()
    assert params["action_head.model.proj_out_2.weight"].grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_fused_linear_gelu_equals_linear_then_gelu_tanh(autocast):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 256).cuda()
    x = torch.randn(3, 50, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        plain = torch.nn.functional.gelu(linear(x), approximate="tanh")
        with torch.no_grad():
            fused = linear_gelu_tanh(linear, x)                 # the cuBLASLt bias + GELU epilogue
        trained = linear_gelu_tanh(linear, x)                   # autograd on: the plain path, with a backward
    assert fused.shape == plain.shape == (3, 50, 256) and fused.dtype == plain.dtype
    tol = 2e-2 if autocast else 1e-4
    torch.testing.assert_close(fused, plain, atol=tol, rtol=tol)
    trained.sum().backward()
    assert linear.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_add_linear_accumulates_into_a_copy_of_the_residual(bias, compiled):
    """Without autograd on CUDA, add_linear is residual + linear(x) to bf16 rounding (the GEMM adds the residual),
    eager or compiled, and leaves the caller's residual as it was; with autograd it is the plain path."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=bias).cuda()
    if bias:
        torch.nn.init.normal_(linear.bias)
    x, residual = torch.randn(3, 50, 256, device="cuda"), torch.randn(3, 50, 64, device="cuda", dtype=torch.bfloat16)
    kept = residual.clone()
    fn = torch.compile(add_linear, dynamic=True) if compiled else add_linear
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            out = fn(residual, linear, x)
            plain = residual + linear(x)
        trained = fn(residual, linear, x)
    exact = residual.double() + torch.nn.functional.linear(x.bfloat16().double(), linear.weight.bfloat16().double(),
                                                           linear.bias.bfloat16().double() if bias else None)
    assert torch.equal(residual, kept) and out.dtype == torch.bfloat16 and out.shape == (3, 50, 64)
    # values up to ~5: bf16's spacing there is 2**-5; both paths round the GEMM's and the sum's result
    torch.testing.assert_close(out.double(), exact, atol=2 ** -5, rtol=0)
    torch.testing.assert_close(out, plain, atol=2 ** -5, rtol=0)
    trained.float().sum().backward()
    assert linear.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_sample_in_fp32_matches_the_cpu(monkeypatch):
    """The CUDA paths of `sample` (fused GEMM epilogues, closing adds in the GEMMs, compiled blocks), in fp32, give
    the CPU's eager result. The backbone features differ by up to 5e-3 (of values up to 4), but not because of
    these paths: on an H100, eager CUDA with the residual adds outside the GEMMs gave the same difference."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch-embedding conv: true fp32
    cfg, meta = Gr00tConfig.preset("gr00t-tiny"), make_metadata()
    cpu = Gr00tPolicy(cfg, metadata=meta)
    cuda = accelerate(Gr00tPolicy(cfg, "cuda", metadata=meta, compute_dtype=torch.float32), compile=True)
    params, obs = cpu.init(seed=0), make_obs(3, seed=1)
    ref = cpu.sample(params, obs, INSTRUCTION, gen(3))
    got = cuda.sample({k: v.cuda() for k, v in params.items()}, obs, INSTRUCTION, gen(3))
    for k in ref:
        atol = 1e-2 if k == "backbone_features" else 1e-4
        torch.testing.assert_close(got[k].cpu(), ref[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reference", ["plain", "fused"])
def test_cuda_compiled_graphed_sample_in_bf16_matches_eager(reference):
    """Compiled blocks in a CUDA graph, in bf16, act as eager does: with the training params (fp32 trainable action
    head, so the DiT's residuals are fp32 and take the plain path, as in a rollout) and the bf16 inference params.
    The backbone features (values up to 4, where bf16's spacing is 2**-5) may differ by a few roundings. Eager here
    is the plain model, and the same layers fused but neither compiled nor graphed."""
    cfg, meta = Gr00tConfig.preset("gr00t-tiny"), make_metadata()
    eager = Gr00tPolicy(cfg, "cuda", metadata=meta) if reference == "plain" else \
        accelerate(Gr00tPolicy(cfg, "cuda", metadata=meta))
    fast = accelerate(Gr00tPolicy(cfg, "cuda", metadata=meta), compile=True, cuda_graphs=True)
    params, obs = eager.init(seed=0), make_obs(3, seed=1)
    for p in (params, eager.inference_params(params)):
        ref = eager.sample(p, obs, INSTRUCTION, gen(3))
        got = fast.sample(p, obs, INSTRUCTION, gen(3))
        for k in ref:
            atol = 2 ** -3 if k == "backbone_features" else 2e-3
            torch.testing.assert_close(got[k].float(), ref[k].float(), atol=atol, rtol=1e-2,
                                       msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("width", [1152, 2048])                   # SigLIP's and Qwen3's hidden sizes
@pytest.mark.parametrize("norm_class", [torch.nn.LayerNorm, Qwen3RMSNorm])
def test_cuda_compiled_norms_of_wide_rows_read_each_row_once(width, norm_class):
    """After use_one_pass_row_norms (compile_blocks installs it) inductor normalises a 1152- or 2048-wide row in
    one persistent program (`triton_per_*`) instead of looping over it (`triton_red_*`), with eager's result."""
    from torch._inductor.utils import run_and_get_code

    use_one_pass_row_norms()
    torch.manual_seed(0)
    norm = norm_class(width).cuda()
    x, residual = torch.randn(2, 3000, width, device="cuda", dtype=torch.bfloat16).unbind(0)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad(), \
            torch._inductor.config.patch(fx_graph_cache=False):
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(lambda a, b: norm(a + b), dynamic=True), x, residual)
        ref = norm(x + residual)
    code = "\n".join(codes)
    assert "triton_per_" in code and "triton_red_" not in code
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_one_pass_norms_key_inductors_graph_cache(tmp_path, monkeypatch):
    """use_one_pass_row_norms changes the code inductor generates, so a graph that inductor cached without it is
    not served with it (nor the other way round): the setting is part of the FX graph cache key."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def compile_and_run() -> dict[str, int]:
        counters.clear()
        torch._dynamo.reset()
        torch.compile(lambda x: torch.nn.functional.layer_norm(x * 3, (1152,)))(torch.randn(4, 1152))
        return {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}

    # inductor's own config API, restored on exit (monkeypatch's undo left fx_graph_cache unreadable to later tests)
    with torch._inductor.config.patch(fx_graph_cache=True, inductor_choices_class=None):  # as before compile_blocks
        assert compile_and_run() == {"fxgraph_cache_miss": 1}
        assert compile_and_run() == {"fxgraph_cache_hit": 1}
        use_one_pass_row_norms()
        assert compile_and_run() == {"fxgraph_cache_miss": 1}
        assert compile_and_run() == {"fxgraph_cache_hit": 1}
    torch._dynamo.reset()
