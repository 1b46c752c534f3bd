"""Where the time of GR00T's `sample` goes: kernel time per call, by kind (matmul, attention, the rest) and by kernel.

    python -m benchmarks.policy_profile --tokenizer <dir with the GR00T tokenizer files>       # GPU, the plain model
    python -m benchmarks.policy_profile --tokenizer <same dir> --compile                            # regional compile
    python -m benchmarks.policy_profile --tokenizer <same dir> --compile --ops 20   # + the ATen ops behind the time
    python -m benchmarks.policy_profile --preset gr00t-tiny --device cpu --batch-size 2 --top 5     # smoke

Same synthetic observations and bf16 inference params as `policy_throughput`; torch.profiler over --calls calls
after --warmup. Prints the tables and writes them to OUT/results.md.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import tyro
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.policy_throughput import INSTRUCTION, observations, synthetic_metadata  # noqa: E402
from benchmarks.report import write_results  # noqa: E402
from models.gr00t import Gr00tConfig, Gr00tPolicy  # noqa: E402
from models.gr00t_fast import accelerate  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::convolution", "aten::mkldnn_convolution"}  # CPU ops


@dataclasses.dataclass
class Args:
    preset: str = "gr00t-n1.5-3b"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size: int = 64
    """Observations per `sample` call."""
    compile: bool = False
    """GR00T's fast path with regional torch.compile (as `policy_throughput --compile`). Without it: the plain
    model."""
    tokenizer: str = "builtin"
    """'builtin' (offline) or a dir with the real GR00T tokenizer files (the real 564-token prompt)."""
    camera_size: int = 256
    warmup: int = 3
    calls: int = 3
    """Profiled calls; times are per call."""
    top: int = 25
    """Kernels listed."""
    ops: int = 0
    """Also list the N ATen ops that launched the most kernel time, by input shapes, and whether a compiled block
    ran them: to find where kernels outside inductor's come from. Costs a second profile that records CPU ops."""
    out: Path = Path("runs/policy_profile")


def kind(kernel: str) -> str:
    """matmul, attention or other, from a kernel's (GPU) or op's (CPU) name."""
    name = kernel.lower()
    if name.startswith("triton_"):  # inductor's: GEMM templates, else fused elementwise/norms (named after their ops)
        return "matmul" if name.startswith(("triton_mm", "triton_tem")) else "other"
    if any(key in name for key in ("flash", "fmha", "sdpa", "attention")):  # cuDNN's flash kernels also say "gemm"
        return "attention"
    if name in MATMUL_OPS or any(key in name for key in ("gemm", "nvjet", "cutlass", "xmma", "conv")):
        return "matmul"
    return "other"


def main(args: Args) -> str:
    cuda = args.device.startswith("cuda")
    policy = Gr00tPolicy(Gr00tConfig.preset(args.preset, tokenizer=args.tokenizer), args.device,
                         metadata=synthetic_metadata(args.camera_size))
    if args.compile:
        accelerate(policy, compile=True)
    params = policy.inference_params(policy.init(0))
    obs = observations(args.batch_size, args.camera_size, args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)
    for _ in range(args.warmup):
        policy.sample(params, obs, INSTRUCTION, generator)
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    prof = profile_calls(policy, params, obs, generator, args, [activity])
    # on CPU the ops' self time stands in for kernel time
    kernel_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if kernel_us(e) > 0]
    total = sum(kernel_us(e) for e in events)
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + kernel_us(e)
    ms = lambda us: us / args.calls / 1e3  # noqa: E731
    mode = "regional torch.compile" if args.compile else "eager"
    lines = [f"`sample` of {args.preset}, batch {args.batch_size}, {mode}, inference params, on "
             f"{torch.cuda.get_device_name() if cuda else 'CPU'}: "
             f"{ms(total):.1f} ms of kernel time per call (torch {torch.__version__}).", "",
             "| kind | ms per call | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {ms(t):.1f} | {t / total:.1%} |" for k, t in sorted(by_kind.items(), key=lambda x: -x[1])]
    lines += ["", "| kernel | kind | ms per call | calls per call |", "|---|---|---:|---:|"]
    for e in sorted(events, key=lambda e: -kernel_us(e))[:args.top]:
        lines.append(f"| `{e.key[:90]}` | {kind(e.key)} | {ms(kernel_us(e)):.2f} | {e.count // args.calls} |")
    if args.ops:
        lines += ["", *op_table(policy, params, obs, generator, args)]
    table = "\n".join(lines) + "\n"
    print(table)
    write_results(args.out, table, None)
    return table


def profile_calls(policy, params, obs, generator, args: Args, activities: list, record_shapes: bool = False):
    """torch.profiler over --calls `sample` calls (the GPU's queue drained before it stops)."""
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        for _ in range(args.calls):
            policy.sample(params, obs, INSTRUCTION, generator)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    return prof


def op_table(policy, params, obs, generator, args: Args) -> list[str]:
    """Markdown rows: the --ops ATen ops with the most kernel time they launched themselves (CPU: their own time),
    grouped by op, input shapes and where they ran (inside a compiled block, or eager)."""
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    prof = profile_calls(policy, params, obs, generator, args, activities, record_shapes=True)

    def in_compiled_block(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and "CompiledFxGraph" not in parent.name:
            parent = parent.cpu_parent
        return parent is not None

    totals: dict[tuple[str, str, str], list[float]] = {}  # (op, shapes, where) -> [us, count]
    for e in prof.events():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if e.name.startswith("aten::") and us > 0:
            key = (e.name, str([list(s) for s in e.input_shapes if s]), "compiled" if in_compiled_block(e) else "eager")
            totals.setdefault(key, [0.0, 0])
            totals[key][0] += us
            totals[key][1] += 1
    rows = ["| op | input shapes | ran | ms per call | calls per call |", "|---|---|---|---:|---:|"]
    for (name, shapes, where), (us, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:args.ops]:
        rows.append(f"| `{name}` | {shapes[:80]} | {where} | {us / args.calls / 1e3:.2f} | {count // args.calls} |")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
