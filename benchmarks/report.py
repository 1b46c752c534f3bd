"""What every benchmark leaves in its --out folder: results.md, the table a person reads (the README quotes it), and
results.json, the same numbers with the arguments that produced them."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, markdown: str, record: dict | list | None) -> None:
    """Write `markdown` to out/results.md and `record` (anything json can hold; other values as their str) to
    out/results.json, making `out` first. `record` None: results.md alone."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown)
    if record is not None:
        (out / "results.json").write_text(json.dumps(record, indent=1, default=str))
