"""`qlora train`: the story of a run, top to bottom.

check the recipe against this machine -> check the run folder is free -> prepare (or reuse) the
data -> load the 4-bit base with LoRA -> claim the run folder -> build the Trainer -> train
(stoppable, resumable) -> save the adapter, run.json and loss.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from qlora_cli.atomic import atomic_folder
from qlora_cli.errors import UserError, combined
from qlora_cli.launch import user_command_line
from qlora_cli.run_folder import (
    RunFolder, clear_run_folder, draw_loss_plot, library_versions, model_card, now, open_run_folder, write_json,
)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class TrainResult:
    """How a run ended and where its files are."""

    run: RunFolder
    metrics: dict
    stopped_by: int | None = None  # the signal that stopped it, if any

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.stopped_by, 0)


def train(recipe, *, resume: bool = False, overwrite: bool = False, reporter=None) -> TrainResult:
    """Train a LoRA adapter as the recipe says; `reporter` (from the CLI) shows progress."""
    from accelerate import PartialState

    from qlora_cli.builders import build_training_arguments
    from qlora_cli.model import load_recipe_tokenizer, load_trainable_model, summarize_model
    from qlora_cli.prepare import prepare_dataset

    check_machine(recipe)
    check_model_folder(recipe)
    check_trainable(recipe)
    run = open_run_folder(recipe, resume=resume, overwrite=overwrite)
    # Building the arguments also joins the process group under torchrun / accelerate launch.
    args = build_training_arguments(recipe.training, recipe.origins, **run_changes(recipe, run))
    state = PartialState()
    tokenizer = load_recipe_tokenizer(recipe)
    with args.main_process_first(local=False, desc="prepare data"):  # rank 0 prepares, the others load
        prepared = prepare_dataset(recipe, tokenizer)
    check_data(recipe, prepared)
    started = now()
    if reporter:
        reporter.data_ready(prepared)
    model = load_trainable_model(recipe, device_map=_device_map(args))
    summary = summarize_model(model, recipe.quantization)
    # Only now that the model has loaded: a run that fails before training leaves no folder behind.
    if state.is_main_process:
        if overwrite:
            clear_run_folder(run)
        run.root.mkdir(parents=True, exist_ok=True)
        run.recipe.write_text(recipe.to_yaml())
    state.wait_for_everyone()
    if reporter:
        reporter.model_ready(summary, run)
    trainer, stopper = None, None
    start_from = run.last_checkpoint() if resume else None
    try:
        trainer, stopper = build_trainer(recipe, args, model, tokenizer, prepared, run, reporter)
        stopper.install()
        output = trainer.train(resume_from_checkpoint=str(start_from) if start_from else None)
    except BaseException as err:
        untrained = trainer is None or trainer.state.global_step == 0
        if state.is_main_process and not resume and untrained:
            shutil.rmtree(run.root, ignore_errors=True)  # nothing trained: the next try needs no flag
        if untrained and _missing_package(err):  # an optional package the recipe asks for (optim, ...)
            raise UserError(f"the run needs a package that is not installed: {err}",
                            fix="pip install it, or change the recipe key that asks for it") from None
        raise
    finally:
        if stopper:
            stopper.uninstall()
    metrics = final_metrics(trainer, output.metrics, stopped=stopper.signal_number is not None)
    if state.is_main_process:
        if stopper.signal_number is None:
            save_adapter(trainer, tokenizer, run, recipe, prepared, metrics)
        draw_loss_plot(trainer.state.log_history, run.plot)
        record = run_record(recipe, prepared, summary, metrics, started, stopper.signal_number)
        write_json(run.run_json, record | (_resumed(run, start_from) if start_from else {}))
    state.wait_for_everyone()
    return TrainResult(run, metrics, stopper.signal_number)


def _missing_package(err: BaseException) -> bool:
    # transformers says so with an ImportError, or for some optimizers a ValueError ("Please install ...").
    return isinstance(err, ImportError) or (isinstance(err, ValueError) and "install" in str(err).lower())


def check_machine(recipe) -> None:
    """Refuse, before any weight is loaded, what this machine cannot do."""
    import torch

    training, origins, errors = recipe.training, recipe.origins, []
    no_gpu = not torch.cuda.is_available()

    def refuse(key: str, why: str, fix: str) -> None:
        key = key if "." in key else f"training.{key}"
        errors.append(UserError(why, where=origins.get(key, key), fix=fix))

    if no_gpu and training.get("bf16") and not training.get("use_cpu"):
        refuse("bf16", "`training.bf16: true` needs a CUDA GPU, and this machine has none",
               "set training.bf16=false to train in fp32 on the CPU")
    if no_gpu and training.get("fp16"):
        refuse("fp16", "`training.fp16: true` needs a CUDA GPU, and this machine has none",
               "set training.fp16=false")
    optim = str(training.get("optim", ""))
    if no_gpu and ("paged" in optim or "8bit" in optim):
        refuse("optim", f"`training.optim: {optim}` needs a CUDA GPU (bitsandbytes paged/8-bit optimizer)",
               "set training.optim=adamw_torch")
    attention = recipe.model.attn_implementation or ""
    if attention.startswith("flash_attention") and not _flash_attention_available(attention):
        refuse("model.attn_implementation", f"`model.attn_implementation: {attention}` needs a CUDA GPU and the "
               "flash-attn package; this machine lacks one or both",
               "pip install flash-attn on a CUDA machine, or set model.attn_implementation=sdpa")
    for name in _missing_integrations(training.get("report_to")):
        refuse("report_to", f"`training.report_to` names {name}, which is not installed",
               f"pip install {name}, or set training.report_to=tensorboard (or none)")
    if errors:
        raise combined(errors)


def _missing_integrations(report_to) -> list[str]:
    """Logging integrations the recipe asks for whose package is not installed."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK, get_available_reporting_integrations,
    )

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = get_available_reporting_integrations()
    return [name for name in names if name in INTEGRATION_TO_CALLBACK and name not in available]


def _flash_attention_available(attention: str) -> bool:
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    return is_flash_attn_3_available() if attention.endswith("_3") else is_flash_attn_2_available()


def check_model_folder(recipe) -> None:
    """A local model path that is not a model folder fails now, not after the data is prepared."""
    name = recipe.model.name_or_path
    path = Path(name).expanduser() if name else None
    looks_local = path is not None and (path.is_absolute() or name.startswith((".", "~")) or path.exists())
    if looks_local and not (path / "config.json").is_file():
        raise UserError(f"`model.name_or_path` {name} is not a model folder: it has no config.json",
                        where=recipe.origins.get("model.name_or_path", "model.name_or_path"),
                        fix="give a local folder with config.json and safetensors weights, or a hub id")


def check_trainable(recipe) -> None:
    """qlora trains LoRA adapters: without a `lora` section a quantized base could not train at
    all, and a full fine-tune would leave weights that `merge` and `generate` do not read."""
    if recipe.lora is None:
        raise UserError("the recipe has no `lora` section, and qlora trains LoRA adapters",
                        where=recipe.origins.get("lora", "lora"),
                        fix="keep a lora section (e.g. lora.r=16 lora.target_modules=all-linear)")


def check_data(recipe, prepared) -> None:
    """Data problems the Trainer would only find later, or never."""
    dataset, training = prepared.dataset, recipe.training
    wants_eval = str(training.get("eval_strategy", "no")) != "no" or training.get("load_best_model_at_end")
    if wants_eval and "validation" not in dataset:
        key = "eval_strategy" if str(training.get("eval_strategy", "no")) != "no" else "load_best_model_at_end"
        raise UserError(f"`training.{key}` asks for evaluation but there is no validation split",
                        where=recipe.origins.get(f"training.{key}", f"training.{key}"),
                        fix="set data.val_size (e.g. 0.1) or data.validation_sources")
    if "validation" in dataset and len(dataset["validation"]) == 0:
        raise UserError("the validation split is empty", where="data.validation_sources",
                        fix="give validation sources with examples, or set data.val_size")


def build_trainer(recipe, args, model, tokenizer, prepared, run: RunFolder, reporter=None):
    """The Trainer for this run, and the callback that stops it cleanly on a signal."""
    from qlora_cli.trainer import CountingCollator, QloraTrainer, StopOnSignal

    dataset = prepared.dataset
    collator = CountingCollator(tokenizer.pad_token_id, recipe.model.attn_implementation)
    stopper = StopOnSignal()
    trainer = QloraTrainer(
        model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset.get("validation"),
        data_collator=collator, processing_class=tokenizer, callbacks=[stopper],
        chunked_loss=recipe.model.chunked_loss,
    )
    _log_to(trainer, run.logs)
    if reporter:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints raw dicts; the reporter shows progress
        trainer.add_callback(reporter.training_callback(lambda: trainer.real_tokens_seen))
    return trainer, stopper


def _log_to(trainer, logs: Path) -> None:
    """TensorBoard event files go to this run's logs/ (the callback would read an environment
    variable, which an earlier run in the same process may have set)."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(logs)


def run_changes(recipe, run: RunFolder) -> dict:
    """TrainingArguments that follow from the run folder and the data, not from the user."""
    changes = {
        "output_dir": str(run.checkpoints),
        "disable_tqdm": True,  # our own progress display instead
        "remove_unused_columns": False,  # `seq_lengths` must reach the collator
        "label_names": ["labels"],
        # Every LoRA weight takes part in every step; the search DDP does otherwise costs time.
        "ddp_find_unused_parameters": recipe.training.get("ddp_find_unused_parameters", False),
    }
    import torch

    if not torch.cuda.is_available():
        # Without this, TrainingArguments does not set up gloo DDP for CPU processes.
        changes["use_cpu"] = True
        changes["dataloader_pin_memory"] = False  # pinning needs an accelerator
    from qlora_cli.builders import evaluation_changes

    has_validation = bool(recipe.data.val_size or recipe.data.validation_sources)
    return changes | evaluation_changes(recipe.training, has_validation)


def _device_map(args):
    import torch

    # Each rank holds the whole 4-bit model on its own GPU (DDP); FSDP places the shards itself;
    # on the CPU, no map at all.
    return {"": args.local_process_index} if torch.cuda.is_available() and not args.fsdp else None


def final_metrics(trainer, train_metrics: dict, stopped: bool) -> dict:
    """Training metrics, plus validation loss and perplexity of the final adapter."""
    from qlora_cli.trainer import reduce_over_ranks

    metrics = {k: v for k, v in train_metrics.items() if isinstance(v, (int, float))}
    metrics["steps"] = trainer.state.global_step
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if losses:
        metrics["final_train_loss"] = losses[-1]
    runtime = metrics.get("train_runtime") or 0
    metrics["real_tokens"] = reduce_over_ranks(trainer.real_tokens_seen)
    metrics["tokens_per_second"] = metrics["real_tokens"] / runtime if runtime else 0.0
    if trainer.eval_dataset is not None and not stopped:
        metrics.update(_final_evaluation(trainer))
    if "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    return metrics


def _final_evaluation(trainer) -> dict:
    """Validation metrics of the final adapter: the Trainer's own from the last step when that
    step's weights are the adapter (no second pass over the validation set), else a new pass."""
    state = trainer.state
    last = next((entry for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    kept_last = not trainer.args.load_best_model_at_end or state.best_global_step == state.global_step
    if last and last.get("step") == state.global_step and kept_last:
        return {key: value for key, value in last.items() if key.startswith("eval_")}
    return trainer.evaluate()


def save_adapter(trainer, tokenizer, run: RunFolder, recipe, prepared, metrics: dict) -> None:
    """adapter/: LoRA weights (safetensors), tokenizer and model card, appearing whole."""
    with atomic_folder(run.adapter, replace=True) as tmp:
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        base = recipe.model.name_or_path or f"init_from_config ({recipe.model.init_from_config.get('model_type')})"
        (tmp / "README.md").write_text(model_card(recipe.to_yaml(), _data_lines(prepared), metrics, base))


def _data_lines(prepared) -> dict:
    s = prepared.summary
    return {
        "fingerprint": s.fingerprint,
        "examples": s.examples,
        "tokens": s.tokens,
        "trained share of tokens": f"{100 * s.trained_fraction:.1f}%",
        "sources": ", ".join(Path(c.path).name for c in s.sources),
    }


def _resumed(run: RunFolder, checkpoint: Path) -> dict:
    """What run.json keeps of the runs before a resume (its times and rates are this run's)."""
    try:
        earlier = json.loads(run.run_json.read_text())
    except (OSError, ValueError):
        earlier = {}
    return {"resumed_from": checkpoint.name, "first_started": earlier.get("first_started", earlier.get("started"))}


def run_record(recipe, prepared, summary, metrics: dict, started: str, stopped_by: int | None) -> dict:
    """run.json: everything needed to tell later how this run was made and how it went."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "command": user_command_line(),  # under --nproc, the launcher's
        "started": started,
        "ended": now(),
        "status": f"stopped by {signal.Signals(stopped_by).name}" if stopped_by else "completed",
        "versions": library_versions(),
        "device": device,
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "data_fingerprint": prepared.summary.fingerprint,
        "parameters": {"trainable": summary.trainable, "total": summary.total},
        "metrics": metrics,
        "tokens_per_second": metrics.get("tokens_per_second"),
    }
