"""One table of SFT recipes: what each `stack_cube_sft_rl.py` run's SFT model scored, beside the settings in which
the runs differ.

    python benchmarks/sft_levers.py runs/sc_base runs/sc_crop runs/sc_crop_exec8 --out runs/sft_levers
    python benchmarks/sft_levers.py runs/sft_levers/results.json runs/sc_longer --out runs/sft_levers_2

Each run folder holds the results.json of the pipeline's report phase, which records how its SFT model was made
(the SFT run's config, the demos' size and recording) and how it was evaluated. The table has a column for each
setting whose value is not the same in every run (among them "passes": SFT steps x batch / demo frames), then the SFT
success with its 95 % interval and the share of episodes that reached each milestone. A model trained by several SFT
runs in a row (`stack_cube_sft_rl.py --sft-policy <earlier run>/sft/gr00t`) shows their steps as "4329+3000" and
the passes of all of them. The results.json of an earlier table stands for its rows, so a table can grow run by run
after the run folders are gone. Writes results.md and results.json under --out.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import write_results  # noqa: E402
from benchmarks.stack_cube_sft_rl import sft_chain  # noqa: E402

# setting name -> where it is in a results.json (the SFT config, the demos, the evals' protocol); a tuple of such
# places: the first one there (results.json files written before the newer place existed have the older one)
SETTINGS = {
    "demos": ("sft_recipe", "demos", "episodes"),
    "demo noise": ("sft_recipe", "demos", "recording", "action_noise"),
    "policy": ("sft_recipe", "config", "policy"),
    "model px": ("sft_recipe", "config", "gr00t_image_size"),
    "SFT steps": (("sft_recipe", "trained_steps"), ("sft_recipe", "config", "num_iterations")),
    "batch": ("sft_recipe", "config", "batch_size"),
    "lr": ("sft_recipe", "config", "learning_rate"),
    "vision tower trained": ("sft_recipe", "config", "tune_visual"),
    "language model trained": ("sft_recipe", "config", "tune_llm"),
    "random crop": ("sft_recipe", "config", "random_crop"),
    "colour jitter": ("sft_recipe", "config", "color_jitter"),
    "SFT seed": ("sft_recipe", "config", "seed"),
    "image px": ("sft_recipe", "config", "env", "image_size"),
    "eval actions per chunk": (("eval_protocol", "action_exec_horizon"), ("args", "eval_action_exec_horizon")),
    "eval episodes": (("eval_protocol", "num_episodes"), ("args", "eval_episodes")),
    "eval seed": (("eval_protocol", "seed"), ("args", "eval_seed")),
}
# the table's setting columns: SETTINGS and, after "batch", "passes"
COLUMNS = list(SETTINGS)
COLUMNS.insert(COLUMNS.index("batch") + 1, "passes")


@dataclass
class Args:
    runs: tyro.conf.Positional[list[Path]]
    """`stack_cube_sft_rl.py` output folders (each with results.json), or the results.json of an earlier table (its
    rows), in the order of the table's rows."""
    out: Path = Path("runs/sft_levers")
    """Where results.md and results.json go."""


def lookup(results: dict, path: tuple) -> object:
    """The value at `path` in a results.json (of several paths, the first one there), None where it is missing
    (e.g. demos recorded before meta/recording.json existed)."""
    if path and isinstance(path[0], tuple):
        return next((v for v in (lookup(results, p) for p in path) if v is not None), None)
    value = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def shown(name: str, value: object) -> str:
    if value is None:
        return {"eval actions per chunk": "all (16)", "model px": "224"}.get(name, "?")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def recipe_settings(results: dict) -> dict:
    """The SETTINGS of a run's model, and "passes" (SFT steps x batch / demo frames: how often the SFT saw each
    frame; None where a frame count is unknown) after "batch". A model made by several SFT runs in a row has the
    last run's settings, the first one's policy and model size, and its steps and batch sizes joined by "+"; its
    passes add up."""
    chain = sft_chain(results["sft_recipe"])
    settings = {name: lookup(results, where) for name, where in SETTINGS.items()}
    links = [(lookup(r, (("trained_steps",), ("config", "num_iterations"))), lookup(r, ("config", "batch_size")),
              lookup(r, ("demos", "frames"))) for r in chain]
    passes = (round(sum(steps * batch / frames for steps, batch, frames in links), 2)
              if all(steps and batch and frames for steps, batch, frames in links) else None)
    if len(chain) > 1:
        settings["policy"] = lookup(chain[0], ("config", "policy"))  # the model's shape is the first run's
        settings["model px"] = lookup(chain[0], ("config", "gr00t_image_size"))
        settings["SFT steps"] = "+".join(str(steps) for steps, _, _ in links)
        settings["batch"] = "+".join(str(batch) for _, batch, _ in links)
    return {name: passes if name == "passes" else settings[name] for name in COLUMNS}


def load(run: Path) -> list[dict]:
    """The table row of a run folder, or the rows of an earlier table's results.json."""
    if run.is_file():
        rows = json.loads(run.read_text())
        if not (isinstance(rows, list) and rows and all(isinstance(r, dict) and "settings" in r for r in rows)):
            raise SystemExit(f"error: {run} is not the results.json of an sft_levers table (a list of rows with "
                             "'settings'); name a stack_cube_sft_rl.py output folder or such a file")
        return rows
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: run stack_cube_sft_rl.py's report phase for {run} first")
    results = json.loads(path.read_text())
    if "sft_recipe" not in results:
        raise SystemExit(f"error: {path} does not say how its SFT model was made (no 'sft_recipe'): rerun "
                         f"`stack_cube_sft_rl.py --out {run} --phases report`")
    sft = next((r for r in results["rows"] if r["model"] == "sft"), None)
    if sft is None:
        raise SystemExit(f"error: {path} has no evaluated SFT model: run its eval phase first")
    return [{"run": str(run), "settings": recipe_settings(results),
             "success_rate": sft["success_rate"], "episodes": sft["episodes"], "ci95": sft["ci95"],
             "milestone_rates": sft["milestone_rates"], "device": results["device"]}]


def table(rows: list[dict]) -> str:
    """Markdown: the settings that differ between the rows, success [95 % interval], milestones. A setting that an
    earlier table's row lacks (a column added since) shows as "?"."""
    names = [name for name in COLUMNS if any(name in r["settings"] for r in rows)]
    varied = [name for name in names if len({json.dumps(r["settings"].get(name)) for r in rows}) > 1]
    same = {name: rows[0]["settings"].get(name) for name in names if name not in varied}
    milestones = list(dict.fromkeys(m for r in rows for m in r["milestone_rates"]))
    lines = ["Shared by every run: " + ", ".join(f"{name} {shown(name, v)}" for name, v in same.items()) + "; "
             + ", ".join(sorted({r["device"] for r in rows})) + ".", "",
             "| run | " + " | ".join(varied + ["SFT success [95 % interval]"] + milestones) + " |",
             "|---|" + "---|" * len(varied) + "---:|" * (1 + len(milestones))]
    for r in rows:
        cells = [shown(name, r["settings"][name]) if name in r["settings"] else "?" for name in varied]
        cells.append(f"{r['success_rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['episodes']} ep)")
        cells += [f"{r['milestone_rates'][m]:.3f}" if m in r["milestone_rates"] else "" for m in milestones]
        lines.append(f"| {Path(r['run']).name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> list[dict]:
    if not args.runs:
        raise SystemExit("error: name at least one stack_cube_sft_rl.py output folder")
    rows = [row for run in args.runs for row in load(run)]
    markdown = table(rows)
    write_results(args.out, markdown, rows)
    print(markdown)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
