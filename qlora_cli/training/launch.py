"""`--nproc N`: N local processes through torchrun, with the exit codes and signals of one.

torchrun reads any non-zero exit of a worker as a crash: it stops the others and prints a
traceback, and the launcher would exit 1 for a recipe mistake (2) or a clean stop (130/143).
And a signal that reaches torchrun itself gives the workers 30 s before it kills them, less
than one step of a large model takes. So torchrun runs in a session of its own, out of the
terminal's reach; each worker writes its pid and its exit code into a folder the launcher reads;
Ctrl-C and SIGTERM go from the launcher straight to the workers, which finish the step, save a
checkpoint and stop as they would alone; and the launcher exits with the workers' code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

STATUS_VARIABLE = "QLORA_RANK_STATUS"  # the folder of pid-N and exit-N files, set by the launcher
COMMAND_VARIABLE = "QLORA_COMMAND"  # the user's command line, for run.json
PLANNED_VARIABLE = "QLORA_PLANNED"  # set for the workers: the launcher has planned the run for them
HANDOVER_VARIABLE = "QLORA_PLAN_HANDOVER"  # a folder where the plan process leaves its prepared data's path
PREPARED_VARIABLE = "QLORA_PREPARED"  # that path, for the workers: the data is prepared and hashed once a job
EXPECTED_EXITS = (2, 130, 143)  # a user's mistake, a stop by SIGINT or SIGTERM: not a crash


def plan_then_launch(nproc: int, command: list[str], qlora_options: list[str] = ()) -> int:
    """`qlora train --nproc N`: plan the run (and prepare its data) in a process of its own, then,
    when the plan passes, train on N workers that reuse what it prepared; the exit code of all.

    The plan runs apart because measuring the GPU would leave a CUDA context on GPU 0 in this
    launcher for the whole run. It is `qlora train ... --plan-only`; it leaves the path of the
    prepared data in a handover folder, and the workers load that instead of planning, preparing
    and hashing every source again, each of them.
    """
    handover = Path(tempfile.mkdtemp(prefix="qlora-plan-"))
    try:
        plan = [sys.executable, "-m", "qlora_cli", *qlora_options, *command, f"--nproc={nproc}", "--plan-only"]
        planned = subprocess.call(plan, env={**os.environ, HANDOVER_VARIABLE: str(handover)})
        if planned:
            return planned
        prepared = (handover / "prepared").read_text(encoding="utf-8")
        return launch_processes(nproc, command, qlora_options, {PREPARED_VARIABLE: prepared})
    finally:
        shutil.rmtree(handover, ignore_errors=True)


def hand_over_prepared(path: Path) -> None:
    """In the plan process of `plan_then_launch`: leave the prepared data's folder to the workers."""
    if os.environ.get(HANDOVER_VARIABLE):
        (Path(os.environ[HANDOVER_VARIABLE]) / "prepared").write_text(str(path), encoding="utf-8")


def prepared_by_launcher() -> Path | None:
    """In a worker of `plan_then_launch`: the prepared data folder its plan process made."""
    return Path(os.environ[PREPARED_VARIABLE]) if os.environ.get(PREPARED_VARIABLE) else None


def launch_processes(nproc: int, command: list[str], qlora_options: list[str] = (), env: dict | None = None) -> int:
    """Run `python -m qlora_cli [OPTIONS] COMMAND` on `nproc` local processes (with `env` added to
    theirs); their exit code."""
    status = Path(tempfile.mkdtemp(prefix="qlora-ranks-"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "qlora_cli", *qlora_options, *command]
    env = {**os.environ, **(env or {}), PLANNED_VARIABLE: "1", STATUS_VARIABLE: str(status),
           COMMAND_VARIABLE: json.dumps(sys.argv),
           # `-m qlora_cli` would import a source checkout in the current folder before the installed package.
           "PYTHONSAFEPATH": "1"}
    child = subprocess.Popen(launcher, env=env, start_new_session=True)
    forwarded = []

    def forward(number, frame) -> None:
        forwarded.append(number)
        pids = _recorded(status, "pid")
        for pid in pids.values():
            _signal(pid, number)
        if not pids:  # still starting: no worker has a handler yet, so they stop at once
            _signal(-child.pid, number)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        exits = _recorded(status, "exit")
        shutil.rmtree(status, ignore_errors=True)
    return combined_exit(code, list(exits.values()), forwarded)


def combined_exit(torchrun_code: int, worker_codes: list[int], forwarded: list[int]) -> int:
    """One exit code for all: a user's mistake (2; a rank that lost its peer to it crashes), then a
    crash (1), then a stop (130/143)."""
    for code in (2, 1, 130, 143):
        if code in worker_codes:
            return code
    if torchrun_code:
        return 128 + forwarded[0] if forwarded else torchrun_code
    return 0


def run_rank(main: Callable[[], None]) -> None:
    """Run one worker's `main` under the launcher: its pid and exit code go to the status folder,
    and an expected exit leaves torchrun with 0, so it neither stops the others nor prints a crash."""
    status = Path(os.environ[STATUS_VARIABLE])
    rank = os.environ.get("RANK", "0")
    (status / f"pid-{rank}").write_text(str(os.getpid()))
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    (status / f"exit-{rank}").write_text(str(code))
    raise SystemExit(0 if code in EXPECTED_EXITS else code)


def _recorded(status: Path, kind: str) -> dict[str, int]:
    found = {}
    for path in status.glob(f"{kind}-*"):
        try:
            found[path.name] = int(path.read_text())
        except (OSError, ValueError):  # being written
            continue
    return found


def _signal(pid: int, number: int) -> None:
    try:
        os.killpg(-pid, number) if pid < 0 else os.kill(pid, number)
    except (ProcessLookupError, PermissionError):
        pass


def planned_by_launcher() -> bool:
    """Whether this process is a worker whose launcher has already planned the run."""
    return bool(os.environ.get(PLANNED_VARIABLE))


def user_command_line() -> list[str]:
    """The command line the user typed: the launcher's, in a worker it started."""
    return json.loads(os.environ[COMMAND_VARIABLE]) if COMMAND_VARIABLE in os.environ else sys.argv
