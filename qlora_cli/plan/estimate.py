"""`qlora plan`: will this recipe fit, how long will it take, is the data sound -- before a weight loads.

Reads only the model's config (a transformers config; `init_from_config` builds one with
`AutoConfig.for_model`), the tokenizer and the prepared data (`prepare_dataset` is
tokenizer-only and caches what `qlora train` will reuse). The arithmetic is in `plan.memory`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import free_bytes, size_text
from qlora_cli.errors import UserError, locate
from qlora_cli.hub import PUBLISHED, is_hub_id, unreachable
from qlora_cli.families import Family
from qlora_cli.model.lora_targets import LoraTargets, planned_targets
from qlora_cli.plan.memory import (
    GiB, MemoryItem, ModelShape, Settings, dtype_bytes, flops_per_token, largest_fitting, lora_tensors, memory_items,
    model_shape, model_skeleton, offloaded_bytes, optimizer_bytes, sampling_kv_item,
)
from qlora_cli.plan.data import DataReport, count_images, data_warnings, describe_data
from qlora_cli.run_folder import merge_output_dir

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

# Dense bf16 TFLOP/s (T4: fp16) from the vendors' data sheets: the name the plan shows -> the words
# of the device name as NVML gives it ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla T4")
# and the peak. The first entry whose words the name holds wins, so the more specific come first
# (an H100 PCIe is not an SXM; an L40S is not an L4).
PEAK_TFLOPS = {
    "H100 PCIe": (("H100", "PCIe"), 756), "H100 NVL": (("H100", "NVL"), 835), "H100 SXM": (("H100",), 989),
    "GH200": (("GH200",), 989), "H200 NVL": (("H200", "NVL"), 835), "H200": (("H200",), 989),
    "A100": (("A100",), 312), "L40S": (("L40S",), 362), "L4": (("L4",), 121), "A10G": (("A10G",), 125),
    "A10": (("A10",), 125), "RTX 4090": (("4090",), 165), "T4": (("T4",), 65),
}
# Where this machine's GPU is unknown (none, or not in the table) the plan times the run on these.
GPU_TFLOPS = {name: PEAK_TFLOPS[name][1] for name in ("A100", "H100 SXM", "H200", "L4", "A10G", "RTX 4090", "T4")}
MFU_RANGE = (0.25, 0.45)
# Host <-> GPU copy rate for activation offloading: what a PCIe 4.0 x16 link sustains with pinned
# memory (32 GB/s raw); PCIe 5.0 (H100/H200 SXM hosts) doubles it.
PCIE_BYTES_PER_S = 25e9
LONG_ROWS = {"neither": {"tiled_mlp": False, "offloading": False},
             "model.tiled_mlp": {"tiled_mlp": True, "offloading": False},
             "training.activation_offloading": {"tiled_mlp": False, "offloading": True},
             "both": {"tiled_mlp": True, "offloading": True}}


@dataclass
class Plan:
    """Everything `qlora plan` reports; `problems` non-empty means the run will not work (exit 2)."""

    model: str
    device: str
    capacity: int | None  # bytes of one device, None when unknown
    batch: int
    seq: int
    memory: list[MemoryItem]
    max_batch: int | None = None
    max_seq: int | None = None
    longest: dict[str, int | None] = field(default_factory=dict)  # LONG_ROWS -> longest row at this batch
    max_positions: int = 0  # the model's max_position_embeddings
    changes: list[str] = field(default_factory=list)
    faster: list[str] = field(default_factory=list)  # changes that still fit and train faster
    data: DataReport | None = None
    steps: int = 0
    epochs: float = 0.0
    flops: float = 0.0  # the whole run
    durations: dict[str, tuple[float, float]] = field(default_factory=dict)  # GPU -> (fast, slow) seconds
    disk: list[MemoryItem] = field(default_factory=list)
    disk_free: dict[str, int] = field(default_factory=dict)
    resume: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the method adds (DPO/KTO)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    disk_short: str | None = None  # the run's checkpoints and adapter cannot fit on its disk (train stops)

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.memory)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    @property
    def ok(self) -> bool:
        return not self.problems

    def short_lines(self) -> list[str]:
        """The few lines `qlora train` prints before it starts."""
        against = "(device memory unknown)" if self.capacity is None else f"of {self.capacity / GiB:.1f} GiB"
        verdict = {None: "", True: " - fits", False: " - DOES NOT FIT"}[self.fits]
        lines = [f"plan: {self.total / GiB:.2f} GiB per device {against}{verdict} "
                 f"(batch {self.batch} x {self.seq:,} tokens, {self.model})"]
        if self.durations:
            name, (fast, slow) = next(iter(self.durations.items()))
            lines.append(f"plan: {self.steps:,} steps, {self.flops:.3g} FLOPs, {format_durations(fast, slow)} on {name} "
                         f"at {MFU_RANGE[0]:.0%} to {MFU_RANGE[1]:.0%} MFU")
        lines += [f"plan: {note}" for note in self.notes]
        lines += [f"plan hint: {f}" for f in self.faster]
        lines += [f"plan warning: {w}" for w in self.warnings]
        lines += [f"plan problem: {p}" for p in self.problems]
        return lines


def plan_recipe(recipe: Recipe, gpu_memory: float | None = None, gpus: int | None = None, *, tokenizer=None,
                prepared=None, checked: bool = False) -> Plan:
    """Plan a run of `recipe` on `gpus` devices of `gpu_memory` GiB (detected when a GPU is present);
    `qlora train` hands over the tokenizer and prepared data it already has, and `checked`: it ran
    the pre-flight's checks of the recipe and the data itself (`qlora plan` reports them as problems)."""
    from qlora_cli.data.images import image_settings
    from qlora_cli.data.prepare import prepare_dataset
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    stand_in = []
    tokenizer = tokenizer or _tokenizer_or_stand_in(recipe, stand_in)
    shape = model_shape(load_model_config(recipe, tokenizer, stand_in))
    device, capacity, tflops = detect_device(gpu_memory)
    settings = recipe_settings(recipe, shape, on_gpu=not recipe.written("training").get("use_cpu"), gpus=gpus or 1)
    prepared = prepared or prepare_dataset(recipe, tokenizer)
    gpus = gpus or 1
    # DPO runs prompt + chosen and prompt + rejected for each pair, KTO each example and its KL twin.
    examples_per_step = recipe.training.per_device_train_batch_size
    batch = examples_per_step * (2 if recipe.method in ("dpo", "kto") else 1)
    data = describe_data(prepared, batch)
    data.images = count_images(prepared, image_settings(tokenizer, shape.config))
    if data.images:
        settings = replace(settings, image_patches=data.images.max_row_patches)
    # GRPO's rows are the prompts; each trains with a completion of up to max_completion_length.
    seq = data.row_width + (recipe.training.max_completion_length if recipe.method == "grpo" else 0)
    plan = Plan(model=recipe.model.name_or_path or f"init_from_config ({shape.layers} layers, {shape.hidden} wide)",
                device=device, capacity=capacity, batch=batch, seq=seq, data=data,
                memory=memory_items(shape, settings, batch, seq), max_positions=shape.max_positions)
    if recipe.method == "grpo":
        sampled = recipe.training.per_device_train_batch_size * recipe.training.steps_per_generation
        plan.memory.append(sampling_kv_item(shape, settings, sampled, seq))
        plan.notes.append(f"grpo: {batch} completions per step, each the longest prompt + max_completion_length "
                          f"({seq:,} tokens); {sampled} sampled at once; the time counts the prompts alone, not the "
                          "completions nor their sampling")
    elif recipe.method != "sft":
        plan.notes.append(f"{recipe.method}: {examples_per_step} examples per step run as {batch} sequences, plus a "
                          "no-grad reference forward with the adapter off (no second copy of the weights)")
    plan.notes += stand_in
    plan.warnings += data_warnings(recipe, prepared, tokenizer)
    plan.warnings += position_warnings(shape, data.row_width)
    if not checked:
        _check_training_data(recipe, prepared, plan)
    _plan_fit(plan, shape, settings, recipe)
    _plan_time(plan, shape, settings, recipe, gpus, tflops)
    _plan_offloading(plan, shape, settings, tflops)
    _plan_disk(plan, shape, settings, recipe, tokenizer)
    plan.resume = describe_resume(recipe)
    return plan


def position_warnings(shape: ModelShape, width: int) -> list[str]:
    """Rows longer than the positions the model's config declares: RoPE computes them (with the rope
    scaling the config gives, applied by transformers), but the model never saw them."""
    if not shape.max_positions or width <= shape.max_positions:
        return []
    rope = (getattr(shape.config.get_text_config(), "rope_parameters", None) or {}) if shape.config else {}
    scaling = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    how = "its rope scaling is `default`" if scaling == "default" else f"even with its rope scaling ({scaling})"
    return [f"rows of {width:,} tokens run past the model's max_position_embeddings ({shape.max_positions:,}; "
            f"{how}): positions beyond it were never trained; use a checkpoint whose config extends them (e.g. "
            "YaRN rope_parameters) or a shorter data.max_length"]


def refuse_unless_fits(plan: Plan, force: bool) -> None:
    """`qlora train` stops here when the plan says the run cannot fit in GPU memory or on its disk,
    unless --force."""
    if plan.disk_short and not force:
        raise UserError(plan.disk_short, key="training.output_dir",
                        fix="free space there, set training.output_dir to another disk, or lower "
                            "training.save_total_limit; add --force to try anyway")
    if plan.fits is False and not force:
        changes = "".join(f"\n    {change}" for change in plan.changes)
        raise UserError(f"this run needs {plan.total / 2**30:.1f} GiB per GPU and the GPU has "
                        f"{plan.capacity / 2**30:.1f} GiB; what to change:{changes}",
                        fix="apply a change above as KEY=VALUE, see `qlora plan`, or add --force to try anyway")


def _tokenizer_or_stand_in(recipe: Recipe, notes: list[str]):
    """The recipe's tokenizer; when the hub cannot be reached and it is not cached, for a checkpoint
    a shipped recipe names, the mistral-common tokenizer of the same vocabulary (said in `notes`)."""
    from qlora_cli.data.tokenizer import load_recipe_tokenizer, load_tokenizer, tokenizer_spec

    try:
        return load_recipe_tokenizer(recipe)
    except UserError:
        spec = tokenizer_spec(recipe.model)
        if spec not in PUBLISHED or not unreachable():
            raise
    notes.append(f"the hub is unreachable ({unreachable()}): {PUBLISHED[spec][1]} stands in for the tokenizer of "
                 f"{spec} (the same vocabulary)")
    return load_tokenizer(PUBLISHED[spec][1])


def load_model_config(recipe: Recipe, tokenizer, notes: list[str] | None = None):
    """The transformers config of the recipe's model; never its weights. When the hub cannot be
    reached and the config is not cached, a checkpoint a shipped recipe names is planned from its
    published architecture (said in `notes`)."""
    from transformers import AutoConfig

    from qlora_cli.families import build_init_config, checkpoint_family

    model = recipe.model
    if model.init_from_config is not None:
        return build_init_config(model.init_from_config, tokenizer)  # as build_init_model does
    if model.name_or_path in PUBLISHED and is_hub_id(model.name_or_path) and unreachable():
        try:
            return AutoConfig.from_pretrained(model.name_or_path, revision=model.revision)  # from the cache
        except OSError:
            if notes is not None:
                notes.append(f"the hub is unreachable ({unreachable()}): {model.name_or_path} is planned from its "
                             "published config.json values")
            return build_init_config(dict(PUBLISHED[model.name_or_path][0]), tokenizer)
    try:
        config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as err:
        # transformers refuses to run a model's own code unless told to; told not to, it reports a
        # model type it does not know instead of the code it did not run
        if "trust_remote_code" in str(err) or (not model.trust_remote_code and _ships_own_code(model)):
            raise UserError(f"model `{model.name_or_path}` ships custom code, which qlora does not run unless the "
                            "recipe allows it", key="model.trust_remote_code",
                            fix="read that code, then set model.trust_remote_code: true") from None
        raise UserError(f"cannot read the config of `{model.name_or_path}`: {err}", key="model.name_or_path",
                        fix="give a local folder with config.json, or a hub id (needs network)") from None
    checkpoint_family(config, trust_remote_code=model.trust_remote_code)  # a type qlora does not train: exit 2
    return config


def _ships_own_code(model) -> bool:
    """Whether the config.json of `model.name_or_path` maps the auto classes to its own Python code."""
    from transformers import PretrainedConfig

    try:
        values, _ = PretrainedConfig.get_config_dict(model.name_or_path, revision=model.revision)
    except (OSError, ValueError):
        return False
    return "auto_map" in values


def detect_device(gpu_memory: float | None) -> tuple[str, int | None, float | None]:
    """(description, bytes per device, dense bf16 peak TFLOP/s or None) of --gpu-memory, else this
    machine's first visible GPU as NVML reads it: no CUDA context, so the `--nproc` launcher plans
    in its own process and leaves every GPU to its workers."""
    if gpu_memory is not None:
        return f"--gpu-memory {gpu_memory:g} GiB", int(gpu_memory * GiB), None
    found = visible_gpu()
    if found is None:
        return "unknown (no GPU here; give --gpu-memory GiB)", None, None
    name, total = found
    return name, total, peak_tflops(name)


def visible_gpu() -> tuple[str, int] | None:
    """(name, bytes of memory) of the first GPU CUDA_VISIBLE_DEVICES leaves visible; None without
    an NVIDIA driver (NVML is part of it) or with no GPU visible."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, no library: no GPU to plan for
        return None
    try:
        handle = _first_visible(pynvml)
        if handle is None:
            return None
        return pynvml.nvmlDeviceGetName(handle), pynvml.nvmlDeviceGetMemoryInfo(handle).total
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _first_visible(pynvml):
    """NVML counts every GPU; CUDA sees those CUDA_VISIBLE_DEVICES names (indices or UUIDs).

    An index is read as NVML's, which counts in PCI bus order; CUDA counts fastest first unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID, so the two agree only under that setting, or on a machine whose
    GPUs are all one model (equals are ordered by bus)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return pynvml.nvmlDeviceGetHandleByIndex(0) if pynvml.nvmlDeviceGetCount() else None
    first = visible.split(",")[0].strip()
    if not first or first.startswith("-"):
        return None  # CUDA_VISIBLE_DEVICES="" or -1: CUDA sees no GPU
    if first.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(first))
    return pynvml.nvmlDeviceGetHandleByUUID(first)


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU NVML calls `name`, None for a GPU not in the table."""
    words = set(re.split(r"[^A-Za-z0-9]+", name))
    return next((tflops for needed, tflops in PEAK_TFLOPS.values() if words.issuperset(needed)), None)


def recipe_settings(recipe: Recipe, shape: ModelShape, on_gpu: bool = True, gpus: int = 1) -> Settings:
    """The recipe's choices that memory depends on, with LoRA targets resolved against the model."""
    from peft import LoraConfig

    from qlora_cli.families import kept_16bit

    bnb, training = recipe.quantization, recipe.training
    quant = "none" if bnb is None else bnb.bnb_4bit_quant_type if bnb.load_in_4bit else "int8" if bnb.load_in_8bit else "none"
    q = (kept_16bit(shape.family, recipe.written("quantization")) if shape.family else recipe.written("quantization")) or {}
    lora = recipe.lora or LoraConfig()  # no LoRA (no targets either): peft's defaults
    targets = lora_targets(recipe, shape)
    mixed = training.bf16 or training.fp16
    attn = recipe.model.attn_implementation or "sdpa"
    sharded = bool(training.fsdp)
    return Settings(
        quant=quant, double_quant=bnb is not None and bnb.bnb_4bit_use_double_quant, model_dtype=recipe.model.dtype,
        skip_modules=tuple(q.get("llm_int8_skip_modules") or ()), lora_r=lora.r,
        lora_targets=targets.modules, expert_lora=targets.tensors,
        lora_dropout=lora.lora_dropout, use_dora=lora.use_dora, optim=training.optim.value,
        checkpointing=training.activation_checkpointing or (sharded and _fsdp_checkpointing(recipe.written("training"))),
        autocast_bytes=2 if mixed else None, packed_mask=recipe.data.packing and "flash" not in attn,
        eager_attention=attn == "eager", on_gpu=on_gpu, chunked_loss=recipe.model.chunked_loss,
        tiled_mlp=recipe.model.tiled_mlp, offloading=on_gpu and bool(recipe.written("training").get("activation_offloading")),
        log_probs=recipe.method != "sft", upcast=recipe.model.upcast_to_fp32 and not sharded,
        lora_bytes=dtype_bytes(recipe.model.dtype) if sharded else 4,  # see load_trainable_model
        shards=gpus if sharded else 1,
    )


def _fsdp_checkpointing(training: dict) -> bool:
    """FSDP's own activation checkpointing (`fsdp_config.activation_checkpointing`)."""
    config = training.get("fsdp_config")
    return isinstance(config, dict) and bool(config.get("activation_checkpointing"))


def lora_targets(recipe: Recipe, shape: ModelShape) -> LoraTargets:
    """The Linear layers and the tensors outside them that the recipe's LoRA reaches, as peft
    decides on the model's skeleton (qlora_cli.model.lora_targets)."""
    if not recipe.lora:
        return LoraTargets()
    family = shape.family or Family(shape.config.model_type, "")
    return planned_targets(recipe, model_skeleton(shape.config), family)


def _check_training_data(recipe: Recipe, prepared, plan: Plan) -> None:
    """The pre-flight's problems with the recipe and the data, each at the file:line of its key."""
    from qlora_cli.plan.preflight import check_prepared_data, check_starting_adapter, check_trainable

    for check in (lambda: check_trainable(recipe), lambda: check_starting_adapter(recipe),
                  lambda: check_prepared_data(recipe, prepared)):
        try:
            check()
        except UserError as err:
            plan.problems += [f"{e.where}: {e.message}" if e.where else e.message
                              for e in locate(err, recipe.origins).errors]


def _plan_fit(plan: Plan, shape: ModelShape, s: Settings, recipe: Recipe) -> None:
    """Largest batch and length that fit, and what to change when the recipe does not."""
    if plan.capacity is None:
        return

    beside = plan.total - sum(item.bytes for item in memory_items(shape, s, plan.batch, plan.seq))  # GRPO's KV cache

    def total(batch: int, seq: int, settings: Settings = s) -> int:
        return sum(item.bytes for item in memory_items(shape, settings, batch, seq)) + beside

    plan.max_batch = largest_fitting(1024, lambda b: total(b, plan.seq) <= plan.capacity)
    positions = max(plan.seq, shape.max_positions)
    plan.max_seq = largest_fitting(positions, lambda n: total(plan.batch, n) <= plan.capacity)
    if s.on_gpu and not s.shards > 1:
        plan.longest = {name: largest_fitting(1 << 24, lambda n, c=replace(s, **change): total(plan.batch, n, c) <= plan.capacity)
                        for name, change in LONG_ROWS.items()}
    if plan.fits:
        plan.faster = _faster(plan, shape, s, recipe, total)
        return
    gib = plan.capacity / GiB
    plan.problems.append(f"needs {plan.total / GiB:.1f} GiB per device; the device has {gib:.1f} GiB")
    plan.changes = _changes(plan, shape, s, recipe, total)


def _faster(plan: Plan, shape: ModelShape, s: Settings, recipe: Recipe, total) -> list[str]:
    """Activation checkpointing recomputes every layer's forward pass; say so when the run fits without it."""

    if not s.checkpointing:
        return []
    written = recipe.written("training")  # the keys that turned it on
    keys = [k for k in ("activation_checkpointing", "gradient_checkpointing") if written.get(k)]
    if recipe.training.fsdp and _fsdp_checkpointing(written):
        keys.append("fsdp_config.activation_checkpointing")
    plain = replace(s, checkpointing=False)
    need = total(plan.batch, plan.seq, plain)
    if need > plan.capacity:
        return []
    context = plan.data.mean_context if plan.data else plan.seq / 2
    saved = 1 - flops_per_token(shape, plain, context) / flops_per_token(shape, s, context)
    change = " ".join(f"training.{key}=false" for key in keys)
    return [f"{change} also fits ({need / GiB:.1f} GiB of {plan.capacity / GiB:.1f}) "
            f"and skips the second forward pass: {saved:.0%} fewer FLOPs per step"]


def _changes(plan: Plan, shape: ModelShape, s: Settings, recipe: Recipe, total) -> list[str]:
    changes, accumulate = [], recipe.training.gradient_accumulation_steps
    sharded = bool(recipe.training.fsdp)
    if not s.checkpointing:
        s = replace(s, checkpointing=True)
        key = "training.fsdp_config.activation_checkpointing" if sharded else "training.activation_checkpointing"
        changes.append(f"{key}=true ({total(plan.batch, plan.seq, s) / GiB:.1f} GiB)")
    if "8bit" not in s.optim and s.on_gpu and not sharded:  # bitsandbytes' optimizers do not shard
        changes.append("training.optim=paged_adamw_8bit (optimizer state 4x smaller)")
    if not s.quantized:
        changes.append("quantization.load_in_4bit=true quantization.bnb_4bit_quant_type=nf4")
    if s.on_gpu and not (s.tiled_mlp and s.offloading):
        long = replace(s, tiled_mlp=True, offloading=True)
        need = total(plan.batch, plan.seq, long)
        keys = [k for k, on in (("model.tiled_mlp=true", s.tiled_mlp), ("training.activation_offloading=true", s.offloading))
                if not on]
        changes.append(f"{' '.join(keys)} ({need / GiB:.1f} GiB; same loss, the rows' activations in slices "
                       f"and in CPU memory){'' if need <= plan.capacity else ': still too much alone'}")
        s = long if need < total(plan.batch, plan.seq, s) else s
    rows = accumulate * plan.batch  # per optimizer step and device: keep it
    fitting = largest_fitting(plan.batch, lambda b: total(b, plan.seq, s) <= plan.capacity)
    batch = max((b for b in range(1, (fitting or 0) + 1) if rows % b == 0), default=None)
    if batch and batch < plan.batch:
        changes.append(f"training.per_device_train_batch_size={batch} "
                       f"training.gradient_accumulation_steps={rows // batch} (same effective batch)")
    seq = largest_fitting(plan.seq, lambda n: total(1, n, s) <= plan.capacity)
    if seq and not batch:
        changes.append(f"training.per_device_train_batch_size=1 data.max_length={seq}")
    if not seq:
        fixed = sum(i.bytes for i in plan.memory if i.name.startswith(("base", "unquantized", "CUDA", "FSDP")))
        more = "more GPUs (--gpus / --nproc)" if sharded else "FSDP sharding (recipes/mistral7b-fsdp.yaml)"
        changes.append(f"weights and CUDA context alone take {fixed / GiB:.1f} GiB: a larger GPU, or {more}")
    return changes


def _plan_time(plan: Plan, shape: ModelShape, s: Settings, recipe: Recipe, gpus: int, peak: float | None) -> None:
    training, data = recipe.training, plan.data
    accumulate = training.gradient_accumulation_steps
    per_epoch = max(1, math.ceil(math.ceil(data.rows / (plan.batch * gpus)) / accumulate))
    max_steps = training.max_steps
    epochs = max_steps / per_epoch if max_steps > 0 else float(training.num_train_epochs)
    plan.steps = max_steps if max_steps > 0 else math.ceil(per_epoch * epochs)
    plan.epochs = epochs
    per_token = flops_per_token(shape, s, data.mean_context)
    if recipe.method != "sft":  # the reference log-probs: one forward, about half of a step without checkpointing
        per_token += flops_per_token(shape, replace(s, checkpointing=False), data.mean_context) / 2
    plan.flops = per_token * data.tokens_computed * epochs
    rates = {f"this GPU ({plan.device}, {peak:.0f} TFLOP/s peak)": peak} if peak else GPU_TFLOPS
    for name, tflops in rates.items():
        label = f"{gpus} x {name}" if gpus > 1 else name
        seconds = plan.flops / (gpus * tflops * 1e12)
        plan.durations[label] = (seconds / MFU_RANGE[1], seconds / MFU_RANGE[0])


def _plan_offloading(plan: Plan, shape: ModelShape, s: Settings, peak: float | None) -> None:
    """What activation offloading costs: host memory, and PCIe traffic against the compute it hides behind."""
    if not s.offloading:
        return
    host = offloaded_bytes(shape, s, plan.batch, plan.seq)
    copy = 2 * host / PCIE_BYTES_PER_S  # to the host in the forward, back in the backward
    context = plan.data.mean_context if plan.data else plan.seq / 2
    tflops = peak or PEAK_TFLOPS["H100 SXM"][1]
    compute = flops_per_token(shape, s, context) * plan.batch * plan.seq / (tflops * 1e12 * MFU_RANGE[1])
    gpu = f"this GPU" if peak else "an H100 SXM"
    plan.notes.append(f"activation offloading: {host / GiB:.2f} GiB of pinned CPU memory per process; "
                      f"{2 * host / GiB:.2f} GiB over PCIe per micro-batch, {copy:.2g} s at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s "
                      f"against {compute:.2g} s of compute on {gpu} at {MFU_RANGE[1]:.0%} MFU"
                      + (": hidden behind it" if copy <= compute else ": the copies, not the GPU, set the pace"))


def _plan_disk(plan: Plan, shape: ModelShape, s: Settings, recipe: Recipe, tokenizer) -> None:
    training = recipe.training
    tensors = lora_tensors(shape, s)
    tokenizer_bytes = len(tokenizer.backend_tokenizer.to_str()) + 16_384
    adapter = s.lora_bytes * sum(tensors) + tokenizer_bytes
    checkpoint = adapter + optimizer_bytes(s.optim, tensors) + 64 * 1024  # + rng, scheduler, trainer state
    saves = {"no": 0, "epoch": math.ceil(plan.epochs)}.get(training.save_strategy.value)
    if saves is None:
        # every save_steps, and once more at the last step (the Trainer always saves there)
        saves = math.ceil(plan.steps / max(int(training.save_steps), 1))
    limit = training.save_total_limit
    kept = min(saves, int(limit) + 1) if limit else saves  # the Trainer writes a new one before rotating
    merged_dir = merge_output_dir(recipe)
    merged = shape.total_params * dtype_bytes(recipe.merge.dtype)
    plan.disk = [MemoryItem("checkpoints", kept * checkpoint, f"{kept} kept x {checkpoint / 2**20:,.1f} MiB "
                            "(adapter + optimizer state + rng)"),
                 MemoryItem("adapter", adapter, f"{sum(tensors):,} params ({s.lora_bytes} bytes each) + tokenizer"),
                 MemoryItem("merged model", merged, f"{shape.total_params:,} params in {recipe.merge.dtype}")]
    run_free, merged_free = free_bytes(Path(recipe.run_dir)), free_bytes(merged_dir)
    plan.disk_free = {str(recipe.run_dir): run_free, str(merged_dir): merged_free}
    if kept * checkpoint + adapter > run_free:
        plan.disk_short = (f"the run needs {size_text(kept * checkpoint + adapter)} on disk; "
                           f"{size_text(run_free)} free under {recipe.run_dir}")
        plan.problems.append(plan.disk_short)
    if merged > merged_free:
        plan.warnings.append(f"`qlora merge` will need {size_text(merged)}; {size_text(merged_free)} free "
                             f"under {merged_dir}")


def describe_resume(recipe: Recipe) -> list[str]:
    """Whether an existing run folder can be resumed, and what differs from its recipe."""
    from qlora_cli.run_folder import RunFolder, recipe_differences, weight_keys

    run = RunFolder(recipe.run_dir)
    if not run.root.is_dir() or not any(run.root.iterdir()):
        return []
    last = run.last_checkpoint()
    if last is None:
        return [f"{run.root} exists without a complete checkpoint: --resume will refuse; --overwrite starts over"]
    differing = recipe_differences(recipe, run)
    changed = weight_keys(differing)
    if changed:
        lines = [f"{run.root}: last complete checkpoint {last.name}; --resume will refuse: the recipe changes "
                 f"{', '.join(changed)}, which the checkpoint's weights depend on"]
    else:
        lines = [f"{run.root}: last complete checkpoint {last.name}; --resume continues from it"]
    if differing:
        lines.append(f"the recipe differs from the run's recipe.yaml in: {', '.join(differing[:8])}"
                     + (f" and {len(differing) - 8} more" if len(differing) > 8 else ""))
    else:
        lines.append("the recipe matches the run's recipe.yaml")
    return lines


def format_duration(seconds: float) -> str:
    """`2.5 h`, `12.0 min`, `40 s`, or `under 1 s`."""
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 1 else "under 1 s"


def format_durations(fast: float, slow: float) -> str:
    """`2.5 h to 4.5 h`, or one figure where both read the same (`under 1 s`)."""
    fast_text, slow_text = format_duration(fast), format_duration(slow)
    return fast_text if fast_text == slow_text else f"{fast_text} to {slow_text}"
