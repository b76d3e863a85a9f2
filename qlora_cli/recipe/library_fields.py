"""What the library classes the sections become declare, asked of the classes themselves and
never copied: which class each method's `training` is, their fields with their types, and their
defaults."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import typing
from typing import Any

from qlora_cli.recipe.sections import TRAINING_CLASSES, dataclass_annotations, signature_annotations


@functools.cache
def dataclass_defaults(cls) -> dict[str, Any]:
    """A dataclass's fields that have a default, with it (a factory's value made fresh)."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


@functools.cache
def signature_defaults(func) -> dict[str, Any]:
    """A function's parameters that have a default, with it."""
    return {p.name: p.default for p in inspect.signature(func).parameters.values()
            if p.default is not inspect.Parameter.empty}


def training_class(method: str = "sft"):
    """The class a recipe's `training` section becomes for `method` (sections.TRAINING_CLASSES)."""
    module, name = TRAINING_CLASSES[method]
    return getattr(importlib.import_module(module), name)


# `training` keys qlora acts on itself, for every method: `activation_offloading` is TRL's SFTConfig
# name (TrainingArguments has none; qlora's trainers offload for DPO/KTO/GRPO too, also on a CPU).
OWN_TRAINING_KEYS: dict[str, tuple[Any, Any]] = {"activation_offloading": (bool, False)}


def training_keys(method: str = "sft") -> dict[str, Any]:
    keys = dataclass_annotations(training_class(method))
    keys.update({key: kind for key, (kind, _) in OWN_TRAINING_KEYS.items()})
    if method == "dpo":  # DPOConfig takes one loss as text (`loss_type: ipo`) and makes it a list itself
        keys["loss_type"] = str | keys["loss_type"]
    return keys


def method_defaults(method: str, training: dict) -> dict:
    """TRL's configs turn on bf16 and gradient checkpointing unless told otherwise; a recipe means
    what it would mean to TrainingArguments."""
    if method == "sft":
        return {}
    return {"bf16": bool(training.get("bf16", False)),
            "gradient_checkpointing": bool(training.get("gradient_checkpointing", False))}


def training_defaults(method: str = "sft") -> dict[str, Any]:
    """What an unset `training.<key>` is for `method`: its config class's default, or qlora's."""
    return {**dataclass_defaults(training_class(method)), **method_defaults(method, {}),
            **{key: default for key, (_, default) in OWN_TRAINING_KEYS.items()}}


def quantization_keys() -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    return signature_annotations(BitsAndBytesConfig.__init__)


def quantization_values(quantization: dict | None) -> dict[str, Any]:
    """The quantization section as the run will have it: the recipe's keys over BitsAndBytesConfig's defaults."""
    from transformers import BitsAndBytesConfig

    return {**signature_defaults(BitsAndBytesConfig.__init__), **(quantization or {})}


def lora_keys() -> dict[str, Any]:
    from peft import LoraConfig

    return dataclass_annotations(LoraConfig)


def generation_defaults() -> dict[str, Any]:
    """GenerationConfig is no dataclass: its fields are the attributes a default instance has."""
    from transformers import GenerationConfig

    return {name: value for name, value in vars(GenerationConfig()).items() if not name.startswith("_")}


def generation_keys() -> dict[str, Any]:
    return {name: typing.Any for name in generation_defaults()}
