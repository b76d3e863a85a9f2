"""`--nproc N`: N local processes through torchrun, with the exit codes and signals of one.

torchrun reads any non-zero exit of a worker as a crash: it stops the others and prints a
traceback, and the launcher would exit 1 for a recipe mistake (2) or a clean stop (130/143).
And a signal that reaches torchrun itself gives the workers 30 s before it kills them, less
than one step of a large model takes. So torchrun runs in a session of its own, out of the
terminal's reach; each worker writes its pid and its exit code into a folder the launcher reads;
Ctrl-C and SIGTERM go from the launcher straight to the workers, which finish the step, save a
checkpoint and stop as they would alone; and the launcher exits with the workers' code.

Before it starts them, the launcher plans the run and prepares its data in its own process
(`training.run.plan_for_processes`; the plan reads the GPU through NVML, which leaves no CUDA
context behind): the workers load that folder instead of each hashing every source again.
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

# The one variable a `--nproc` worker gets from its launcher: a folder the launcher made for the
# job. Each worker writes its pid and exit code there (pid-N, exit-N: how the launcher forwards
# signals and reports the workers' exit), and reads what the launcher hands over (launcher.json:
# the user's command line for run.json, and the data it prepared when it planned the run).
STATUS_VARIABLE = "QLORA_RANK_STATUS"
HANDOVER = "launcher.json"
EXPECTED_EXITS = (2, 130, 143)  # a user's mistake, a stop by SIGINT or SIGTERM: not a crash


def launch_processes(nproc: int, command: list[str], prepared: Path, qlora_options: list[str] = (),
                     nodes: tuple[int, int, str, int] | None = None) -> int:
    """Run `python -m qlora_cli [OPTIONS] COMMAND` on `nproc` local processes, which load the
    `prepared` data folder (the launcher planned the run and prepared it once); their exit code.
    `nodes`, (nnodes, node_rank, host, port) of a job over several machines, each running this."""
    status = Path(tempfile.mkdtemp(prefix="qlora-ranks-"))
    handover = {"command": sys.argv, "prepared": str(prepared)}
    (status / HANDOVER).write_text(json.dumps(handover), encoding="utf-8")
    launcher = [sys.executable, "-m", "torch.distributed.run", *_rendezvous(nodes), f"--nproc_per_node={nproc}",
                "-m", "qlora_cli", *qlora_options, *command]
    env = {**os.environ, STATUS_VARIABLE: str(status),
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


def _rendezvous(nodes: tuple[int, int, str, int] | None) -> list[str]:
    """torchrun's options: one machine on its own, or this node of several. Their static rendezvous
    (node 0's address, a fixed node rank) numbers the ranks node by node, so each rank reads the
    same rows on every run of the job."""
    if nodes is None:
        return ["--standalone"]
    nnodes, node_rank, host, port = nodes
    return [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={host}", f"--master_port={port}"]


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


def _handed_over() -> dict:
    """What the `--nproc` launcher left for this worker; nothing outside a `--nproc` job."""
    if not os.environ.get(STATUS_VARIABLE):
        return {}
    return json.loads((Path(os.environ[STATUS_VARIABLE]) / HANDOVER).read_text(encoding="utf-8"))


def prepared_by_launcher() -> Path | None:
    """In a `--nproc` worker: the data folder its launcher prepared when it planned the run."""
    prepared = _handed_over().get("prepared")
    return Path(prepared) if prepared else None


def user_command_line() -> list[str]:
    """The command line the user typed: the launcher's, in a worker it started."""
    return _handed_over().get("command") or sys.argv
