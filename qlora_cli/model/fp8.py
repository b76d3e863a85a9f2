"""FP8 checkpoints as Mistral publishes them (Ministral 3, Mistral Small 4): loaded into 4 bits,
each weight dequantized from FP8 as it loads, never the whole model in 16 bits.

Such a checkpoint's config.json holds `quantization_config: {quant_method: fp8, ...}` and its
language model's Linear weights are float8_e4m3fn, each beside a float32 `weight_scale_inv`
(one per block of `weight_block_size`, or one per tensor). transformers dequantizes them itself
(`FineGrainedFP8Config(dequantize=True)`, its `Fp8Dequantize` op), but only into a 16-bit model,
and refuses a `BitsAndBytesConfig` beside the checkpoint's FP8 one. So for a 4-bit (or 8-bit) load
the FP8 section leaves the config, bitsandbytes quantizes as for any 16-bit checkpoint, and
`dequantizing_fp8_on_load` gives that load transformers' own FP8 dequantization ops: each weight
with its scales goes through `Fp8Dequantize`, then straight into bitsandbytes' quantize op.

What transformers cannot dequantize (an FP8 tensor that is not a `*.weight`, such as fused 3-D
expert tensors, whose scales its ops would drop) is refused before anything loads, naming the
16-bit repo to use instead.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from qlora_cli.errors import UserError

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
# The names an FP8 checkpoint gives a weight's scales; transformers renames the last two to the first.
SCALE_SUFFIXES = ("_scale_inv", ".scale", ".qscale_weight")


def fp8_quantization(config) -> dict | None:
    """The checkpoint's FP8 `quantization_config` (top level, or its text model's), or None."""
    for holder in (config, config.get_text_config(decoder=True)):
        found = getattr(holder, "quantization_config", None)
        values = found.to_dict() if hasattr(found, "to_dict") else found
        if isinstance(values, dict) and str(values.get("quant_method", "")).lower() == "fp8":
            return values
    return None


def without_fp8_quantization(config):
    """`config` with its FP8 section removed, so bitsandbytes quantizes the model as it loads."""
    for holder in (config, config.get_text_config(decoder=True)):
        if hasattr(holder, "quantization_config"):
            del holder.quantization_config
    return config


def bf16_repo(name_or_path: str | None) -> str:
    """Where the same weights are published in 16 bits: Mistral's `<repo>-BF16` beside each FP8 repo."""
    from qlora_cli.hub import is_hub_id

    if is_hub_id(name_or_path) and "/" in name_or_path:
        return f"`{name_or_path.removesuffix('-FP8')}-BF16`"
    return "the checkpoint's BF16 release (Mistral publishes `<repo>-BF16` beside each FP8 repo)"


def check_fp8_layout(path: str, revision: str | None, name_or_path: str | None) -> None:
    """Exit 2 before loading when an FP8 checkpoint holds FP8 tensors transformers' dequantization
    would load without their scales: any FP8 tensor that is not a `*.weight` with its scale."""
    dtypes = checkpoint_dtypes(path, revision)
    if dtypes is None:
        return  # not readable before loading (no network): transformers reads it as it loads
    scaled = {_scaled_name(name) for name in dtypes if name.endswith(SCALE_SUFFIXES)}
    unscaled = sorted(name for name, dtype in dtypes.items() if dtype in FP8_DTYPES
                      and not (name.endswith(".weight") and name in scaled))
    if unscaled:
        more = f" and {len(unscaled) - 3} more" if len(unscaled) > 3 else ""
        shown = ", ".join(f"`{n}`" for n in unscaled[:3]) + more
        raise UserError(f"`{name_or_path or path}` is an FP8 checkpoint with FP8 tensors that transformers cannot "
                        f"dequantize while loading ({shown}: not a Linear `weight` with its `weight_scale_inv`)",
                        key="model.name_or_path", fix=f"use {bf16_repo(name_or_path)}")


def check_fp8_folder(folder: Path, name_or_path: str) -> None:
    """`check_fp8_layout` for a local model folder, from its config.json alone (no transformers):
    what `qlora train` checks before it prepares data."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable config where it reads it
    sections = [config.get("quantization_config"), (config.get("text_config") or {}).get("quantization_config")]
    if any(isinstance(q, dict) and str(q.get("quant_method", "")).lower() == "fp8" for q in sections):
        check_fp8_layout(str(folder), None, name_or_path)


def _scaled_name(scale_name: str) -> str:
    """The tensor a scale belongs to: `x.weight_scale_inv`, `x.scale`, `x.qscale_weight` -> `x.weight`."""
    if scale_name.endswith("_scale_inv"):
        return scale_name.removesuffix("_scale_inv")
    return scale_name.rsplit(".", 1)[0] + ".weight"


def checkpoint_dtypes(path: str, revision: str | None) -> dict[str, str] | None:
    """Every tensor's name and safetensors dtype, read from the file headers (no weights):
    a local folder's files, or a hub repo's headers over the network; None when neither answers."""
    folder = Path(path)
    if folder.is_dir():
        dtypes: dict[str, str] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            dtypes.update(_header_dtypes(shard))
        return dtypes
    try:
        from huggingface_hub import get_safetensors_metadata

        metadata = get_safetensors_metadata(path, revision=revision)
    except Exception:  # offline, gated, not a safetensors repo: nothing to check before loading
        return None
    return {name: info.dtype for file in metadata.files_metadata.values() for name, info in file.tensors.items()}


def _header_dtypes(shard: Path) -> dict[str, str]:
    """A safetensors file's tensor dtypes, read by safetensors from its header (no weights); a file
    it cannot read is named, with what to do, before transformers meets it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(shard), "pt") as weights:
            return {name: str(weights.get_slice(name).get_dtype()) for name in weights.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{shard} is cut short or corrupt ({err})", where=str(shard),
                        fix="download or copy the model again") from None


def dequantized_fp8(fp8: dict):
    """transformers' own config for loading an FP8 checkpoint as a 16-bit model (merge, plain LoRA):
    dequantized even on a GPU whose FP8 kernels would keep the weights in FP8."""
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config.from_dict({**fp8, "dequantize": True})


@contextmanager
def dequantizing_fp8_on_load(fp8: dict | None):
    """While a `from_pretrained` with a bitsandbytes config runs inside it, load the FP8 weights of
    the checkpoint whose `quantization_config` was `fp8` as transformers' own FP8 dequantization
    would, each tensor then quantized by bitsandbytes before the next one loads.

    transformers 5.25 has no hook for two quantizations in one load: it builds the list of weight
    conversions once per load (`get_model_conversion_mapping`, which asks the load's quantizer to
    add its own). This wraps that function for the block only and lets transformers' FP8 quantizer,
    in its dequantize mode, add its ops to the list: the scale renames of Mistral's checkpoints and
    `Fp8Dequantize` on every weight with its scales. A load with bitsandbytes quantizing on the fly
    loads one tensor at a time, so the peak holds the 4-bit model and one weight in 16 bits.
    (In bf16 the scales reach the op rounded to bf16, as every tensor quantized on load is cast to
    the model's dtype first: the 4-bit codes then differ in up to 3% of weights by one step from
    quantizing transformers' own bf16 dequantization; in float32 they are equal.)"""
    if fp8 is None:
        yield
        return
    import transformers.modeling_utils as modeling
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    fp8_quantizer = FineGrainedFP8HfQuantizer(dequantized_fp8(fp8), pre_quantized=True)
    original = modeling.get_model_conversion_mapping

    def with_fp8_dequantization(model, *args, **kwargs):
        return fp8_quantizer.update_weight_conversions(original(model, *args, **kwargs), model)

    modeling.get_model_conversion_mapping = with_fp8_dequantization
    try:
        yield
    finally:
        modeling.get_model_conversion_mapping = original
