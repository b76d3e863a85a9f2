"""The `qlora` executable as a user runs it: the tiny recipe learns its sample answers (how fast:
bench/answering_time.py), and a run stopped by SIGTERM leaves a checkpoint, says how to resume,
and resumes to the same adapter as a run never stopped."""

from __future__ import annotations

import json
import math
import shlex
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import QLORA, sample_pairs, short_run, stop_at_first_step

CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json"}


def run_qlora(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([QLORA, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_tiny_recipe_learns_its_sample_answers(answering_run, tmp_path):
    record = json.loads((answering_run.root / "run.json").read_text())
    assert record["command"][1:] == ["train", *answering_run.args]  # the command line as typed
    # How long it takes is measured by bench/answering_time.py: a shared machine makes a time limit flaky.

    pairs = sample_pairs(12)
    prompts, answers = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q, "expected": a}) + "\n" for q, a in pairs))
    done = run_qlora("generate", answering_run.root, "--input", prompts, "--output", answers)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [q for q, _ in pairs]
    exact = [row for row in rows if row["response"] == row["expected"]]
    assert len(exact) >= 0.9 * len(rows), [(row["expected"], row["response"]) for row in rows]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, sample_subset, prepared_dir):
    """The shared short run's recipe in a subprocess, sent SIGTERM at its first step; what it left."""
    root = tmp_path_factory.mktemp("stopped") / "run"
    args = ["tiny-mistral", *short_run(sample_subset, root, prepared_dir)]
    returncode, output = stop_at_first_step(args)
    return root, args, returncode, output


@pytest.fixture(scope="module")
def resumed_run(stopped_run):
    """The stopped run resumed with the command it printed."""
    root, args, _, output = stopped_run
    checkpoints = sorted(p.name for p in (root / "checkpoints").iterdir())
    stopped_record = json.loads((root / "run.json").read_text())
    # The command is the last thing printed; a line wrapped by the console keeps its space.
    command = output.split("resume with:", 1)[1].replace("\n", "").strip()
    done = subprocess.run([QLORA, *shlex.split(command)[1:]], capture_output=True, text=True, timeout=300)
    return root, checkpoints, command, done, stopped_record


@pytest.mark.slow
def test_sigterm_stops_at_a_complete_checkpoint_with_exit_143(stopped_run):
    root, _, returncode, output = stopped_run
    assert returncode == 143, output
    assert "Traceback" not in output
    record = json.loads((root / "run.json").read_text())
    assert record["status"] == "stopped by SIGTERM"
    stopped_at = record["metrics"]["steps"]
    assert 1 <= stopped_at < 12, "stopped mid-training"
    checkpoint = root / "checkpoints" / f"checkpoint-{stopped_at}"
    assert CHECKPOINT_FILES <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == stopped_at
    assert (root / "loss.png").is_file()
    assert not (root / "adapter").exists()  # a stopped run is not a finished adapter


@pytest.mark.slow
def test_a_stopped_run_prints_the_command_that_resumes_it(stopped_run):
    _, args, _, output = stopped_run
    assert shlex.join(["qlora", "train", *args, "--resume"]) in output


@pytest.mark.slow
def test_resume_after_sigterm_ends_with_the_adapter_of_an_uninterrupted_run(resumed_run, trained_run):
    root, _, command, done, stopped_record = resumed_run
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((root / "run.json").read_text())
    assert record["status"] == "completed" and record["metrics"]["steps"] == 12
    assert record["command"][1:] == shlex.split(command)[1:]
    assert record["resumed_from"] == f"checkpoint-{stopped_record['metrics']['steps']}"
    assert record["first_started"] == stopped_record["started"] <= record["started"]

    # trained_run: the same recipe and seed, run to the end in one go.
    resumed = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    uninterrupted = load_file(str(trained_run.adapter / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= 1e-5
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in resumed.items() if "lora_B" in k)


@pytest.mark.slow
def test_rows_of_64k_tokens_prepare_show_plan_and_train_tiled_and_offloaded(tmp_path, qlora_cache):
    """Long documents: data.max_length=65,536 prepares and packs them, --show elides the middle of a
    long example, plan reports the rows and warns past the model's positions. Training runs at
    2,048-token rows (64K rows take minutes of attention on a CPU) with the MLP tiled (2 slices),
    activations offloaded, checkpointing, and the YaRN rope scaling the model's config gives."""
    import random

    from conftest import TINY_OVERRIDES, qlora

    rng = random.Random(0)
    words = "contract party clause shall agreement term notice payment schedule breach remedy law court".split()
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n"
                            for n in (60_000, 25_000, 800)), encoding="utf-8")
    base = ["tiny-mistral", *TINY_OVERRIDES, f"data.sources=[{{path: {data}, format: text}}]", "data.train_on=all",
            f"data.prepared_dir={tmp_path}/prepared", f"training.output_dir={tmp_path}/run"]
    shown = qlora("prepare", *base, "data.max_length=65536", "--show", "1")
    assert shown.exit_code == 0, shown.output
    assert "max 65,536 (max_length 65,536)" in shown.output  # the 60,000-word document, cut at 65,536
    assert "tokens not shown ...]" in shown.output and len(shown.output) < 20_000
    plan = qlora("plan", *base, "data.max_length=65536", "--gpu-memory", "24")
    assert plan.exit_code == 0, plan.output
    assert "1 x 65,536 tokens" in plan.output and "run past the model's max_position_embeddings (2,048" in plan.output
    assert "longest rows by memory at batch 1" in plan.output
    yarn = ("model.init_from_config.rope_parameters={rope_type: yarn, factor: 4.0, "
            "original_max_position_embeddings: 1024, rope_theta: 10000.0}")
    trained = qlora("train", *base, "data.max_length=2048", yarn, "model.init_from_config.max_position_embeddings=4096",
                    "model.tiled_mlp=true", "training.activation_offloading=true",
                    "training.activation_checkpointing=true", "training.max_steps=2", "training.logging_steps=1")
    assert trained.exit_code == 0, trained.output
    assert "run past" not in trained.output  # within the 4,096 positions the scaled config declares
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
