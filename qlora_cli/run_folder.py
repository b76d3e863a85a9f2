"""The run folder (`training.output_dir`): what a finished or stopped run leaves for the user.

    recipe.yaml   the fully resolved recipe, runnable again as is
    run.json      command line, times, versions, device, data fingerprint, parameters, metrics
    checkpoints/  complete Trainer checkpoints (checkpoint-N)
    adapter/      the final LoRA adapter, tokenizer and a model card
    logs/         TensorBoard event files
    loss.png      training/validation loss and learning rate against steps

run.json carries qlora's marker from the moment a run claims the folder, and `.qlora.lock` names
the process that holds it: `--overwrite` deletes only these files (a user's own files in the
folder survive), refuses a folder without the marker, and a second run on the folder is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import (
    CARD, LOCK_FILE, check_not_in_use, has_marker, lock_folder, made_from, marker, model_card, release_folder,
    weights_damage,
)
from qlora_cli.errors import UserError

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
KIND = "run"  # run.json's marker (atomic.marker)
MERGED = "merged"  # a merged model's card marker (atomic.model_card)
# What `qlora train` writes in a run folder, and the staging it may leave there when killed.
OWN_FILES = ("recipe.yaml", "run.json", "checkpoints", "adapter", "logs", "loss.png")
OWN_STAGING = (".adapter.tmp-*", ".adapter.old-*", ".run.json.tmp", ".loss.tmp.png", "checkpoints/.staging-*")
LIBRARIES = ("qlora-cli", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


@dataclass
class RunFolder:
    """Paths inside one run folder, and what opening it for a run found there."""

    root: Path
    fresh: bool = False  # claimed by a run that saved nothing: reused without a flag
    resume_from: Path | None = None  # the checkpoint --resume continues
    notes: list[str] = field(default_factory=list)  # what the user should hear (a checkpoint skipped, ...)

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

    def is_ours(self) -> bool:
        """Whether qlora made this folder: run.json holds its marker, or, written before the marker
        existed, the qlora-cli version that only qlora records (so such a run still resumes)."""
        if has_marker(self.run_json, KIND):
            return True
        try:
            return "qlora-cli" in json.loads(self.run_json.read_text()).get("versions", {})
        except (OSError, ValueError, AttributeError, TypeError):
            return False

    def saved_anything(self) -> bool:
        """Whether a run saved a checkpoint (complete or not) or an adapter here."""
        return bool(self.newest_checkpoints()) or self.adapter.exists()

    def newest_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := CHECKPOINT.match(p.name))]
        return [path for _, path in sorted(found, reverse=True)]

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint that is complete and undamaged."""
        return next((path for path in self.newest_checkpoints() if checkpoint_damage(path) is None), None)


def checkpoint_damage(checkpoint: Path) -> str | None:
    """Why a resume could not load `checkpoint` (a file missing, cut short or corrupt), or None.
    Read without unpickling: safetensors headers, and the checksums of torch's zip files."""
    if not _readable_json(checkpoint / "trainer_state.json"):  # the Trainer writes it last
        return "its trainer_state.json is missing or incomplete"
    damage = weights_damage(checkpoint)
    if damage:
        return damage.replace(f"{checkpoint}/", "")
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth"), *checkpoint.glob("*.bin")]):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as err:
            return f"{path.name} is cut short or corrupt ({err})"
        if bad:
            return f"{path.name} is corrupt (its part {bad} fails its checksum)"
    return None


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def open_run_folder(recipe: Recipe, *, resume: bool, overwrite: bool, probe_lock: bool = True) -> RunFolder:
    """Open the run folder of `recipe` for a run: a new one, one to resume, one to overwrite, or
    one a killed run claimed before saving anything (reused as new). Only looks: claim_run_folder
    takes it.

    An existing run is never touched without a flag, and a folder that is not a run never at all.
    """
    run = RunFolder(recipe.run_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", fix="choose one")
    _check_writable(run.root)
    if probe_lock and os.environ.get("RANK", "0") == "0":  # the other ranks follow rank 0, which holds it
        check_not_in_use(run.root, "qlora train", key="training.output_dir")
    if not _entries(run.root):
        if resume:
            raise UserError(f"nothing to resume: {run.root} does not exist or is empty", key="training.output_dir",
                            fix="train without --resume, or set training.output_dir to the run to continue")
        return run
    if not run.is_ours():
        if overwrite or resume:
            raise UserError(f"{'--overwrite would delete' if overwrite else 'cannot resume'} {run.root}, which is "
                            "not a run folder qlora made (it has no run.json with qlora's marker)",
                            key="training.output_dir",
                            fix="set training.output_dir to a new folder, or empty that folder yourself")
        raise UserError(f"{run.root} already exists and is not a run folder", key="training.output_dir",
                        fix="set training.output_dir to a new folder")
    if not run.saved_anything():  # a run killed before its first save
        run.fresh = True
        if resume:
            run.notes.append(f"{run.root} has no checkpoint yet (its run stopped before the first save): "
                             "starting the run afresh")
        return run
    if not (resume or overwrite):
        raise UserError(f"run folder {run.root} already exists", key="training.output_dir",
                        fix="add --resume to continue it, --overwrite to start over, or set training.output_dir")
    if resume:
        _find_resume_point(run)
        _check_same_weights(recipe, run)
    return run


def _entries(root: Path) -> list[Path]:
    """What a folder holds besides our lock (a folder that holds only that is free)."""
    return [p for p in root.iterdir() if p.name != LOCK_FILE] if root.is_dir() else []


def _find_resume_point(run: RunFolder) -> None:
    """The newest checkpoint a resume can load; newer damaged ones are named (and skipped)."""
    damaged = []
    for checkpoint in run.newest_checkpoints():
        why = checkpoint_damage(checkpoint)
        if why is None:
            run.resume_from = checkpoint
            break
        damaged.append(f"{checkpoint}: {why}")
    if run.resume_from is None:
        listed = "; ".join(damaged) or "there are none"
        raise UserError(f"nothing to resume: {run.root} has no complete checkpoint ({listed})",
                        key="training.output_dir",
                        fix="start it over with --overwrite instead of --resume, or set training.output_dir")
    if damaged:
        run.notes.append(f"skipping damaged {'; '.join(damaged)}; resuming from {run.resume_from.name} "
                         "(training runs past the damaged steps again and replaces them)")


# What the checkpoint's weights depend on: resuming with any of these changed cannot load them.
WEIGHT_KEYS = ("model.name_or_path", "model.revision", "model.init_from_config", "model.tokenizer",
               "quantization", "lora")


def weight_changes(recipe: Recipe, run: RunFolder) -> list[str]:
    """Keys that shape the weights and differ between `recipe` and the run's recipe.yaml."""
    return weight_keys(recipe_differences(recipe, run))


def weight_keys(keys: list[str]) -> list[str]:
    return [key for key in keys if key.startswith(WEIGHT_KEYS)]


def recipe_differences(recipe: Recipe, run: RunFolder) -> list[str]:
    """Every key (dotted) whose value differs between `recipe` and the run's recipe.yaml."""
    import yaml

    from qlora_cli.recipe.load import expand_home

    old = (yaml.safe_load(run.recipe.read_text()) or {}) if run.recipe.is_file() else {}
    if isinstance(old, dict):
        expand_home(old)  # as the new recipe's paths are (a recipe.yaml from before may keep a `~`)
    old = _flat(old)
    new = _flat(yaml.safe_load(recipe.to_yaml()))  # as it was written: `${oc.env:...}` values kept as such
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def _flat(config, prefix: str = "") -> dict:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    return {k: v for key, value in config.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _check_same_weights(recipe: Recipe, run: RunFolder) -> None:
    changed = weight_changes(recipe, run)
    if changed:
        raise UserError(f"cannot resume {run.root}: the recipe changes {', '.join(changed)}, which its checkpoints' "
                        "weights depend on", key=changed[0],
                        fix=f"resume with the run's own recipe (qlora train {run.recipe} --resume, adding only "
                            "training.* overrides), or start a new run with another training.output_dir")


@contextmanager
def claim_run_folder(recipe: Recipe, seen: RunFolder, *, resume: bool, overwrite: bool, main: bool):
    """`with claim_run_folder(...) as run:` the run folder, held under its lock by the main
    process until the block ends (the other ranks go on with what they `seen` before it was
    taken). Staging a killed run left is removed; a new folder gets run.json's marker at once, so
    a kill from here on leaves a folder qlora knows. A run that fails before it saved anything
    removes what it wrote: the next try needs no flag."""
    if not main:
        yield seen
        return
    lock = lock_folder(recipe.run_dir, "qlora train", key="training.output_dir")
    try:
        # Under the lock: what another run did since the first look counts (it may have finished).
        run = open_run_folder(recipe, resume=resume, overwrite=overwrite, probe_lock=False)
        _remove(run.root, OWN_STAGING)  # no other process writes here now: any staging is a killed run's
        if not _entries(run.root):
            write_json(run.run_json, marker(KIND) | {"status": "claimed", "started": now()})
        yield run
    except BaseException:
        left = RunFolder(recipe.run_dir)
        if left.is_ours() and not left.saved_anything():
            _remove(left.root, OWN_FILES)
        raise
    finally:
        release_folder(lock)
        _remove_if_empty(recipe.run_dir)


def start_run_folder(run: RunFolder, recipe_yaml: str, record: dict) -> None:
    """Replace an old run's files by a new run's first ones (recipe.yaml, run.json), once the
    model has loaded; files the user keeps in the folder stay."""
    _remove(run.root, OWN_FILES)
    run.root.mkdir(parents=True, exist_ok=True)
    run.recipe.write_text(recipe_yaml)
    write_json(run.run_json, marker(KIND) | record)


def _remove(root: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _remove_if_empty(root: Path) -> None:
    try:
        root.rmdir()
    except OSError:  # not empty: a run's files, or the user's
        pass


def _check_writable(root: Path) -> None:
    from qlora_cli.atomic import can_create_in, nearest_existing

    parent = nearest_existing(root)
    if not parent.is_dir():
        raise UserError(f"cannot make the run folder {root}: {parent} is a file, not a folder",
                        key="training.output_dir", fix="choose another training.output_dir")
    if not can_create_in(parent):
        raise UserError(f"cannot write the run folder {root}: {parent} is not writable",
                        key="training.output_dir", fix="choose a folder you can write")


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

    rewards = _reward_curves(log_history)
    if rewards:  # DPO / KTO: the rewards under the loss
        fig, (loss_axis, reward_axis) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
        for label, points in rewards.items():
            reward_axis.plot(*zip(*points), "o-" if label.startswith("validation") else "-", label=label)
        reward_axis.axhline(0, color="tab:gray", linewidth=0.5)
        reward_axis.set_xlabel("step")
        grpo = any(label in GRPO_TOTALS.values() for label in rewards)
        reward_axis.set_ylabel("reward (the recipe's rewards)" if grpo else "reward (beta x log-ratio to the reference)")
        reward_axis.legend(loc="upper left")
    else:
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


REWARD_CURVES = {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "margin",
                 "eval_rewards/margins": "validation margin", "eval_rewards/accuracies": "validation reward accuracy"}


GRPO_TOTALS = {"reward": "reward (weighted sum)", "eval_reward": "validation reward (weighted sum)"}


def _reward_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The reward curves TRL's DPO/KTO/GRPO trainers log, by label; empty for SFT runs. GRPO logs
    each reward function's mean as `rewards/<name>/mean` (`eval_` before it on validation)."""
    labels = dict(REWARD_CURVES)
    for key in {key for entry in log_history for key in entry}:
        name = key.removeprefix("eval_")
        if name.startswith("rewards/") and name.endswith("/mean"):
            labels[key] = ("validation " if key.startswith("eval_") else "") + name.split("/")[1]
    labels |= GRPO_TOTALS
    curves = {label: [(e["step"], e[key]) for e in log_history if e.get(key) is not None]
              for key, label in sorted(labels.items())}
    return {label: points for label, points in curves.items() if points}


def adapter_card(recipe_yaml: str, data_summary: dict, metrics: dict, base_model: str | None, base_described: str):
    """README.md for the adapter folder (a `ModelCard` carrying qlora's marker): what it is, how it
    was trained, how well it did. `base_model` goes in the front matter where it is a hub id;
    `base_described` names it in the text."""
    metric_lines = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                             for k, v in metrics.items())
    data_lines = "\n".join(f"- {k}: {v}" for k, v in data_summary.items())
    return model_card("adapter", base_model, f"""# LoRA adapter trained with qlora

Base model: {base_described}. Load it with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "<this folder>")`
(`AutoModelForImageTextToText` for a vision-language base such as Mistral Small 3.x),
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
""", library_name="peft", tags=("lora", "peft"))


def merge_adapter_dir(recipe: Recipe) -> Path:
    """The adapter merge, generate and eval load: `merge.adapter`, by default the run's adapter/."""
    return Path(recipe.merge.adapter or RunFolder(recipe.run_dir).adapter)


def merge_output_dir(recipe: Recipe) -> Path:
    """The merged model's folder: `merge.output_dir`, by default the run's merged/ (the one place
    that default is made; not train's: merged/ is not in OWN_FILES)."""
    return Path(recipe.merge.output_dir or Path(recipe.run_dir) / "merged")


def is_merged_model(folder: Path) -> bool:
    """Whether `qlora merge` wrote `folder`: a model (config.json) whose card carries the marker."""
    return (folder / "config.json").is_file() and has_marker(folder / CARD, MERGED)


def is_current_merge(recipe: Recipe) -> bool:
    """Whether the recipe's merged folder holds the merge of the adapter it names, as that adapter is
    now (not one a retrained run, `--overwrite` or another `merge.adapter` left behind)."""
    folder = merge_output_dir(recipe)
    return is_merged_model(folder) and made_from(folder, merge_adapter_dir(recipe))
