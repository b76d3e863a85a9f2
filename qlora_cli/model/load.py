"""Recipe.model / quantization / lora -> the model: a 4-bit base with LoRA, or a plain one; and a
trained adapter loaded on its base (for merge and generate)."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import atomic_folder, cache_root
from qlora_cli.recipe.builders import build_bnb_config
from qlora_cli.recipe.library_fields import quantization_values
from qlora_cli.errors import UserError
from qlora_cli.recipe.sections import to_dtype
from qlora_cli.data.tokenizer import load_recipe_tokenizer, tokenizer_spec

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe
    from transformers import BitsAndBytesConfig


# init_from_config model folders found in this process: merge and generate ask for the base
# model several times, and each miss costs a tokenizer load (~0.4 s) to compute the cache key.
_BUILT: dict[str, Path] = {}


def model_path(recipe: Recipe, tokenizer=None) -> str:
    """A path or hub id `from_pretrained` can load: `init_from_config` models are built first
    (with `tokenizer` when the caller has loaded the recipe's already)."""
    model = recipe.model
    if model.init_from_config is None:
        return model.name_or_path
    key = json.dumps([str(cache_root()), model.init_from_config, tokenizer_spec(model)], sort_keys=True)
    if key not in _BUILT or not (_BUILT[key] / "config.json").is_file():
        _BUILT[key] = build_init_model(model.init_from_config, tokenizer or load_recipe_tokenizer(recipe))
    return str(_BUILT[key])


def build_init_model(init_config: dict, tokenizer) -> Path:
    """Build a randomly initialised model once and keep it as safetensors in the cache, keyed by
    its config, so every later step (train, merge, generate) loads the same base weights."""
    key = hashlib.sha256(json.dumps([init_config, len(tokenizer)], sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{init_config.get('model_type', 'model')}-{key}"
    with _rank_zero_first():
        if (target / "config.json").is_file():
            return target
        import torch

        from qlora_cli.families import auto_model_class, build_init_config, family_of

        config = build_init_config(init_config, tokenizer)
        torch.manual_seed(init_config.get("seed", 0))
        model = auto_model_class(family_of(config.model_type)).from_config(config, dtype=torch.float32)
        with atomic_folder(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return target


@contextmanager
def _rank_zero_first():
    """In a process group, rank 0 runs the block first and the others after it: transformers'
    `save_pretrained` writes weights only on rank 0, so another rank's folder would hold the
    tokenizer alone, and could be renamed into the cache before rank 0's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


@dataclass
class ModelSummary:
    """What the user is told about a loaded model."""

    trainable: int
    total: int
    footprint_bytes: int
    quantization: str
    lora_by_kind: dict[str, int] = field(default_factory=dict)  # LoRA parameters per kind of module

    def lines(self) -> list[str]:
        share = 100 * self.trainable / max(self.total, 1)
        lines = [
            f"quantization: {self.quantization}",
            f"parameters: {self.trainable:,} trainable of {self.total:,} ({share:.2f}%)",
            f"memory footprint: {self.footprint_bytes / 2**20:,.1f} MiB",
        ]
        if self.lora_by_kind:
            lines.append("LoRA on: " + ", ".join(f"{kind} {count:,}" for kind, count in self.lora_by_kind.items()))
        return lines


# Kinds of modules a LoRA parameter can sit on, tested in this order on its name.
LORA_KINDS = [
    ("shared experts", (".shared_expert",)),
    ("experts", (".experts.",)),
    ("router", (".mlp.gate.", ".router.")),
    ("vision", ("vision_tower", "multi_modal_projector")),
    ("attention", (".self_attn.", ".attention.")),
    ("MLP", (".mlp.",)),
]


def lora_by_kind(model) -> dict[str, int]:
    """Trainable LoRA parameters per kind of module (attention, experts, router, ...)."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and ".lora_" in name:
            kind = next((k for k, marks in LORA_KINDS if any(m in name for m in marks)), "other")
            counts[kind] = counts.get(kind, 0) + param.numel()
    return counts


def describe_quantization(quantization: BitsAndBytesConfig | None) -> str:
    if quantization is None:
        return "none (16/32-bit base weights)"
    if quantization.load_in_4bit:
        double = " + double quantization" if quantization.bnb_4bit_use_double_quant else ""
        compute = str(quantization.bnb_4bit_compute_dtype).removeprefix("torch.")
        return f"4-bit {quantization.bnb_4bit_quant_type}{double}, compute in {compute}"
    return "8-bit (LLM.int8)" if quantization.load_in_8bit else "none"


def load_base_model(recipe: Recipe, *, quantized: bool = True, dtype=None, device_map=None, tokenizer=None):
    """The base model as the recipe says: 4-bit / 8-bit through BitsAndBytesConfig, or not,
    loaded with the auto class of its family (causal LM, or image-text-to-text); `tokenizer`, the
    recipe's when the caller has it (an `init_from_config` model is built with it)."""
    from transformers import AutoConfig

    from qlora_cli.model.experts import quantize_experts, quantizing_experts_on_load
    from qlora_cli.model.fp8 import (bf16_repo, check_fp8_layout, dequantized_fp8, dequantizing_fp8_on_load,
                                     fp8_quantization, without_fp8_quantization)
    from qlora_cli.families import auto_model_class, checkpoint_family, kept_16bit

    model = recipe.model
    path = model_path(recipe, tokenizer)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code, revision=model.revision)
        family = checkpoint_family(config, trust_remote_code=model.trust_remote_code)
        quantization = kept_16bit(family, recipe.written("quantization")) if quantized else None
        bnb = build_bnb_config(quantization) if quantized else None
        experts_4bit = quantization_values(quantization) if bnb is not None else None
        fp8 = fp8_quantization(config)
        if fp8 is not None:
            check_fp8_layout(path, model.revision, model.name_or_path)
            if bnb is not None:
                without_fp8_quantization(config)
        with quantizing_experts_on_load(family.expert_modules, experts_4bit), \
                dequantizing_fp8_on_load(fp8 if bnb is not None else None):
            loaded = auto_model_class(family).from_pretrained(
                path,
                config=config,
                quantization_config=bnb if fp8 is None or bnb is not None else dequantized_fp8(fp8),
                dtype=dtype or to_dtype(model.dtype, "model.dtype"),
                attn_implementation=model.attn_implementation,
                trust_remote_code=model.trust_remote_code,
                revision=model.revision,
                device_map=device_map,
            )
    except OSError as err:
        raise UserError(f"cannot load model `{model.name_or_path}`: {err}", key="model.name_or_path",
                        fix="give a local folder with config.json and safetensors weights, or a hub id "
                            "(needs network)") from None
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        raise UserError(f"loading model `{model.name_or_path or 'init_from_config'}` needs a package that is not "
                        f"installed: {err}", key="model.attn_implementation" if "ttention" in str(err) else "model",
                        fix="pip install it, or change the recipe key that asks for it") from None
    except ValueError as err:
        if "The model is quantized with" in str(err):  # a checkpoint quantized another way than bitsandbytes
            raise UserError(f"`{model.name_or_path}` holds weights quantized by another method "
                            f"({type(config.quantization_config).__name__}), which bitsandbytes cannot quantize "
                            "again", key="model.name_or_path",
                            fix=f"use its 16-bit release ({bf16_repo(model.name_or_path)}), or set quantization: null "
                                "to train LoRA on it as it loads") from None
        if "trust_remote_code" not in str(err):
            raise
        # transformers refuses a model that ships its own Python code unless told to run it.
        raise UserError(f"model `{model.name_or_path}` ships custom code, which qlora does not run unless "
                        "the recipe allows it", key="model.trust_remote_code",
                        fix="read that code, then set model.trust_remote_code: true") from None
    _keep_4bit_compute_dtype(loaded)
    if bnb is not None:  # what loading left: a tensor not quantized on load raises its error here
        quantize_experts(loaded, family.expert_modules, experts_4bit)
    return loaded


def _keep_4bit_compute_dtype(model) -> None:
    """Keep bitsandbytes from repacking CPU 4-bit layers for its bf16 inference kernel.

    It repacks a layer at its first no-grad forward in eval mode (an evaluation, a probe, a
    generation) and keeps it so. That kernel computes in bf16 whatever `bnb_4bit_compute_dtype`
    says, and passes no gradient to its input: every later training step would lose the gradient
    through the frozen base layers below each LoRA.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_trainable_model(recipe: Recipe, *, device_map=None, tokenizer=None):
    """4-bit base prepared for k-bit training, wrapped with LoRA: a `PeftModel`."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from qlora_cli.model.experts import repair_expert_lora
    from qlora_cli.model.lora_targets import lora_config, refused_by_peft
    from qlora_cli.families import checkpoint_family

    model = load_base_model(recipe, device_map=device_map, tokenizer=tokenizer)
    checkpointing = recipe.training.activation_checkpointing
    sharded = bool(recipe.training.fsdp)
    if recipe.quantization and recipe.model.upcast_to_fp32 and not sharded:
        # The QLoRA paper's preparation: every weight that is not 4-bit (embeddings, norms, lm_head)
        # becomes fp32, and with the embeddings so does the residual stream. Off by default: the
        # norms compute in fp32 anyway, and the fp32 residual doubles what checkpointing keeps.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if recipe.model.tiled_mlp:  # the MLPs' own forward is replaced; peft's LoRA layers inside run as usual
        from qlora_cli.model.tiling import tile_mlps

        tile_mlps(model)
    if recipe.model.adapter:
        return load_starting_adapter(model, recipe)
    family = checkpoint_family(model.config, trust_remote_code=recipe.model.trust_remote_code)
    lora = lora_config(recipe, model, family)
    if lora is None:
        return model
    # Seed right before the LoRA weights' random init, so it is the same for every rank and
    # every run, whether or not this process had to build the base model first.
    set_seed(recipe.training.seed)
    # FSDP shards a layer as one flat buffer of one dtype: keep LoRA weights in the model's dtype
    # instead of peft's fp32 (and never upcast the unquantized weights above).
    with refused_by_peft(lora):
        peft_model = get_peft_model(model, lora, autocast_adapter_dtype=not sharded)
    repair_expert_lora(peft_model)
    return peft_model


def load_starting_adapter(model, recipe: Recipe):
    """`model.adapter` (an SFT run's adapter/, or a hub id) on the base, trainable: the run goes on
    from it, with its own LoRA config (the recipe's `lora` section does not reshape it)."""
    from peft import PeftModel

    from qlora_cli.model.experts import repair_expert_lora

    # A local folder was checked before loading (preflight.check_starting_adapter).
    adapter, key = recipe.model.adapter, "model.adapter"
    fix = "give a folder with adapter_config.json and adapter_model.safetensors (e.g. runs/sft/adapter)"
    try:
        loaded = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the adapter `{adapter}` to start from: {err}", key=key, fix=fix) from None
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise UserError(f"`model.adapter` `{adapter}` does not fit the base model (its weights have other shapes): "
                        f"{next(line for line in str(err).splitlines() if 'size mismatch' in line).strip()}", key=key,
                        fix="start from an adapter trained on this recipe's base model and layers") from None
    repair_expert_lora(loaded)
    return loaded


def load_adapter_model(recipe: Recipe, adapter: Path, *, quantized: bool, dequantize: bool = False):
    """A trained adapter on its base, for merge and generate: the base 4-bit as in training, or
    in `merge.dtype` (with `dequantize`, holding the 4-bit weights training saw, dequantized)."""
    from peft import PeftModel

    from qlora_cli.model.experts import nest_expert_lora_as_trained, repair_expert_lora
    from qlora_cli.families import checkpoint_family

    dtype = None if quantized else to_dtype(recipe.merge.dtype, "merge.dtype")
    base = load_base_model(recipe, quantized=quantized, dtype=dtype)
    if dequantize and not quantized and trained_on_4bit(recipe):
        copy_dequantized_weights(load_base_model(recipe, quantized=True), base)
    if not quantized and trained_on_4bit(recipe):
        family = checkpoint_family(base.config, trust_remote_code=recipe.model.trust_remote_code)
        nest_expert_lora_as_trained(base, family.expert_modules)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    repair_expert_lora(model)
    return model


def trained_on_4bit(recipe: Recipe) -> bool:
    return recipe.quantization is not None and recipe.quantization.load_in_4bit


def copy_dequantized_weights(quantized_model, model) -> None:
    """Give each weight of `model` that `quantized_model` holds in 4 bits the value training
    computed with: that 4-bit weight dequantized.

    Read from the loaded 4-bit model, not from a rule of our own, so exactly the modules
    transformers quantized change: not the output head, not `llm_int8_skip_modules`.

    Not `PreTrainedModel.dequantize` (transformers 5.24, `dequantize_and_replace`): it replaces
    only `bnb.nn.Linear4bit` modules, so the 4-bit experts (experts.py) would stay 4-bit; it turns
    the 4-bit model itself into the merge base, so the weights training kept unquantized would be
    those loaded in `model.dtype` instead of the checkpoint's in `merge.dtype` (bf16 embeddings and
    lm_head in a float32 merge); and on a model whose only 4-bit weights are experts it fails
    (`has_been_replaced` is assigned only inside its loop).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from qlora_cli.model.experts import dequantized, is_quantized

    modules = dict(model.named_modules())
    for name, module in quantized_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            target = modules[name].weight
            value = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
            target.data = value.to(target.device, target.dtype).reshape(target.shape)
        for param_name in getattr(module, "parametrizations", {}):  # fused experts (qlora_cli.model.experts)
            if is_quantized(module, param_name):
                target = getattr(modules[name], param_name)
                target.data = dequantized(module, param_name).to(target.device, target.dtype)


def adapter_config(adapter: Path) -> dict:
    """The adapter's adapter_config.json, which peft loads it by: damaged, it is the user's to fix."""
    config_file = adapter / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"adapter_config.json is not JSON ({err}): the adapter is damaged",
                        where=str(config_file), fix="train again, or point merge.adapter at an intact adapter") from None
    if not isinstance(config, dict):
        raise UserError("adapter_config.json is not a JSON object: the adapter is damaged", where=str(config_file),
                        fix="train again, or point merge.adapter at an intact adapter")
    return config


def base_model_id(recipe: Recipe) -> str | None:
    """What peft records as the base model: a hub id or path, or the built model's cache folder."""
    return recipe.model.name_or_path or model_path(recipe)


def describe_base_model(recipe: Recipe) -> str:
    """The base model as a model card's text names it: the recipe's hub id or path, or what a built
    model was built from (its cache folder is this machine's, no name a reader could load)."""
    model = recipe.model
    if model.init_from_config is None:
        return f"`{model.name_or_path}`"
    return f"a model built from its config (init_from_config, {model.init_from_config.get('model_type')})"


def summarize_model(model, quantization: BitsAndBytesConfig | None) -> ModelSummary:
    """Trainable and total parameters (4-bit weights counted as their logical size)."""
    from peft import PeftModel

    from qlora_cli.model.experts import packed_expert_numels

    # peft's count reads only `named_parameters()`, so it serves a model without LoRA as well. It
    # counts a 4-bit Linear weight (Params4bit) at its logical size, but 4-bit experts are plain
    # uint8 tensors under a parametrization: those are corrected from their quantization state.
    trainable, total = PeftModel.get_nb_trainable_parameters(model)
    total += sum(logical - packed for logical, packed in packed_expert_numels(model))
    return ModelSummary(trainable, total, model.get_memory_footprint(), describe_quantization(quantization),
                        lora_by_kind(model))
