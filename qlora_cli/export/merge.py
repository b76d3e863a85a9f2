"""`qlora merge`: base model + the run's LoRA adapter -> a standalone model folder.

The adapter was trained against 4-bit weights. By default (`merge.base: dequantized`) it is
merged into the base as training saw it — each weight transformers quantized, dequantized
again — rather than into the original 16-bit weights, which the adapter never saw.

A vision-language model's probe holds an image as well as text, so that LoRA on the vision tower
or a trained projector (`lora.modules_to_save`) is verified too, and its folder gets the image
processor transformers pairs with it (Pixtral's, set to the model's patch size, spatial merge and
maximum image size), so that `AutoModelForImageTextToText` with its image processor loads it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import CARD, atomic_folder, model_card, nearest_existing, remove_stale_temporaries, write_checksums
from qlora_cli.errors import UserError
from qlora_cli.model.load import (adapter_config, base_model_id, describe_base_model, load_adapter_model,
                                  trained_on_4bit)
from qlora_cli.plan.preflight import check_before_merge
from qlora_cli.run_folder import MERGED, merge_adapter_dir, merge_output_dir

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

# Merging rounds each merged weight (W + s·BA) to `merge.dtype` once more, which moves the logits
# by about as much as that dtype's arithmetic does on the same model: a fixed bound would refuse
# correct merges of deep models in bf16 and pass wrong merges of shallow ones. So the bound is
# measured on the model itself (`rounding_tolerance`): a few times how far computing it in float32
# instead of its dtype moves the logits, plus float32's own margin. A merge that dropped or
# mis-scaled the adapter moves them by the adapter's whole effect, well beyond.
FLOAT32_TOLERANCE = 1e-3
ROUNDING_FACTOR = 4
PROBE_TEXT = "[INST] Explain what a LoRA adapter is. [/INST] A LoRA adapter is a small set of low-rank"


class MergeVerificationFailed(Exception):
    """The merged model does not reproduce base + adapter: a bug, not a user mistake (exit 1)."""


@dataclass
class LogitDifference:
    max: float
    mean: float

    def __str__(self) -> str:
        return f"max {self.max:.3g}, mean {self.mean:.3g}"


@dataclass
class MergeResult:
    output: Path
    base: str  # what the adapter was merged into, in words (describe_base)
    merged_vs_unmerged: LogitDifference
    merged_vs_quantized: LogitDifference | None  # against the 4-bit model + adapter, as trained
    adapter_effect: LogitDifference | None = None  # base + adapter against the base alone
    tolerance: float = 0.0  # what the verification allowed (rounding_tolerance)
    lora_differences: list[str] = field(default_factory=list)  # recipe lora keys the adapter was not trained with

    @property
    def adapter_within_rounding(self) -> bool:
        """The adapter moves the probe's logits less than rounding may: the check could not tell
        a merge that lost it."""
        return self.adapter_effect is not None and self.adapter_effect.max <= self.tolerance


def merge(recipe: Recipe, *, overwrite: bool = False) -> MergeResult:
    """Merge the run's adapter into the base model and write `merge.output_dir`, verified."""
    from qlora_cli.model.experts import drop_unchanged_parametrizations
    from qlora_cli.data.chat_template import save_tokenizer
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    check_before_merge(recipe, overwrite=overwrite)
    adapter, output = merge_adapter_dir(recipe), merge_output_dir(recipe)
    differences = lora_differences(adapter, recipe.written("lora"))  # the keys it sets
    remove_stale_temporaries(output.parent, output.name)  # a killed merge leaves a model-sized folder behind
    tokenizer = load_recipe_tokenizer(recipe)
    model = load_adapter_model(recipe, adapter, quantized=False, dequantize=recipe.merge.base == "dequantized")
    check_disk(output, model)
    probe = probe_inputs(model, tokenizer)
    unmerged = _logits(model, probe)
    with model.disable_adapter():
        effect = logit_difference(unmerged, _logits(model, probe))
    tolerance = rounding_tolerance(model, probe, unmerged)
    merged = model.merge_and_unload()
    drop_unchanged_parametrizations(merged)
    difference = check_merged(merged, probe, unmerged, tolerance, recipe.merge.dtype)
    quantized = _distance_from_training_view(recipe, adapter, merged, probe)
    with atomic_folder(output, replace=overwrite) as tmp:
        merged.save_pretrained(str(tmp), max_shard_size=recipe.merge.max_shard_size, safe_serialization=True)
        save_tokenizer(tokenizer, tmp, recipe.data.template)  # with the chat template it trained on
        save_image_processor(tmp, merged, tokenizer)
        _model_card(recipe, adapter, difference, quantized, type(merged).__name__).save(tmp / CARD)
        write_checksums(tmp, made_from=adapter)
    return MergeResult(output, describe_base(recipe), difference, quantized, effect, tolerance, differences)


# The LoRA settings that change the merged weights (W + alpha/r · BA, DoRA's magnitudes)
MERGED_LORA_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora")


def lora_differences(adapter: Path, lora: dict | None) -> list[str]:
    """`lora.KEY: recipe X, adapter Y` for each setting the recipe gives otherwise than the
    adapter was trained with. The adapter's own config is what peft merges (its weights have
    its rank), so these are said, not refused: merge.adapter may name another run's adapter."""
    trained = adapter_config(adapter)
    return [f"lora.{key}: the recipe says {lora[key]!r}, the adapter was trained with {trained[key]!r}"
            for key in MERGED_LORA_KEYS if key in (lora or {}) and key in trained and lora[key] != trained[key]]


def check_disk(output: Path, model) -> None:
    """Refuse before writing when the shards cannot fit."""
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    parent = nearest_existing(output.parent)
    free = shutil.disk_usage(parent).free
    if need * 1.05 > free:
        raise UserError(f"the merged model needs about {need / 2**30:.1f} GiB but {parent} has "
                        f"{free / 2**30:.1f} GiB free", key="merge.output_dir",
                        fix="free space, or set merge.output_dir to another disk")


def rounding_tolerance(model, probe, logits) -> float:
    """How far the merged model's logits may be from `logits` (the unmerged model's): see
    ROUNDING_FACTOR."""
    with computing_in_float32(model):
        exact = _logits(model, probe)
    return FLOAT32_TOLERANCE + ROUNDING_FACTOR * logit_difference(exact, logits).max


def check_merged(merged, probe, unmerged, tolerance: float, dtype: str) -> LogitDifference:
    """The merged model's distance from the unmerged logits; MergeVerificationFailed beyond `tolerance`."""
    difference = logit_difference(_logits(merged, probe), unmerged)
    if not difference.max <= tolerance:  # NaN fails too
        raise MergeVerificationFailed(
            f"the merged model's logits differ from base + adapter by {difference} (tolerance {tolerance:.3g} "
            f"in {dtype}, {ROUNDING_FACTOR}x what {dtype} rounding alone moves them); nothing was written")
    return difference


class computing_in_float32:
    """Forward passes in float32 on the same (16-bit) weights: each module's own parameters are
    upcast just before it runs and restored right after, so memory holds one layer in float32
    at a time, never the whole model. bf16/fp16 -> fp32 -> back is exact."""

    def __init__(self, model):
        self.model, self.dtypes, self.hooks = model, {}, []

    def _upcast(self, module, args) -> None:
        for param in module.parameters(recurse=False):
            self.dtypes[param] = param.dtype
            param.data = param.data.float()

    def _restore(self, module, args, output) -> None:
        for param in module.parameters(recurse=False):
            param.data = param.data.to(self.dtypes.pop(param))

    def __enter__(self):
        for module in self.model.modules():
            if next(module.parameters(recurse=False), None) is not None:
                self.hooks += [module.register_forward_pre_hook(self._upcast),
                               module.register_forward_hook(self._restore)]
        return self.model

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        for param, dtype in self.dtypes.items():  # a forward that failed midway
            param.data = param.data.to(dtype)


def _logits(model, probe: dict):
    import torch

    with torch.no_grad():
        return model(**{key: value.to(model.device) for key, value in probe.items()}).logits.float().cpu()


def probe_inputs(model, tokenizer) -> dict:
    """The probe batch: PROBE_TEXT's ids; for a model that sees images, a question about a drawn
    image (its tokens and pixels as training makes them) before it."""
    from qlora_cli.export.generate import image_settings_of

    from qlora_cli.data.images import image_token_ids

    settings = image_settings_of(model, tokenizer)
    if settings is None or image_token_ids(tokenizer) is None:  # trained on text with a tokenizer without [IMG]
        return {"input_ids": tokenizer(PROBE_TEXT, return_tensors="pt").input_ids}
    import torch

    from qlora_cli.data.collate import pixel_batch
    from qlora_cli.data.templates import encode_prompt

    image = _probe_image()
    ids = encode_prompt([{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": "What is drawn here?"}]}],
                        tokenizer, "mistral")
    return {"input_ids": torch.tensor([ids]), **pixel_batch([image.data], settings)}


def _probe_image():
    """A 48x32 PNG with a gradient and a square on it: every patch differs."""
    import io

    from PIL import Image, ImageDraw

    from qlora_cli.data.images import read_image

    image = Image.linear_gradient("L").resize((48, 32)).convert("RGB")
    ImageDraw.Draw(image).rectangle((8, 8, 24, 24), fill=(200, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return read_image(buffer.getvalue(), "(probe image)", "merge")


def save_image_processor(folder: Path, model, tokenizer) -> None:
    """The processor transformers pairs with a vision-language model, for a model that sees images:
    Pixtral's image processor and processor settings with the model's patch size, spatial merge and
    maximum image size (its resize is bicubic, as mistral-common's). Written as files:
    transformers' PixtralProcessor class needs torchvision, which qlora does not."""
    from qlora_cli.export.generate import image_settings_of

    settings = image_settings_of(model, tokenizer)
    if settings is None:
        return
    import json

    from transformers import PixtralImageProcessorPil

    patch = {"height": settings.patch_size, "width": settings.patch_size}
    PixtralImageProcessorPil(patch_size=patch, size={"longest_edge": settings.max_image_size},
                             image_mean=list(settings.mean), image_std=list(settings.std)).save_pretrained(str(folder))
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": settings.patch_size,
        "spatial_merge_size": settings.spatial_merge_size, "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}, indent=2) + "\n")


def logit_difference(a, b) -> LogitDifference:
    difference = (a - b).abs()
    return LogitDifference(difference.max().item(), difference.mean().item())


def _distance_from_training_view(recipe: Recipe, adapter: Path, merged, probe) -> LogitDifference | None:
    """How far the merged model is from what was trained: the 4-bit base + adapter."""
    if recipe.quantization is None:
        return None
    reference = load_adapter_model(recipe, adapter, quantized=True)
    difference = logit_difference(_logits(merged, probe), _logits(reference, probe))
    del reference
    return difference


def describe_base(recipe: Recipe) -> str:
    """What the adapter is merged into, as the CLI and the model card say it."""
    if recipe.merge.base == "original":
        return "the original unquantized base weights"
    if trained_on_4bit(recipe):
        return "the base weights as training saw them (each 4-bit weight quantized and dequantized again)"
    return "the unquantized base weights (the recipe has no 4-bit quantization: there was nothing to dequantize)"


def _model_card(recipe: Recipe, adapter: Path, difference: LogitDifference, quantized: LogitDifference | None,
                model_class: str):
    base = base_model_id(recipe)
    how = describe_base(recipe)
    versus = f"\n- logits against the 4-bit base + adapter it was trained as: {quantized}" if quantized else ""
    return model_card(MERGED, base, f"""# Merged model

The LoRA adapter `{adapter}` merged into {describe_base_model(recipe)} with `qlora merge`, in {recipe.merge.dtype}.
Merged into {how} (`merge.base: {recipe.merge.base}`).

Verification on a probe batch:
- logits against base + adapter unmerged: {difference}{versus}

Load it with `{model_class}.from_pretrained("<this folder>")` (or its family's transformers auto class).
""", library_name="transformers")
