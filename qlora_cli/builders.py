"""Recipe sections -> the libraries' own objects: BitsAndBytesConfig, LoraConfig,
TrainingArguments, GenerationConfig. Their keys are checked against the classes themselves."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from typing import Any

from qlora_cli.errors import UserError
from qlora_cli.sections import (
    METHODS, GenerateOptions, build_schema, check_keys, dataclass_annotations, matches_type, signature_annotations,
    to_dtype,
)


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


def training_value(training: dict, key: str) -> Any:
    """`training.<key>` as the run will have it: the recipe's, or the class's own default."""
    return training[key] if key in training else dataclass_defaults(training_class())[key]


def lora_value(lora: dict | None, key: str) -> Any:
    """`lora.<key>` as the run will have it: the recipe's, or LoraConfig's own default."""
    from peft import LoraConfig

    return (lora or {})[key] if key in (lora or {}) else dataclass_defaults(LoraConfig)[key]


def quantization_value(quantization: dict | None, key: str) -> Any:
    """`quantization.<key>` as the run will have it: the recipe's, or BitsAndBytesConfig's default."""
    from transformers import BitsAndBytesConfig

    values = quantization or {}
    return values[key] if key in values else signature_defaults(BitsAndBytesConfig.__init__)[key]


def quantization_keys() -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    return signature_annotations(BitsAndBytesConfig.__init__)


def lora_keys() -> dict[str, Any]:
    from peft import LoraConfig

    return dataclass_annotations(LoraConfig)


def training_class(method: str = "sft"):
    """The class a recipe's `training` section becomes, the one place that chooses it: TrainingArguments,
    or for `method: dpo | kto` TRL's DPOConfig / KTOConfig (which extend it)."""
    if method == "sft":
        from transformers import TrainingArguments

        return TrainingArguments
    from trl import DPOConfig, KTOConfig

    return {"dpo": DPOConfig, "kto": KTOConfig}[method]


def training_keys(method: str = "sft") -> dict[str, Any]:
    keys = dataclass_annotations(training_class(method))
    if method == "dpo":  # DPOConfig takes one loss as text (`loss_type: ipo`) and makes it a list itself
        keys["loss_type"] = str | keys["loss_type"]
    return keys


def method_defaults(method: str, training: dict) -> dict:
    """TRL's configs turn on bf16 and gradient checkpointing unless told otherwise; a recipe means
    what it would mean to TrainingArguments (our `activation_checkpointing` is the switch)."""
    if method == "sft":
        return {}
    return {"bf16": bool(training.get("bf16", False)),
            "gradient_checkpointing": bool(training.get("gradient_checkpointing", False))}


def generation_defaults() -> dict[str, Any]:
    """GenerationConfig is no dataclass: its fields are the attributes a default instance has."""
    from transformers import GenerationConfig

    return {name: value for name, value in vars(GenerationConfig()).items() if not name.startswith("_")}


def generation_keys() -> dict[str, Any]:
    return {name: typing.Any for name in generation_defaults()}


def checkpointing_on(training: dict) -> bool:
    """Whether the recipe recomputes activations: our `activation_checkpointing` or the Trainer's name."""
    return bool(training.get("activation_checkpointing") or training.get("gradient_checkpointing"))


def build_bnb_config(quantization: dict | None, origins: dict[str, str] | None = None):
    """`BitsAndBytesConfig` from the recipe's `quantization` section (None: no quantization)."""
    if not quantization:
        return None
    from transformers import BitsAndBytesConfig

    origins = origins or {}
    values = {
        key: to_dtype(value, origins.get(f"quantization.{key}", f"quantization.{key}"), f"quantization.{key}")
        if key.endswith(("_dtype", "_storage")) and isinstance(value, str) else value
        for key, value in quantization.items()
    }
    return _construct(BitsAndBytesConfig, values, "quantization", origins)


def build_lora_config(lora: dict | None, origins: dict[str, str] | None = None):
    """`peft.LoraConfig` for a causal LM from the recipe's `lora` section."""
    if lora is None:
        return None
    from peft import LoraConfig

    return _construct(LoraConfig, {"task_type": "CAUSAL_LM", **lora}, "lora", origins or {})


def build_training_arguments(training: dict, origins: dict[str, str] | None = None, *,
                             has_validation: bool = False, method: str = "sft", cls=None, **changes):
    """The TrainingArguments a run trains with, assembled in this one place: the recipe's
    `training` section, what this machine needs, the evaluation that validation data implies,
    and `changes` (the run folder's) on top. `cls` defaults to `training_class(method)`."""
    values = {**method_defaults(method, training), **training, **machine_changes(),
              **evaluation_changes(training, has_validation), **changes}
    return _construct(cls or training_class(method), values, "training", origins or {})


def machine_changes() -> dict:
    """What a machine without CUDA needs. `use_cpu`: else TrainingArguments sets up no gloo DDP
    for CPU processes, and refuses a bf16 recipe written for a GPU (a recipe must validate on a
    laptop too; `qlora train` checks the machine itself, before loading). No pinned memory: that
    needs an accelerator."""
    import torch

    return {} if torch.cuda.is_available() else {"use_cpu": True, "dataloader_pin_memory": False}


def split_generate(generate: dict) -> tuple[GenerateOptions, dict]:
    """Our own `generate` keys, and the rest (the GenerationConfig fields)."""
    ours = {f.name for f in dataclasses.fields(GenerateOptions)}
    options = GenerateOptions(**{k: v for k, v in generate.items() if k in ours})
    return options, {k: v for k, v in generate.items() if k not in ours}


def build_generation_config(generate: dict, origins: dict[str, str] | None = None, **defaults):
    """`GenerationConfig` from the recipe's `generate` section; `defaults` fill unset keys."""
    from transformers import GenerationConfig

    _, fields = split_generate(generate)
    config = _construct(GenerationConfig, {**defaults, **fields}, "generate", origins or {})
    try:
        config.validate(strict=True)
    except ValueError as err:
        raise _library_error("generate", "GenerationConfig", err, fields, origins or {}) from None
    return config


def check_library_sections(config: dict, origins: dict[str, str], data=None) -> list[UserError]:
    """Every unknown key, wrong type and library objection in the four library sections; `data`
    is the typed data section, when it was built."""
    generate_ours = [f.name for f in dataclasses.fields(GenerateOptions)]
    has_validation = data is not None and data.has_validation
    method = config.get("method", "sft")
    method = method if method in METHODS else "sft"  # an unknown one is reported by check_method
    checks = [
        ("quantization", quantization_keys, build_bnb_config, ()),
        ("lora", lora_keys, build_lora_config, ()),
        ("training", functools.partial(training_keys, method),
         functools.partial(build_training_arguments, has_validation=has_validation, method=method), ()),
        ("generate", generation_keys, build_generation_config, generate_ours),
    ]
    errors: list[UserError] = []
    for section, keys, build, extra in checks:
        values = config.get(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            errors.append(UserError(f"`{section}` must be a mapping of keys", where=origins.get(section, section)))
            continue
        annotations = normalize_yaml_booleans(values, keys())
        section_errors = check_keys(values, annotations, section, origins, extra_keys=extra)
        if section == "generate":
            section_errors += _check_generate_options(values, origins)
        if section == "training":
            section_errors += _check_choices(training_class(method), values, origins)
        if not section_errors:
            try:
                build(values, origins)
            except UserError as err:
                section_errors = err.errors
        errors += section_errors
    return errors


def _check_choices(cls, values: dict, origins: dict[str, str]) -> list[UserError]:
    """Values outside the `choices` a config class declares in its field metadata (TRL's KTOConfig
    takes any `loss_type` text and fails mid-training on one it does not know)."""
    errors = []
    for f in dataclasses.fields(cls):
        choices = list(f.metadata.get("choices") or [])
        value = values.get(f.name)
        if choices and isinstance(value, str) and value not in choices:
            dotted = f"training.{f.name}"
            errors.append(UserError(f"`{dotted}` is {value!r}; {cls.__name__} takes {', '.join(map(str, choices))}",
                                    where=origins.get(dotted, dotted)))
    return errors


def _check_generate_options(generate: dict, origins: dict[str, str]) -> list[UserError]:
    """Types of our own `generate` keys, which GenerationConfig never sees."""
    ours = {f.name for f in dataclasses.fields(GenerateOptions)}
    try:
        options = build_schema(GenerateOptions, {k: v for k, v in generate.items() if k in ours}, "generate", origins)
    except UserError as err:
        return err.errors
    if options.batch_size < 1:  # 0 would crash after the model loads; a negative size would answer nothing
        return [UserError(f"`generate.batch_size` is {options.batch_size}; it must be at least 1",
                          where=origins.get("generate.batch_size", "generate.batch_size"))]
    return []


def normalize_yaml_booleans(values: dict, annotations: dict) -> dict:
    """Turn a YAML `no` read as false back into "no" in `values` (in place, so the recipe keeps
    it), and return `annotations` loosened where a library takes a boolean for a text field.

    YAML 1.1 reads a bare `no` as false: `save_strategy: no` means the string "no". And a library
    may take `true` where its annotation still says text (TrainingArguments' `fsdp: true`): such a
    value is left for the library to judge, which names the key if it objects.
    """
    annotations = dict(annotations)
    for key, value in values.items():
        annotation = annotations.get(key)
        if not isinstance(value, bool) or annotation is None or matches_type(value, annotation):
            continue
        if value is False and matches_type("no", annotation):
            values[key] = "no"
        elif matches_type("text", annotation):
            annotations[key] = typing.Any
    return annotations


def evaluation_changes(training: dict, has_validation: bool) -> dict:
    """With validation data and no `eval_strategy`: evaluate whenever a checkpoint is saved, so
    that `load_best_model_at_end` works."""
    if not has_validation or "eval_strategy" in training:
        return {}
    return {"eval_strategy": training.get("save_strategy", "steps"),
            "eval_steps": training.get("eval_steps") or training.get("save_steps")}


def _construct(cls, values: dict, section: str, origins: dict[str, str]):
    try:
        return cls(**values)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise _library_error(section, cls.__name__, err, values, origins) from None
    except ImportError as err:  # e.g. training.deepspeed without the deepspeed package
        raise UserError(f"{cls.__name__} needs a package that is not installed: {err}", where=section,
                        fix="pip install the package it names, or remove the key that asks for it") from None


def _library_error(section: str, cls_name: str, err: Exception, values: dict, origins: dict[str, str]):
    message = str(err).strip()
    named = _keys_named(message, values)
    keys = ", ".join(f"`{section}.{key}`" for key in named) or f"`{section}`"
    where = origins.get(f"{section}.{named[0]}", section) if named else section
    return UserError(f"{cls_name} rejects {keys}: {message}", where=where)


def _keys_named(message: str, values: dict) -> list[str]:
    """The keys a library's message is about: named as whole words (`seed` must not be blamed for
    `data_seed`), or else quoted only by their value ("bogus is not a valid SchedulerType")."""
    def mentions(word: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", message) is not None

    return ([key for key in values if mentions(key)]
            or [key for key, value in values.items() if isinstance(value, str) and len(value) > 2 and mentions(value)])
