"""Pre-flight: what can be checked about a run before a weight loads, in one place.

`qlora train` runs these once, before the data is prepared (`check_before_loading`) and once it
is (`check_prepared_data`); `qlora plan` reports the same problems with its plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.errors import UserError, combined

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe


def check_before_loading(recipe: Recipe) -> None:
    """The quick checks, every problem at once: this machine, the model folder, a LoRA section."""
    errors = []
    for check in (check_machine, check_model_folder, check_trainable):
        try:
            check(recipe)
        except UserError as err:
            errors += err.errors
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
