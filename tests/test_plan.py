"""plan/estimate.py / plan/memory.py: the estimate against the tensors and the memory of a real tiny model,
the 7B/13B/70B figures against published ones, and the verdicts `qlora plan` turns into exit codes.

How memory is measured on the CPU (there is no torch.cuda here):
- static entries: sum of numel * element_size over the loaded model's tensors (4-bit weights with
  every tensor of their quant_state), over the LoRA gradients after a backward pass, and over the
  state of a real torch AdamW after one step;
- activations: `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd keeps for
  the backward pass; summing the distinct storages saved inside the decoder (weights excluded)
  is what the activation entry estimates;
- peak: a `TorchDispatchMode` sees the output of every aten op of a training step (forward,
  loss, backward, optimizer step); each new storage is counted until a weakref finalizer says it
  was freed, which gives the live bytes at every moment and so their peak. Peak + the bytes that
  existed before the step (weights, LoRA, optimizer state) is what a GPU's max_memory_allocated
  would show, without the CUDA context (the estimate leaves it out for CPU settings).
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qlora_cli.model.loss import loss_in_chunks
from quant_state import expert_quant_state_tensors, quant_state_tensors
from qlora_cli.plan.estimate import (
    detect_device, load_model_config, lora_targets, peak_tflops, plan_recipe, recipe_settings, visible_gpu,
)
from qlora_cli.plan.memory import GiB, Settings, activation_bytes, memory_items, model_shape
from qlora_cli.recipe.load import load_recipe
from qlora_cli.run_folder import RunFolder, weight_changes

from conftest import TINY_OVERRIDES

MISTRAL_7B = (  # Mistral-7B-v0.1's config.json
    "model.init_from_config={model_type: mistral, hidden_size: 4096, intermediate_size: 14336, "
    "num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 32000, "
    "max_position_embeddings: 32768, sliding_window: 4096, rms_norm_eps: 1e-5, tie_word_embeddings: false}"
)


BF16 = ["model.dtype=bfloat16", "quantization.bnb_4bit_compute_dtype=bfloat16"]
VARIANTS = {  # unquantized weights and residual stream in: fp32 / bf16 / bf16 upcast to fp32 by peft
    "fp32": [],
    "bf16": BF16,
    "bf16-upcast": [*BF16, "model.upcast_to_fp32=true"],
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    """The tiny recipe, its own freshly loaded model (the optimizer step changes it) and its estimate."""
    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    folder = tmp_path_factory.mktemp("plan")
    recipe = load_recipe(["tiny-mistral"], [*TINY_OVERRIDES, *VARIANTS[request.param],
                                            f"training.output_dir={folder}/run", f"data.prepared_dir={folder}/prepared"])
    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    settings = recipe_settings(recipe, shape, on_gpu=False)
    return recipe, load_trainable_model(recipe), shape, settings


def estimate(shape, settings, batch=1, seq=64) -> dict[str, int]:
    return {item.name.split(" (")[0]: item.bytes for item in memory_items(shape, settings, batch, seq)}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.slow
def test_weight_and_lora_entries_equal_the_bytes_of_the_loaded_tensors(tiny):
    _, model, shape, settings = tiny
    frozen = [p for p in model.parameters() if not p.requires_grad]
    weights = tensor_bytes(frozen) + tensor_bytes(model.buffers())
    weights += sum(tensor_bytes(quant_state_tensors(p)) for p in frozen)
    entries = estimate(shape, settings)
    assert entries["base weights"] + entries["unquantized: embeddings, norms, lm_head"] == weights
    assert entries["LoRA parameters"] == tensor_bytes(p for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_the_plan_counts_the_lora_peft_gives_the_loaded_model_under_peft_s_own_rules(tmp_path):
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.model.load import load_trainable_model

    # layers_to_transform and exclude_modules are peft's to apply: the plan asks peft, on the skeleton
    recipe = load_recipe(["tiny-mistral"], [*TINY_OVERRIDES, "lora.target_modules=[q_proj, v_proj, o_proj, down_proj]",
                                            "lora.layers_to_transform=[1]", "lora.exclude_modules=[o_proj]",
                                            f"training.output_dir={tmp_path}/run"])
    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    targets = lora_targets(recipe, shape)
    assert sorted(name.rsplit(".", 1)[-1] for name in targets.modules) == ["down_proj", "q_proj", "v_proj"]
    assert all(".layers.1." in name for name in targets.modules) and not targets.tensors
    trainable = [p for p in load_trainable_model(recipe).parameters() if p.requires_grad]
    assert estimate(shape, recipe_settings(recipe, shape, on_gpu=False))["LoRA parameters"] == tensor_bytes(trainable)


@pytest.mark.slow
def test_gradient_and_optimizer_entries_equal_a_real_adamw_step(tiny):
    recipe, model, shape, settings = tiny
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, shape.vocab, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = tensor_bytes(p.grad for p in trainable)
    optimizer.step()
    state = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    optimizer.zero_grad(set_to_none=True)
    entries = estimate(shape, settings)
    assert recipe.training.optim == "adamw_torch"
    assert entries["LoRA gradients"] == grads
    assert entries["optimizer state"] == state


def saved_activation_bytes(model, ids) -> int:
    """Distinct storages autograd saves inside the decoder (and the final norm), weights excluded."""
    weights = {t.untyped_storage().data_ptr() for t in model.parameters()}
    decoder, inside, saved = model.get_base_model().model, [False], {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    decoder.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    handle = decoder.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    handle.remove()
    decoder._forward_pre_hooks.clear()
    return sum(saved.values())


SHAPES = [(1, 64), (2, 128), (4, 48)]


@pytest.mark.slow
@pytest.mark.parametrize("batch,seq", SHAPES)
def test_activations_are_within_a_tenth_of_what_autograd_saves(tiny, batch, seq):
    _, model, shape, settings = tiny
    ids = torch.randint(0, shape.vocab, (batch, seq))
    measured = saved_activation_bytes(model, ids)
    # No attention mask reaches the model here (full rows), so none is estimated either.
    estimated = activation_bytes(shape, Settings(**{**vars(settings), "packed_mask": False}), batch, seq)
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)  # measured: 4-6% over


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages made by aten ops while active, and their peak (see the docstring)."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing, self.live, self.current, self.peak = existing, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage.data_ptr()
        if key in self.live or key in self.existing or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def measured_step_peak(model, ids, chunked_loss: bool) -> int:
    """Bytes at the peak of a training step as the Trainer runs it (with the recipe's chunked
    loss): what exists before it (weights, quantization state, LoRA, optimizer state) plus the
    peak of what the step allocates. Two steps: the optimizer state exists from the first on."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)

    def step():
        with loss_in_chunks(model, enabled=chunked_loss):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    before = [*model.parameters(), *model.buffers(), *(t for p in model.parameters() for t in quant_state_tensors(p)),
              *expert_quant_state_tensors(model),
              *(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
    static = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in before}.values())
    with LiveBytes({t.untyped_storage().data_ptr() for t in before}) as tracker:
        step()
    return static + tracker.peak


def estimated_total(shape, settings, batch: int, seq: int) -> int:
    # No attention mask reaches the model in these steps (full rows), so none is estimated either.
    return sum(item.bytes for item in memory_items(shape, Settings(**{**vars(settings), "packed_mask": False}),
                                                   batch, seq))


@pytest.mark.slow
@pytest.mark.parametrize("batch,seq", SHAPES)
def test_the_total_is_within_5_percent_of_the_measured_peak_of_a_training_step(tiny, batch, seq):
    _, model, shape, settings = tiny
    measured = measured_step_peak(model, torch.randint(0, shape.vocab, (batch, seq)), settings.chunked_loss)
    estimated = estimated_total(shape, settings, batch, seq)
    assert abs(estimated - measured) <= 0.05 * measured, (estimated, measured)  # measured: 1.2-2.2% over


def published_shape(model_type: str, **config):
    from transformers import AutoConfig

    return model_shape(AutoConfig.for_model(model_type, **config))


def test_mistral_7b_at_the_shipped_recipe_needs_about_10_gib(tmp_path):
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    recipe = load_recipe(["mistral7b"], [MISTRAL_7B, "model.name_or_path=null", "model.tokenizer=mistral-common:v1",
                                         f"training.output_dir={tmp_path}/run"])
    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    settings = recipe_settings(recipe, shape)
    entries = estimate(shape, settings, batch=4, seq=2048)
    assert shape.total_params == 7_241_732_096  # Mistral-7B-v0.1's published count
    assert len(lora_targets(recipe, shape).modules) == 4 * 32
    # NF4 + double quantization: 4 bits + 8-bit absmax per 64 + fp32 per 256 x 64 = 4.127 bits/param.
    assert entries["base weights"] / 6_979_321_856 == pytest.approx(4.127 / 8, rel=1e-3)
    # 9.6: the chunked loss holds no full logits, and the residual stream stays in bf16.
    assert 8.5 * GiB < sum(entries.values()) < 11 * GiB
    # peft's fp32 upcast doubles the unquantized weights and what checkpointing keeps per layer.
    upcast = estimate(shape, Settings(**{**vars(settings), "upcast": True}), batch=4, seq=2048)
    assert upcast["unquantized: embeddings, norms, lm_head"] == pytest.approx(2 * entries[
        "unquantized: embeddings, norms, lm_head"], rel=1e-3)
    assert 12.5 * GiB < sum(upcast.values()) < 15 * GiB


def test_65b_at_the_qlora_papers_settings_is_about_48_gb():
    # LLaMA-65B, r=64 on every linear layer, paged 32-bit AdamW, checkpointing, 1 x 512 tokens.
    shape = published_shape("llama", hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=64, vocab_size=32000)
    settings = Settings(quant="nf4", double_quant=True, lora_r=64, lora_dropout=0.05, optim="paged_adamw_32bit",
                        checkpointing=True, autocast_bytes=2, upcast=True,  # the paper's prepare_model_for_kbit_training
                        lora_targets=[n for n, _, _ in shape.layer_linears])
    entries = estimate(shape, settings, batch=1, seq=512)
    paged = entries["optimizer state"]  # paged state moves to CPU memory under pressure
    assert 42 * GiB < sum(entries.values()) - paged < 48e9 < sum(entries.values()) + 1 * GiB


@pytest.fixture
def tiny_plan_recipe(tmp_path):
    def make(*overrides):
        return load_recipe(["tiny-mistral"], [*TINY_OVERRIDES, f"training.output_dir={tmp_path}/run",
                                              f"data.prepared_dir={tmp_path}/prepared", *overrides])
    return make


def test_planning_leaves_the_recipe_s_lora_config_as_written_for_the_run_that_follows(tiny_plan_recipe):
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    # train plans, then loads, in one process: peft resolves all-linear on the plan's copy only
    recipe = tiny_plan_recipe()
    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    targets = lora_targets(recipe, shape)
    assert len(targets.modules) == 2 * 7
    assert recipe.lora.target_modules == "all-linear" and recipe.lora.target_parameters is None
    assert lora_targets(recipe, shape) == targets


def test_a_recipe_that_does_not_fit_is_refused_with_changes_that_would_fit(tiny_plan_recipe):
    plan = plan_recipe(tiny_plan_recipe(), gpu_memory=0.5)  # the CUDA context alone takes 0.75
    assert plan.fits is False and not plan.ok
    assert "needs" in plan.problems[0] and plan.changes
    assert any("activation_checkpointing=true" in change for change in plan.changes)
    assert any(line.startswith("plan problem") for line in plan.short_lines())
    roomy = plan_recipe(tiny_plan_recipe(), gpu_memory=8)
    assert roomy.ok and roomy.fits and roomy.max_batch > 1 and roomy.steps == 80


def test_a_run_that_also_fits_without_activation_checkpointing_is_told_so(tiny_plan_recipe):
    checkpointed = tiny_plan_recipe("training.activation_checkpointing=true")
    roomy = plan_recipe(checkpointed, gpu_memory=8)
    assert roomy.fits and len(roomy.faster) == 1
    assert "training.activation_checkpointing=false also fits" in roomy.faster[0]
    assert "33% fewer FLOPs" in roomy.faster[0]  # 4N + attention instead of 6N + attention, attention small here
    assert f"plan hint: {roomy.faster[0]}" in roomy.short_lines()
    # Room for the checkpointed run only (the activations of every layer need more): no hint.
    tight = plan_recipe(checkpointed, gpu_memory=(roomy.total + 1024) / GiB)
    assert tight.fits and tight.faster == []
    assert plan_recipe(tiny_plan_recipe(), gpu_memory=8).faster == []  # already off
    # The Trainer's own name for it is named back.
    trainer_key = plan_recipe(tiny_plan_recipe("training.gradient_checkpointing=true"), gpu_memory=8)
    assert trainer_key.faster[0].startswith("training.gradient_checkpointing=false also fits")


def test_a_smaller_batch_suggested_keeps_the_effective_batch_exactly(tiny_plan_recipe):
    recipe = tiny_plan_recipe("training.activation_checkpointing=true", "training.per_device_train_batch_size=4",
                              "training.gradient_accumulation_steps=3")
    roomy = plan_recipe(recipe, gpu_memory=8)
    for capacity in range(roomy.total - 1, roomy.total - 64 * 2**20, -2**20):
        plan = plan_recipe(recipe, gpu_memory=capacity / GiB)
        batch_lines = [c for c in plan.changes if "per_device_train_batch_size" in c]
        if plan.changes and batch_lines:
            break
    (line,) = batch_lines
    batch, steps = (int(part.split("=")[1]) for part in line.split()[:2])
    assert batch < 4 and batch * steps == 12


def item(plan, name: str):
    return next(i for i in plan.memory if i.name.startswith(name))


def test_fsdp_shards_weights_over_the_gpus_and_counts_its_own_checkpointing(tiny_plan_recipe):
    fsdp = tiny_plan_recipe("training.fsdp=true", "training.fsdp_config={activation_checkpointing: true}",
                            "model.dtype=float32")
    one, two = plan_recipe(fsdp, gpu_memory=8, gpus=1), plan_recipe(fsdp, gpu_memory=8, gpus=2)
    plain = plan_recipe(tiny_plan_recipe("model.dtype=float32"), gpu_memory=8)
    assert "checkpointing on" in item(one, "activations").how and "checkpointing off" in item(plain, "activations").how
    assert item(one, "activations").bytes < item(plain, "activations").bytes
    assert item(two, "base weights").bytes == pytest.approx(item(one, "base weights").bytes / 2, abs=1)
    assert item(two, "optimizer state").bytes == pytest.approx(item(one, "optimizer state").bytes / 2, abs=1)
    # What FSDP gathers: here the lm_head (32,000 x 64) and final norm in fp32, and their all-gather
    # buffer, more than sharding saves (tests/test_distributed.py measures it per rank).
    gathered = item(two, "FSDP gathered weights")
    assert gathered.bytes == 2 * 4 * (32000 + 1) * 64 and "lm_head" in gathered.how
    assert two.total - gathered.bytes < one.total
    tight = plan_recipe(fsdp, gpu_memory=0.5, gpus=2)
    assert tight.changes and not any("paged" in change for change in tight.changes)  # they do not shard
    assert two.faster[0].startswith("training.fsdp_config.activation_checkpointing=false also fits")
    both = tiny_plan_recipe("training.fsdp=true", "training.fsdp_config={activation_checkpointing: true}",
                            "training.activation_checkpointing=true")
    assert plan_recipe(both, gpu_memory=8, gpus=2).faster[0].startswith(
        "training.activation_checkpointing=false training.fsdp_config.activation_checkpointing=false also fits")


def test_a_quantized_base_without_lora_is_a_problem_before_training(tiny_plan_recipe):
    plan = plan_recipe(tiny_plan_recipe("lora=null"), gpu_memory=8)
    # Placed where the recipe set the key, as `qlora train` would place it.
    assert not plan.ok and "override: the recipe has no `lora` section, and qlora trains LoRA adapters" in plan.problems


def test_without_a_gpu_or_gpu_memory_the_fit_is_unknown_but_time_and_data_are_reported(tiny_plan_recipe):
    plan = plan_recipe(tiny_plan_recipe())
    assert plan.capacity is None and plan.fits is None and plan.ok
    assert set(plan.durations) >= {"A100", "H100 SXM", "T4"} and plan.flops > 0
    assert plan.data.examples == {"train": 34} and 0 < plan.data.trained_fraction < 1
    assert [item.name for item in plan.disk] == ["checkpoints", "adapter", "merged model"]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362), ("NVIDIA L4", 121),
    ("NVIDIA A10G", 125), ("NVIDIA GeForce RTX 4090", 165), ("Tesla T4", 65), ("NVIDIA B200", None),
])
def test_a_gpu_is_known_by_the_name_nvml_gives_it(name, tflops):
    assert peak_tflops(name) == tflops


def _has_nvidia_driver() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_has_nvidia_driver(), reason="this machine has an NVIDIA driver")
def test_without_an_nvidia_driver_the_plan_sees_no_gpu_and_takes_gpu_memory_from_the_user():
    assert visible_gpu() is None  # NVML's library is absent here: the real failure, not a stand-in
    assert detect_device(None) == ("unknown (no GPU here; give --gpu-memory GiB)", None, None)
    assert detect_device(24) == ("--gpu-memory 24 GiB", 24 * GiB, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvml_reads_the_gpu_cuda_sees_without_opening_a_cuda_context():
    import subprocess
    import sys

    code = ("import json, torch; from qlora_cli.plan.estimate import visible_gpu; found = visible_gpu(); "
            "print(json.dumps([*found, torch.cuda.is_initialized()]))")
    name, total, initialized = json.loads(subprocess.check_output([sys.executable, "-c", code], text=True))
    assert not initialized
    assert name == torch.cuda.get_device_name(0)
    assert abs(total - torch.cuda.get_device_properties(0).total_memory) <= 0.05 * total


def test_resume_reports_the_last_complete_checkpoint_and_what_changed(tiny_plan_recipe, tmp_path):
    recipe = tiny_plan_recipe()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.to_yaml().replace("learning_rate: 0.005", "learning_rate: 0.001"))
    lines = plan_recipe(recipe).resume
    assert "checkpoint-5" in lines[0] and "--resume continues" in lines[0]
    assert "training.learning_rate" in lines[1]
    lines = plan_recipe(tiny_plan_recipe("lora.r=2")).resume
    assert "--resume will refuse" in lines[0] and "lora.r" in lines[0]


def test_a_run_whose_recipe_kept_a_tilde_path_resumes_with_the_same_path_expanded(tiny_plan_recipe, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = tiny_plan_recipe("model.tokenizer=~/tokenizer")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.to_yaml().replace(str(tmp_path / "tokenizer"), "~/tokenizer"))
    assert weight_changes(recipe, RunFolder(tmp_path / "run")) == []


def test_responses_without_eos_and_a_small_validation_split_are_warned(data_recipe, write_jsonl):
    rows = [{"text": f"plain text number {i} that never ends"} for i in range(60)]
    path = data_recipe({"sources": [{"path": write_jsonl(rows), "format": "text"}], "train_on": "all", "val_size": 10})
    recipe = load_recipe([str(path)], [*TINY_OVERRIDES, f"training.output_dir={path.parent}/run"])
    warnings = " | ".join(plan_recipe(recipe).warnings)
    assert "without </s>" in warnings
    assert "only 10 examples" in warnings


def test_a_grpo_plan_counts_each_completion_and_the_kv_cache_while_sampling(tmp_path):
    # tiny-mistral: 2 layers, 2 KV heads of 256 / 4 = 64 dims, float32; 8 completions per step.
    recipe = load_recipe(["tiny-mistral-grpo"], ["model.adapter=null", f"training.output_dir={tmp_path}/run",
                                                 f"data.prepared_dir={tmp_path}/prepared"])
    plan = plan_recipe(recipe, gpu_memory=8)
    assert plan.seq == plan.data.row_width + 16 and plan.batch == 8
    kv = next(item for item in plan.memory if item.name == "KV cache while sampling")
    assert kv.bytes == 4 * 2 * (2 * 2 * 64) * 8 * plan.seq
    assert plan.total == sum(item.bytes for item in plan.memory) and plan.fits
    assert any(note.startswith("grpo: 8 completions per step") for note in plan.notes)


LONG_ROWS_7B = [MISTRAL_7B, "model.name_or_path=null", "model.tokenizer=mistral-common:v1", "lora.r=32",
                "lora.target_modules=all-linear", "training.activation_checkpointing=true", "training.bf16=true"]


def _longest_row(shape, settings, gib: float) -> int:
    from qlora_cli.plan.memory import largest_fitting, total_bytes

    return largest_fitting(1 << 24, lambda n: total_bytes(shape, settings, 1, n) <= gib * GiB)


@pytest.mark.parametrize("packing", [False, True])
def test_mistral_7b_long_rows_fit_with_tiling_and_offloading(tmp_path, packing):
    """Issue 31's shapes (r=32 on every linear layer, bf16, checkpointing, batch 1): 64K tokens on
    24 GiB and 256K on 80 GiB once both are on, for rows that hold one document each; packed rows
    under sdpa carry a tokens x tokens mask, which caps them lower."""
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.plan.memory import offloaded_bytes

    recipe = load_recipe(["mistral7b"], [*LONG_ROWS_7B, f"data.packing={str(packing).lower()}",
                                         f"training.output_dir={tmp_path}/run"])
    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    plain = recipe_settings(recipe, shape)
    both = Settings(**{**vars(plain), "tiled_mlp": True, "offloading": True})
    assert _longest_row(shape, plain, 24) < 32_768  # what issue 31 started from (26,042 and 97,829)
    if packing:  # the mask alone is 64 GiB at 256K tokens
        assert _longest_row(shape, both, 24) > 2 * _longest_row(shape, plain, 24)
        assert _longest_row(shape, both, 80) < 262_144
        return
    assert _longest_row(shape, both, 24) >= 65_536 and _longest_row(shape, both, 80) >= 262_144
    # Each alone helps less than both; offloading moves one bf16 hidden state per layer per token.
    for alone in ({"tiled_mlp": True}, {"offloading": True}):
        assert _longest_row(shape, plain, 24) < _longest_row(shape, Settings(**{**vars(plain), **alone}), 24) \
            < _longest_row(shape, both, 24)
    per_token = offloaded_bytes(shape, both, 1, 1 << 16) / (1 << 16)
    assert per_token >= 2 * shape.layers * shape.hidden


@pytest.mark.slow
def test_offloaded_bytes_are_what_autograd_saves_outside_the_checkpointed_layers(tiny):
    """What activation offloading moves (the plan's host memory) against what the decoder saves
    through saved_tensors_hooks under checkpointing: each layer's input and the final norm's tensors."""
    from qlora_cli.plan.memory import offloaded_bytes

    _, model, shape, settings = tiny
    batch, seq = 2, 96
    ids = torch.randint(0, shape.vocab, (batch, seq))
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        measured = saved_activation_bytes(model, ids)
    finally:
        model.activation_checkpointing_disable()
        model.disable_input_require_grads()
    s = Settings(**{**vars(settings), "packed_mask": False, "checkpointing": True, "offloading": True})
    loss_gradient = s.residual_bytes * shape.hidden * batch * seq  # saved by the chunked loss, outside the decoder
    estimated = offloaded_bytes(shape, s, batch, seq) - loss_gradient
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)


@pytest.mark.slow
def test_a_tiled_mlp_saves_only_its_input_for_the_whole_row(tiny):
    """With model.tiled_mlp the forward saves the MLP's input per token and nothing wider (the plan's
    activations less the one slice the backward recomputes), and less than untiled."""
    from qlora_cli.model.tiling import tile_mlps, untile_mlps
    from qlora_cli.plan.memory import mlp_slice_bytes

    _, model, shape, settings = tiny
    if settings.model_dtype != "float32":
        pytest.skip("the fp32 variant is enough: the slicing does not depend on the dtype (and runs fastest)")
    seq = 1100  # two slices of max(64, 1024) tokens
    ids = torch.randint(0, shape.vocab, (1, seq))
    whole = saved_activation_bytes(model, ids)
    tile_mlps(model)
    try:
        measured = saved_activation_bytes(model, ids)
    finally:
        untile_mlps(model)
    s = Settings(**{**vars(settings), "packed_mask": False, "tiled_mlp": True})
    estimated = activation_bytes(shape, s, 1, seq) - mlp_slice_bytes(shape, s, 1, seq)
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)
    assert measured < 0.8 * whole


# ---------------------------------------------------------------- images


@pytest.mark.slow
@pytest.mark.parametrize("model_type, sizes", [("mistral3", [(224, 224), (112, 168), (56, 56)]),
                                               ("llava", [(448, 224)])])
def test_the_vision_tower_estimate_is_within_5_percent_of_its_measured_forward_peak(model_type, sizes):
    # A Pixtral tower shaped as the real one (intermediate 4 x hidden), frozen as training keeps it.
    from qlora_cli.families import FAMILIES, auto_model_class, build_init_config
    from qlora_cli.plan.memory import vision_tower_bytes

    config = build_init_config({"model_type": model_type, "text_config": {
        "model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}, "vision_config": {
        "model_type": "pixtral", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "head_dim": 32, "image_size": 1024, "patch_size": 14}})
    config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    model = auto_model_class(FAMILIES[model_type]).from_config(config).requires_grad_(False)
    width, height = max(w for w, _ in sizes), max(h for _, h in sizes)
    pixels = torch.zeros(len(sizes), 3, height, width)  # padded bottom/right, as the collator pads
    for i, (w, h) in enumerate(sizes):
        pixels[i, :, :h, :w] = torch.randn(3, h, w)
    existing = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), pixels]}
    with torch.enable_grad(), LiveBytes(existing) as tracker:
        model.model.get_image_features(pixels, image_sizes=torch.tensor([[h, w] for w, h in sizes]))
    patches = sum((w // 14) * (h // 14) for w, h in sizes)
    estimated = vision_tower_bytes(model_shape(config), Settings(model_dtype="float32", image_patches=patches), 1)
    assert abs(estimated - tracker.peak) <= 0.05 * tracker.peak, (estimated, tracker.peak)


@pytest.mark.slow  # converts the tekken vocabulary
def test_qlora_plan_counts_the_image_tokens_the_rows_hold_and_the_vision_towers_memory(tmp_path):
    from pathlib import Path

    from datasets import load_from_disk
    from PIL import Image

    sizes = [(40, 24), (96, 64), (16, 16)]
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / f"{i}.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "path": f"{i}.png"},
                                                      {"type": "text", "text": "What colour?"}]},
                          {"role": "assistant", "content": "red"}]} for i in range(len(sizes))]
    rows[0]["messages"][0]["content"].insert(0, {"type": "image", "path": "1.png"})  # two images in one row
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    from conftest import qlora

    result = qlora("plan", "tiny-mistral3-vision", "--gpu-memory", "24", f"data.sources=[{{path: {tmp_path}/data.jsonl, "
                   "format: chat}]", f"data.prepared_dir={tmp_path}/prepared", "data.packing=false")
    assert result.exit_code == 0, result.output
    # the image tokens the prepared rows hold ([IMG], [IMG_BREAK], [IMG_END]: ids 10, 12, 13 in tekken)
    prepared = load_from_disk(str(next(p for p in (tmp_path / "prepared").iterdir() if p.is_dir())))
    in_rows = sum(sum(t in (10, 12, 13) for t in ids) for ids in prepared["train"]["input_ids"])
    text = " ".join(result.output.split())
    assert f"images: 4 in the training rows, {in_rows:,} image tokens" in text
    # 16-pixel patches, no merge: the row with 40x24 and 96x64 runs on 3x2 + 6x4 = 30 patches
    assert "up to 2 image(s), 30 patches, per row" in text and "vision tower activations" in text


@pytest.fixture
def unreachable_hub(monkeypatch):
    """This process finds the hub unreachable, as on a machine without network (CI sets HF_HUB_OFFLINE)."""
    import huggingface_hub.constants

    from qlora_cli import hub

    monkeypatch.setitem(hub._found, "reason", "HF_HUB_OFFLINE is set")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("recipe, params", [("mistral7b.yaml", "7,241,732,096"), ("mixtral-8x7b.yaml", "46,702,792,704")])
def test_a_shipped_recipe_plans_offline_from_its_published_architecture(recipe, params, unreachable_hub, tmp_path):
    from conftest import qlora

    result = qlora("plan", Path(__file__).resolve().parent.parent / "recipes" / recipe, "--gpu-memory", "24", f"training.output_dir={tmp_path}/run",
                   f"data.prepared_dir={tmp_path}/prepared")
    assert result.exit_code in (0, 2), result.output  # 2: Mixtral does not fit in 24 GiB
    text = " ".join(result.output.split())
    assert f"{params} params" in text and "planned from its published config.json values" in text, text
    assert "stands in for the tokenizer" in text and "internal error" not in text and "Retry" not in text


def test_a_hub_tokenizer_that_is_not_cached_fails_at_once_saying_the_hub_is_unreachable(unreachable_hub, tmp_path):
    from conftest import qlora

    result = qlora("prepare", "tiny-mistral", "model.tokenizer=someone/not-cached", f"data.prepared_dir={tmp_path}")
    assert result.exit_code == 2, result.output
    assert "the hub is unreachable (HF_HUB_OFFLINE is set)" in " ".join(result.output.split()), result.output


def test_a_hub_that_cannot_be_reached_turns_the_process_offline_within_seconds(monkeypatch):
    import socket
    import time

    import huggingface_hub.constants

    from qlora_cli import hub

    with socket.socket() as closed:  # a port nothing listens on: the connection is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub, "_found", {})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    assert "127.0.0.1 cannot be reached" in hub.unreachable()
    assert time.monotonic() - start < hub.PROBE_SECONDS + 1
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------- what only the model's layers tell (issue 33)


@pytest.mark.parametrize("recipe, rank, layer", [
    ("tiny-mistral", 200, "k_proj rank 200, above its narrower side (128: it is 128 x 256)"),
    (str(Path(__file__).resolve().parent.parent / "recipes" / "mistral7b.yaml"), 2048,
     "k_proj rank 2,048, above its narrower side (1,024: it is 1,024 x 4,096)"),
], ids=["tiny-mistral", "mistral7b"])
def test_a_lora_rank_above_a_targeted_layer_s_narrower_side_exits_2_at_plan(recipe, rank, layer, unreachable_hub,
                                                                             tmp_path):
    """B @ A can have no rank above the narrower side of its layer: a larger r only takes memory.
    The tiny model's k_proj is 2 heads x 64 wide; Mistral 7B's, 8 x 128 (its published config)."""
    from conftest import assert_user_error, qlora

    result = qlora("plan", recipe, f"lora.r={rank}", "--gpu-memory", "80", f"training.output_dir={tmp_path}/run",
                   f"data.prepared_dir={tmp_path}/prepared")
    assert_user_error(result, "override: `lora.r` gives model.layers.0.self_attn.", layer, "at most", wrapped=True)


def test_a_lora_rank_as_wide_as_the_narrowest_layer_plans(tiny_plan_recipe):
    assert plan_recipe(tiny_plan_recipe("lora.r=32"), gpu_memory=8).ok  # k_proj of TINY_OVERRIDES: 2 heads x 16


def test_a_starting_adapter_that_does_not_exist_is_a_plan_problem(tiny_plan_recipe):
    plan = plan_recipe(tiny_plan_recipe("model.adapter=no/such/adapter"), gpu_memory=8)
    assert not plan.ok and any("`model.adapter`" in p or "model.adapter" in p for p in plan.problems), plan.problems
    assert any("no/such/adapter does not exist" in p for p in plan.problems), plan.problems


def test_a_model_folder_with_its_own_code_is_refused_naming_trust_remote_code(tmp_path):
    """transformers, told not to run a model's code, says it does not know the model type instead."""
    from conftest import assert_user_error, qlora

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "my_own_lm", "auto_map": {
        "AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.MyModel"}}))
    result = qlora("plan", "tiny-mistral", "~model.init_from_config", f"model.name_or_path={folder}",
                   f"data.prepared_dir={tmp_path}/prepared")
    assert_user_error(result, "model.trust_remote_code", "ships custom code", "set model.trust_remote_code: true",
                      wrapped=True)


# ---------------------------------------------------------------- bitsandbytes and the hub's kernels


@pytest.fixture
def stand_in_kernels(tmp_path, monkeypatch):
    """A `kernels` package on sys.path whose get_kernel records that it ran (the real one would
    download kernels-community/quantization-bitsandbytes and run it)."""
    import sys

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(
        "ran = []\ndef get_kernel(repo, **kwargs):\n    ran.append(repo)\n    return object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    return tmp_path


def test_bitsandbytes_cannot_import_hub_kernels_and_everything_else_can(stand_in_kernels):
    import qlora_cli  # noqa: F401 - installs the guard, as every qlora command does

    as_bitsandbytes = {"__name__": "bitsandbytes.backends.cpu.ops"}
    with pytest.raises(ImportError, match="QLORA_HUB_KERNELS=1"):
        exec("from kernels import get_kernel", as_bitsandbytes)
    import kernels  # transformers' hub kernels (attn_implementation: kernels-community/...) are the user's choice

    assert kernels.__file__.startswith(str(stand_in_kernels))
    with pytest.raises(ImportError):  # imported once by someone else, still not for bitsandbytes
        exec("from kernels import get_kernel", as_bitsandbytes)
    assert kernels.ran == []


@pytest.mark.slow
def test_bitsandbytes_cpu_backend_fetches_no_hub_kernel_once_qlora_is_imported(stand_in_kernels):
    """bitsandbytes' own CPU ops module, imported as on a CPU with AVX512-BF16 (its capability probe
    answers yes; this machine has none): alone it calls get_kernel, after `import qlora_cli` it does not."""
    import subprocess
    import sys

    probe = ("import importlib, sys\nimport bitsandbytes.functional, kernels\n"
             "bitsandbytes.functional.has_avx512bf16 = lambda: True\n"
             "def import_ops():\n    sys.modules.pop('bitsandbytes.backends.cpu.ops')\n"
             "    importlib.import_module('bitsandbytes.backends.cpu.ops')\n"
             "import_ops()\nprint('alone:', kernels.ran)\n"
             "import qlora_cli\nkernels.ran.clear()\nimport_ops()\nprint('with qlora:', kernels.ran)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stand_in_kernels), *sys.path])}
    env.pop("QLORA_HUB_KERNELS", None)
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "alone: ['kernels-community/quantization-bitsandbytes']" in result.stdout, result.stdout + result.stderr
    assert "with qlora: []" in result.stdout, result.stdout + result.stderr


def test_behind_a_proxy_the_hub_is_probed_through_the_proxy_not_directly(monkeypatch):
    """On a cluster that reaches the hub only through HTTPS_PROXY, a direct connection fails: that
    must not turn the process offline while the proxy answers."""
    import socket

    from qlora_cli import hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "NO_PROXY", "no_proxy",
                 "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as proxy:  # listening: the proxy answers
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.setattr(hub, "_found", {})
        assert hub._probe() is None
    monkeypatch.setattr(hub, "_found", {})  # closed now: the proxy is what cannot be reached
    assert "127.0.0.1 (the proxy) cannot be reached" in hub._probe()


def test_the_dpo_demo_before_the_quick_start_says_to_train_the_sft_run_first(tmp_path, monkeypatch):
    """The DPO demo starts from the quick start's adapter, as a user would: without it, exit 2
    naming the run to train, not only the missing folder."""
    from conftest import assert_user_error, qlora

    monkeypatch.chdir(tmp_path)  # no runs/tiny-mistral here
    result = qlora("train", "tiny-mistral-dpo", f"data.prepared_dir={tmp_path}/prepared")
    assert_user_error(result, "runs/tiny-mistral/adapter does not exist", "training.output_dir is runs/tiny-mistral",
                      wrapped=True)
    assert not (tmp_path / "runs").exists()
