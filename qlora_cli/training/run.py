"""`qlora train`: the story of a run, top to bottom.

check the run folder is free -> check the recipe against this machine -> claim (lock) the run
folder -> prepare (or reuse) the data -> plan (will it fit?) -> load the 4-bit base with LoRA ->
write the run's first files -> build the Trainer -> train (stoppable, resumable) -> save the
adapter, run.json and loss.png.
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import CARD, atomic_folder, disk_full, folder_size, write_checksums
from qlora_cli.errors import UserError, first_line
from qlora_cli.training.launch import prepared_by_launcher, user_command_line
from qlora_cli.plan.preflight import check_before_training, check_prepared_data
from qlora_cli.run_folder import (
    KIND, RunFolder, adapter_card, claim_run_folder, draw_loss_plot, library_versions, now, open_run_folder,
    start_run_folder, write_json,
)

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class TrainResult:
    """How a run ended and where its files are."""

    run: RunFolder
    metrics: dict
    stopped_by: int | None = None  # the signal that stopped it, if any
    tokenizer: object = None  # what the run loaded, for the `eval.after_training` that follows
    prepared: object = None  # its data (data.prepare.PreparedData)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.stopped_by, 0)


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, force: bool = False,
          reporter=None) -> TrainResult:
    """Train a LoRA adapter as the recipe says; `reporter` (from the CLI) shows progress.

    The plan comes first, on rank 0 (under `--nproc`, in the launcher: `plan_for_processes`); a run
    that cannot fit in GPU memory stops there unless `force`.
    """
    from accelerate import PartialState

    from qlora_cli.recipe.builders import build_training_arguments

    seen = open_run_folder(recipe, resume=resume, overwrite=overwrite)
    check_before_training(recipe)
    # Building the arguments also joins the process group under torchrun / accelerate launch.
    args = build_training_arguments(recipe.written("training"), has_validation=recipe.data.has_validation,
                                    method=recipe.method, **run_changes(recipe, seen))
    state = PartialState()
    state.wait_for_everyone()  # every rank has looked at the folder before rank 0 takes it
    with claim_run_folder(recipe, seen, resume=resume, overwrite=overwrite, main=state.is_main_process) as run:
        if reporter:
            for note in run.notes:
                reporter.note(note)
        return train_in_folder(recipe, run, args, state, force=force, reporter=reporter)


def plan_for_processes(recipe: Recipe, *, resume: bool, overwrite: bool, force: bool, gpus: int, reporter=None) -> Path:
    """The `--nproc` launcher's part of a run, before any worker starts: the run folder's and the
    recipe's checks, the data prepared once, and the plan for `gpus` processes (refused unless it
    fits, or `force`). The prepared folder, for the workers to load."""
    from qlora_cli.data.prepare import prepare_dataset
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    open_run_folder(recipe, resume=resume, overwrite=overwrite)
    check_before_training(recipe, processes=gpus)
    tokenizer = load_recipe_tokenizer(recipe)
    prepared = prepare_dataset(recipe, tokenizer)
    check_prepared_data(recipe, prepared)
    refuse_images_outside_sft(recipe, prepared)
    plan_run(recipe, tokenizer, prepared, force, gpus, reporter)
    return prepared.path


def train_in_folder(recipe: Recipe, run: RunFolder, args, state, *, force: bool, reporter=None) -> TrainResult:
    """The run itself, in a run folder this process holds."""
    from qlora_cli.model.load import load_trainable_model, summarize_model
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.training.distributed import gathered_trainable_weights
    from qlora_cli.training.trainer import OnTrainBegin

    tokenizer = load_recipe_tokenizer(recipe)
    handed_over = prepared_by_launcher()  # a `--nproc` worker: its launcher prepared and planned
    prepared = prepared_data(recipe, tokenizer, args, handed_over)
    if not handed_over:
        check_prepared_data(recipe, prepared)
        refuse_images_outside_sft(recipe, prepared)
        if state.is_main_process:
            plan_run(recipe, tokenizer, prepared, force, state.num_processes, reporter)
    started = now()
    if reporter:
        reporter.data_ready(prepared)
    model = load_trainable_model(recipe, device_map=_device_map(args), tokenizer=tokenizer)
    summary = summarize_model(model, recipe.quantization)
    start_from = run.resume_from
    # Only now that the model has loaded: a run that fails before it leaves the old files as they
    # were. A resume writes its recipe.yaml once the checkpoint has loaded (OnTrainBegin below).
    if state.is_main_process and start_from is None:
        start_run_folder(run, recipe.to_yaml(), {"status": "training", "started": started,
                                                 "command": user_command_line()})
    state.wait_for_everyone()
    if reporter:
        reporter.model_ready(summary, run)
    trainer, stopper, distribution = None, None, None
    loaded = OnTrainBegin(lambda: run.recipe.write_text(recipe.to_yaml()) if start_from else None)
    try:
        trainer, stopper, distribution = build_trainer(recipe, args, model, tokenizer, prepared, run, reporter)
        trainer.add_callback(loaded)
        stopper.install()
        output = trainer.train(resume_from_checkpoint=str(start_from) if start_from else None)
    except BaseException as err:
        untrained = trainer is None or trainer.state.global_step == 0
        if untrained and _missing_package(err):  # an optional package the recipe asks for (optim, ...)
            raise UserError(f"the run needs a package that is not installed: {err}",
                            fix="pip install it, or change the recipe key that asks for it") from None
        if start_from and trainer is not None and not loaded.called and isinstance(err, Exception):
            raise UserError(f"cannot resume from {start_from}, which fails to load: {first_line(err, named=True)}",
                            key="training.output_dir",
                            fix=f"delete that checkpoint (rm -r {start_from}) to resume from the one before it, "
                                "or start over with --overwrite") from None
        raise
    finally:
        if stopper:
            stopper.uninstall()
    metrics = final_metrics(trainer, output.metrics, stopped=stopper.signal_number is not None)
    # Under FSDP each rank holds a shard of the LoRA weights: gathered on every rank, saved by rank 0.
    gathered = gathered_trainable_weights(trainer) if stopper.signal_number is None else None
    if state.is_main_process:
        if stopper.signal_number is None:
            save_adapter(trainer, tokenizer, run, recipe, prepared, metrics, gathered)
        draw_loss_plot(trainer.state.log_history, run.plot)
        record = run_record(recipe, prepared, summary, metrics, started, stopper.signal_number, distribution.record)
        write_json(run.run_json, record | (_resumed(run, start_from) if start_from else {}))
    state.wait_for_everyone()
    return TrainResult(run, metrics, stopper.signal_number, tokenizer, prepared)


def prepared_data(recipe: Recipe, tokenizer, args, handed_over: Path | None):
    """The run's data: the folder the `--nproc` launcher prepared, or else prepared (or found in
    the cache) by rank 0 first and then loaded by the other ranks."""
    from qlora_cli.data.prepare import load_prepared, prepare_dataset

    if handed_over:
        return load_prepared(handed_over)
    with args.main_process_first(local=False, desc="prepare data"):
        return prepare_dataset(recipe, tokenizer)


def refuse_images_outside_sft(recipe: Recipe, prepared) -> None:
    """DPO and KTO feed TRL's trainers our ids only: their rows' images would never reach the model
    (its [IMG] tokens trained on as text), so such data exits 2 before the model loads."""
    if recipe.method == "sft":
        return
    if any("images" in split.column_names for split in prepared.dataset.values()):
        raise UserError(f"`method: {recipe.method}` does not train on images yet: the pixels would not reach the "
                        "model", key="method", fix="train on image data with method: sft, or remove the images")


def plan_run(recipe: Recipe, tokenizer, prepared, force: bool, gpus: int, reporter=None) -> None:
    """The short plan, shown; a run that cannot fit in GPU memory is refused unless `force`."""
    from qlora_cli.plan.estimate import plan_recipe, refuse_unless_fits

    plan = plan_recipe(recipe, gpus=gpus, tokenizer=tokenizer, prepared=prepared, checked=True)
    if reporter:
        reporter.plan_ready(plan)
    refuse_unless_fits(plan, force)


def _missing_package(err: BaseException) -> bool:
    # transformers says so with an ImportError, or for some optimizers a ValueError ("Please install ...").
    return isinstance(err, ImportError) or (isinstance(err, ValueError) and "install" in str(err).lower())


def build_trainer(recipe: Recipe, args, model, tokenizer, prepared, run: RunFolder, reporter=None):
    """The Trainer for this run, the callback that stops it cleanly on a signal, and the one that
    records how the Trainer distributed the model."""
    from qlora_cli.data.images import image_settings
    from qlora_cli.training.distributed import RecordDistribution
    from qlora_cli.training.trainer import CountingCollator, QloraTrainer, StopOnSignal

    dataset = prepared.dataset
    stopper = StopOnSignal()
    if recipe.method == "grpo":  # TRL's GRPOTrainer, generating from our prepared prompts
        from qlora_cli.rewards import reward_functions
        from qlora_cli.training.grpo_trainer import build_grpo_trainer

        trainer = build_grpo_trainer(model=model, args=args, dataset=dataset, tokenizer=tokenizer,
                                     rewards=reward_functions(recipe.rewards, args.max_completion_length),
                                     callbacks=[stopper], from_adapter=recipe.model.adapter is not None,
                                     from_environment=recipe.from_environment)
    elif recipe.method != "sft":  # DPO / KTO: TRL's trainers on our prepared pairs
        from qlora_cli.training.preference_trainer import build_preference_trainer

        trainer = build_preference_trainer(recipe.method, model=model, args=args, dataset=dataset, tokenizer=tokenizer,
                                           callbacks=[stopper], from_adapter=recipe.model.adapter is not None,
                                           chunked_loss=recipe.model.chunked_loss,
                                           from_environment=recipe.from_environment)
    else:
        collator = CountingCollator(tokenizer.pad_token_id, recipe.model.attn_implementation,
                                    image_settings=image_settings(tokenizer, model.config))
        trainer = QloraTrainer(
            model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset.get("validation"),
            data_collator=collator, processing_class=tokenizer, callbacks=[stopper],
            chunked_loss=recipe.model.chunked_loss, from_environment=recipe.from_environment,
        )
    if recipe.written("training").get("activation_offloading"):
        trainer.offload_activations()
    _log_to(trainer, run.logs)
    distribution = RecordDistribution(trainer, reporter.distributed if reporter else None)
    trainer.add_callback(distribution)
    if reporter:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints raw dicts; the reporter shows progress
        trainer.add_callback(reporter.training_callback(lambda: trainer.real_tokens_seen))
    return trainer, stopper, distribution


def _log_to(trainer, logs: Path) -> None:
    """TensorBoard event files go to this run's logs/ (the callback would read an environment
    variable, which an earlier run in the same process may have set)."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(logs)


def run_changes(recipe: Recipe, run: RunFolder) -> dict:
    """TrainingArguments that follow from the run folder and our own collator, not from the user."""
    return {
        "output_dir": str(run.checkpoints),
        "disable_tqdm": True,  # our own progress display instead
        "remove_unused_columns": False,  # `seq_lengths` (or a pair's masks) must reach the collator
        "label_names": ["labels"] if recipe.method == "sft" else [],
        # Every LoRA weight takes part in every step; the search DDP does otherwise costs time.
        "ddp_find_unused_parameters": recipe.training.ddp_find_unused_parameters or False,
    } | ({"reward_weights": [reward.weight for reward in recipe.rewards]} if recipe.method == "grpo" else {})


def _device_map(args):
    import torch

    # Each rank holds the whole 4-bit model on its own GPU (DDP); FSDP places the shards itself;
    # on the CPU, no map at all.
    return {"": args.local_process_index} if torch.cuda.is_available() and not args.fsdp else None


def final_metrics(trainer, train_metrics: dict, stopped: bool) -> dict:
    """Training metrics, plus validation loss and perplexity of the final adapter."""
    from qlora_cli.training.trainer import reduce_over_ranks

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
    preference = {"eval_rewards/accuracies", "eval_kl", "eval_reward"} & metrics.keys()  # DPO, KTO, GRPO
    if "eval_loss" in metrics and not preference:
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


def save_adapter(trainer, tokenizer, run: RunFolder, recipe: Recipe, prepared, metrics: dict,
                 gathered: dict | None = None) -> None:
    """adapter/: LoRA weights (safetensors), tokenizer and model card, appearing whole; `gathered`,
    the trainable weights whole when the model is sharded (distributed.gathered_trainable_weights)."""
    from qlora_cli.data.chat_template import save_tokenizer
    from qlora_cli.model.load import base_model_id, describe_base_model

    card = adapter_card(recipe.to_yaml(), _data_lines(prepared), metrics, base_model_id(recipe),
                        describe_base_model(recipe))
    try:
        with atomic_folder(run.adapter, replace=True) as tmp:
            # Only the trained adapter: a DPO run from an adapter also holds TRL's frozen reference copy.
            trainer.model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=["default"],
                                          state_dict=gathered)
            save_tokenizer(tokenizer, tmp, recipe.data.template)  # with the chat template it trained on
            card.save(tmp / CARD)
            write_checksums(tmp)
    except Exception as err:  # the staging is gone; a full disk says how much the adapter needs
        last = run.last_checkpoint()
        raise disk_full(err, run.adapter, folder_size(last) if last else 0, key="training.output_dir") or err


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


def run_record(recipe: Recipe, prepared, summary, metrics: dict, started: str, stopped_by: int | None,
               distributed: dict | None = None) -> dict:
    """run.json: everything needed to tell later how this run was made and how it went."""
    import torch

    from qlora_cli.atomic import marker

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return marker(KIND) | {
        "command": user_command_line(),  # under --nproc, the launcher's
        "started": started,
        "ended": now(),
        "status": f"stopped by {signal.Signals(stopped_by).name}" if stopped_by else "completed",
        "versions": library_versions(),
        "device": device,
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "distributed": distributed,  # strategy, version, processes, nodes, what was sharded (distributed.py)
        "data_fingerprint": prepared.summary.fingerprint,
        "parameters": {"trainable": summary.trainable, "total": summary.total},
        "metrics": metrics,
        "tokens_per_second": metrics.get("tokens_per_second"),
    }
