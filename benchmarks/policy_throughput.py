"""Throughput of the GR00T N1.5 policy: batch-1 `sample` latency, `sample` samples/s per batch size,
`evaluate` + backward samples/s, peak memory and model FLOPs utilisation. Random weights, synthetic stack-cube
observations (two 256x256 views, 8-d state, 7-d actions), bf16 autocast on GPU.

    python -m benchmarks.policy_throughput --batch-sizes 8 64 256 --cuda-graphs --out runs/bench   # H100, 3B
    python -m benchmarks.policy_throughput --preset gr00t-tiny --device cpu --batch-sizes 2 --iters 2   # smoke

Prints a markdown table and writes it, with every number and the setup, to OUT/results.{md,json}.
One `sample` = one observation -> one 16-action chunk (backbone once, 4 denoising steps, value).
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import write_results  # noqa: E402
from models.gr00t import Gr00tConfig, Gr00tPolicy  # noqa: E402
from models.gr00t_fast import accelerate  # noqa: E402
from models.gr00t_processor import metadata_from_data  # noqa: E402

INSTRUCTION = "Stack the red block on the blue block, then stack the green block on the red block."
# Dense bf16 tensor-core peaks (FLOP/s), for model FLOPs utilisation.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}
# NVIDIA's Isaac-GR00T N1.5 code on one NVIDIA H100 80GB HBM3 (bf16 + autocast, SDPA), for reference.
OFFICIAL_H100 = {"latency_ms_batch1": 77.6, "samples_per_s": {64: 156.0}}


@dataclasses.dataclass
class Args:
    preset: str = "gr00t-n1.5-3b"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    batch_sizes: tuple[int, ...] = (8, 64, 256)
    """Batch sizes for `sample` throughput (batch 1 latency is always measured)."""
    train_batch_size: int = 64
    """Batch of `evaluate` + backward."""
    iters: int = 10
    warmup: int = 3
    compile: bool = False
    """GR00T's fast path with regional torch.compile: each repeated transformer block (SigLIP, Qwen3, VL
    self-attention, DiT) is compiled in place, once per block variant (sizes symbolic: batch sizes above 1 share it);
    the rest runs eager (models/gr00t_fast.py). Without --compile and --cuda-graphs: the plain model."""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode of the blocks: `default` or `max-autotune-no-cudagraphs` (GEMM kernels autotuned while
    compiling; slower to compile)."""
    cuda_graphs: bool = False
    """GR00T's fast path with `sample` replayed as a CUDA graph (captured per batch size)."""
    inference_params: bool = False
    """Time `sample` with `policy.inference_params` (every weight in bf16: acting only, no per-call cast of the
    fp32 trainable weights); `evaluate` + backward always uses the training params."""
    tokenizer: str = "builtin"
    """'builtin' (offline; special tokens at their official ids) or a dir with the real GR00T tokenizer files."""
    camera_size: int = 256
    peak_tflops: float | None = None
    """Override the GPU's dense bf16 peak used for MFU."""
    out: Path = Path("runs/policy_throughput")
    seed: int = 0


def synthetic_metadata(camera_size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    dims = {"x": 1, "y": 1, "z": 1, "roll": 1, "pitch": 1, "yaw": 1}
    state = {**{k: torch.randn(256, d, generator=g) for k, d in dims.items()}, "gripper": torch.rand(256, 2)}
    action = {**{k: torch.randn(256, d, generator=g) for k, d in dims.items()}, "gripper": torch.rand(256, 1)}
    return metadata_from_data("new_embodiment", state, action, {"table_cam": (camera_size, camera_size),
                                                                "wrist_cam": (camera_size, camera_size)})


def observations(n: int, camera_size: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {"rgb": torch.randint(0, 256, (n, 2, camera_size, camera_size, 3), dtype=torch.uint8,
                                 generator=g).to(device),
            "state": torch.randn(n, 8, generator=g).to(device)}


def flops_per_sample(c: Gr00tConfig, prompt_len: int) -> dict[str, float]:
    """Matmul + attention FLOPs of one observation (2 per multiply-add; causal attention counted half)."""
    L, D, Dd = prompt_len, c.llm_hidden, c.dit_dim
    P, Dv = c.tokens_per_view, c.vision_hidden
    vision = c.num_views * (2 * P * 3 * c.patch_size**2 * Dv
                            + c.vision_layers * (2 * P * (4 * Dv * Dv + 2 * Dv * c.vision_intermediate)
                                                 + 4 * P * P * Dv))
    projector = 2 * c.num_views * P * Dv * D
    q, kv = c.llm_heads * c.llm_head_dim, c.llm_kv_heads * c.llm_head_dim
    llm = c.llm_layers * (2 * L * (2 * D * q + 2 * D * kv + 3 * D * c.llm_intermediate) + 2 * L * L * q)
    vl = c.vl_layers * (2 * L * 12 * D * D + 4 * L * L * D)
    cross, self_ = (c.dit_layers + 1) // 2, c.dit_layers // 2
    cross_kv = cross * 2 * L * 2 * D * Dd                                   # once per call
    H, T = c.action_horizon, 1 + c.num_future_tokens + c.action_horizon
    dit_step = (c.dit_layers * (2 * T * (2 * Dd * Dd + 8 * Dd * Dd) + 2 * 2 * Dd * Dd)   # q, out, ff; AdaLN
                + self_ * (2 * T * 2 * Dd * Dd + 4 * T * T * Dd) + cross * 4 * T * L * Dd
                + 2 * (256 * Dd + Dd * Dd) + 2 * 2 * Dd * Dd + 2 * T * Dd * c.hidden_size)
    heads_step = 2 * H * (c.action_dim * Dd + 3 * Dd * Dd) + 2 * H * (c.hidden_size**2 + c.hidden_size * c.action_dim)
    state = 2 * (c.max_state_dim * c.hidden_size + c.hidden_size * Dd)
    value = 2 * sum(a * b for a, b in zip((D + Dd, *c.value_hidden), (*c.value_hidden, 1)))
    step = dit_step + heads_step
    stochastic = 1 if c.sde_steps == "one" else c.num_inference_steps
    return {"backbone": vision + projector + llm,
            "sample": vision + projector + llm + vl + cross_kv + state + c.num_inference_steps * step + value,
            "evaluate_fwd": vl + cross_kv + state + stochastic * step + value}


def peak_flops(args: Args) -> tuple[str, float | None]:
    if args.device == "cpu" or not torch.cuda.is_available():
        return platform.processor() or "cpu", args.peak_tflops * 1e12 if args.peak_tflops else None
    name = torch.cuda.get_device_name()
    if args.peak_tflops:
        return name, args.peak_tflops * 1e12
    for key in sorted(PEAK_BF16, key=len, reverse=True):       # "H100 PCIe" before "H100"
        if all(part in name for part in key.split()):
            return name, PEAK_BF16[key]
    return name, None


def timed(fn, args: Args) -> tuple[float, float]:
    """(median seconds of fn() over args.iters runs after args.warmup, seconds of the warm-up: compiles and graph
    captures happen there)."""
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), warmup_s


def peak_memory_gib(args: Args) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None


def reset_memory(args: Args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(args: Args) -> dict:
    torch.manual_seed(args.seed)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = Gr00tConfig.preset(args.preset, tokenizer=args.tokenizer)
    policy = Gr00tPolicy(cfg, args.device, metadata=synthetic_metadata(args.camera_size))
    if args.compile or args.cuda_graphs:  # the fast path (models/gr00t_fast.py); without either, the plain model
        accelerate(policy, compile=args.compile, cuda_graphs=args.cuda_graphs, compile_mode=args.compile_mode)
    t0 = time.perf_counter()
    params = policy.init(args.seed)
    init_s = time.perf_counter() - t0
    prompt_len = int(policy.processor.prompt(INSTRUCTION)[0].numel())
    flops = flops_per_sample(cfg, prompt_len)
    device_name, peak = peak_flops(args)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    num_params = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for n, p in params.items() if policy.is_trainable(n))
    rows, results = [], {"setup": {
        "device": device_name, "preset": args.preset, "torch": torch.__version__, "compile": args.compile,
        "compile_mode": args.compile_mode,
        "cuda_graphs": args.cuda_graphs, "inference_params": args.inference_params,
        "compute_dtype": str(policy.compute_dtype), "prompt_tokens": prompt_len,
        "tokenizer": args.tokenizer, "params": num_params, "trainable_params": trainable, "init_s": init_s,
        "iters": args.iters, "warmup": args.warmup, "peak_flops": peak, "flops_per_sample": flops},
        "sample": {}, "evaluate_backward": None}

    def mfu(flop_per_s: float) -> float | None:
        return flop_per_s / peak if peak else None

    act_params = policy.inference_params(params) if args.inference_params else params
    for batch in sorted({1, *args.batch_sizes}):
        reset_memory(args)
        obs = observations(batch, args.camera_size, args.device)
        try:
            seconds, warmup_s = timed(lambda obs=obs: policy.sample(act_params, obs, INSTRUCTION, generator), args)
        except torch.cuda.OutOfMemoryError:
            results["sample"][batch] = {"error": "out of memory"}
            rows.append((f"`sample` batch {batch}", "OOM", "", "", ""))
            continue
        except Exception as e:  # keep measuring the other sizes; the JSON records what failed
            results["sample"][batch] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            rows.append((f"`sample` batch {batch}", f"error: {type(e).__name__}", "", "", ""))
            continue
        r = {"seconds": seconds, "warmup_s": warmup_s, "latency_ms": 1e3 * seconds, "samples_per_s": batch / seconds,
             "peak_memory_gib": peak_memory_gib(args), "mfu": mfu(batch * flops["sample"] / seconds)}
        results["sample"][batch] = r
        rows.append((f"`sample` batch {batch}", f"{r['latency_ms']:.1f} ms", f"{r['samples_per_s']:.1f}",
                     _fmt(r["peak_memory_gib"], "{:.1f} GiB"), _fmt(r["mfu"], "{:.1%}")))

    batch = args.train_batch_size
    reset_memory(args)
    try:
        out = policy.sample(params, observations(batch, args.camera_size, args.device), INSTRUCTION, generator)
        trainable_params = [p for p in params.values() if p.requires_grad]

        def step():
            logprob, value, _ = policy.evaluate(params, out)
            (-logprob.mean() + value.square().mean()).backward()
            for p in trainable_params:
                p.grad = None

        reset_memory(args)
        seconds, warmup_s = timed(step, args)
        r = {"batch": batch, "seconds": seconds, "warmup_s": warmup_s, "samples_per_s": batch / seconds,
             "peak_memory_gib": peak_memory_gib(args), "mfu": mfu(3 * batch * flops["evaluate_fwd"] / seconds)}
        rows.append((f"`evaluate` + backward batch {batch}", f"{1e3 * seconds:.1f} ms", f"{r['samples_per_s']:.1f}",
                     _fmt(r["peak_memory_gib"], "{:.1f} GiB"), _fmt(r["mfu"], "{:.1%}")))
    except torch.cuda.OutOfMemoryError:
        r = {"batch": batch, "error": "out of memory"}
        rows.append((f"`evaluate` + backward batch {batch}", "OOM", "", "", ""))
    results["evaluate_backward"] = r

    table = render(results, rows)
    print(table)
    write_results(args.out, table, results)
    return results


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _fmt(x, spec: str) -> str:
    return spec.format(x) if x is not None else "n/a"


def render(results: dict, rows: list[tuple]) -> str:
    s = results["setup"]
    mode = s.get("compile_mode", "default")
    compiled = "regional torch.compile" + ("" if mode == "default" else f" ({mode})")
    flags = ", ".join(f for f, on in ((compiled, s["compile"]), ("CUDA graphs", s["cuda_graphs"]),
                                      ("inference params for `sample`", s.get("inference_params"))) if on)
    header = (f"GR00T N1.5 policy throughput — {s['preset']} on **{s['device']}**, {s['compute_dtype']}"
              f"{', ' + flags if flags else ''}; torch {s['torch']}; prompt {s['prompt_tokens']} tokens, "
              f"{_count(s['params'])} params ({_count(s['trainable_params'])} trainable); median of {s['iters']} "
              f"runs after {s['warmup']} warm-up.")
    lines = [header, "", "| measurement | time per call | samples/s | peak memory | MFU |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    if s["preset"] == "gr00t-n1.5-3b":
        official = OFFICIAL_H100
        lines += ["", (f"NVIDIA's Isaac-GR00T code on one H100 80GB HBM3 (bf16 + autocast, SDPA): batch 1 "
                       f"{official['latency_ms_batch1']} ms per chunk, {official['samples_per_s'][64]:.0f} "
                       f"samples/s at batch 64.")]
        b1, b64 = results["sample"].get(1, {}), results["sample"].get(64, {})
        if "latency_ms" in b1 and "samples_per_s" in b64:
            lines.append(f"Here: {official['latency_ms_batch1'] / b1['latency_ms']:.2f}x faster at batch 1, "
                         f"{b64['samples_per_s'] / official['samples_per_s'][64]:.2f}x the throughput at batch 64 "
                         f"(compare only on the same GPU).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(tyro.cli(Args))
