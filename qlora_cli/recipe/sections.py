"""The nine recipe sections (load.SECTIONS): our own typed schemas, and introspection of the library classes.

`quantization`, `lora` and `training` map onto `BitsAndBytesConfig`, `LoraConfig` and
`TrainingArguments` (or TRL's config for the method, TRAINING_CLASSES), and `generate`'s keys
other than our `GenerateOptions` onto `GenerationConfig`: their keys are checked against those
classes' own signatures and dataclass fields, never a copied list, so a field a library adds
tomorrow works tomorrow. `model`, `data`, `merge` and `eval` are ours and are described by the
dataclasses below, with the value limits (`check_values`) that loading, preparing and merging would
enforce later; `rewards` (method: grpo) is a list of ours too, its items' schema in
qlora_cli/rewards.py.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from qlora_cli.errors import UserError, combined, did_you_mean
from qlora_cli.families import MISTRAL_COMMON_FILES, MISTRAL_COMMON_PREFIX, init_config_errors

if TYPE_CHECKING:
    from transformers import GenerationConfig


@dataclass
class ModelSection:
    """Which base model and tokenizer to load, and how."""

    name_or_path: str | None = None
    init_from_config: dict | None = None  # kwargs of a transformers config (+ model_type, seed)
    tokenizer: str | None = None  # path, hub id or mistral-common:v1/v3...; default: name_or_path
    revision: str | None = None
    dtype: str = "bfloat16"  # dtype of the weights that stay unquantized
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    chunked_loss: bool = True  # loss (DPO/KTO: log-probs) in chunks of tokens, never the full-vocabulary logits
    tiled_mlp: bool = False  # each layer's MLP over slices of the row, recomputed per slice (long rows)
    upcast_to_fp32: bool = False  # under quantization (not FSDP): embeddings, norms, lm_head in fp32 (peft's k-bit prep)
    adapter: str | None = None  # a LoRA adapter folder or hub id to train on from (SFT -> DPO); else a fresh LoRA


@dataclass
class DataSource:
    """One data file, folder or hub dataset, and how to read it."""

    path: str
    format: Literal["text", "alpaca", "chat", "completion", "preference", "unpaired", "prompt"] = "text"
    columns: dict[str, str] = field(default_factory=dict)  # our field name -> the file's column
    split: str = "train"
    limit: int | None = None
    weight: float = 1.0


# The top-level `method`, the objective: the data formats it trains on (qlora_cli/data/preference.py,
# qlora_cli/data/prompts.py) and the class its `training` section becomes (TrainingArguments, or TRL's
# configs that extend it). The one place that says both: a method adds its line to each.
METHOD_FORMATS = {"sft": ("text", "alpaca", "chat", "completion"), "dpo": ("preference",), "kto": ("unpaired",),
                  "grpo": ("prompt",)}
TRAINING_CLASSES = {"sft": ("transformers", "TrainingArguments"), "dpo": ("trl", "DPOConfig"), "kto": ("trl", "KTOConfig"),
                    "grpo": ("trl", "GRPOConfig")}
METHODS = tuple(METHOD_FORMATS)

TEMPLATE_NAMES = ("mistral", "tokenizer")  # data.template: one of these, or a Jinja chat template


def is_jinja(template: str) -> bool:
    """Whether a `data.template` that names no template is Jinja text: a Jinja chat template
    cannot do without `{{ }}` or `{% %}`, so a bare word is a typo for a name, not a template."""
    return "{" in template


@dataclass
class DataSection:
    """How raw examples become the tokens, labels and rows the model trains on."""

    sources: list[DataSource] = field(default_factory=list)
    validation_sources: list[DataSource] = field(default_factory=list)
    template: str = "mistral"  # mistral | tokenizer | a Jinja chat template
    train_on: Literal["responses", "all"] = "responses"
    max_length: int = 2048
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    packing: bool = True
    val_size: float | int = 0
    shuffle: bool = True
    prepared_dir: str = "prepared"
    num_proc: int | None = None

    @property
    def has_validation(self) -> bool:
        """Whether the prepared data will have a validation split: held out or given."""
        return bool(self.val_size or self.validation_sources)


@dataclass
class MergeSection:
    """Where and how `qlora merge` writes a standalone model."""

    output_dir: str | None = None  # default: <training.output_dir>/merged
    adapter: str | None = None  # default: <training.output_dir>/adapter
    dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"
    max_shard_size: str = "5GB"
    base: Literal["original", "dequantized"] = "dequantized"


@dataclass
class GenerateOptions:
    """`generate` keys of our own; every other key is a `GenerationConfig` field."""

    batch_size: int = 8
    quantized: bool = True
    input: str | None = None
    output: str | None = None
    system_prompt: str | None = None


@dataclass
class GenerateSection:
    """The `generate` section: our own options, and the `GenerationConfig` its other keys become."""

    options: GenerateOptions
    config: GenerationConfig


@dataclass
class EvalSection:
    """What `qlora eval` scores when its flags do not say, and whether `qlora train` runs it at the end."""

    input: str | None = None  # JSONL of prompt/messages lines with a `reference` answer
    tasks: list[str] = field(default_factory=list)  # lm-eval task names, task YAML files or folders
    limit: int | None = None  # the first N records and N examples per task
    after_training: bool = False


# Names people bring from other tools, mapped to ours: difflib alone would answer `lora.rank`
# with `rank_pattern`, not `r`.
_ALIASES = {
    "rank": "r", "lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
    "lr": "learning_rate", "epochs": "num_train_epochs", "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size", "micro_batch_size": "per_device_train_batch_size",
    "sequence_len": "max_length", "max_seq_length": "max_length", "seq_len": "max_length",
}


def suggest(key: str, valid: typing.Iterable[str]) -> str:
    """` (did you mean `x`?)` for the nearest valid key, or nothing."""
    valid = list(valid)
    if _ALIASES.get(key) in valid:
        return f" (did you mean `{_ALIASES[key]}`?)"
    return did_you_mean(str(key), valid)  # YAML keys may be numbers


def matches_type(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a type annotation; unknown annotations are left to the library."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin in (list, tuple, set):
        return isinstance(value, list) and (not args or all(matches_type(v, args[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation} or isinstance(value, annotation)
    return True


def describe_type(annotation: Any) -> str:
    """A short human name for an annotation: `int`, `'none' | 'all'`, `list of str | null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, set):
        return f"list of {describe_type(args[0])}" if args else "list"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def check_keys(
    values: dict, annotations: dict[str, Any], section: str, extra_keys=()
) -> list[UserError]:
    """Unknown keys (with the nearest valid one) and wrongly typed values of one section."""
    errors = []
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in annotations and key not in extra_keys:
            errors.append(UserError(
                f"unknown key `{dotted}`{suggest(key, [*annotations, *extra_keys])}",
                key=dotted,
            ))
        elif key in annotations and not matches_type(value, annotations[key]):
            errors.append(UserError(
                f"`{dotted}` is {value!r} ({type(value).__name__}); expected {describe_type(annotations[key])}",
                key=dotted, fix=_decode_hint(value, annotations[key]),
            ))
    return errors


def _decode_hint(value: Any, annotation: Any) -> str | None:
    """For text that would fit once read as YAML: OmegaConf's `${oc.env:...}` always gives text
    (by design), and its `oc.decode` is the way to read it as a number or a boolean."""
    import yaml

    try:
        decoded = yaml.safe_load(value) if isinstance(value, str) else value
    except yaml.YAMLError:
        return None
    if isinstance(decoded, str) or not matches_type(decoded, annotation):
        return None
    return (f"write it unquoted; an environment variable is always text, so read it as YAML with "
            f"${{oc.decode:${{oc.env:VAR,{value}}}}}")


def dataclass_annotations(cls) -> dict[str, Any]:
    """Field name -> resolved type for a dataclass (ours or a library's)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(cls) if f.init}


def signature_annotations(func) -> dict[str, Any]:
    """Parameter name -> annotation for a callable (BitsAndBytesConfig takes **kwargs and only
    logs what it ignores, so its signature is the list of keys it really understands)."""
    params = inspect.signature(func).parameters.values()
    kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return {
        p.name: (typing.Any if p.annotation is inspect.Parameter.empty else p.annotation)
        for p in params if p.name != "self" and p.kind not in kinds
    }


def build_schema(cls, values: dict | None, section: str):
    """One of our section dataclasses from its YAML mapping; raises every problem at once."""
    if values is not None and not isinstance(values, dict):
        raise UserError(f"`{section}` must be a mapping of keys, not {values!r}", key=section)
    values = dict(values or {})
    annotations = dataclass_annotations(cls)
    errors = check_keys(values, annotations, section)
    for key, annotation in annotations.items():
        item_type = _listed_dataclass(annotation)
        if item_type and isinstance(values.get(key), list):
            values[key], item_errors = build_list(item_type, values[key], f"{section}.{key}")
            errors += item_errors
    missing = [f.name for f in dataclasses.fields(cls) if _is_required(f) and f.name not in values]
    errors += [UserError(f"`{section}.{name}` is required", key=section) for name in missing]
    if errors:
        raise combined(errors)
    return cls(**values)


def build_list(cls, items: list, prefix: str):
    """A list section's items (`data.sources`, `rewards`) as `cls`, and every item's errors, keyed `prefix.N`."""
    built, errors = [], []
    for index, item in enumerate(items):
        key = f"{prefix}.{index}"
        if not isinstance(item, dict):
            errors.append(UserError(f"`{key}` must be a mapping like {{path: ..., format: ...}}",
                                    key=key))
            continue
        try:
            built.append(build_schema(cls, item, key))
        except UserError as err:
            errors += err.errors
    return built, errors


def _listed_dataclass(annotation) -> type | None:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# ---------------------------------------------------------------- values a later step would refuse


def check_finite(resolved: Any, prefix: str = "") -> list[UserError]:
    """Every NaN and infinity in the recipe, wherever a number is read: no library refuses them all
    (a NaN compares false with every bound, so each check passes it), and a run turns them into a NaN
    loss, a crash or a schedule that never ends. No field of ours or the libraries' documents an
    infinity as meaningful (TrainingArguments' max_grad_norm turns clipping off with 0, not inf)."""
    if isinstance(resolved, float) and not math.isfinite(resolved):
        return [UserError(f"`{prefix}` is {resolved}; it must be a finite number", key=prefix,
                          fix="write a number (YAML reads .nan and .inf as not-a-number and infinity)")]
    items = resolved.items() if isinstance(resolved, dict) else enumerate(resolved) if isinstance(resolved, list) else ()
    return [error for key, value in items for error in check_finite(value, f"{prefix}.{key}" if prefix else str(key))]


def _positive(value) -> bool:
    return value > 0


# Counts, rates and probabilities that no run can use and no library refuses (it takes them, then
# trains on quietly or fails mid-run), keyed by field name: checked in whichever section or config
# class has the field (TrainingArguments or the method's TRL config, LoraConfig, GenerationConfig,
# our data section). A fraction below 1 is a share of the run for the *_steps keys.
BOUNDS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "lora_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "max_steps": (lambda v: v == -1 or v > 0, "more than 0, or -1 to train for num_train_epochs"),
    "logging_steps": (_positive, "more than 0 (a whole number of steps, or a fraction of the run below 1)"),
    "eval_steps": (_positive, "more than 0 (a whole number of steps, or a fraction of the run below 1)"),
    "save_steps": (_positive, "more than 0 (a whole number of steps, or a fraction of the run below 1)"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "at least 1 (1 updates the weights after every batch)"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "max_grad_norm": (lambda v: v >= 0, "0 or more (0 turns clipping off)"),
    "save_total_limit": (lambda v: v >= 1, "at least 1 (remove it to keep every checkpoint)"),
    "num_proc": (lambda v: v >= 1, "at least 1 (remove it to prepare in this process)"),
    "beta": (lambda v: v >= 0, "0 or more"),  # DPO/KTO's deviation from the reference; GRPO's KL weight (0: none)
    "desirable_weight": (_positive, "more than 0"),
    "undesirable_weight": (_positive, "more than 0"),
    "top_p": (lambda v: 0 < v <= 1, "a probability in (0, 1]"),
}


def check_bounds(section: str, values: dict, fields: typing.Iterable[str]) -> list[UserError]:
    """The BOUNDS of `values` (a section as written) for the keys its class has (`fields`); a value
    of the wrong type, NaN or infinity is reported by the type and finite checks instead."""
    errors = []
    for key in BOUNDS.keys() & set(fields) & values.keys():
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        allowed, wanted = BOUNDS[key]
        if not allowed(value):
            errors.append(UserError(f"`{section}.{key}` is {value}; it must be {wanted}", key=f"{section}.{key}",
                                    fix="write a value in that range, or remove the key for its default"))
    return errors


def to_dtype(value: Any, key: str | None = None):
    """`"bfloat16"` -> `torch.bfloat16`, with a recipe error for anything that is not a dtype."""
    import torch

    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype):
        named = f"`{key}` is {value!r}, which" if key else f"{value!r}"
        raise UserError(f"{named} is not a torch dtype", key=key, fix="use bfloat16, float16 or float32")
    return dtype


def check_values(typed: dict) -> list[UserError]:
    """Values of the right type that loading, preparing or merging would still refuse, for each
    of our sections that was built: found now, with the rest of the recipe's problems."""
    checks = {"model": _check_model_source, "data": _check_data_limits, "merge": _check_shard_size,
              "eval": _check_eval_limit}
    return [error for name, section in typed.items() for error in checks[name](section)]


def _check_eval_limit(section) -> list[UserError]:
    if section.limit is not None and section.limit < 1:
        return [UserError(f"eval.limit must be at least 1, not {section.limit}",
                          key="eval.limit", fix="remove it to score every record")]
    return []


def _check_model_source(model) -> list[UserError]:
    """What the loader would reject later: checked now, before any weight is read."""
    errors = []
    if (model.name_or_path is None) == (model.init_from_config is None):
        errors.append(UserError("the model needs exactly one of `model.name_or_path` and `model.init_from_config`",
                                key="model", fix="set model.name_or_path to a path or hub id"))
    if model.init_from_config is not None and model.tokenizer is None:
        errors.append(UserError("a model built with `model.init_from_config` needs `model.tokenizer`",
                                key="model.init_from_config",
                                fix="set model.tokenizer, e.g. mistral-common:v1"))
    if model.init_from_config is not None and model.init_from_config.get("model_type") is None:
        errors.append(UserError("`model.init_from_config` needs `model_type`",
                                key="model.init_from_config",
                                fix="add model_type: mistral"))
    if model.init_from_config is not None:
        errors += init_config_errors(model.init_from_config)
    errors += _check_mistral_common_name(model.tokenizer)
    try:
        if not to_dtype(model.dtype, "model.dtype").is_floating_point:
            errors.append(UserError(f"`model.dtype` is {model.dtype!r}: the weights that stay unquantized (and "
                                    "LoRA's) must be floating point", key="model.dtype", fix="use bfloat16, float16 or float32"))
    except UserError as err:
        errors.append(err)
    return errors


def _check_data_limits(data) -> list[UserError]:
    """Values of the right type that preparing the data would still refuse."""
    errors = []
    if data.max_length < 8:
        errors.append(UserError(f"`data.max_length` is {data.max_length}; it must be at least 8",
                                key="data.max_length"))
    if data.val_size < 0 or (isinstance(data.val_size, float) and data.val_size >= 1):
        errors.append(UserError(f"`data.val_size` is {data.val_size}; it must be a fraction in [0, 1) or a count "
                                "of examples", key="data.val_size"))
    errors += check_bounds("data", vars(data), [f.name for f in dataclasses.fields(data)])
    return errors + _check_template(data.template) + _check_source_amounts(data)


def _check_template(template: str) -> list[UserError]:
    """A template name with a typo, or Jinja that does not parse, which prepare would refuse only
    after loading the tokenizer."""
    if template in TEMPLATE_NAMES:
        return []
    if is_jinja(template):
        return _check_jinja(template)
    return [UserError(f"`data.template` is {template!r}{suggest(template, TEMPLATE_NAMES)}: neither a template "
                      "name nor a Jinja chat template", key="data.template",
                      fix="use mistral, tokenizer, or a Jinja chat template (with {{ }} and {% %})")]


def _check_jinja(template: str) -> list[UserError]:
    """Compile the template in transformers' own sandboxed environment, as apply_chat_template will
    (with qlora's bounds: Jinja computes constant expressions as it compiles, and 10 ** (10 ** 10) took hours)."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from qlora_cli.recipe.template_sandbox import bound_chat_templates

    bound_chat_templates()
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as err:
        return [UserError(f"`data.template` is not valid Jinja: {err.message} (line {err.lineno} of the template)",
                          key="data.template", fix="fix the template, or use template: mistral")]
    return []


def _check_mistral_common_name(tokenizer: str | None) -> list[UserError]:
    """`mistral-common:NAME` names one of the tokenizers mistral-common ships (prepare refused a typo)."""
    if not isinstance(tokenizer, str) or not tokenizer.startswith(MISTRAL_COMMON_PREFIX):
        return []
    name = tokenizer[len(MISTRAL_COMMON_PREFIX):]
    if name in MISTRAL_COMMON_FILES:
        return []
    return [UserError(f"`model.tokenizer` is {tokenizer!r}{suggest(name, MISTRAL_COMMON_FILES)}: mistral-common "
                      "ships no tokenizer of that name", key="model.tokenizer",
                      fix=f"use one of {', '.join(MISTRAL_COMMON_PREFIX + n for n in MISTRAL_COMMON_FILES)}")]


def _check_source_amounts(data) -> list[UserError]:
    """No training source, a `limit` that reads no row, or weights that keep nothing: prepare would
    refuse them after reading the data. A negative `limit` would slice rows off the end and a
    negative `weight` drop the source, both silently; neither can mean what was intended."""
    errors = []
    if not data.sources:
        errors.append(UserError("the recipe has no data: `data.sources` is empty", key="data.sources",
                                fix="add - {path: my.jsonl, format: chat}"))
    elif all(source.weight == 0 for source in data.sources):
        errors.append(UserError("every source of `data.sources` has weight 0: no training example is left",
                                key="data.sources",
                                fix="give at least one source a weight above 0 (2 repeats it, 0.5 keeps half)"))
    for key in ("sources", "validation_sources"):
        for index, source in enumerate(getattr(data, key)):
            for name, least, fix in (
                    ("limit", 1, "give the number of rows to read (at least 1), or remove it to read them all"),
                    ("weight", 0, "use 1 to keep the source as is, 2 to repeat it, 0.5 to keep half")):
                value, dotted = getattr(source, name), f"data.{key}.{index}.{name}"
                if value is not None and value < least:
                    errors.append(UserError(f"`{dotted}` is {value}; it must be {least} or more",
                                            key=dotted, fix=fix))
    return errors


def check_method(method: Any, data: Any) -> list[UserError]:
    """`method` is one we know, and every data source is in a format that method trains on."""
    if method not in METHODS:
        return [UserError(f"`method` is {method!r}{suggest(str(method), METHODS)}; it must be one of {', '.join(METHODS)}",
                          key="method")]
    if data is None:
        return []
    wanted, errors = METHOD_FORMATS[method], []
    for key in ("sources", "validation_sources"):
        for index, source in enumerate(getattr(data, key)):
            if source.format not in wanted:
                dotted = f"data.{key}.{index}.format"
                fits = next(name for name, formats in METHOD_FORMATS.items() if source.format in formats)
                errors.append(UserError(
                    f"`method: {method}` trains on {' or '.join(wanted)} data, and `{dotted}` is {source.format}",
                    key=dotted,
                    fix=f"set format: {' or '.join(wanted)} on this source, or method: {fits} for {source.format} data"))
    return errors


def _check_shard_size(merge) -> list[UserError]:
    """`merge.max_shard_size` as transformers' own parser reads it: else it fails after the merge."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(merge.max_shard_size)
    except ValueError:
        size = 0
    if size > 0:
        return []
    return [UserError(f"`merge.max_shard_size` is {merge.max_shard_size!r}, which is not a size",
                      key="merge.max_shard_size",
                      fix="write a number and a unit, e.g. 5GB, 500MB or 2GiB")]
