"""Every setting of a recipe, its value and where it came from: `qlora config explain`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from qlora_cli.recipe.sections import DataSection, EvalSection, GenerateOptions, MergeSection, ModelSection

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe


def explain_recipe(recipe: Recipe) -> list[tuple[str, Any, str]]:
    """(dotted key, value, origin) for each leaf set by the recipe, then each default it inherits.
    A value from the environment shows as written (`${oc.env:NAME}`): a secret is never printed."""
    rows = [(key, value, recipe.origins.get(key, "default (qlora)")) for key, value in _leaves(recipe.as_written())]
    set_keys = {key for key, _, _ in rows}
    # A default is shadowed by the key itself or by anything set inside it (`data.sources.0.path`
    # replaces the default `data.sources: []`).
    set_keys |= {key.rsplit(".", n)[0] for key in set_keys for n in range(1, key.count(".") + 1)}
    for section, owner, defaults in _section_defaults(recipe):
        rows += [
            (f"{section}.{name}", value, f"default ({owner})")
            for name, value in defaults.items() if f"{section}.{name}" not in set_keys
        ]
    return rows


def _leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Each leaf; a list of plain values (`target_modules: [q_proj, v_proj]`) is one leaf."""
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value or isinstance(value, list) and _has_containers(value):
            yield from _leaves(value, f"{dotted}.")
        else:
            yield dotted, value


def _has_containers(items: list) -> bool:
    return any(isinstance(item, (dict, list)) for item in items)


def _section_defaults(recipe: Recipe) -> Iterator[tuple[str, str, dict[str, Any]]]:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from qlora_cli.recipe.library_fields import (dataclass_defaults, generation_defaults, signature_defaults,
                                                 training_class, training_defaults)

    yield "model", "qlora", dataclass_defaults(ModelSection)
    yield "data", "qlora", dataclass_defaults(DataSection)
    yield "merge", "qlora", dataclass_defaults(MergeSection)
    if recipe.quantization is not None:
        yield "quantization", "BitsAndBytesConfig", signature_defaults(BitsAndBytesConfig.__init__)
    if recipe.lora is not None:
        yield "lora", "LoraConfig", dataclass_defaults(LoraConfig)
    yield "training", training_class(recipe.method).__name__, training_defaults(recipe.method)
    yield "generate", "qlora", dataclass_defaults(GenerateOptions)
    yield "generate", "GenerationConfig", generation_defaults()
    yield "eval", "qlora", dataclass_defaults(EvalSection)
