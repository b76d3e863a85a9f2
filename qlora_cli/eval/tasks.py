"""lm-evaluation-harness tasks, run on the model qlora already loaded (4-bit base + adapter).

lm-eval is an optional extra (`pip install '.[eval]'` in the checkout): it pulls scikit-learn, nltk,
evaluate and more, which training never needs. Tasks are named as lm-eval names them
(`hellaswag`), or given as a task YAML file or a folder of them: a local task reads a local
dataset, so it runs offline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from qlora_cli.errors import UserError, combined
from qlora_cli.recipe.sections import suggest

INSTALL_FIX = ("install lm-evaluation-harness: pip install '.[eval]' in the qlora checkout "
               "(or pip install 'lm_eval>=0.4.13,<0.5')")


@dataclass
class TaskSuite:
    """The tasks to run, checked: what lm-eval loads them by, and the index that knows them."""

    specs: list[str]
    manager: object  # lm_eval.tasks.TaskManager
    names: list[str] = field(default_factory=list)


def load_tasks(tasks: list[str]) -> TaskSuite:
    """Check that lm-eval is installed, that every task exists and that its data loads (before any
    weights do): exit 2 with the task and the reason otherwise."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    folders, files, names = _split_specs(tasks)
    # Indexing lm-eval's own ~15,000 tasks takes half a minute: only when a task is named.
    manager = TaskManager(include_path=[str(f) for f in folders] or None, include_defaults=bool(names))
    errors = [_unknown(name, manager.all_tasks) for name in names if name not in manager.all_tasks]
    specs = [*names, *[str(f) for f in files]]
    for folder in folders:
        found = TaskManager(include_path=str(folder), include_defaults=False).all_subtasks
        if not found:
            errors.append(UserError(f"{folder} holds no lm-eval task YAML", where="--tasks",
                                    fix="give a folder with task YAML files (see lm-eval's task guide)"))
        specs += found
    if errors:
        raise combined(errors)
    loaded = _load_data(manager, specs)
    return TaskSuite(specs, manager, sorted(loaded["tasks"]))


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--tasks runs lm-evaluation-harness, which is not installed", where="--tasks",
                        fix=INSTALL_FIX) from None
    # Its notes (default aggregations, "pretrained is not a str") would bury our progress and table.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _split_specs(tasks: list[str]) -> tuple[list[Path], list[Path], list[str]]:
    folders, files, names, errors = [], [], [], []
    for task in tasks:
        path = Path(task).expanduser()
        if path.is_dir():
            folders.append(path.resolve())
        elif path.suffix in (".yaml", ".yml"):
            if path.is_file():
                files.append(path.resolve())
            else:
                errors.append(UserError(f"task file {task} does not exist", where="--tasks"))
        else:
            names.append(task)
    if errors:
        raise combined(errors)
    return folders, files, names


def _unknown(name: str, known: list[str]) -> UserError:
    return UserError(f"unknown lm-eval task `{name}`{suggest(name, known)}", where="--tasks",
                     fix="use a name from `lm-eval ls tasks`, a task YAML file or a folder of them")


def _load_data(manager, specs: list[str]) -> dict:
    try:
        return manager.load(specs)
    except Exception as err:  # noqa: BLE001 - a dataset that cannot be reached, a broken task YAML
        raise UserError(f"lm-eval cannot load the tasks {', '.join(specs)}: {type(err).__name__}: {err}",
                        where="--tasks", fix="check the task's dataset is reachable (offline: use a local "
                                             "task YAML whose dataset is a local file)") from None


def wrap_model(model, tokenizer, batch_size: int):
    """The model as lm-eval's HFLM, without a copy: disabling the adapter later changes what it runs."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(lm, suite: TaskSuite, limit: int | None) -> tuple[dict[str, float], dict]:
    """`task/metric` -> value for each task, and lm-eval's whole output (with its samples)."""
    from lm_eval import simple_evaluate

    output = simple_evaluate(model=lm, tasks=suite.specs, task_manager=suite.manager, limit=limit,
                             bootstrap_iters=0, log_samples=True)
    return task_metrics(output["results"]), output


def task_metrics(results: dict) -> dict[str, float]:
    """lm-eval's `{"task": {"acc,none": 0.5, "acc_stderr,none": ...}}` as `{"task/acc": 0.5}`."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            metrics[f"{task}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")] = float(value)
    return metrics
