"""`method: dpo | kto` through the real `qlora` command on the 64-wide tiny model: held-out reward
accuracy, the run folder, SIGTERM -> checkpoint -> --resume equal to an uninterrupted run, the
SFT -> DPO chain, merge and generate on the result."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import QLORA, TINY_OVERRIDES, qlora, stop_at_first_step



def dpo_args(output_dir: Path, prepared_dir: Path, *extra: str) -> list[str]:
    """The shipped tiny DPO recipe at 64 wide from a fresh LoRA (the recipe starts from the quick
    start's SFT adapter): 80 pairs, 20 held out, 2 epochs of 10 steps."""
    return ["tiny-mistral-dpo", *TINY_OVERRIDES, "model.adapter=null", f"data.prepared_dir={prepared_dir}",
            f"training.output_dir={output_dir}", "training.num_train_epochs=2", "training.learning_rate=1e-2",
            *extra]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, prepared_dir):
    root = tmp_path_factory.mktemp("dpo") / "run"
    args = dpo_args(root, prepared_dir)
    result = qlora("train", *args)
    assert result.exit_code == 0, result.output
    return root, args, result.output


@pytest.mark.slow
def test_dpo_reaches_held_out_reward_accuracy(dpo_run):
    root, _, output = dpo_run
    metrics = json.loads((root / "run.json").read_text())["metrics"]
    assert metrics["eval_rewards/accuracies"] >= 0.9, metrics
    assert metrics["eval_rewards/margins"] > 0
    assert "eval_perplexity" not in metrics  # a DPO loss is no language-model loss
    assert "reward accuracy" in output and "margin" in output  # live progress shows the rewards


@pytest.mark.slow
def test_dpo_run_folder_holds_the_adapter_alone_and_reward_curves(dpo_run):
    root, _, _ = dpo_run
    adapter = root / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert (root / "loss.png").is_file()
    state = json.loads(next((root / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    assert any("rewards/margins" in entry for entry in state["log_history"])
    assert json.loads((root / "run.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_dpo_adapter_merges_and_generates(dpo_run, tmp_path):
    root, _, _ = dpo_run
    merged = qlora("merge", root / "recipe.yaml", f"merge.output_dir={tmp_path / 'merged'}")
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "config.json").is_file()
    answered = qlora("generate", root / "recipe.yaml", "--prompt", "What is 3 plus 4?", "generate.max_new_tokens=4")
    assert answered.exit_code == 0, answered.output


@pytest.mark.slow
def test_kto_reaches_held_out_signed_accuracy(tmp_path, prepared_dir):
    root = tmp_path / "kto"
    result = qlora("train", "tiny-mistral-kto", *dpo_args(root, prepared_dir)[1:])
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "run.json").read_text())["metrics"]
    # Held-out share of examples whose reward has their label's sign (the base: 0.5 by chance):
    # measured as a `qlora train` command at 2 epochs: 0.975 with the recipe's beta 1.0, 0.85 with beta 0.1
    # (beta 0.5: 0.975 as a command but 0.85 in this test's process, so 0.5 was too close to the edge).
    assert metrics["eval_rewards/accuracies"] >= 0.9, metrics
    assert metrics["eval_rewards/chosen"] > 0 > metrics["eval_rewards/rejected"]
    # a saturated KTO loss (often under 1e-4) is said to four significant digits, never rounded to 0.0
    assert f"'final_train_loss': {float(format(metrics['final_train_loss'], '.4g'))}," in result.output


@pytest.mark.slow
def test_dpo_from_an_sft_adapter_starts_from_it_and_keeps_it_as_reference(dpo_run, tmp_path, prepared_dir):
    sft_adapter = dpo_run[0] / "adapter"  # any adapter of this base: the DPO run's own will do
    root = tmp_path / "chained"
    result = qlora("train", *dpo_args(root, prepared_dir, f"model.adapter={sft_adapter}", "training.max_steps=2"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "run.json").read_text())["metrics"]
    # The reference is the starting adapter, so its rewards start at 0, not at the first run's margin.
    state = json.loads((root / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    first = next(e for e in state["log_history"] if "rewards/margins" in e)
    assert abs(first["rewards/margins"]) < 1.0, first
    assert not (root / "adapter" / "ref").exists() and metrics["steps"] == 2


@pytest.mark.slow
def test_dpo_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path, prepared_dir):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    extra = ("training.max_steps=6", "training.save_strategy=steps", "training.save_steps=2",
             "training.eval_strategy=no", "training.logging_steps=1")
    assert qlora("train", *dpo_args(straight, prepared_dir, *extra)).exit_code == 0
    returncode, output = stop_at_first_step(dpo_args(stopped, prepared_dir, *extra))
    assert returncode == 143, output
    assert json.loads((stopped / "run.json").read_text())["status"] == "stopped by SIGTERM"
    assert not (stopped / "adapter").exists()
    command = output.split("resume with:", 1)[1].replace("\n", "").strip()
    done = subprocess.run([QLORA, *shlex.split(command)[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    uninterrupted = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= 1e-5
