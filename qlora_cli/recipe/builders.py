"""Recipe sections -> the libraries' own objects: BitsAndBytesConfig, LoraConfig,
TrainingArguments, GenerationConfig. Their keys are checked against the classes themselves."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import typing
from typing import Any

from qlora_cli.errors import UserError, combined
from qlora_cli.recipe.sections import (
    METHODS, GenerateOptions, GenerateSection, build_schema, check_keys, dataclass_annotations, matches_type,
    signature_annotations, to_dtype,
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


def training_defaults(method: str = "sft") -> dict[str, Any]:
    """What an unset `training.<key>` is for `method`: its config class's default, or qlora's."""
    return {**dataclass_defaults(training_class(method)), **method_defaults(method, {})}


def quantization_values(quantization: dict | None) -> dict[str, Any]:
    """The quantization section as the run will have it: the recipe's keys over BitsAndBytesConfig's defaults."""
    from transformers import BitsAndBytesConfig

    return {**signature_defaults(BitsAndBytesConfig.__init__), **(quantization or {})}


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


def build_library_sections(config: dict, data=None) -> tuple[dict[str, Any], list[UserError]]:
    """The objects the four library sections become (`None` for quantization or lora set to null),
    and every unknown key, wrong type and library objection in them; `data` is the typed data
    section, when it was built."""
    generate_ours = [f.name for f in dataclasses.fields(GenerateOptions)]
    has_validation = data is not None and data.has_validation
    method = config.get("method", "sft")
    method = method if method in METHODS else "sft"  # an unknown one is reported by check_method
    checks = [
        ("quantization", quantization_keys, build_bnb_config, ()),
        ("lora", lora_keys, _build_lora_for_check, ()),
        ("training", functools.partial(training_keys, method),
         functools.partial(_build_training_for_check, has_validation=has_validation, method=method), ()),
        ("generate", generation_keys, _build_generate_section, generate_ours),
    ]
    built: dict[str, Any] = {"quantization": None, "lora": None}
    errors: list[UserError] = []
    for section, keys, build, extra in checks:
        values = config.get(section)
        if values is None:
            if section == "generate":
                built[section] = _build_generate_section({})
            continue
        if not isinstance(values, dict):
            errors.append(UserError(f"`{section}` must be a mapping of keys", key=section))
            continue
        annotations = normalize_yaml_booleans(values, keys())
        section_errors = check_keys(values, annotations, section, extra_keys=extra)
        if section == "generate":
            section_errors += _check_generate_options(values)
        if section == "training":
            section_errors += _check_choices(training_class(method), values)
        if not section_errors:
            try:
                built[section] = build(values)
            except UserError as err:
                section_errors = err.errors
        errors += section_errors
    return built, errors


def _check_choices(cls, values: dict) -> list[UserError]:
    """Values outside the `choices` a config class declares in its field metadata (TRL's KTOConfig
    takes any `loss_type` text and fails mid-training on one it does not know)."""
    errors = []
    for f in dataclasses.fields(cls):
        choices = list(f.metadata.get("choices") or [])
        value = values.get(f.name)
        if choices and isinstance(value, str) and value not in choices:
            dotted = f"training.{f.name}"
            errors.append(UserError(f"`{dotted}` is {value!r}; {cls.__name__} takes {', '.join(map(str, choices))}",
                                    key=dotted))
    return errors


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


def evaluation_changes(training: dict, has_validation: bool) -> dict:
    """With validation data and no `eval_strategy`: evaluate whenever a checkpoint is saved, so
    that `load_best_model_at_end` works."""
    if not has_validation or "eval_strategy" in training:
        return {}
    return {"eval_strategy": training.get("save_strategy", "steps"),
            "eval_steps": training.get("eval_steps") or training.get("save_steps")}


def _construct(cls, values: dict, section: str):
    try:
        return cls(**values)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise _library_error(section, cls.__name__, err, values) from None
    except ImportError as err:  # e.g. training.deepspeed without the deepspeed package
        raise UserError(f"{cls.__name__} needs a package that is not installed: {err}", key=section,
                        fix="pip install the package it names, or remove the key that asks for it") from None


def _library_error(section: str, cls_name: str, err: Exception, values: dict):
    message = str(err).strip()
    named = _keys_named(message, values)
    keys = ", ".join(f"`{section}.{key}`" for key in named) or f"`{section}`"
    return UserError(f"{cls_name} rejects {keys}: {message}", key=f"{section}.{named[0]}" if named else section)


def _keys_named(message: str, values: dict) -> list[str]:
    """The keys a library's message is about: named as whole words (`seed` must not be blamed for
    `data_seed`), or else quoted only by their value ("bogus is not a valid SchedulerType")."""
    def mentions(word: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", message) is not None

    return ([key for key in values if mentions(key)]
            or [key for key, value in values.items() if isinstance(value, str) and len(value) > 2 and mentions(value)])


def _build_training_for_check(training: dict, has_validation: bool = False,
                              method: str = "sft"):
    """The run's TrainingArguments, and the values they accept that torch, numpy or the Trainer
    would refuse only once training starts."""
    args = build_training_arguments(training, has_validation=has_validation, method=method)
    errors = [*_ask_optimizer(args, training, method), *_ask_seeds(args), *_ask_data_loader(args),
              *_check_step_counts(args, training), *_check_kto_batches(args, method)]
    if errors:
        raise combined(errors)
    return args


def _refused(key: str, value: Any, reason: str, fix: str | None = None) -> UserError:
    return UserError(f"`{key}` is {value!r}: {reason}", key=key, fix=fix)


def _ask_optimizer(args, training: dict, method: str = "sft") -> list[UserError]:
    """Build the recipe's optimizer on one throwaway parameter: torch's optimizers judge their
    own learning rate, betas and epsilon (a negative learning rate fails only at the first step)."""
    message = _optimizer_objection(args)
    if message is None:
        return []

    def objection(values: dict) -> str | None:
        return _optimizer_objection(build_training_arguments(values, method=method))

    key = "training." + (blamed_key(message, training, objection) or "optim")
    return [UserError(f"the optimizer ({training.get('optim', args.optim.value)}) refuses `{key}`: {message}", key=key)]


def _optimizer_objection(args) -> str | None:
    import torch
    from transformers import Trainer

    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        optimizer_cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (ValueError, OverflowError) as err:
        return first_line(err)
    except Exception:  # noqa: BLE001 - one that cannot be built here (needs CUDA) is judged when training starts
        return None
    return None


def blamed_key(message: str, values: dict, objection) -> str | None:
    """The key a library's objection is about: the one it names, else the one without which it
    objects differently or not at all ("Invalid learning rate: -1" names no key)."""
    named = _keys_named(message, values)
    if named:
        return named[0]
    with quiet_transformers():  # the probes' own warnings are about configs nobody wrote
        for key in values:
            try:
                if objection({k: v for k, v in values.items() if k != key}) != message:
                    return key
            except (UserError, ValueError, TypeError):  # no valid config without it: it tells nothing
                continue
    return None


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _ask_seeds(args) -> list[UserError]:
    """transformers' set_seed seeds numpy, whose generator takes 0 <= seed < 2**32 only."""
    import numpy as np

    errors = []
    for name in ("seed", "data_seed"):
        value = getattr(args, name)
        try:
            np.random.RandomState(value if value is not None else 0)
        except (ValueError, TypeError) as err:
            errors.append(_refused(f"training.{name}", value, f"numpy cannot seed with it ({first_line(err)})",
                                   fix="use a whole number from 0 to 4294967295"))
    return errors


def _ask_data_loader(args) -> list[UserError]:
    """torch's DataLoader judges batch sizes and worker counts, which it would see only after the
    model has loaded."""
    from torch.utils.data import DataLoader

    errors = []
    for key, option in (("per_device_train_batch_size", "batch_size"), ("per_device_eval_batch_size", "batch_size"),
                        ("dataloader_num_workers", "num_workers")):
        value = getattr(args, key)
        try:
            DataLoader(range(1), **{option: value})
        except (ValueError, OverflowError) as err:
            errors.append(_refused(f"training.{key}", value, f"torch refuses it ({first_line(err)})"))
    return errors


def _check_step_counts(args, training: dict) -> list[UserError]:
    """Counts no library judges: the Trainer divides by the accumulation steps, trains on with a
    negative number of epochs, and never saves with `save_steps: 0`."""
    errors = []
    if args.gradient_accumulation_steps < 1:
        errors.append(_refused("training.gradient_accumulation_steps", args.gradient_accumulation_steps,
                               "it must be at least 1", fix="use 1 to update the weights after every batch"))
    if args.num_train_epochs < 0 or (args.num_train_epochs == 0 and args.max_steps <= 0):
        errors.append(_refused("training.num_train_epochs", args.num_train_epochs, "it must be more than 0 "
                               "(or training.max_steps set)", fix="train for e.g. 3 epochs"))
    for strategy, key in (("save_strategy", "save_steps"), ("eval_strategy", "eval_steps")):
        value = getattr(args, key)
        if getattr(args, strategy) == "steps" and value is not None and value <= 0:
            errors.append(_refused(f"training.{key}", value, f"with {strategy} steps it must be more than 0 (a whole "
                                   "number of steps, or a fraction of the run below 1)"))
    return errors


def _check_kto_batches(args, method: str) -> list[UserError]:
    """What TRL's KTOTrainer refuses only once the model has loaded: its KL term (every loss_type
    but apo_zero_unpaired) pairs each completion with the previous example's prompt within a batch,
    so a batch needs 2 examples or more and keeps its order (`train_sampling_strategy: sequential`)."""
    if method != "kto" or args.loss_type == "apo_zero_unpaired":
        return []
    errors = []
    if args.per_device_train_batch_size <= 1:
        errors.append(_refused("training.per_device_train_batch_size", args.per_device_train_batch_size,
                               f"KTO's KL term (loss_type {args.loss_type}) pairs each completion with another example's "
                               "prompt of the same batch, so it needs 2 examples per device or more",
                               fix="use 2 or more (e.g. 8), or loss_type: apo_zero_unpaired, which has no KL term"))
    if args.train_sampling_strategy != "sequential":
        errors.append(_refused("training.train_sampling_strategy", args.train_sampling_strategy,
                               f"KTO's KL term (loss_type {args.loss_type}) pairs neighbours of a fixed-order batch",
                               fix="remove the key (KTOConfig's default is sequential; `qlora prepare` "
                               "already shuffles the examples)"))
    return errors


def _build_lora_for_check(lora: dict):
    """LoraConfig accepts any rank and dropout; the LoRA layer refuses them only when the model is
    wrapped. Wrap one meta-device linear layer now with each rank the recipe uses."""
    import torch
    from peft.tuners.lora.layer import Linear

    config = build_lora_config(lora)
    probe = dataclasses.replace(config, init_lora_weights=False)  # pissa/loftq/... initialise from real weights
    errors = []
    for key, rank in [("lora.r", config.r), *((f"lora.rank_pattern.{k}", v) for k, v in config.rank_pattern.items())]:
        try:
            Linear(torch.nn.Linear(8, 8, device="meta"), "probe", config=probe, r=rank, lora_alpha=config.lora_alpha)
        except (ValueError, TypeError, OverflowError) as err:  # a rank too large for a tensor's shape: Type/Overflow
            dropout = "dropout" in str(err)
            key = "lora.lora_dropout" if dropout else key
            errors.append(_refused(key, config.lora_dropout if dropout else rank, f"peft refuses it ({first_line(err)})"))
            break
    if errors:
        raise combined(errors)
    return config


def _build_generate_section(generate: dict) -> GenerateSection:
    """Our own `generate` options (checked already) and the GenerationConfig of the other keys."""
    options, _ = split_generate(generate)
    return GenerateSection(options, _build_generation_for_check(generate) if generate else build_generation_config({}))


def _build_generation_for_check(generate: dict):
    """GenerationConfig.validate leaves sampling values (temperature, top_k, penalties) to the
    logits processors that generate() builds: build them now, for a meta-device stand-in model."""
    config = build_generation_config(generate)
    errors = [_refused(f"generate.{key}", getattr(config, key), "it must be at least 1")
              for key in ("num_beams", "num_return_sequences")
              if isinstance(getattr(config, key), int) and getattr(config, key) < 1]
    message = _sampling_objection(config)
    if message is not None:
        def objection(values: dict) -> str | None:
            return _sampling_objection(build_generation_config(values))

        key = "generate." + (blamed_key(message, split_generate(generate)[1], objection) or "do_sample")
        errors.append(UserError(f"generate() refuses `{key}`: {message}", key=key))
    if errors:
        raise combined(errors)
    return config


def _sampling_objection(config) -> str | None:
    try:
        _generation_probe_model()._get_logits_processor(config, input_ids_seq_length=1, device="cpu")
    except (ValueError, OverflowError) as err:
        return first_line(err)
    return None


@functools.lru_cache(maxsize=1)
def _generation_probe_model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=16)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def first_line(err: BaseException, named: bool = False) -> str:
    """The start of a library's error, its first two lines; `named`: after its type, and saying how
    many lines it leaves out (torch lists every mismatched weight of a state dict)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not named:
        return " ".join(lines[:2]) if lines else type(err).__name__
    more = f" (and {len(lines) - 2} more lines)" if len(lines) > 2 else ""
    return f"{type(err).__name__}: {' '.join(lines[:2])}{more}"
