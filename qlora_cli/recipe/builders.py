"""Recipe sections -> the libraries' own objects: BitsAndBytesConfig, LoraConfig,
TrainingArguments (or the method's TRL config), GenerationConfig; a library's objection to a value
becomes a recipe error naming the key."""

from __future__ import annotations

import dataclasses
import re

from qlora_cli.errors import UserError
from qlora_cli.recipe.library_fields import OWN_TRAINING_KEYS, method_defaults, training_class
from qlora_cli.recipe.sections import GenerateOptions, to_dtype


def build_bnb_config(quantization: dict | None):
    """`BitsAndBytesConfig` from the recipe's `quantization` section (None: no quantization)."""
    if not quantization:
        return None
    from transformers import BitsAndBytesConfig

    values = {
        key: to_dtype(value, f"quantization.{key}")
        if key.endswith(("_dtype", "_storage")) and isinstance(value, str) else value
        for key, value in quantization.items()
    }
    return _construct(BitsAndBytesConfig, values, "quantization")


def build_lora_config(lora: dict | None):
    """`peft.LoraConfig` for a causal LM from the recipe's `lora` section."""
    if lora is None:
        return None
    from peft import LoraConfig

    return _construct(LoraConfig, {"task_type": "CAUSAL_LM", **lora}, "lora")


def build_training_arguments(training: dict, *, has_validation: bool = False, method: str = "sft", cls=None, **changes):
    """The TrainingArguments a run trains with, assembled in this one place: the recipe's
    `training` section, what this machine needs, the evaluation that validation data implies,
    and `changes` (the run folder's) on top. `cls` defaults to `training_class(method)`."""
    values = {**method_defaults(method, training), **training, **_checkpointing(training), **machine_changes(),
              **evaluation_changes(training, has_validation), **changes}
    for key in OWN_TRAINING_KEYS:  # qlora's trainers act on these (TRL's own handling stays off)
        values.pop(key, None)
    return _construct(cls or training_class(method), values, "training")


def _checkpointing(training: dict) -> dict:
    """`activation_checkpointing` and its older name `gradient_checkpointing` are one switch, which
    either turns on (TrainingArguments lets a false new name win over a true old one)."""
    on = training.get("activation_checkpointing") or training.get("gradient_checkpointing")
    return {"activation_checkpointing": True} if on else {}


def machine_changes() -> dict:
    """What a machine without CUDA needs. `use_cpu`: else TrainingArguments sets up no gloo DDP
    for CPU processes, and refuses a bf16 recipe written for a GPU (a recipe must validate on a
    laptop too; `qlora train` checks the machine itself, before loading). No pinned memory: that
    needs an accelerator."""
    import torch

    return {} if torch.cuda.is_available() else {"use_cpu": True, "dataloader_pin_memory": False}


def evaluation_changes(training: dict, has_validation: bool) -> dict:
    """With validation data and no `eval_strategy`: evaluate whenever a checkpoint is saved, so
    that `load_best_model_at_end` works."""
    if not has_validation or "eval_strategy" in training:
        return {}
    return {"eval_strategy": training.get("save_strategy", "steps"),
            "eval_steps": training.get("eval_steps") or training.get("save_steps")}


def split_generate(generate: dict) -> tuple[GenerateOptions, dict]:
    """Our own `generate` keys, and the rest (the GenerationConfig fields)."""
    ours = {f.name for f in dataclasses.fields(GenerateOptions)}
    options = GenerateOptions(**{k: v for k, v in generate.items() if k in ours})
    return options, {k: v for k, v in generate.items() if k not in ours}


def build_generation_config(generate: dict, **defaults):
    """`GenerationConfig` from the recipe's `generate` section; `defaults` fill unset keys."""
    from transformers import GenerationConfig

    _, fields = split_generate(generate)
    config = _construct(GenerationConfig, {**defaults, **fields}, "generate")
    try:
        config.validate(strict=True)
    except ValueError as err:
        raise _library_error("generate", "GenerationConfig", err, fields) from None
    return config


def _construct(cls, values: dict, section: str):
    try:
        return cls(**values)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise _library_error(section, cls.__name__, err, values) from None
    except ImportError as err:  # e.g. training.deepspeed without the deepspeed package
        _forget_deepspeed_config()
        raise UserError(f"{cls.__name__} needs a package that is not installed: {err}", key=section,
                        fix="pip install the package it names, or remove the key that asks for it") from None


def _forget_deepspeed_config() -> None:
    """TrainingArguments registers its DeepSpeed config globally before it checks that deepspeed is
    installed; left behind, that half-built config breaks every later model build in the process."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _library_error(section: str, cls_name: str, err: Exception, values: dict):
    message = str(err).strip()
    named = keys_named(message, values)
    keys = ", ".join(f"`{section}.{key}`" for key in named) or f"`{section}`"
    return UserError(f"{cls_name} rejects {keys}: {message}", key=f"{section}.{named[0]}" if named else section)


def keys_named(message: str, values: dict) -> list[str]:
    """The keys a library's message is about: named as whole words (`seed` must not be blamed for
    `data_seed`), or else quoted only by their value ("bogus is not a valid SchedulerType")."""
    def mentions(word: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", message) is not None

    return ([key for key in values if mentions(key)]
            or [key for key, value in values.items() if isinstance(value, str) and len(value) > 2 and mentions(value)])
