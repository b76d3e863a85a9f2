"""Write a model folder in the FP8 layout Mistral publishes (Ministral 3, Mistral Small 4):
the language model's Linear weights in float8_e4m3fn, each with its `weight_scale_inv`
(float32, one per block of `weight_block_size`, or one per tensor beside a static
`activation_scale` as the Ministral 3 checkpoints have), and config.json's
`quantization_config` saying so. Everything else (embeddings, norms, lm_head, vision tower,
projector) stays as saved. Used by the tests and bench/fp8_load.py to build tiny and
mid-size FP8 checkpoints from a 16-bit one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

FP8_MAX = 448.0  # largest float8_e4m3fn
# The language model's projections (attention, MLP, shared and routed experts); not the vision
# tower's or the projector's, which the real checkpoints keep unquantized.
QUANTIZED = re.compile(r"(^|\.)layers\.\d+\..*_proj(\.\d+)?\.weight$|(^|\.)experts\.\d+\.\w+\.weight$")
KEPT = ("vision_tower", "multi_modal_projector")


def quantize_blockwise(weight, block: tuple[int, int] | None):
    """(float8 weight, float32 scale_inv) with weight ~= fp8 * scale_inv per block (or per tensor)."""
    import torch

    w = weight.float()
    if block is None:
        scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
        return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())
    rows, cols = w.shape
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    padded = torch.zeros(grid[0] * br, grid[1] * bc)
    padded[:rows, :cols] = w
    blocks = padded.reshape(grid[0], br, grid[1], bc)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.float()


def save_fp8_checkpoint(source: Path, target: Path, block: tuple[int, int] | None = (128, 128)) -> Path:
    """Copy the model folder `source` to `target` with its language model in FP8."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    index = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                value = f.get_tensor(key)
                if value.ndim == 2 and QUANTIZED.search(key) and not any(k in key for k in KEPT):
                    q, scale = quantize_blockwise(value, block)
                    tensors[key], tensors[f"{key}_scale_inv"] = q, scale
                    if block is None:
                        tensors[key.removesuffix("weight") + "activation_scale"] = torch.ones(())
                else:
                    tensors[key] = value
        save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
        index.update({k: shard.name for k in tensors})
    if (source / "model.safetensors.index.json").is_file():
        (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "dynamic" if block else "static",
        "weight_block_size": list(block) if block else None,
        "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
