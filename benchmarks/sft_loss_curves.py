"""SFT runs' training losses side by side, window by window of steps: which recipe fits the demonstrations faster.

    python benchmarks/sft_loss_curves.py runs/llm_frozen runs/llm_trained --window 100 --out runs/sft_loss_curves

Runs with the same seed, dataset and batch size train on the same frames with the same noise and flow times at
every step (`algos/sft.py`), so their logged losses are paired: the difference at one step is the recipe's, not the
batch's. For each window of steps the table gives every run's mean logged loss and, for each run after the first,
its difference from the first and at how many of the window's logged steps its loss was the lower one. The settings
in which the runs' configs differ head the table. Writes results.md and results.json under --out.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import write_results  # noqa: E402


@dataclass
class Args:
    runs: tyro.conf.Positional[list[Path]]
    """`train.py sft` run directories (config.json and metrics.jsonl); the first is the one the others are compared
    with."""
    window: int = 100
    """Steps per window."""
    out: Path = Path("runs/sft_loss_curves")
    """Where results.md and results.json go."""


def read_run(run: Path) -> tuple[dict, dict[int, float]]:
    """A run's config and its logged sft/loss by step."""
    config, metrics = run / "config.json", run / "metrics.jsonl"
    if not config.is_file() or not metrics.is_file():
        raise SystemExit(f"error: {run} is not a train.py sft run directory (it needs config.json and metrics.jsonl)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = {row["step"]: row["sft/loss"] for row in rows if "sft/loss" in row}
    if not losses:
        raise SystemExit(f"error: {metrics} has no sft/loss")
    return json.loads(config.read_text()), losses


def differences(configs: list[dict]) -> dict[str, list]:
    """The config settings (nested ones as a.b) whose values differ between the runs, with each run's value."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    flats = [flat(c) for c in configs]
    names = dict.fromkeys(k for f in flats for k in f)
    return {k: [f.get(k) for f in flats] for k in names
            if k != "run_dir" and len({json.dumps(f.get(k)) for f in flats}) > 1}


def compare(losses: list[dict[int, float]], window: int) -> list[dict]:
    """One row per window of steps [a, a + window - 1] (from step 1) holding a step every run logged: each run's mean
    loss, and each later run's difference from the first and its count of lower losses at those steps."""
    steps = sorted(set.intersection(*(set(run) for run in losses)))
    rows = []
    for start in range(1, steps[-1] + 1, window):
        shared = [s for s in steps if start <= s < start + window]
        if not shared:
            continue
        means = [sum(run[s] for s in shared) / len(shared) for run in losses]
        rows.append({"steps": [start, start + window - 1], "logged": len(shared), "mean_loss": means,
                     "difference": [round(m - means[0], 9) + 0.0 for m in means[1:]],  # + 0.0: no -0.0
                     "lower_at": [sum(run[s] < losses[0][s] for s in shared) for run in losses[1:]]})
    return rows


def main(args: Args) -> list[dict]:
    if len(args.runs) < 2 or args.window < 1:
        raise SystemExit("error: give two or more runs and a --window >= 1")
    configs, losses = zip(*(read_run(run) for run in args.runs))
    if not set.intersection(*(set(run) for run in losses)):
        raise SystemExit("error: the runs logged no step in common (train.py sft --log-every)")
    rows = compare(list(losses), args.window)
    names = [run.name for run in args.runs]
    differ = differences(list(configs))
    lines = ["Settings that differ: " + ("; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in zip(names, values))
                                                 for k, values in differ.items()) or "none") + ".", "",
             "| steps | logged | " + " | ".join(f"{n} loss" for n in names)
             + "".join(f" | {n} − {names[0]} | {n} lower at" for n in names[1:]) + " |",
             "|---|---:|" + "---:|" * (len(names) + 2 * (len(names) - 1))]
    for r in rows:
        cells = [f"{r['steps'][0]}–{r['steps'][1]}", str(r["logged"]), *(f"{m:.3f}" for m in r["mean_loss"])]
        for d, lower in zip(r["difference"], r["lower_at"]):
            cells += [f"{d:+.3f}", f"{lower}/{r['logged']}"]
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    write_results(args.out, markdown, {"runs": [str(r) for r in args.runs], "differ": differ, "rows": rows})
    print(markdown)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
