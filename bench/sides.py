"""What the benches that race qlora against a peer's stock trainer share: each side runs in a process
of its own (so its peak RSS is its own), the sides alternate (a shared machine's load drifts: neither
side gets the quiet minutes), and each side's figures become medians."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def report(figures: dict) -> None:
    """In a side's process: its figures and its peak RSS, for `run_side` to read."""
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(figures))


def run_side(script: str, side: str, folder: str, args: list[str]) -> dict:
    """`script --side SIDE --folder FOLDER ARGS` in a process of its own; the figures it reported."""
    done = subprocess.run([sys.executable, script, "--side", side, "--folder", folder, *args],
                          capture_output=True, text=True, cwd=ROOT)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{side} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def alternated(script: str, repeats: int, folder: str, args: list[str],
               sides: tuple[str, ...] = ("qlora", "trl")) -> dict[str, list[dict]]:
    """Each side `repeats` times, in `sides` order then reversed (qlora first, then the peer
    first), each run in a folder of its own."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(repeats):
        for side in (sides if repeat % 2 == 0 else sides[::-1]):
            figures = run_side(script, side, f"{folder}/{side}-{repeat}", args)
            runs[side].append(figures)
            print(f"run {repeat + 1} {side:5s} " + "  ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()), flush=True)
    return runs


def medians(runs: dict[str, list[dict]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {side: {key: statistics.median(r[key] for r in results if r[key] is not None) for key in keys}
            for side, results in runs.items()}
