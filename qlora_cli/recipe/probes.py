"""What torch, numpy, peft, bitsandbytes, the Trainer and generate() would refuse only once a run
starts, asked at load on throwaway objects (one parameter, a meta-device layer or model, 64 zeros):
the optimizer, the seeds, the data loader, the reporting integrations, epochs, KTO's batches, LoRA
ranks and dropout, the 4-bit data type, sampling values."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

from qlora_cli.errors import UserError, combined, first_line
from qlora_cli.recipe.builders import (
    build_bnb_config, build_generation_config, build_lora_config, build_training_arguments, keys_named, split_generate,
)


def probed_training_arguments(training: dict, has_validation: bool = False, method: str = "sft"):
    """The run's TrainingArguments, and the values they accept that torch, numpy or the Trainer
    would refuse only once training starts."""
    args = build_training_arguments(training, has_validation=has_validation, method=method)
    errors = [*_ask_optimizer(args, training, method), *_ask_seeds(args), *_ask_data_loader(args),
              *_ask_reporting(args), *_check_epochs(args), *_check_kto_batches(args, method)]
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


def _ask_reporting(args) -> list[UserError]:
    """The Trainer looks up each `report_to` integration only when it is built, after the model loads."""
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        get_reporting_integration_callbacks(args.report_to)
    except ValueError as err:
        return [_refused("training.report_to", args.report_to, f"transformers has no such integration ({first_line(err)})",
                         fix="name integrations transformers has, or none")]
    return []


def _check_epochs(args) -> list[UserError]:
    """The Trainer trains on with a negative number of epochs (the other counts are sections.BOUNDS)."""
    if args.num_train_epochs < 0 or (args.num_train_epochs == 0 and args.max_steps <= 0):
        return [_refused("training.num_train_epochs", args.num_train_epochs, "it must be more than 0 "
                         "(or training.max_steps set)", fix="train for e.g. 3 epochs")]
    return []


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


def probed_lora_config(lora: dict):
    """LoraConfig accepts any rank and dropout; the LoRA layer refuses them only when the model is
    wrapped. Wrap one meta-device linear layer now (its LoRA matrices on meta too) with each rank the recipe uses."""
    import torch
    from peft.tuners.lora.layer import Linear

    config = build_lora_config(lora)
    probe = dataclasses.replace(config, init_lora_weights=False)  # pissa/loftq/... initialise from real weights
    errors = []
    for key, rank in [("lora.r", config.r), *((f"lora.rank_pattern.{k}", v) for k, v in config.rank_pattern.items())]:
        try:
            with torch.device("meta"):  # peft makes the LoRA matrices on the default device: a huge rank took minutes
                Linear(torch.nn.Linear(8, 8), "probe", config=probe, r=rank, lora_alpha=config.lora_alpha)
        except (ValueError, TypeError, OverflowError) as err:  # a rank too large for a tensor's shape: Type/Overflow
            dropout = "dropout" in str(err)
            key = "lora.lora_dropout" if dropout else key
            errors.append(_refused(key, config.lora_dropout if dropout else rank, f"peft refuses it ({first_line(err)})"))
            break
    if errors:
        raise combined(errors)
    return config


def probed_bnb_config(quantization: dict):
    """BitsAndBytesConfig takes any `bnb_4bit_quant_type` text; bitsandbytes refuses one it lacks only
    when it quantizes the first weight. Quantize 64 zeros with it now."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    config = build_bnb_config(quantization)
    if config is None or not config.load_in_4bit:
        return config
    try:
        quantize_4bit(torch.zeros(64), quant_type=config.bnb_4bit_quant_type)
    except ValueError as err:
        raise _refused("quantization.bnb_4bit_quant_type", config.bnb_4bit_quant_type,
                       f"bitsandbytes refuses it ({first_line(err)})", fix="use nf4 (or fp4)") from None
    except Exception:  # noqa: BLE001 - a bitsandbytes without a kernel for this machine judges it where it runs
        return config
    return config


def probed_generation_config(generate: dict):
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
    # Private, but the one way to hear these objections before a weight loads: the public generate()
    # builds its logits processors only inside a generation, from this same method.
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


def blamed_key(message: str, values: dict, objection) -> str | None:
    """The key a library's objection is about: the one it names, else the one without which it
    objects differently or not at all ("Invalid learning rate: -1" names no key)."""
    named = keys_named(message, values)
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
