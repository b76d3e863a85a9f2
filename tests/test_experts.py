"""experts.py: fused MoE expert tensors in 4 bits, LoRA on them, on a tiny Mixtral loaded as
`qlora train` loads it (4 experts, 2 per token, 64 wide)."""

from __future__ import annotations

import warnings

import pytest
import torch

from qlora_cli.errors import UserError, locating
from qlora_cli.model.experts import dequantized, expert_parameters, is_quantized, quantized_tensors
from qlora_cli.plan.memory import quantized_linear_bytes
from qlora_cli.recipe.load import load_recipe

from conftest import TINY_OVERRIDES, assert_user_error, qlora

MIXTRAL = [
    *TINY_OVERRIDES,
    "model.init_from_config.model_type=mixtral",
    "model.init_from_config.num_local_experts=4",
    "model.init_from_config.num_experts_per_tok=2",
]
EXPERTS = ("mlp.experts",)

pytestmark = pytest.mark.slow  # every test loads a model


def mixtral_recipe(*overrides):
    return load_recipe(["tiny-mistral"], [*MIXTRAL, *overrides])


@pytest.fixture(scope="module")
def base():
    from qlora_cli.model.load import load_base_model

    return load_base_model(mixtral_recipe())


@pytest.fixture(scope="module")
def trainable():
    from qlora_cli.model.load import load_trainable_model

    return load_trainable_model(mixtral_recipe())


def test_a_4bit_mixtral_keeps_no_expert_tensor_in_16_or_32_bits(base):
    found = expert_parameters(base, EXPERTS)
    assert sorted({p for _, _, p in found}) == ["down_proj", "gate_up_proj"] and len(found) == 4  # 2 layers
    assert all(is_quantized(module, p) for _, module, p in found)
    big = [n for n, t in base.named_parameters() if t.is_floating_point() and t.ndim == 3]
    assert big == []
    state = found[0][1].parametrizations["gate_up_proj"][0].quant_state
    assert state.quant_type == "nf4" and state.state2 is not None  # as the recipe says: nf4 + double quant


def test_the_experts_turn_4bit_as_they_load_into_the_model_quantizing_after_loading_makes(base):
    """Each expert tensor is quantized as transformers sets it, so a load never holds all experts
    in model.dtype (bench/moe_experts.py --load measures the peak); the model is the same one."""
    from transformers import AutoModelForCausalLM

    from qlora_cli.recipe.builders import build_bnb_config
    from qlora_cli.recipe.library_fields import quantization_values
    from qlora_cli.model.experts import quantize_experts, quantizing_experts_on_load
    from qlora_cli.families import family_of, kept_16bit
    from qlora_cli.model.load import model_path

    recipe = mixtral_recipe()
    quantization = kept_16bit(family_of("mixtral"), recipe.written("quantization"))

    def load():
        return AutoModelForCausalLM.from_pretrained(model_path(recipe), dtype=torch.float32,
                                                    quantization_config=build_bnb_config(quantization))

    with quantizing_experts_on_load(EXPERTS, quantization_values(quantization)):
        on_load = load()
    assert all(is_quantized(module, p) for _, module, p in expert_parameters(on_load, EXPERTS))
    after = load()
    assert quantize_experts(after, EXPERTS, quantization_values(quantization)) == 4
    assert [n for n, _ in on_load.named_parameters()] == [n for n, _ in after.named_parameters()]
    ours, theirs = on_load.state_dict(), after.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert list(ours) == list(base.state_dict())


def test_fp4_without_double_quantization_is_what_the_recipe_asks_for():
    from qlora_cli.model.load import load_base_model

    model = load_base_model(mixtral_recipe("quantization.bnb_4bit_quant_type=fp4",
                                           "quantization.bnb_4bit_use_double_quant=false"))
    _, module, _ = expert_parameters(model, EXPERTS)[0]
    state = module.parametrizations["down_proj"][0].quant_state
    assert state.quant_type == "fp4" and state.state2 is None


def test_an_unset_quant_type_is_bitsandbytes_configs_default_for_the_experts_too():
    from transformers import BitsAndBytesConfig

    from qlora_cli.model.load import load_base_model

    model = load_base_model(mixtral_recipe("~quantization.bnb_4bit_quant_type"))
    _, module, _ = expert_parameters(model, EXPERTS)[0]
    assert module.parametrizations["down_proj"][0].quant_state.quant_type == BitsAndBytesConfig().bnb_4bit_quant_type


def test_expert_weight_bytes_are_exactly_the_4bit_codes_and_their_quantization_state(base):
    for _, module, param_name in expert_parameters(base, EXPERTS):
        experts, out_features, in_features = module.parametrizations[param_name][0].quant_state.shape
        stored = sum(t.numel() * t.element_size() for t in quantized_tensors(module, param_name))
        assert stored == quantized_linear_bytes(experts * out_features * in_features, out_features, "nf4", True)
        assert stored <= 0.3 * experts * out_features * in_features * 2  # at most 0.3x of 16-bit bytes


def test_each_4bit_block_belongs_to_one_expert(base):
    _, module, param_name = expert_parameters(base, EXPERTS)[0]
    state = module.parametrizations[param_name][0].quant_state
    experts, out_features, in_features = state.shape
    assert (out_features * in_features) % state.blocksize == 0


def test_4bit_experts_compute_what_their_dequantized_weights_compute_in_the_models_own_expert_code(base):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    _, module, _ = expert_parameters(base, EXPERTS)[0]
    reference = MixtralExperts(base.config)
    for param_name in ("gate_up_proj", "down_proj"):
        getattr(reference, param_name).data = dequantized(module, param_name)
    torch.manual_seed(0)
    hidden = torch.randn(12, base.config.hidden_size)
    index = torch.randint(0, 4, (12, 2))
    weights = torch.rand(12, 2)
    with torch.no_grad():
        got, want = module(hidden, index, weights), reference(hidden, index, weights)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_whole_4bit_model_equals_a_16bit_copy_holding_its_dequantized_weights(base):
    from qlora_cli.model.load import copy_dequantized_weights
    from qlora_cli.model.load import load_base_model

    plain = load_base_model(mixtral_recipe(), quantized=False)
    copy_dequantized_weights(base, plain)
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)


def test_skip_modules_keep_the_named_experts_in_16_bits_and_the_router_stays_16_bit():
    from qlora_cli.model.load import load_base_model

    model = load_base_model(mixtral_recipe("quantization.llm_int8_skip_modules=[model.layers.1.mlp.experts,lm_head]"))
    quantized = {f"{n}.{p}": is_quantized(m, p) for n, m, p in expert_parameters(model, EXPERTS)}
    assert quantized == {"model.layers.0.mlp.experts.down_proj": True, "model.layers.0.mlp.experts.gate_up_proj": True,
                         "model.layers.1.mlp.experts.down_proj": False, "model.layers.1.mlp.experts.gate_up_proj": False}
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32


def expert_lora(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}


def test_all_linear_puts_lora_on_every_expert_tensor_and_gradients_reach_all_of_them_step_after_step(trainable):
    lora = expert_lora(trainable)
    assert len(lora) == 2 * 2 * 2  # lora_A and lora_B of gate_up_proj and down_proj, in 2 layers
    optimizer = torch.optim.SGD(lora.values(), lr=1.0)
    ids = torch.randint(0, 1000, (2, 16))
    trainable.train()
    for _ in range(3):  # peft's per-forward parametrizations must come off again every step
        optimizer.zero_grad()
        trainable(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n), \
            [n for n, p in lora.items() if p.grad is None]
        optimizer.step()
    plists = [m.parametrizations for m in trainable.modules() if hasattr(m, "parametrizations")]
    assert all(len(plist) == 1 for p in plists for plist in p.values())  # only the 4-bit one remains


def test_the_run_summary_names_the_kinds_of_modules_that_carry_lora(trainable):
    from qlora_cli.model.load import summarize_model

    from transformers import BitsAndBytesConfig

    summary = summarize_model(trainable, BitsAndBytesConfig(load_in_4bit=True))
    assert set(summary.lora_by_kind) >= {"attention", "experts"}
    assert summary.lora_by_kind["experts"] == sum(p.numel() for p in expert_lora(trainable).values())
    assert any(line.startswith("LoRA on: ") and "experts" in line for line in summary.lines())
    assert summary.quantization == "4-bit fp4, compute in float32"  # BitsAndBytesConfig's defaults


def test_lora_can_be_kept_to_attention_or_to_the_experts():
    from qlora_cli.model.load import load_trainable_model, lora_by_kind

    attention = load_trainable_model(mixtral_recipe("lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"))
    assert set(lora_by_kind(attention)) == {"attention"}
    experts = load_trainable_model(mixtral_recipe("lora.target_modules=[]", "lora.target_parameters=[experts]"))
    assert set(lora_by_kind(experts)) == {"experts"}
    down = load_trainable_model(mixtral_recipe("lora.target_modules=[]", "lora.target_parameters=[down_proj]"))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in expert_lora(down)} == {"experts"}
    assert len(expert_lora(down)) == 2 * 2


def test_expert_lora_that_matches_no_expert_is_refused():
    from qlora_cli.model.load import load_trainable_model

    recipe = mixtral_recipe("lora.target_parameters=[up_proj_typo]")
    with pytest.raises(UserError, match=r"`lora.target_parameters` \['up_proj_typo'\] match no expert tensor.*"
                                        r"down_proj, gate_up_proj") as err, locating(recipe.origins):
        load_trainable_model(recipe)
    assert err.value.where == "override"  # where the key came from: the command line here


@pytest.mark.parametrize("model, asked, have", [("mixtral", "up_proj_typo", "its experts: down_proj, gate_up_proj"),
                                                ("mistral", "experts", "it has no fused experts")])
def test_qlora_plan_refuses_expert_lora_that_matches_nothing_before_any_weight_loads(model, asked, have, tmp_path):
    """`qlora plan` (and so `qlora train`, which plans first) knows the expert tensors from a
    weightless build of the config: a target_parameters typo exits 2 there, at its line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: tiny-mistral\nlora:\n  target_parameters: [{asked}]\n")
    overrides = MIXTRAL if model == "mixtral" else TINY_OVERRIDES
    result = qlora("plan", str(recipe), *overrides, f"data.prepared_dir={tmp_path / 'prepared'}")
    assert_user_error(result, f"{recipe}:3:", f"`lora.target_parameters` ['{asked}'] match no expert tensor", have)
    assert not (tmp_path / "prepared").exists()


def test_expert_lora_with_dropout_is_refused_with_the_key():
    from qlora_cli.model.load import load_trainable_model

    recipe = mixtral_recipe("lora.lora_dropout=0.05")
    with pytest.raises(UserError, match="`lora.lora_dropout: 0`") as err, locating(recipe.origins):
        load_trainable_model(recipe)
    assert err.value.where == "override" and "lora.lora_dropout=0" in err.value.fix


# ---------------------------------------------------------------- through the real CLI


@pytest.fixture(scope="module")
def mixtral_run(tmp_path_factory, sample_subset, prepared_dir, qlora_cache):
    """A short run of the tiny Mixtral through `qlora train`: 12 steps on 12 examples."""
    from conftest import TrainedRun, qlora, short_run

    root = tmp_path_factory.mktemp("mixtral") / "run"
    args = ["tiny-mistral", *short_run(sample_subset, root, prepared_dir), *MIXTRAL[len(TINY_OVERRIDES):]]
    result = qlora("train", *args)
    assert result.exit_code == 0, result.output
    return TrainedRun(root, args, result.output)


def test_a_tiny_mixtral_with_4bit_experts_learns_the_sample_data(mixtral_run):
    import json

    state = json.loads((mixtral_run.root / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 12 and sum(losses[-2:]) < sum(losses[:2]) - 1.0
    line = next(line for line in mixtral_run.output.splitlines() if line.startswith("LoRA on: "))
    assert "attention" in line and "experts" in line, line


def test_merge_folds_the_expert_lora_into_dequantized_experts_and_plain_transformers_loads_it(mixtral_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import qlora

    merged = tmp_path / "merged"
    result = qlora("merge", mixtral_run.root / "recipe.yaml", f"merge.output_dir={merged}")
    assert result.exit_code == 0, result.output
    assert "logits vs base + adapter (as trained in 4 bits)" in result.output  # checked against the 4-bit model too
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 256, 64)  # fused, 16-bit, LoRA folded in
    assert not any("lora" in name or "parametrizations" in name for name, _ in model.named_parameters())


def test_generate_answers_from_the_adapter_and_from_the_merged_model_alike(mixtral_run, tmp_path):
    from conftest import qlora

    merged = tmp_path / "merged"
    assert qlora("merge", mixtral_run.root / "recipe.yaml", f"merge.output_dir={merged}").exit_code == 0
    asks = ["--prompt", "What is the capital of France?", "generate.max_new_tokens=6"]
    adapter = qlora("generate", mixtral_run.root / "recipe.yaml", *asks)
    whole = qlora("generate", mixtral_run.root / "recipe.yaml", "--model", merged, *asks)
    assert adapter.exit_code == 0 and whole.exit_code == 0, adapter.output + whole.output
    assert adapter.output.strip().splitlines()[-1] == whole.output.strip().splitlines()[-1]


def test_a_mixtral_resumed_after_sigterm_ends_with_the_adapter_of_an_uninterrupted_run(mixtral_run, tmp_path):
    import json
    import shlex
    import subprocess

    from safetensors.torch import load_file

    from conftest import QLORA, stop_at_first_step

    root = tmp_path / "run"
    args = [*mixtral_run.args, f"training.output_dir={root}"]  # the later output_dir wins
    returncode, output = stop_at_first_step(args)
    assert returncode == 143, output
    stopped_at = json.loads((root / "run.json").read_text())["metrics"]["steps"]
    assert 1 <= stopped_at < 12, "stopped mid-training"
    command = output.split("resume with:", 1)[1].replace("\n", "").strip()
    done = subprocess.run([QLORA, *shlex.split(command)[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((root / "run.json").read_text())["resumed_from"] == f"checkpoint-{stopped_at}"

    # mixtral_run: the same recipe and seed, run to the end in one go.
    resumed = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    uninterrupted = load_file(str(mixtral_run.adapter / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= 1e-5
    experts_b = [t for k, t in resumed.items() if ".experts." in k and "lora_B" in k]
    assert len(experts_b) == 2 * 2 and all(t.abs().max() > 0 for t in experts_b)  # expert LoRA trained, both tensors


# ---------------------------------------------------------------- Mistral Small 4 and Large 4

MISTRAL_MOE = {  # 64-wide, 2 layers, 4 experts, MLA attention with small ranks
    "mistral4": "{model_type: mistral4, hidden_size: 64, intermediate_size: 128, moe_intermediate_size: 64, "
                "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4, num_local_experts: 4, "
                "num_experts_per_tok: 2, n_group: 1, topk_group: 1, q_lora_rank: 32, kv_lora_rank: 16, "
                "qk_rope_head_dim: 8, qk_nope_head_dim: 8, v_head_dim: 16}",
    "mistral_large4": "{model_type: mistral_large4, text_config: {hidden_size: 64, intermediate_size: 128, "
                      "moe_intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4, "
                      "num_local_experts: 4, num_experts_per_tok: 2, n_group: 1, topk_group: 1, first_k_dense_replace: 1}, "
                      "vision_config: {model_type: pixtral, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
                      "num_attention_heads: 2, image_size: 64, patch_size: 16}}",
}


@pytest.mark.parametrize("model_type", list(MISTRAL_MOE))
def test_mistral_small_and_large_4_load_with_4bit_experts_and_train_their_text_model(model_type):
    from qlora_cli.model.load import load_trainable_model, lora_by_kind

    model = load_trainable_model(load_recipe(["tiny-mistral"], [
        "lora.r=4", "lora.lora_alpha=8", f"model.init_from_config={MISTRAL_MOE[model_type]}"]))
    found = expert_parameters(model, EXPERTS)
    assert found and all(is_quantized(module, p) for _, module, p in found)
    assert not [n for n, t in model.named_parameters() if t.is_floating_point() and t.ndim == 3]
    kinds = lora_by_kind(model)
    assert {"attention", "experts", "shared experts"} <= set(kinds) and "vision" not in kinds
    ids = torch.randint(0, 1000, (2, 16))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = [p for n, p in expert_lora(model).items() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_an_unsupported_moe_model_type_exits_2_naming_the_key():
    from conftest import assert_user_error, qlora

    result = qlora("config", "validate", "tiny-mistral", "model.init_from_config.model_type=qwen2_moe")
    assert_user_error(result, "model.init_from_config.model_type", "qwen2_moe", "mixtral")


def planned_shape(recipe):
    from qlora_cli.plan.estimate import load_model_config
    from qlora_cli.plan.memory import model_shape
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    return model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))


def test_plan_counts_the_experts_at_exactly_the_bytes_of_the_loaded_4bit_model(base):
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.plan.estimate import load_model_config, recipe_settings
    from qlora_cli.plan.memory import memory_items, model_shape

    recipe = mixtral_recipe()
    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    entries = {item.name.split(" (")[0]: item.bytes for item in memory_items(shape, recipe_settings(
        recipe, shape, on_gpu=False), 1, 64)}
    expert_bytes = sum(t.numel() * t.element_size() for _, m, p in expert_parameters(base, EXPERTS)
                       for t in quantized_tensors(m, p) if t is not m.parametrizations[p].original)
    linear_states = []
    for param in base.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            linear_states += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    loaded = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers(), *linear_states])
    assert entries["base weights"] + entries["unquantized: embeddings, norms, lm_head"] == loaded + expert_bytes
    assert shape.expert_params == 2 * (4 * 256 * 64 + 4 * 64 * 128)


PLANNED = {"mixtral": MIXTRAL, "mistral4": ["lora.r=4", "lora.lora_alpha=8", f"model.init_from_config={MISTRAL_MOE['mistral4']}"]}


@pytest.mark.parametrize("model_type", list(PLANNED))
def test_plan_counts_expert_lora_and_the_activations_of_routed_experts_and_latent_attention(model_type):
    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.plan.estimate import recipe_settings
    from qlora_cli.plan.memory import Settings, activation_bytes, memory_items
    from test_plan import estimated_total, measured_step_peak, saved_activation_bytes

    recipe = load_recipe(["tiny-mistral"], PLANNED[model_type])
    shape = planned_shape(recipe)
    settings = recipe_settings(recipe, shape, on_gpu=False)
    model = load_trainable_model(recipe)
    entries = {item.name.split(" (")[0]: item.bytes for item in memory_items(shape, settings, 2, 64)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert entries["LoRA parameters"] == sum(p.numel() * p.element_size() for p in trainable)  # experts + router too
    ids = torch.randint(0, shape.vocab, (2, 64))
    # Each token reaches 2 of the 4 experts: the activations count those, not all 4; mistral4's
    # attention is MLA (its latent ranks and head dims, not heads x head_dim).
    estimated = activation_bytes(shape, Settings(**{**vars(settings), "packed_mask": False}), 2, 64)
    measured = saved_activation_bytes(model, ids)
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)  # measured: 1.3% / 4.1% over
    measured = measured_step_peak(model, ids, settings.chunked_loss)
    estimated = estimated_total(shape, settings, 2, 64)
    assert abs(estimated - measured) <= 0.05 * measured, (estimated, measured)  # measured: 2.3% / 2.0% over


def test_peft_does_not_warn_that_the_fused_experts_rank_was_ignored_but_still_warns_of_a_users_pattern():
    from qlora_cli.model.load import load_trainable_model

    def pattern_warnings(*overrides) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_trainable_model(mixtral_recipe(*overrides))
        return [str(w.message) for w in caught if "_pattern keys did not match" in str(w.message)]

    # all-linear: peft's own `.*\.gate_up_proj` doubles the fused tensor's rank, and it did apply.
    assert pattern_warnings() == []
    assert any("nope_proj" in message for message in pattern_warnings("lora.rank_pattern={nope_proj: 4}"))
