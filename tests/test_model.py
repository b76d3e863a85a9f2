"""model/load.py: the tiny recipe loads as a 4-bit base with trainable LoRA on the CPU, its random base
model is built once and reused, and custom model code never runs unless the recipe allows it."""

from __future__ import annotations

import json

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16

from qlora_cli.errors import UserError
from qlora_cli.model.load import build_init_model, load_base_model, summarize_model
from qlora_cli.data.tokenizer import load_recipe_tokenizer
from qlora_cli.recipe.load import load_recipe

from conftest import TINY_OVERRIDES


def lora_pairs(model):
    """(base Linear4bit, lora_A, lora_B) for every LoRA-wrapped layer."""
    import bitsandbytes as bnb

    return [
        (module.base_layer, module.lora_A["default"], module.lora_B["default"])
        for module in model.modules()
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), bnb.nn.Linear4bit)
    ]


@pytest.mark.slow
def test_the_tiny_recipe_loads_with_4bit_linear_layers(tiny_model, tiny_recipe):
    import bitsandbytes as bnb
    from peft import PeftModel

    assert isinstance(tiny_model, PeftModel)
    layers = tiny_recipe.model.init_from_config["num_hidden_layers"]
    quantized = [m for m in tiny_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * layers  # q, k, v, o, gate, up, down in each decoder layer
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in quantized)
    assert all(m.compute_dtype == torch.float32 for m in quantized)


@pytest.mark.slow
def test_lora_wraps_every_linear_layer_and_only_lora_weights_train(tiny_model):
    pairs = lora_pairs(tiny_model)
    assert len(pairs) == 14  # target_modules: all-linear
    for name, param in tiny_model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name


@pytest.mark.slow
def test_the_trainable_count_is_exactly_the_lora_shapes(tiny_model, tiny_recipe):
    r = tiny_recipe.lora.r
    pairs = lora_pairs(tiny_model)
    assert all(a.weight.shape == (r, base.in_features) and b.weight.shape == (base.out_features, r)
               for base, a, b in pairs)
    expected = sum(r * (base.in_features + base.out_features) for base, _, _ in pairs)
    summary = summarize_model(tiny_model, tiny_recipe.quantization)
    assert summary.trainable == expected == 8192  # 2 layers x 4 x (4x(64+64) + 2x(64+32) + 3x(64+128))
    assert summary.total == expected + 2 * 32000 * 64 + 2 * 36864 + 5 * 64  # 4-bit weights at logical size
    assert summary.quantization == "4-bit nf4 + double quantization, compute in float32"


@pytest.mark.slow
@pytest.mark.parametrize("upcast", [False, True])
def test_unquantized_weights_stay_in_model_dtype_unless_upcast_to_fp32(upcast):
    from qlora_cli.model.load import load_trainable_model

    recipe = load_recipe(["tiny-mistral"], [*TINY_OVERRIDES, "model.dtype=bfloat16",
                                            "quantization.bnb_4bit_compute_dtype=bfloat16",
                                            f"model.upcast_to_fp32={str(upcast).lower()}"])
    model = load_trainable_model(recipe)
    base = model.get_base_model()
    kept = torch.float32 if upcast else torch.bfloat16
    unquantized = [base.get_input_embeddings().weight, base.get_output_embeddings().weight, base.model.norm.weight,
                   *(p for n, p in base.named_parameters() if "layernorm" in n)]
    assert len(unquantized) == 3 + 2 * 2 and all(p.dtype == kept for p in unquantized)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # peft's fp32 LoRA
    ids = torch.tensor([[1, 733, 16289, 28793, 2]])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert hidden[0].dtype == kept  # the residual stream
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def lora_gradients(model, ids) -> list:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]


@pytest.mark.slow
@pytest.mark.skipif(not has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit layers only on a CPU with AVX512-BF16")
def test_an_evaluation_forward_leaves_the_training_gradients_as_they_were():
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer at its first no-grad eval
    forward for a bf16 kernel that passes no gradient to its input; qlora's loader turns that off, so
    an evaluation or probe between steps does not change what training computes (on a CPU without
    the instruction bitsandbytes never repacks, and this holds by construction)."""
    from qlora_cli.model.load import load_trainable_model

    recipe = load_recipe(["tiny-mistral"], [*TINY_OVERRIDES, "model.dtype=bfloat16",
                                            "quantization.bnb_4bit_compute_dtype=bfloat16"])
    model = load_trainable_model(recipe)
    torch.manual_seed(0)
    for _, _, b in lora_pairs(model):  # LoRA B starts at zero: give every A a gradient to lose
        torch.nn.init.normal_(b.weight, std=0.02)
    ids = torch.randint(3, 32000, (2, 24))
    model.train()
    before = lora_gradients(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = lora_gradients(model, ids)
    repacked = [base for base, _, _ in lora_pairs(model) if getattr(base.weight.quant_state, "packing_format_for_cpu", False)]
    assert not repacked
    assert all(a.abs().sum() > 0 for a in before)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.slow
def test_the_init_from_config_model_is_built_once_and_reused(tiny_model, tiny_recipe, qlora_cache):
    tokenizer = load_recipe_tokenizer(tiny_recipe)
    folder = build_init_model(tiny_recipe.model.init_from_config, tokenizer)
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_init_model(tiny_recipe.model.init_from_config, tokenizer) == folder
    assert weights.stat().st_mtime_ns == stamp
    built = [p.name for p in (qlora_cache / "models").iterdir()]
    assert folder.name in built and not [name for name in built if name.startswith(".")]  # nothing half-written
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["vocab_size"]) == (64, 32000)
    # the trainable model was loaded from that folder, and a second load gets the same weights
    assert tiny_model.base_model.model.config._name_or_path == str(folder)
    again = load_base_model(tiny_recipe)
    assert torch.equal(again.model.embed_tokens.weight, tiny_model.base_model.model.model.embed_tokens.weight)


@pytest.mark.slow
def test_a_different_init_config_builds_a_different_model(tiny_recipe):
    tokenizer = load_recipe_tokenizer(tiny_recipe)
    first = build_init_model(tiny_recipe.model.init_from_config, tokenizer)
    other = build_init_model({**tiny_recipe.model.init_from_config, "seed": 1}, tokenizer)
    assert other != first and (other / "model.safetensors").is_file()


def test_init_from_config_without_model_type_is_a_recipe_error():
    with pytest.raises(UserError, match="needs `model_type`") as error:
        load_recipe(["tiny-mistral"], ["~model.init_from_config.model_type"])
    assert "model.init_from_config" in str(error.value)


def test_the_tiny_recipe_uses_the_mistral_common_v1_tokenizer(tiny_recipe):
    tokenizer = load_recipe_tokenizer(tiny_recipe)
    assert tokenizer("[INST]", add_special_tokens=False).input_ids == [733, 16289, 28793]
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.fixture(scope="module")
def custom_code_model(tmp_path_factory, tiny_recipe):
    """A local model folder whose config asks to run its own Python file, which leaves a mark."""
    folder = tmp_path_factory.mktemp("custom-code-model")
    built = build_init_model(tiny_recipe.model.init_from_config, load_recipe_tokenizer(tiny_recipe))
    config = json.loads((built / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    config["model_type"] = "qlora-test-custom"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(built / "model.safetensors")
    (folder / "custom.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('ran').touch()\n"
        "from transformers import MistralConfig, MistralForCausalLM\n"
        "class CustomConfig(MistralConfig):\n    model_type = 'qlora-test-custom'\n"
        "class CustomModel(MistralForCausalLM):\n    config_class = CustomConfig\n"
    )
    return folder


def custom_code_recipe(folder, *overrides):
    return load_recipe(["tiny-mistral"], [f"model.name_or_path={folder}", "~model.init_from_config",
                                          "~quantization", *overrides])


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Where transformers copies a model's own code before running it (default: ~/.cache)."""
    folder = tmp_path / "modules"
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(folder))
    return folder


def code_ran(folder) -> bool:
    return folder.exists() and any(folder.rglob("ran"))


@pytest.mark.slow
def test_custom_model_code_does_not_run_unless_the_recipe_allows_it(custom_code_model, modules_cache):
    recipe = custom_code_recipe(custom_code_model)
    assert recipe.model.trust_remote_code is False
    with pytest.raises(UserError, match="custom code") as excinfo:
        load_base_model(recipe)
    assert excinfo.value.key == "model.trust_remote_code"
    assert not code_ran(modules_cache) and not code_ran(custom_code_model)


@pytest.mark.slow
def test_trust_remote_code_set_in_the_recipe_reaches_the_loader(custom_code_model, modules_cache):
    recipe = custom_code_recipe(custom_code_model, "model.trust_remote_code=true")
    model = load_base_model(recipe)
    assert type(model).__name__ == "CustomModel" and code_ran(modules_cache)


def test_tiny_overrides_keep_the_recipe_valid():
    # The shrunken recipe the fixtures use must stay a recipe the validator accepts.
    assert load_recipe(["tiny-mistral"], TINY_OVERRIDES).model.init_from_config["hidden_size"] == 64


def test_a_starting_adapter_of_another_base_is_refused_before_peft_loads_it(tmp_path):
    from qlora_cli.plan.preflight import check_before_training

    adapter = tmp_path / "sft" / "adapter"
    adapter.mkdir(parents=True)
    recipe = load_recipe(["tiny-mistral-dpo"], [f"model.adapter={adapter}"])
    with pytest.raises(UserError) as caught:  # no adapter_config.json: not an adapter at all
        check_before_training(recipe)
    assert caught.value.message.startswith("`model.adapter`") and "no adapter_config.json" in caught.value.message
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/other-7b"}))
    with pytest.raises(UserError) as caught:
        check_before_training(recipe)
    assert caught.value.message.startswith("`model.adapter`") and "trained on `someone/other-7b`" in caught.value.message
