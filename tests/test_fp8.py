"""qlora_cli.model.fp8: a checkpoint in Mistral's FP8 layout (Ministral 3, Mistral Small 4) loads
into 4 bits through the real loader, each weight as transformers' own FP8 dequantization gives
it; one it cannot dequantize exits 2 before loading, naming the 16-bit repo."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import assert_user_error, qlora
from fp8_checkpoint import save_fp8_checkpoint
from qlora_cli.recipe.load import load_recipe
from test_families import family_recipe

LAYOUTS = {"blocks": (32, 32), "per-tensor": None}  # Mistral Small 4's block scales; Ministral 3's one scale


def fp8_recipe(folder, checkpoint, **sections) -> str:
    """The tiny mistral3 recipe with its model read from `checkpoint` (not built from its config)."""
    path = folder / "fp8.yaml"
    body = {"extends": family_recipe(folder, "mistral3", "base"), "model": {"init_from_config": None,
                                                                    "name_or_path": str(checkpoint)}, **sections}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory, qlora_cache):
    """The tiny mistral3 (vision tower, 2-layer language model) saved in bfloat16, as Mistral's 16-bit repos."""
    import torch
    from transformers import AutoModelForImageTextToText

    from qlora_cli.model.load import model_path

    folder = tmp_path_factory.mktemp("fp8")
    built = model_path(load_recipe([family_recipe(folder, "mistral3")]))
    target = folder / "bf16"
    AutoModelForImageTextToText.from_pretrained(built, dtype=torch.bfloat16).save_pretrained(target)
    return target


def fp8_layout(tiny_bf16, layout: str):
    target = tiny_bf16.parent / f"fp8-{layout}"
    return target if target.is_dir() else save_fp8_checkpoint(tiny_bf16, target, LAYOUTS[layout])


@pytest.fixture(scope="module", params=list(LAYOUTS))
def tiny_fp8(request, tiny_bf16):
    """The tiny mistral3 in each FP8 layout."""
    return fp8_layout(tiny_bf16, request.param)


@pytest.mark.slow
def test_the_fp8_checkpoint_is_in_mistrals_layout(tiny_fp8):
    from safetensors import safe_open

    config = json.loads((tiny_fp8 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8"
    with safe_open(str(tiny_fp8 / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("language_model.model.layers.0.mlp.down_proj.weight")
        scale = f.get_tensor("language_model.model.layers.0.mlp.down_proj.weight_scale_inv")
        vision = f.get_tensor("vision_tower.transformer.layers.0.attention.q_proj.weight")
    assert str(weight.dtype) == "torch.float8_e4m3fn" and scale.dtype.is_floating_point
    assert scale.shape == ((2, 4) if config["weight_block_size"] else ())  # (64, 128) in 32 x 32 blocks
    assert str(vision.dtype) == "torch.bfloat16"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_fp8_checkpoint_loads_in_4_bits_as_transformers_dequantizes_it(tiny_fp8, tmp_path, dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    from transformers import AutoModelForImageTextToText

    from qlora_cli.model.load import load_base_model

    recipe = load_recipe([fp8_recipe(tmp_path, tiny_fp8)], [f"model.dtype={dtype}",
                                                           f"quantization.bnb_4bit_compute_dtype={dtype}"])
    model = load_base_model(recipe)
    # transformers' own FP8 dequantization, in the same dtype (a 16-bit copy: only for the test)
    reference = dict(AutoModelForImageTextToText.from_pretrained(tiny_fp8, dtype=getattr(torch, dtype))
                     .named_modules())
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * 7 and all(".language_model.layers." in n for n in quantized)
    equal = total = 0
    for name, module in quantized.items():
        codes, state = F.quantize_4bit(reference[name].weight.data.contiguous(), quant_type="nf4",
                                       blocksize=module.weight.quant_state.blocksize)
        equal += (codes.flatten() == module.weight.data.flatten()).sum().item()
        total += codes.numel()
        dequantized = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert (dequantized.float() - reference[name].weight.float()).abs().max() < 0.25 * reference[
            name].weight.abs().max()  # NF4 of what FP8 holds, not FP8 bytes read as numbers
    # float32: the same 4-bit codes; bf16: the scales were rounded to bf16 first (see fp8.py)
    assert equal / total == 1.0 if dtype == "float32" else equal / total > 0.95
    vision = [n for n, m in model.named_modules() if "vision_tower" in n and isinstance(m, torch.nn.Linear)]
    assert vision and all(torch.equal(model.get_submodule(n).weight, reference[n].weight) for n in vision)


@pytest.mark.slow
def test_qlora_trains_and_merges_an_fp8_checkpoint(tiny_bf16, tmp_path, sample_subset, prepared_dir):
    tiny_fp8 = fp8_layout(tiny_bf16, "blocks")
    recipe = fp8_recipe(tmp_path, tiny_fp8, data={"sources": [{"path": str(sample_subset), "format": "text"}],
                                                  "prepared_dir": str(prepared_dir), "max_length": 64},
                        training={"output_dir": str(tmp_path / "run"), "max_steps": 2, "save_steps": 2})
    result = qlora("train", recipe)
    assert result.exit_code == 0, result.output
    assert "4-bit nf4" in result.output
    result = qlora("merge", tmp_path / "run")  # the merge base: the FP8 weights dequantized (not FP8 on a GPU)
    assert result.exit_code == 0, result.output
    assert "logits vs base + adapter" in result.output
    merged = json.loads((tmp_path / "run" / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged  # a plain 16/32-bit model


def write_checkpoint(folder, config: dict, tensors: dict) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v if isinstance(v, torch.Tensor) else torch.zeros(v) for k, v in tensors.items()},
              str(folder / "model.safetensors"))


def test_fp8_tensors_transformers_cannot_dequantize_exit_2_before_loading_naming_the_bf16_repo(tmp_path):
    import torch

    # Fused 3-D expert tensors in FP8: transformers' FP8 ops dequantize `*.weight` only and would
    # load these as raw FP8 numbers, dropping their scales.
    folder = tmp_path / "Mistral-Small-4-fp8"
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    write_checkpoint(folder, {"model_type": "mistral4", "quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}},
        {experts: torch.zeros(4, 8, 8).to(torch.float8_e4m3fn), f"{experts}_scale_inv": (4, 1, 1)})
    result = qlora("train", "tiny-mistral", "~model.init_from_config", f"model.name_or_path={folder}")
    assert_user_error(result, "FP8", experts, "BF16", wrapped=True)


def test_the_bf16_repo_is_named_after_the_fp8_one():
    from qlora_cli.model.fp8 import bf16_repo

    assert bf16_repo("mistralai/Ministral-3-8B-Instruct-2512") == "`mistralai/Ministral-3-8B-Instruct-2512-BF16`"
    assert "-BF16" in bf16_repo("/models/local-fp8")


@pytest.mark.slow
def test_mistral_small_4s_fp8_layout_loads_with_4_bit_experts(tmp_path):
    # Mistral Small 4 with its vision tower: a mistral3 whose mistral4 text model has FP8 Linear
    # weights (attention, shared experts) beside fused expert tensors, which bitsandbytes-4-bit
    # experts (qlora_cli.model.experts) take as they load.
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    from transformers import AutoModelForImageTextToText

    from qlora_cli.model.experts import expert_parameters, is_quantized
    from qlora_cli.model.load import load_base_model, model_path

    built = model_path(load_recipe([family_recipe(tmp_path, "mistral3-mistral4")]))
    checkpoint = save_fp8_checkpoint(built, tmp_path / "fp8", (16, 16))
    recipe = load_recipe([fp8_recipe(tmp_path, checkpoint)])
    model = load_base_model(recipe)
    reference = dict(AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).named_modules())
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any("shared_experts" in n for n in quantized) and any("kv_b_proj" in n for n in quantized)
    for name, module in quantized.items():
        codes, _ = F.quantize_4bit(reference[name].weight.data.contiguous(), quant_type="nf4",
                                   blocksize=module.weight.quant_state.blocksize)
        assert torch.equal(codes.flatten(), module.weight.data.flatten()), name
    experts = expert_parameters(model, ("mlp.experts",))
    assert len(experts) == 2 * 2 and all(is_quantized(m, p) for _, m, p in experts)


def test_a_cut_shard_in_a_model_folder_is_named_before_loading(tmp_path):
    folder = tmp_path / "Ministral-fp8"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut in its header
    result = qlora("train", "tiny-mistral", "~model.init_from_config", f"model.name_or_path={folder}")
    assert_user_error(result, "model.safetensors", "cut short or corrupt", "download or copy", wrapped=True)
