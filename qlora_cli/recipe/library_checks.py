"""The four library sections at load: unknown keys, wrong types and values outside a field's
declared choices, then the objects built and probed (recipe.probes); what is built is kept as the
Recipe's typed section."""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Any

from qlora_cli.errors import UserError
from qlora_cli.recipe.library_fields import generation_keys, lora_keys, quantization_keys, training_class, training_keys
from qlora_cli.recipe.builders import build_generation_config, split_generate
from qlora_cli.recipe.probes import (probed_bnb_config, probed_generation_config, probed_lora_config,
                                     probed_training_arguments)
from qlora_cli.recipe.sections import (METHODS, GenerateOptions, GenerateSection, build_schema, check_bounds, check_keys,
                                       matches_type)


def build_library_sections(config: dict, data=None, unbuilt=()) -> tuple[dict[str, Any], list[UserError]]:
    """The objects the four library sections become (`None` for quantization or lora set to null),
    and every unknown key, wrong type and library objection in them; `data` is the typed data
    section, when it was built; `unbuilt`: sections only checked, not built (a NaN in them is
    reported already, and a library would only object to it again)."""
    generate_ours = [f.name for f in dataclasses.fields(GenerateOptions)]
    has_validation = data is not None and data.has_validation
    method = config.get("method", "sft")
    method = method if method in METHODS else "sft"  # an unknown one is reported by check_method
    checks = [
        ("quantization", quantization_keys, probed_bnb_config, ()),
        ("lora", lora_keys, probed_lora_config, ()),
        ("training", functools.partial(training_keys, method),
         functools.partial(probed_training_arguments, has_validation=has_validation, method=method), ()),
        ("generate", generation_keys, _generate_section, generate_ours),
    ]
    built: dict[str, Any] = {"quantization": None, "lora": None}
    errors: list[UserError] = []
    for section, keys, build, extra in checks:
        values = config.get(section)
        if values is None:
            if section == "generate":
                built[section] = _generate_section({})
            continue
        if not isinstance(values, dict):
            errors.append(UserError(f"`{section}` must be a mapping of keys", key=section))
            continue
        annotations = normalize_yaml_booleans(values, keys())
        section_errors = check_keys(values, annotations, section, extra_keys=extra)
        section_errors += check_bounds(section, values, annotations)
        if section == "generate":
            section_errors += _check_generate_options(values)
        if section == "training":
            section_errors += _check_choices(training_class(method), values)
        if not section_errors and section not in unbuilt:
            try:
                built[section] = build(values)
            except UserError as err:
                section_errors = err.errors
        errors += section_errors
    return built, errors


def _check_choices(cls, values: dict) -> list[UserError]:
    """Values outside the `choices` a config class declares in its field metadata, or lists in its
    help (TRL's KTOConfig and DPOConfig take any `loss_type` text and fail mid-training on one they
    do not know)."""
    errors = []
    for f in dataclasses.fields(cls):
        choices = list(f.metadata.get("choices") or []) or _listed_in_help(f.metadata.get("help", ""))
        value = values.get(f.name)
        for item in value if isinstance(value, list) else [value]:  # DPOConfig's loss_type: one or a list
            if choices and isinstance(item, str) and item not in choices:
                dotted = f"training.{f.name}"
                errors.append(UserError(f"`{dotted}` is {item!r}; {cls.__name__} takes {', '.join(map(str, choices))}",
                                        key=dotted))
    return errors


def _listed_in_help(text: str) -> list[str]:
    """The values a field's help lists after "Possible values are:" (TRL's DPOConfig declares its
    `loss_type` and `f_divergence_type` this way, with no `choices`, and fails on another only in
    the loss)."""
    _, found, tail = text.partition("Possible values are:")
    return re.findall(r"`'?([\w-]+)'?`", tail.split(".")[0]) if found else []


def _check_generate_options(generate: dict) -> list[UserError]:
    """Types of our own `generate` keys, which GenerationConfig never sees."""
    ours = {f.name for f in dataclasses.fields(GenerateOptions)}
    try:
        options = build_schema(GenerateOptions, {k: v for k, v in generate.items() if k in ours}, "generate")
    except UserError as err:
        return err.errors
    if options.batch_size < 1:  # 0 would crash after the model loads; a negative size would answer nothing
        return [UserError(f"`generate.batch_size` is {options.batch_size}; it must be at least 1",
                          key="generate.batch_size")]
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


def _generate_section(generate: dict) -> GenerateSection:
    """Our own `generate` options (checked already) and the GenerationConfig of the other keys."""
    options, _ = split_generate(generate)
    return GenerateSection(options, probed_generation_config(generate) if generate else build_generation_config({}))
