"""`qlora train` through the real command on the 64-wide tiny model: what a run folder holds,
refusing to overwrite, errors caught before any weight loads, and validation with the best
checkpoint kept. (Stopping on a signal and resuming: test_cli_end_to_end.py.)"""

from __future__ import annotations

import json
import math
import os
import shutil
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_cli.data.prepare import load_prepared
from qlora_cli.recipe.load import load_recipe
from qlora_cli.data.tokenizer import load_recipe_tokenizer

from conftest import assert_user_error, qlora, short_run

CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json"}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------- the run folder


@pytest.mark.slow
def test_run_folder_keeps_the_resolved_recipe_which_runs_again_as_is(trained_run):
    original = load_recipe([trained_run.args[0]], trained_run.args[1:])
    again = load_recipe([str(trained_run.root / "recipe.yaml")])
    assert again.resolved == original.resolved
    assert load_recipe([str(trained_run.root)]).resolved == original.resolved  # the run folder names it too


@pytest.mark.slow
def test_run_json_records_how_the_run_was_made_and_how_it_went(trained_run, prepared_dir):
    record = json.loads((trained_run.root / "run.json").read_text())
    assert record["status"] == "completed"
    assert datetime.fromisoformat(record["started"]) <= datetime.fromisoformat(record["ended"])
    for library in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        assert record["versions"][library] == metadata.version(library)
    assert record["device"] == "cpu"
    prepared = load_prepared(prepared_dir / record["data_fingerprint"])
    assert prepared.summary.fingerprint == record["data_fingerprint"]

    trainable = sum(t.numel() for t in adapter_weights(trained_run.adapter).values())
    assert record["parameters"]["trainable"] == trainable
    assert record["parameters"]["total"] > 10 * trainable

    metrics = record["metrics"]
    assert metrics["steps"] == 12
    assert metrics["real_tokens"] == 6 * prepared.summary.tokens["train"]  # every real token, each epoch
    assert record["tokens_per_second"] == metrics["tokens_per_second"]
    assert metrics["tokens_per_second"] == pytest.approx(metrics["real_tokens"] / metrics["train_runtime"])
    assert math.isfinite(metrics["final_train_loss"])


@pytest.mark.slow
def test_training_lowers_the_loss(trained_run):
    state = json.loads((trained_run.root / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 12  # logging_steps=1
    assert sum(losses[-2:]) < sum(losses[:2]) - 1.0


@pytest.mark.slow
def test_checkpoints_are_complete_and_only_the_newest_are_kept(trained_run):
    checkpoints = trained_run.root / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-12"]  # save_total_limit 2
    for step in (10, 12):
        folder = checkpoints / f"checkpoint-{step}"
        assert CHECKPOINT_FILES <= {p.name for p in folder.iterdir()}
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
        shared = folder.stat().st_mode & 0o044  # a team can read the weights if it can read the folder
        assert shared and all(p.stat().st_mode & 0o044 == shared for p in folder.iterdir() if p.is_file())
    assert not any(p.name.startswith(".") for p in trained_run.root.rglob("*")), "staging leftovers"


@pytest.mark.slow
def test_adapter_loads_with_peft_and_holds_the_final_weights(trained_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = trained_run.adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    loaded = {name: p for name, p in model.named_parameters() if "lora_" in name}
    saved = adapter_weights(adapter)
    assert len(loaded) == len(saved) > 0
    assert any(t.abs().max() > 0 for name, t in saved.items() if "lora_B" in name)  # B starts at zero

    final = adapter_weights(trained_run.root / "checkpoints" / "checkpoint-12")
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[k], final[k]) for k in saved)

    text = "[INST] What is 7 times 8? [/INST] 7 times 8 is 56."
    recipe_tokenizer = load_recipe_tokenizer(load_recipe([str(trained_run.root)]))
    assert AutoTokenizer.from_pretrained(str(adapter))(text).input_ids == recipe_tokenizer(text).input_ids


@pytest.mark.slow
def test_adapter_card_holds_the_recipe_and_the_metrics(trained_run):
    from huggingface_hub import ModelCard

    card = (trained_run.adapter / "README.md").read_text()
    data = ModelCard(card).data
    config = json.loads((trained_run.adapter / "adapter_config.json").read_text())
    # tiny-mistral's base is built from its config: peft records its cache folder, a path on this
    # machine that is no hub id, so the card's front matter names no base and its text what was built
    assert data.base_model is None and config["base_model_name_or_path"] not in card
    assert "Base model: a model built from its config (init_from_config, mistral)." in card
    assert data.library_name == "peft" and {"qlora", "adapter"} <= set(data.tags)
    assert (trained_run.root / "recipe.yaml").read_text() in card
    metrics = json.loads((trained_run.root / "run.json").read_text())["metrics"]
    assert f"| final_train_loss | {metrics['final_train_loss']:.6g} |" in card


@pytest.mark.slow
def test_logs_hold_tensorboard_events_and_loss_png_is_drawn(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((trained_run.root / "logs").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(trained_run.root / "logs"))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == list(range(1, 13))
    assert (trained_run.root / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- an existing run folder


@pytest.mark.slow
def test_an_existing_run_folder_is_refused_and_left_untouched(trained_run):
    before = snapshot(trained_run.root)
    result = qlora("train", *trained_run.args)
    assert_user_error(result, "already exists", "--resume", "--overwrite")
    assert snapshot(trained_run.root) == before


@pytest.mark.slow
def test_overwrite_starts_the_run_over_and_keeps_the_users_own_files(tmp_path, sample_subset, prepared_dir):
    root = tmp_path / "run"
    args = ["tiny-mistral", *short_run(sample_subset, root, prepared_dir, "training.max_steps=2")]
    assert qlora("train", *args).exit_code == 0
    (root / "checkpoints" / "checkpoint-99").mkdir()  # as if an older, longer run had left it
    (root / "notes.txt").write_text("my notes on this run")
    result = qlora("train", *args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (root / "notes.txt").read_text() == "my notes on this run"  # not qlora's: kept
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert (root / "adapter" / "adapter_model.safetensors").is_file()
    assert list((root / "logs").glob("events.out.tfevents.*"))  # its own logs, though not the first run here


@pytest.mark.slow
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, sample_subset, prepared_dir):
    (tmp_path / "my-runs" / "old-run").mkdir(parents=True)
    (tmp_path / "my-runs" / "notes.txt").write_text("keep me")
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, tmp_path / "my-runs", prepared_dir),
                   "--overwrite")
    assert_user_error(result, "not a run folder", "training.output_dir")
    assert (tmp_path / "my-runs" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_resume_with_other_lora_weights_is_refused_and_the_run_left_untouched(trained_run):
    before = snapshot(trained_run.root)
    result = qlora("train", *trained_run.args, "lora.r=2", "--resume")
    assert_user_error(result, "cannot resume", "lora.r", "--resume")
    assert snapshot(trained_run.root) == before


@pytest.mark.slow
def test_resume_of_a_folder_qlora_did_not_make_is_refused(tmp_path, sample_subset, prepared_dir):
    root = tmp_path / "run"
    root.mkdir()
    (root / "recipe.yaml").write_text("{}\n")
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir), "--resume")
    assert_user_error(result, "cannot resume", "not a run folder qlora made")
    assert [p.name for p in root.iterdir()] == ["recipe.yaml"]


# ---------------------------------------------------------------- mistakes caught before any weight loads

EARLY_ERRORS = {
    "bf16 on a CPU": (["training.bf16=true"], "training.bf16"),
    "paged 8-bit optimizer on a CPU": (["training.optim=paged_adamw_8bit"], "training.optim"),
    "fp16 on a CPU": (["training.fp16=true"], "training.fp16"),
    "missing model folder": (["model.init_from_config=null", "model.name_or_path=/nonexistent"], "model.name_or_path"),
    "missing tokenizer": (["model.tokenizer=/nonexistent-tokenizer"], "model.tokenizer"),
    "a quantized base without LoRA": (["lora=null"], "lora"),
    "a full fine-tune (no LoRA at all)": (["lora=null", "quantization=null"], "lora"),
    "flash attention without flash-attn or a GPU": (["model.attn_implementation=flash_attention_2"],
                                                    "model.attn_implementation"),
    "a logging integration that is not installed": (["training.report_to=[tensorboard,wandb]"], "pip install wandb"),
    "evaluation without a validation split": (["training.eval_strategy=steps"], "training.eval_strategy"),
}


@pytest.mark.slow
@pytest.mark.parametrize("overrides, key", EARLY_ERRORS.values(), ids=EARLY_ERRORS.keys())
def test_mistakes_exit_2_naming_the_key_before_the_model_loads(overrides, key, tmp_path, sample_subset,
                                                                prepared_dir):
    root = tmp_path / "run"
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir), *overrides)
    assert_user_error(result, key)
    assert "parameters:" not in result.output  # the model summary, printed once the weights have loaded
    assert not root.exists()


@pytest.mark.slow
def test_a_model_that_fails_to_load_exits_2_and_leaves_no_run_folder(trained_run, tmp_path, sample_subset,
                                                                      prepared_dir):
    base = Path(json.loads((trained_run.adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(base / "config.json", model)  # a config, but no weights
    root = tmp_path / "run"
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir),
                   "model.init_from_config=null", f"model.name_or_path={model}")
    assert_user_error(result, "cannot load model")
    assert not root.exists()  # so the next attempt needs neither --resume nor --overwrite


@pytest.mark.slow
def test_a_batch_larger_than_the_data_is_warned_and_trains_on_the_rows_there_are(tmp_path, sample_subset,
                                                                                 prepared_dir):
    # The shipped 7B recipe (batch 4) on its sample data (one packed row of 2,048) must still run.
    root = tmp_path / "run"
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir, "training.max_steps=2",
                                                       "training.per_device_train_batch_size=64"))
    assert result.exit_code == 0, result.output
    assert "plan warning: training.per_device_train_batch_size is 64 but the training set has" in result.output
    assert json.loads((root / "run.json").read_text())["metrics"]["steps"] == 2


@pytest.mark.slow
def test_a_run_loads_the_tokenizer_once_and_hashes_its_data_once(tmp_path, sample_subset, prepared_dir,
                                                                monkeypatch):
    """Plan, prepare, model building and training share one tokenizer and one fingerprint of the
    data (each costs a tokenizer load or a pass over every source byte). Counted, not mocked."""
    import qlora_cli.data.prepare
    import qlora_cli.data.tokenizer

    calls = {"load_tokenizer": 0, "data_fingerprint": 0}
    for module, name in ((qlora_cli.data.tokenizer, "load_tokenizer"), (qlora_cli.data.prepare, "data_fingerprint")):
        def counted(*args, _original=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    # A model size of its own: its init_from_config model is built in this run, with the run's tokenizer.
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, tmp_path / "run", prepared_dir,
                                                       "training.max_steps=1", "model.init_from_config.seed=7"))
    assert result.exit_code == 0, result.output
    assert "plan: " in result.output and (tmp_path / "run" / "adapter").is_dir()
    assert calls == {"load_tokenizer": 1, "data_fingerprint": 1}


FAILING_AFTER_LOAD = {
    "LoRA targets the model does not have": (["lora.target_modules=[nonexistent_proj]"], "lora.target_modules"),
    "an optimizer whose package is not installed": (["training.optim=galore_adamw"], "not installed"),
    "an optimizer whose package is not installed (ValueError)": (["training.optim=adamw_anyprecision"],
                                                                 "torchdistx"),
}


@pytest.mark.slow
@pytest.mark.parametrize("overrides, needle", FAILING_AFTER_LOAD.values(), ids=FAILING_AFTER_LOAD.keys())
def test_a_run_that_fails_before_its_first_step_exits_2_and_leaves_no_run_folder(overrides, needle, tmp_path,
                                                                                 sample_subset, prepared_dir):
    root = tmp_path / "run"
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir), *overrides)
    assert_user_error(result, needle)
    assert not root.exists()  # so the next attempt needs neither --resume nor --overwrite


@pytest.mark.slow
def test_an_output_folder_under_a_file_exits_2(tmp_path, sample_subset, prepared_dir):
    (tmp_path / "afile").write_text("not a folder")
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, tmp_path / "afile" / "run", prepared_dir))
    assert_user_error(result, "training.output_dir", "afile")


@pytest.mark.slow
def test_an_output_folder_that_is_a_file_exits_2(tmp_path, sample_subset, prepared_dir):
    (tmp_path / "afile").write_text("not a folder")
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, tmp_path / "afile", prepared_dir))
    assert_user_error(result, "training.output_dir", "is a file")
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_an_unwritable_output_folder_exits_2(tmp_path, sample_subset, prepared_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = qlora("train", "tiny-mistral", *short_run(sample_subset, locked / "run", prepared_dir))
    finally:
        locked.chmod(0o700)
    assert_user_error(result, "training.output_dir", "not writable")


# ---------------------------------------------------------------- validation

VALIDATION = ["data.val_size=2", "training.num_train_epochs=3", "training.eval_steps=2", "training.save_total_limit=1"]


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory, sample_subset, prepared_dir):
    """6 steps on 10 examples, evaluated on 2 every 2 steps, the best adapter kept at the end."""
    root = tmp_path_factory.mktemp("validated") / "run"
    result = qlora("train", "tiny-mistral", *short_run(
        sample_subset, root, prepared_dir, *VALIDATION, "training.eval_strategy=steps",
        "training.load_best_model_at_end=true"))
    assert result.exit_code == 0, result.output
    return root, result.output


@pytest.mark.slow
def test_validation_reports_eval_loss_and_keeps_the_best_adapter(validated_run):
    root, output = validated_run
    assert "eval at step 2: loss" in output
    metrics = json.loads((root / "run.json").read_text())["metrics"]
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))

    last = max((root / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) == 3
    best = Path(state["best_model_checkpoint"])
    assert best.parent == root / "checkpoints" and best.is_dir()  # the final path, not the staging one
    assert state["best_metric"] == pytest.approx(min(evals))
    assert metrics["eval_loss"] == pytest.approx(min(evals), abs=1e-5)  # the final adapter is the best one
    saved, best_weights = adapter_weights(root / "adapter"), adapter_weights(best)
    assert all(torch.equal(saved[k], best_weights[k]) for k in saved)


@pytest.mark.slow
def test_validation_data_alone_evaluates_at_each_save_and_the_last_step_once(tmp_path, sample_subset, prepared_dir):
    root = tmp_path / "run"
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir, *VALIDATION))
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.output.splitlines() if line.startswith("eval at step")] == [
        "eval at step 2", "eval at step 4", "eval at step 6"]  # the final metrics reuse step 6's evaluation
    state = json.loads((root / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    last_eval = [entry for entry in state["log_history"] if "eval_loss" in entry][-1]
    assert json.loads((root / "run.json").read_text())["metrics"]["eval_loss"] == last_eval["eval_loss"]


@pytest.mark.slow
def test_evaluating_during_training_does_not_change_what_is_trained(validated_run, tmp_path, sample_subset,
                                                                    prepared_dir):
    root, _ = validated_run
    plain = tmp_path / "run"
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, plain, prepared_dir, *VALIDATION,
                                                       "training.eval_strategy=no"))
    assert result.exit_code == 0, result.output
    evaluated = adapter_weights(root / "checkpoints" / "checkpoint-6")
    not_evaluated = adapter_weights(plain / "adapter")
    assert max((evaluated[k] - not_evaluated[k]).abs().max().item() for k in evaluated) <= 1e-5


@pytest.mark.slow
def test_activation_offloading_gives_the_same_loss_and_gradients(tiny_model):
    """training.activation_offloading: a checkpointed 4-bit + LoRA step through the offloading hooks
    (on this CPU torch's save_on_cpu; on a GPU TRL's) gives the same loss and LoRA gradients, and the
    hooks are gone afterwards."""
    from qlora_cli.data.collate import PackedCollator
    from qlora_cli.training.trainer import offloading_context

    rows = [{"input_ids": list(range(5, 45)), "labels": [-100] * 3 + list(range(8, 45)), "seq_lengths": [15, 25]}]
    batch = PackedCollator(pad_token_id=0)(rows)
    tiny_model.train()
    tiny_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.enable_input_require_grads()

    def loss_and_grads(context):
        tiny_model.zero_grad()
        with context:
            loss = tiny_model(**batch).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.requires_grad}

    try:
        plain_loss, plain_grads = loss_and_grads(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
        offloaded_loss, offloaded_grads = loss_and_grads(offloading_context(tiny_model))
    finally:
        tiny_model.zero_grad()
        tiny_model.activation_checkpointing_disable()
    assert offloaded_loss.item() == plain_loss.item()
    assert plain_grads.keys() == offloaded_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.equal(offloaded_grads[name], grad), name


def test_the_progress_bar_keeps_its_step_count_and_times_on_80_columns():
    import io
    import re

    from rich.console import Console

    from qlora_cli.terminal.progress import TrainingProgress

    console = Console(width=80, force_terminal=True, file=io.StringIO())
    progress = TrainingProgress(console, lambda: 0)

    class State:
        is_world_process_zero, global_step, max_steps, epoch = True, 12, 80, 3.0

    progress.on_train_begin(None, State(), None)
    progress.progress.update(progress.task, info="epoch 3.00  loss 1.2345  lr 5.00e-03  12,345 tok/s")
    progress.progress.refresh()
    progress.progress.stop()
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", console.file.getvalue())
    assert "12/80 0:00:00 < -:--:--" in shown and "…" not in shown, shown
    assert "12,345 tok/s" in shown, shown
