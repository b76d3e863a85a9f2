"""Pre-flight: what can be checked about a command before a weight loads, in one place.

Each command calls its entry once, before any model loads: `qlora train` `check_before_training`
(and `check_prepared_data` once the data is prepared; `qlora plan` reports the same problems with
its plan), `qlora merge` `check_before_merge`, `qlora generate` `check_before_generate`, `qlora
eval` (and `eval.after_training`) `check_before_eval`. Reading the command's own input files (the
prompts, the eval records, the lm-eval tasks) stays with the command that parses them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import can_create_in, nearest_existing, weights_damage
from qlora_cli.errors import UserError, combined
from qlora_cli.hub import is_hub_id
from qlora_cli.run_folder import RunFolder, is_current_merge, is_merged_model, merge_adapter_dir, merge_output_dir

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe


def check_before_training(recipe: Recipe, processes: int | None = None) -> None:
    """The quick checks, every problem at once: this machine, the parallelism asked of it over
    `processes` (this job's WORLD_SIZE unless given: the `--nproc` launcher gives its N), the model
    folder, a LoRA section, the adapter a run starts from."""
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    errors = []
    for check in (check_machine, lambda r: check_parallelism(r, processes), check_model_folder, check_trainable,
                  check_starting_adapter):
        try:
            check(recipe)
        except UserError as err:
            errors += err.errors
    if errors:
        raise combined(errors)


def check_parallelism(recipe: Recipe, processes: int) -> None:
    """Refuse a sharding this job cannot give, instead of training another way without a word:
    FSDP on one process, FSDP1 without GPUs (FSDP2 runs on CPU processes: training.distributed),
    4-bit weights FSDP would leave whole on every rank, more local processes than GPUs (a
    `training.deepspeed` without its package is refused when the recipe loads)."""
    import torch

    training, errors = recipe.written("training"), []
    fsdp = training.get("fsdp")
    config = training.get("fsdp_config") if isinstance(training.get("fsdp_config"), dict) else {}
    if fsdp and processes < 2:
        errors.append(UserError("`training.fsdp` shards the model across processes, and this run has one",
                                key="training.fsdp", fix="train with --nproc 2 (or more), torchrun or accelerate "
                                "launch, or set training.fsdp=false"))
    if fsdp and str(config.get("version", 2)) == "1" and not torch.cuda.is_available():
        errors.append(UserError("FSDP1 (`fsdp_config.version: 1`) runs on GPUs only, and this machine has none",
                                key="training.fsdp_config.version", fix="set training.fsdp_config.version=2 "
                                "(FSDP2 runs on CPU processes too)"))
    if fsdp and recipe.quantization is not None and recipe.quantization.load_in_4bit:
        storage = str(recipe.written("quantization").get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
        if storage != str(recipe.model.dtype):
            errors.append(UserError(
                f"FSDP shards the 4-bit weights only when they are stored in the model's dtype "
                f"(`{recipe.model.dtype}`), and `bnb_4bit_quant_storage` is `{storage}`: each rank would hold "
                "all of them", key="quantization.bnb_4bit_quant_storage",
                fix=f"set quantization.bnb_4bit_quant_storage={recipe.model.dtype}"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))  # on this machine (torchrun sets it)
    if torch.cuda.is_available() and local > torch.cuda.device_count():
        errors.append(UserError(f"{local} processes on this machine, and it has {torch.cuda.device_count()} GPU(s): "
                                "two processes would share one", key="training",
                                fix=f"train with --nproc {torch.cuda.device_count()} (one process per GPU)"))
    if errors:
        raise combined(errors)


def check_machine(recipe: Recipe) -> None:
    """Refuse, before any weight is loaded, what this machine cannot do."""
    import torch

    # what the recipe asks for: `recipe.training` was built for this machine (use_cpu on a CPU)
    training, errors = recipe.written("training"), []
    no_gpu = not torch.cuda.is_available()

    def refuse(key: str, why: str, fix: str) -> None:
        key = key if "." in key else f"training.{key}"
        errors.append(UserError(why, key=key, fix=fix))

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


def check_model_folder(recipe: Recipe) -> None:
    """A local model path that is not a model folder fails now, not after the data is prepared."""
    name = recipe.model.name_or_path
    path = Path(name).expanduser() if name else None
    looks_local = path is not None and (path.is_absolute() or name.startswith((".", "~")) or path.exists())
    if looks_local and not (path / "config.json").is_file():
        raise UserError(f"`model.name_or_path` {name} is not a model folder: it has no config.json",
                        key="model.name_or_path",
                        fix="give a local folder with config.json and safetensors weights, or a hub id")
    if looks_local:
        from qlora_cli.model.fp8 import check_fp8_folder

        check_fp8_folder(path, name)  # FP8 tensors transformers cannot dequantize: now, not after prepare


def check_trainable(recipe: Recipe) -> None:
    """qlora trains LoRA adapters: without a `lora` section a quantized base could not train at
    all, and a full fine-tune would leave weights that `merge` and `generate` do not read."""
    if recipe.lora is None:
        raise UserError("the recipe has no `lora` section, and qlora trains LoRA adapters",
                        key="lora",
                        fix="keep a lora section (e.g. lora.r=16 lora.target_modules=all-linear)")


def check_prepared_data(recipe: Recipe, prepared) -> None:
    """Data problems the Trainer would only find later, or never."""
    dataset, training = prepared.dataset, recipe.written("training")  # asked for, not implied by validation data
    wants_eval = str(training.get("eval_strategy", "no")) != "no" or training.get("load_best_model_at_end")
    if wants_eval and "validation" not in dataset:
        key = "eval_strategy" if str(training.get("eval_strategy", "no")) != "no" else "load_best_model_at_end"
        raise UserError(f"`training.{key}` asks for evaluation but there is no validation split",
                        key=f"training.{key}",
                        fix="set data.val_size (e.g. 0.1) or data.validation_sources")
    if "validation" in dataset and len(dataset["validation"]) == 0:
        raise UserError("the validation split is empty", key="data.validation_sources",
                        fix="give validation sources with examples, or set data.val_size")


def check_starting_adapter(recipe: Recipe) -> None:
    """`model.adapter`, when it is a folder (else a hub id, which peft fetches), is an adapter of
    the recipe's base model."""
    adapter = recipe.model.adapter
    if adapter and not is_hub_id(adapter) and not Path(adapter).expanduser().exists():
        run = Path(adapter).parent if Path(adapter).name == "adapter" else None  # <run>/adapter: a run not trained yet
        raise UserError(f"adapter folder {adapter} does not exist (and it is no hub id)", key="model.adapter",
                        fix=(f"train the run that writes it first (the one whose training.output_dir is {run}), or "
                             if run and str(run) != "." else "")
                        + "give a folder with adapter_config.json and adapter_model.safetensors (e.g. runs/sft/adapter)")
    if not adapter or not Path(adapter).expanduser().is_dir():
        return
    try:
        check_adapter(Path(adapter).expanduser(), recipe, key="model.adapter")
    except UserError as err:
        raise UserError(f"`model.adapter`: {err.message}", where=err.where, key=err.key, fix=err.fix or
                        "give a folder with adapter_config.json and adapter_model.safetensors "
                        "(e.g. runs/sft/adapter)") from None


# ---------------------------------------------------------------- merge, generate, eval


def check_before_merge(recipe: Recipe, *, overwrite: bool) -> None:
    """The adapter to merge, and an output folder that can be written without deleting anything
    but an earlier merge."""
    adapter, output = merge_adapter_dir(recipe), merge_output_dir(recipe)
    check_adapter(adapter, recipe)
    check_output_spares_the_run(output, adapter, RunFolder(recipe.run_dir), recipe.model.name_or_path)
    check_merge_output(output, overwrite)


def check_before_generate(recipe: Recipe, model_path: str | None = None) -> None:
    """What answers: `--model` (a model folder or a hub id), else the run's adapter."""
    if model_path:
        check_model_source(model_path)
    else:
        check_adapter(merge_adapter_dir(recipe), recipe)


def check_before_eval(recipe: Recipe, *, model_path: str | None, measures: bool, adapter_trained: bool = True) -> None:
    """The adapter (unless training is about to make it), `--model`, something to measure
    (`measures`: records or tasks were given, else the validation loss), a writable <run>/eval."""
    merged = model_path or existing_merged_model(recipe)
    if merged:
        check_model_source(merged, where="--model" if model_path else "the run's merged model")
    if not measures and not has_held_out_loss(recipe):
        found = ("the recipe's validation split is preference data or GRPO prompts, which have no held-out "
                 "loss here (their rewards are in run.json)" if recipe.data.has_validation
                 else "the recipe has no validation split")
        raise UserError(f"nothing to evaluate: no --input, no --tasks, and {found}",
                        where="qlora eval", fix="give --input FILE (JSONL of prompt + reference), "
                                                "--tasks NAMES, or set data.val_size")
    check_writable(RunFolder(recipe.run_dir).root / "eval")
    if adapter_trained:
        check_adapter(merge_adapter_dir(recipe), recipe)


def existing_merged_model(recipe: Recipe) -> str | None:
    """The run's merged folder, when `qlora merge` wrote it from the adapter as it is now (eval
    scores it as `merged`; a merge of an earlier adapter would score other weights)."""
    return str(merge_output_dir(recipe)) if is_current_merge(recipe) else None


def has_held_out_loss(recipe: Recipe) -> bool:
    """A validation split of prompt/answer rows; preference pairs and signed examples are scored by
    the trainer's rewards (run.json), and GRPO's prompts have no answer to take a loss on."""
    from qlora_cli.data.preference import is_preference_data
    from qlora_cli.data.prompts import is_prompt_data

    return recipe.data.has_validation and not is_preference_data(recipe.data) and not is_prompt_data(recipe.data)


def check_writable(folder: Path) -> None:
    parent = nearest_existing(folder.parent)
    if not can_create_in(parent):
        raise UserError(f"cannot write {folder}: {parent} is not writable", key="training.output_dir",
                        fix="evaluate a run folder you can write")


def check_adapter(adapter: Path, recipe: Recipe, key: str = "merge.adapter") -> None:
    """The adapter folder exists, is a peft adapter, and was trained on the recipe's base model
    (`key`: the key that named it)."""
    from qlora_cli.model.load import adapter_config, base_model_id

    config_file = adapter / "adapter_config.json"
    if not adapter.is_dir():
        last = RunFolder(recipe.run_dir).last_checkpoint()
        fix = (f"the run stopped before its end: finish it with `qlora train {recipe.run_dir} --resume`, or set "
               f"merge.adapter={last} to use its last checkpoint" if last and not recipe.merge.adapter else
               "train first (qlora train ...), or point merge.adapter at an adapter folder")
        raise UserError(f"adapter folder {adapter} does not exist", key=key, fix=fix)
    if not config_file.is_file():
        raise UserError(f"{adapter} is not a LoRA adapter: it has no adapter_config.json", key=key)
    trained_on = adapter_config(adapter).get("base_model_name_or_path")
    expected = base_model_id(recipe)
    if trained_on and expected and not _same_model(trained_on, expected):
        raise UserError(f"the adapter was trained on `{trained_on}`, but the recipe's base model is `{expected}`",
                        where=str(config_file), fix="use the recipe the adapter was trained with "
                        "(its run folder's recipe.yaml)")
    damage = weights_damage(adapter, ("adapter_model.safetensors",))
    if damage:
        last = RunFolder(recipe.run_dir).last_checkpoint()
        raise UserError(f"the adapter is damaged: {damage}", key=key,
                        fix=f"train it again (qlora train RECIPE --overwrite), or set {key}={last} to use the run's "
                            "last checkpoint" if last else "train it again (qlora train RECIPE --overwrite), or point "
                            f"{key} at an undamaged adapter folder")


def _same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


MODEL_FIX = "give a merged model folder (qlora merge writes one), a model path or a hub id"


def check_model_source(path: str, where: str = "--model") -> None:
    """What `--model` names is a model folder, or could be a hub id: a path that does not exist
    is not reported as a malformed repo id, a run folder not as an unrecognized model."""
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(f"{path} is a folder without a model: it has no config.json", where="--model", fix=MODEL_FIX)
    if local.is_file():
        raise UserError(f"{path} is a file; a model is a folder", where="--model", fix=MODEL_FIX)
    damage = weights_damage(local, contents=False) if local.is_dir() else None
    if damage:
        raise UserError(f"the model is damaged: {damage}", where=where,
                        fix="merge it again (qlora merge RUN --overwrite) if qlora wrote it, else download or copy it again")
    # A hub id is `name` or `namespace/name`; anything else not found on disk was meant as a path.
    if not local.exists() and (local.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1):
        raise UserError(f"model folder {path} does not exist", where="--model", fix=MODEL_FIX)


def check_output_spares_the_run(output: Path, adapter: Path, run: RunFolder, base: str | None) -> None:
    """The merged folder may go inside the run folder (the default), but writing it (replacing it,
    with --overwrite) must never delete what the merge reads or the run keeps: the adapter, a
    local base model, the checkpoints, the run folder itself."""
    output = output.resolve()
    local_base = Path(base).expanduser() if base and Path(base).expanduser().is_dir() else None
    # (what, folder, whether lying inside it is refused too)
    kept = [("the adapter folder", adapter, True), ("the base model's folder", local_base, True),
            ("the run's checkpoints", run.checkpoints, False), ("the run folder", run.root, False)]
    for what, folder, not_inside in kept:
        if folder is None:
            continue
        folder = folder.resolve()
        relation = ("is" if output == folder else "holds" if output in folder.parents
                    else "lies inside" if not_inside and folder in output.parents else None)
        if relation:
            raise UserError(f"merge output {output} {relation} {what} {folder}: writing it could delete or "
                            "clutter what the merge reads and the run keeps", key="merge.output_dir",
                            fix="set merge.output_dir to a new folder, e.g. <run>/merged")


def check_merge_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise UserError(f"merge output {output} already exists", key="merge.output_dir",
                        fix="add --overwrite, or set merge.output_dir")
    if output.exists() and not is_merged_folder(output):
        raise UserError(f"merge output {output} is not a merged model that qlora wrote, and --overwrite replaces "
                        "only those: it would delete what the folder holds", key="merge.output_dir",
                        fix="set merge.output_dir to a new folder, or move this one away yourself")
    parent = nearest_existing(output.parent)
    if not can_create_in(parent):
        raise UserError(f"cannot write {output}: {parent} is not writable", key="merge.output_dir",
                        fix="choose a folder you can write")


def is_merged_folder(folder: Path) -> bool:
    """An empty folder, or a merged model `qlora merge` wrote (its card carries the marker)."""
    return (folder.is_dir() and not any(folder.iterdir())) or is_merged_model(folder)
