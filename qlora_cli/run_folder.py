"""The run folder (`training.output_dir`): what a finished or stopped run leaves for the user.

    recipe.yaml   the fully resolved recipe, runnable again as is
    run.json      command line, times, versions, device, data fingerprint, parameters, metrics
    checkpoints/  complete Trainer checkpoints (checkpoint-N)
    adapter/      the final LoRA adapter, tokenizer and a model card
    logs/         TensorBoard event files
    loss.png      training/validation loss and learning rate against steps
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from qlora_cli.errors import UserError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
LIBRARIES = ("qlora-cli", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


@dataclass
class RunFolder:
    """Paths inside one run folder."""

    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def plot(self) -> Path:
        return self.root / "loss.png"

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint whose trainer state was written (the Trainer writes it last)."""
        if not self.checkpoints.is_dir():
            return None
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := CHECKPOINT.match(p.name))]
        for _, path in sorted(found, reverse=True):
            if _readable_json(path / "trainer_state.json"):
                return path
        return None


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def open_run_folder(recipe, *, resume: bool, overwrite: bool) -> RunFolder:
    """Claim the run folder of `recipe`: a new one, an existing one to resume, or one to overwrite.

    An existing run is never touched without a flag, and a folder that is not a run never at all.
    """
    run = RunFolder(recipe.run_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", fix="choose one")
    _check_writable(run.root)
    exists = run.root.is_dir() and any(run.root.iterdir())
    if exists and not (resume or overwrite):
        raise UserError(f"run folder {run.root} already exists", where="training.output_dir",
                        fix="add --resume to continue it, --overwrite to start over, or set training.output_dir")
    if exists and overwrite and not any(p.exists() for p in (run.recipe, run.run_json, run.checkpoints)):
        raise UserError(f"--overwrite would delete {run.root}, which is not a run folder (it has no recipe.yaml, "
                        "run.json or checkpoints/)", where="training.output_dir",
                        fix="set training.output_dir to a new folder, or empty that folder yourself")
    if resume and run.last_checkpoint() is None:
        raise UserError(f"nothing to resume: {run.root} has no complete checkpoint", where="training.output_dir",
                        fix="start it over with --overwrite instead of --resume, or set training.output_dir")
    if resume:
        _check_same_weights(recipe, run)
    return run


# What the checkpoint's weights depend on: resuming with any of these changed cannot load them.
WEIGHT_KEYS = ("model.name_or_path", "model.revision", "model.init_from_config", "model.tokenizer",
               "quantization", "lora")


def weight_changes(recipe, run: RunFolder) -> list[str]:
    """Keys that shape the weights and differ between `recipe` and the run's recipe.yaml."""
    return weight_keys(recipe_differences(recipe, run))


def weight_keys(keys: list[str]) -> list[str]:
    return [key for key in keys if key.startswith(WEIGHT_KEYS)]


def recipe_differences(recipe, run: RunFolder) -> list[str]:
    """Every key (dotted) whose value differs between `recipe` and the run's recipe.yaml."""
    import yaml

    from qlora_cli.recipe import expand_home

    old = (yaml.safe_load(run.recipe.read_text()) or {}) if run.recipe.is_file() else {}
    if isinstance(old, dict):
        expand_home(old)  # as the new recipe's paths are (a recipe.yaml from before may keep a `~`)
    old = _flat(old)
    new = _flat(recipe.resolved)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def _flat(config, prefix: str = "") -> dict:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    return {k: v for key, value in config.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _check_same_weights(recipe, run: RunFolder) -> None:
    changed = weight_changes(recipe, run)
    if changed:
        raise UserError(f"cannot resume {run.root}: the recipe changes {', '.join(changed)}, which its checkpoints' "
                        "weights depend on", where=recipe.origins.get(changed[0], changed[0]),
                        fix=f"resume with the run's own recipe (qlora train {run.recipe} --resume, adding only "
                            "training.* overrides), or start a new run with another training.output_dir")


def clear_run_folder(run: RunFolder) -> None:
    """Remove an old run's files for --overwrite (only once the new run is about to start)."""
    if run.root.exists():
        shutil.rmtree(run.root)
    run.root.mkdir(parents=True)


def _check_writable(root: Path) -> None:
    from qlora_cli.atomic import can_create_in, nearest_existing

    parent = nearest_existing(root)
    if not parent.is_dir():
        raise UserError(f"cannot make the run folder {root}: {parent} is a file, not a folder",
                        where="training.output_dir", fix="choose another training.output_dir")
    if not can_create_in(parent):
        raise UserError(f"cannot write the run folder {root}: {parent} is not writable",
                        where="training.output_dir", fix="choose a folder you can write")


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def draw_loss_plot(log_history: list[dict], target: Path) -> bool:
    """Training and validation loss and the learning rate against steps; False if nothing to draw."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    if not train:  # a run shorter than logging_steps: its average loss at its last step
        train = [(e["step"], e["train_loss"]) for e in log_history if "train_loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    rates = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e]
    if not (train or evals):
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, loss_axis = plt.subplots(figsize=(8, 4.5))
    if train:
        loss_axis.plot(*zip(*train), label="training loss", color="tab:blue")
    if evals:
        loss_axis.plot(*zip(*evals), "o-", label="validation loss", color="tab:orange")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    if rates:
        rate_axis = loss_axis.twinx()
        rate_axis.plot(*zip(*rates), "--", color="tab:gray", label="learning rate")
        rate_axis.set_ylabel("learning rate")
        rate_axis.legend(loc="upper center")
    loss_axis.legend(loc="upper right")
    fig.tight_layout()
    tmp = target.with_name(f".{target.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(target)
    return True


def model_card(recipe_yaml: str, data_summary: dict, metrics: dict, base_model: str) -> str:
    """README.md for the adapter folder: what it is, how it was trained, how well it did."""
    metric_lines = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                             for k, v in metrics.items())
    data_lines = "\n".join(f"- {k}: {v}" for k, v in data_summary.items())
    return f"""---
library_name: peft
base_model: {base_model}
tags: [qlora, lora, peft]
---

# LoRA adapter trained with qlora

Base model: `{base_model}`. Load it with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "<this folder>")`,
or merge it into a standalone model with `qlora merge <run folder>`.

## Final metrics

| metric | value |
|---|---|
{metric_lines}

## Data

{data_lines}

## Recipe

```yaml
{recipe_yaml}```
"""
