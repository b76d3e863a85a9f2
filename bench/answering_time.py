"""How long the tiny recipe takes to learn its 12 sample answers through `qlora train`.

    python bench/answering_time.py

The same run as the `answering_run` test fixture (tests/conftest.py: 256-wide tiny-mistral,
12 rows of sample_data.jsonl, 6 epochs), timed here instead of asserted in a test: on a machine
shared by other jobs a wall-clock limit in a test fails for reasons that are not bugs. It prints
the training time (run.json's train_runtime) and the whole process's time, each against its
budget (60 s and 120 s on 2 cores, the limits the test used to assert), as a ratio: below 1.0 is
within budget.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import ANSWERING_OVERRIDES, QLORA, SAMPLE_DATA  # noqa: E402  (the fixture's own recipe)

BUDGETS = {"training (train_runtime)": 60.0, "whole process": 120.0}


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="qlora-answering-"))
    try:
        data = folder / "sample12.jsonl"
        data.write_text("".join(SAMPLE_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:12]))
        run = folder / "run"
        args = ["tiny-mistral", *ANSWERING_OVERRIDES, f"data.sources=[{{path: {data}, format: text}}]",
                f"data.prepared_dir={folder / 'prepared'}", f"training.output_dir={run}"]
        started = time.monotonic()
        done = subprocess.run([QLORA, "train", *args], capture_output=True, text=True,
                              env={**os.environ, "QLORA_CACHE": str(folder / "cache")})
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)
        runtime = json.loads((run / "run.json").read_text())["metrics"]["train_runtime"]
        for (name, budget), measured in zip(BUDGETS.items(), (runtime, seconds)):
            print(f"{name:26} {measured:6.1f} s of {budget:.0f} s budget: ratio {measured / budget:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
