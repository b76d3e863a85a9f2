"""Several processes on the CPU (gloo, through `qlora train --nproc 2`) against one process: DDP,
and FSDP2 with the 4-bit base sharded (training/distributed.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES, stop_at_first_step

ROOT = Path(__file__).resolve().parent.parent


def _command(tmp_path: Path, name: str, batch: int, nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlora_cli", "train", *_train_args(tmp_path, name, batch, nproc, *extra)]


def _train_args(tmp_path: Path, name: str, batch: int, nproc: int, *extra: str) -> list[str]:
    """The arguments of `qlora train` for a run of `name` under tmp_path (see _command)."""
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join((ROOT / "sample_data.jsonl").read_text().splitlines(keepends=True)[:32]))
    run = tmp_path / name
    command = [
        "tiny-mistral", *TINY_OVERRIDES,
        f"data.sources=[{{path: {data}, format: text}}]", "data.packing=false",
        f"data.prepared_dir={tmp_path / 'prepared'}", f"training.output_dir={run}",
        "training.num_train_epochs=1", f"training.per_device_train_batch_size={batch}",
        # The same rows in the same order for both: one process takes rows 0-3 as one batch,
        # two processes take rows 0-1 and 2-3, so each step sees the same global batch.
        "training.train_sampling_strategy=sequential",
        "training.save_strategy=no", "training.logging_steps=1", "training.report_to=none",
        # SGD: the update is the gradient itself. AdamW divides by sqrt(v), which turns the
        # rounding noise of a near-zero gradient into a step of about the learning rate.
        "training.optim=sgd", "training.learning_rate=1.0", *extra,
    ]
    if nproc > 1:
        command.append(f"--nproc={nproc}")
    return command


def _train(tmp_path: Path, name: str, batch: int, nproc: int, *extra: str) -> Path:
    result = subprocess.run(_command(tmp_path, name, batch, nproc, *extra), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / name


@pytest.fixture(scope="module")
def shared_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")  # one data file and prepared folder for the module


@pytest.fixture(scope="module")
def one_process_run(shared_folder):
    return _train(shared_folder, "one", batch=4, nproc=1)


@pytest.fixture(scope="module")
def runs(shared_folder, one_process_run):
    return {"one": one_process_run, "two": _train(shared_folder, "two", batch=2, nproc=2)}


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    one, two = _adapter(runs["one"]), _adapter(runs["two"])
    assert one.keys() == two.keys()
    difference = max((one[k] - two[k]).abs().max().item() for k in one)
    scale = max(one[k].abs().max().item() for k in one if "lora_B" in k)  # B starts at zero
    # Only the order of floating-point sums differs (per-rank sums, then an all-reduce): measured
    # 1.3e-7 on lora_B weights up to 0.31. A global batch of 8 instead of 4 (each rank taking 4
    # rows) measured 0.20; a wrong shard or loss normalisation moves weights by their own size.
    assert scale > 0.1
    assert difference < 1e-4, f"adapters differ by {difference} (lora_B weights up to {scale})"


@pytest.mark.slow
def test_two_processes_train_on_the_whole_data_once_with_twice_the_global_batch(runs):
    one = json.loads((runs["one"] / "run.json").read_text())
    two = json.loads((runs["two"] / "run.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["metrics"]["steps"] == one["metrics"]["steps"] == 8  # 32 rows / global batch 4
    assert two["metrics"]["real_tokens"] == one["metrics"]["real_tokens"]  # every row once, none twice


@pytest.mark.slow
def test_only_rank_zero_writes_one_run_folder(runs):
    run = runs["two"]
    names = {p.name for p in run.iterdir()} - {"checkpoints"}  # save_strategy=no: no checkpoint in it
    assert names == {"adapter", "loss.png", "recipe.yaml", "run.json"}  # report_to=none: no logs/
    assert not list(run.rglob("*rank*")) and not list(run.parent.glob(".*tmp*"))
    assert (run / "adapter" / "adapter_config.json").is_file()


# FSDP2 over the processes: each rank keeps half of every weight, the 4-bit ones too (stored in the
# model's float32 words so that they flatten with their layer), and sharded checkpoints.
FSDP = ["training.fsdp=true", "quantization.bnb_4bit_quant_storage=float32",
        "training.fsdp_config={auto_wrap_policy: TRANSFORMER_BASED_WRAP, "
        "transformer_layer_cls_to_wrap: [MistralDecoderLayer], state_dict_type: SHARDED_STATE_DICT}"]

# A tiny Mixtral, 4 experts of which each token uses 2, its experts in 4 bits with LoRA on them.
# Every token carries a loss (see _measured_fsdp_run).
MIXTRAL = ["model.init_from_config.model_type=mixtral", "model.init_from_config.num_local_experts=4",
           "model.init_from_config.num_experts_per_tok=2", "data.train_on=all"]


def _measured_fsdp_run(tmp_path: Path, name: str, *extra: str) -> tuple[Path, list[dict], list[str]]:
    """Two FSDP processes of `qlora train` as torchrun starts its workers (the documented launch
    line), 2 rows each, every rank's memory measured at its second step by
    bench/fsdp_rank_memory.py: the run folder, each rank's record and the run's recipe arguments.

    The runs train on every token (`data.train_on=all`), as the plan's one chunk of the loss
    assumes: on a GPU a micro-batch has more labelled tokens than a chunk holds (524 of a 32k
    vocabulary), here fewer, and the chunk is only the labelled ones."""
    memory = tmp_path / f"{name}-memory"
    memory.mkdir()
    args = _train_args(tmp_path, name, 2, 1, *extra)  # one process each: torchrun starts two
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "bench" / "fsdp_rank_memory.py"), str(memory), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / name, [json.loads((memory / f"rank-{rank}.json").read_text()) for rank in (0, 1)], args


def _fsdp(layer: str) -> list[str]:
    return [*FSDP[:2], FSDP[2].replace("MistralDecoderLayer", layer)]


@pytest.fixture(scope="module")
def mixtral_one_process_run(shared_folder):
    return _train(shared_folder, "mixtral-one", 4, 1, *MIXTRAL)


@pytest.mark.slow
def test_a_mixtral_with_4bit_expert_lora_trains_on_two_processes_as_on_one(shared_folder, mixtral_one_process_run):
    one = _adapter(mixtral_one_process_run)
    two = _adapter(_train(shared_folder, "mixtral-two", 2, 2, *MIXTRAL))
    assert one.keys() == two.keys()
    experts_b = [k for k in one if ".experts." in k and "lora_B" in k]
    assert len(experts_b) == 2 * 2 and all(two[k].abs().max() > 0.01 for k in experts_b)  # trained, both tensors
    # Measured (on the responses only): 1.0e-7 apart, lora_B weights up to 0.28 (expert ones 0.02-0.15).
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


@pytest.fixture(scope="module")
def mixtral_fsdp_run(shared_folder):
    return _measured_fsdp_run(shared_folder, "mixtral-fsdp", *MIXTRAL, *_fsdp("MixtralDecoderLayer"))


@pytest.mark.slow
def test_fsdp_shards_a_mixtrals_4bit_experts_and_trains_their_lora_as_one_process(mixtral_one_process_run,
                                                                                  mixtral_fsdp_run):
    run = mixtral_fsdp_run[0]
    distributed = json.loads((run / "run.json").read_text())["distributed"]
    # Every weight is a shard: the experts' 4-bit codes (uint8, under their parametrization) as well.
    assert distributed["units"]["MixtralDecoderLayer"] == 2
    assert distributed["parameter_elements"]["whole_frozen"] == 0, distributed
    one, two = _adapter(mixtral_one_process_run), _adapter(run)
    assert one.keys() == two.keys()
    experts_b = [k for k in one if ".experts." in k and "lora_B" in k]
    assert len(experts_b) == 2 * 2 and all(two[k].abs().max() > 0.01 for k in experts_b)
    # Measured (on the responses only): 1.3e-7 apart (expert lora_B weights 0.02-0.15).
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


# A tiny Mistral Small 4: MLA attention, 4 routed experts (2 per token) and a shared expert.
MISTRAL4 = ["model.init_from_config={model_type: mistral4, hidden_size: 64, intermediate_size: 128, "
            "moe_intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4, "
            "num_local_experts: 4, num_experts_per_tok: 2, n_group: 1, topk_group: 1, q_lora_rank: 32, "
            "kv_lora_rank: 16, qk_rope_head_dim: 8, qk_nope_head_dim: 8, v_head_dim: 16}", "training.max_steps=4",
            "data.train_on=all"]


@pytest.fixture(scope="module")
def mistral4_fsdp_run(shared_folder):
    return _measured_fsdp_run(shared_folder, "mistral4-fsdp", *MISTRAL4, *_fsdp("Mistral4DecoderLayer"))


@pytest.mark.slow
def test_fsdp_shards_a_mistral4_and_trains_its_expert_lora_as_one_process(shared_folder, mistral4_fsdp_run):
    one = _adapter(_train(shared_folder, "mistral4-one", 4, 1, *MISTRAL4))
    run = mistral4_fsdp_run[0]
    distributed = json.loads((run / "run.json").read_text())["distributed"]
    assert distributed["units"]["Mistral4DecoderLayer"] == 2 and distributed["parameter_elements"]["whole_frozen"] == 0
    two = _adapter(run)
    assert one.keys() == two.keys()
    experts_b = [k for k in one if ".experts." in k and "lora_B" in k]
    assert len(experts_b) == 2 * 2 and all(two[k].abs().max() > 1e-3 for k in experts_b)
    # Measured over 8 steps on the responses only: 3.7e-8 apart (expert lora_B weights 0.005-0.014).
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


@pytest.fixture(scope="module")
def tiny_fsdp_run(shared_folder):
    return _measured_fsdp_run(shared_folder, "tiny-fsdp", "data.train_on=all", "training.max_steps=2", *FSDP)


def _planned_per_rank(args: list[str], rows: list[int]) -> int:
    """What `qlora plan --gpus 2` counts on each GPU for a micro-batch of `rows` ([rows, tokens]),
    less the CUDA context a CPU process does not have."""
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.plan.estimate import load_model_config, recipe_settings
    from qlora_cli.plan.memory import memory_items, model_shape
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe([args[0]], args[1:])
    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    return sum(item.bytes for item in memory_items(shape, recipe_settings(recipe, shape, on_gpu=False, gpus=2), *rows))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_fsdp_run", "mixtral_fsdp_run", "mistral4_fsdp_run"])
def test_the_plans_memory_per_gpu_under_fsdp_is_within_a_tenth_of_each_ranks_peak(model, request):
    _, ranks, args = request.getfixturevalue(model)
    for rank, measured in enumerate(ranks):
        planned = _planned_per_rank(args, measured["input_ids"])
        # Each rank at its own rows: the shards, the output unit gathered with its all-gather buffer,
        # one chunk of the loss. Measured rank 0 / rank 1: tiny Mistral 33.6 / 30.9 MB, planned 34.1 / 31.6;
        # Mixtral 34.9 / 32.1, planned 35.7 / 33.1; mistral4 34.5 / 31.6, planned 35.1 / 32.5 (1-5% over).
        # Before the chunked loss reached FSDP's lm_head, full logits made tiny Mistral's 43.2 / 37.9 MB.
        assert abs(planned - measured["total"]) <= 0.10 * measured["total"], (rank, measured, planned)


def _launcher_command(tmp_path: Path, run: Path, *extra: str) -> list[str]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join((ROOT / "sample_data.jsonl").read_text().splitlines(keepends=True)[:16]))
    return [
        sys.executable, "-m", "qlora_cli", "train", "tiny-mistral", *TINY_OVERRIDES,
        f"data.sources=[{{path: {data}, format: text}}]", f"data.prepared_dir={tmp_path / 'prepared'}",
        f"training.output_dir={run}", "training.num_train_epochs=1000", "training.per_device_train_batch_size=1",
        "training.logging_steps=1", "training.save_steps=100000", "training.report_to=none", "--nproc=2", *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_the_nproc_launcher_stops_every_rank_with_a_checkpoint(signal_name, code, tmp_path):
    import signal

    run = tmp_path / "run"
    launcher = subprocess.Popen(_launcher_command(tmp_path, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    lines = []
    for line in launcher.stdout:  # wait until training runs on both ranks
        lines.append(line)
        if line.startswith("step "):
            break
    launcher.send_signal(getattr(signal, signal_name))  # Ctrl-C in a terminal: SIGINT to the launcher
    output = "".join(lines) + launcher.stdout.read()
    assert launcher.wait(timeout=300) == code, output[-3000:]
    # The workers stopped themselves: torchrun, which would kill them 30 s after a signal of its
    # own, never saw one and reported no failure.
    assert "Traceback" not in output and "FAILED" not in output, output[-3000:]
    checkpoints = list((run / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == f"stopped by {signal_name}"
    assert record["command"][-1] == "--nproc=2"  # what the user typed, not what torchrun ran
    assert "--resume --nproc=2" in output
    assert not (run / "adapter").exists()
    orphans = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
    assert not orphans, "workers outlived the launcher"


@pytest.mark.slow
def test_a_mistake_found_inside_the_ranks_exits_2_with_one_message_and_no_run_folder(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(_launcher_command(tmp_path, run, "lora.target_modules=[nonexistent_proj]"),
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert output.count("`lora.target_modules` does not fit this model") == 1
    assert "Traceback" not in output and "internal error" not in output
    assert not run.exists()


def _train_dpo(tmp_path: Path, name: str, batch: int, nproc: int) -> Path:
    """Two SGD steps of the shipped tiny DPO recipe, pairs in the prepared order (as `_train`)."""
    run = tmp_path / name
    command = [
        sys.executable, "-m", "qlora_cli", "train", "tiny-mistral-dpo", *TINY_OVERRIDES, "model.adapter=null",
        f"data.prepared_dir={tmp_path / 'prepared'}", f"training.output_dir={run}", "training.max_steps=2",
        f"training.per_device_train_batch_size={batch}", "training.train_sampling_strategy=sequential",
        "training.eval_strategy=no", "training.save_strategy=no", "training.logging_steps=1",
        "training.report_to=none", "training.optim=sgd", "training.learning_rate=1.0",
    ]
    if nproc > 1:
        command.append(f"--nproc={nproc}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_dpo_trains_on_two_processes_as_on_one(tmp_path):
    one_run, two_run = _train_dpo(tmp_path, "one", 4, 1), _train_dpo(tmp_path, "two", 2, 2)
    one, two = _adapter(one_run), _adapter(two_run)
    assert one.keys() == two.keys()
    assert max(two[k].abs().max().item() for k in two if "lora_B" in k) > 0.01  # it trained
    # Each rank runs the policy and the adapter-off reference on its own pairs; DDP averages the
    # per-rank mean losses into the global batch's.
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    record = json.loads((two_run / "run.json").read_text())
    assert record["processes"] == 2 and record["metrics"]["steps"] == 2


@pytest.mark.slow
def test_grpo_trains_on_two_processes(tmp_path):
    # Each rank samples its own answers, so the adapter cannot equal one process's: it trains, every
    # rank's rewards reach the log, and rank 0 alone writes the run.
    (tmp_path / "vowels.py").write_text("def vowels(completions, **kwargs):\n"
                                        "    return [sum(map(c.count, 'aeiou')) / (len(c) or 1) for c in completions]\n")
    run = tmp_path / "run"
    result = subprocess.run([
        sys.executable, "-m", "qlora_cli", "train", "tiny-mistral-grpo", *TINY_OVERRIDES, "model.adapter=null",
        f"rewards=[{{function: {tmp_path / 'vowels.py'}:vowels}}]", f"data.prepared_dir={tmp_path / 'prepared'}",
        f"training.output_dir={run}", "training.max_steps=2", "training.eval_strategy=no",
        "training.eval_on_start=false", "training.save_strategy=no", "training.learning_rate=1e-2", "--nproc=2",
    ], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    adapter = _adapter(run)
    assert max(adapter[k].abs().max().item() for k in adapter if "lora_B" in k) > 1e-3  # it trained
    record = json.loads((run / "run.json").read_text())
    assert record["processes"] == 2 and record["metrics"]["steps"] == 2
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all(" reward " in line for line in steps)  # rank 0's progress alone



@pytest.fixture(scope="module")
def fsdp_resumed_run(shared_folder):
    """Two processes under FSDP2, stopped by SIGTERM after their first step, then resumed."""
    returncode, stopped = stop_at_first_step(_train_args(shared_folder, "fsdp", 2, 2, *FSDP))
    assert returncode == 143, stopped[-3000:]
    checkpoint = next((shared_folder / "fsdp" / "checkpoints").glob("checkpoint-*"))
    shards = sorted(p.name for p in checkpoint.rglob("*.distcp"))
    resumed = subprocess.run([*_command(shared_folder, "fsdp", 2, 2, *FSDP), "--resume"], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return shared_folder / "fsdp", stopped + resumed.stdout, shards


@pytest.mark.slow
def test_fsdp_shards_the_4bit_model_stops_resumes_and_trains_the_adapter_of_one_process(one_process_run,
                                                                                       fsdp_resumed_run):
    run, output, shards = fsdp_resumed_run
    record = json.loads((run / "run.json").read_text())
    distributed = record["distributed"]
    assert distributed["strategy"] == "FSDP" and distributed["version"] == 2, distributed
    assert distributed["processes"] == 2 and distributed["nodes"] == 1 and distributed["backend"] == "gloo"
    assert distributed["units"]["MistralDecoderLayer"] == 2
    counts = distributed["parameter_elements"]
    assert counts["whole_frozen"] == counts["whole_trainable"] == 0 and counts["sharded_trainable"] > 0
    assert output.count("distributed: FSDP2 over 2 processes, 1 node (gloo)") == 2  # stopped, then resumed
    # The checkpoint holds each rank's shard of the LoRA weights and of the optimizer state.
    assert shards == ["__0_0.distcp", "__0_0.distcp", "__1_0.distcp", "__1_0.distcp"]
    assert record["resumed_from"].startswith("checkpoint-") and record["metrics"]["steps"] == 8
    # The adapter, gathered from the shards and saved by rank 0, in the PEFT layout of one process's.
    one, fsdp = _adapter(one_process_run), _adapter(run)
    assert one.keys() == fsdp.keys()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # Measured 2.1e-7 (lora_B weights up to 0.31), as DDP: only the order of the sums differs.
    assert max((one[k] - fsdp[k]).abs().max().item() for k in one) < 1e-4


def test_a_parallelism_this_machine_cannot_give_is_refused_before_the_model_loads(tmp_path):
    from qlora_cli.errors import UserError
    from qlora_cli.plan.preflight import check_before_training
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe(["tiny-mistral"], [*TINY_OVERRIDES, f"training.output_dir={tmp_path / 'run'}",
                                            "training.fsdp=true", "training.fsdp_config={version: 1}"])
    with pytest.raises(UserError) as refused:
        check_before_training(recipe, processes=1)  # what `qlora train` runs first: exit 2, nothing loaded
    messages = [(error.key, error.message) for error in refused.value.errors]
    assert ("training.fsdp", "`training.fsdp` shards the model across processes, and this run has one") in messages
    assert any(key == "training.fsdp_config.version" and "runs on GPUs only" in text for key, text in messages)
    assert any(key == "quantization.bnb_4bit_quant_storage" and "each rank would hold all of them" in text
               for key, text in messages)  # uint8 storage: accelerate would leave the 4-bit weights whole


@pytest.mark.slow
def test_two_one_process_nodes_on_loopback_train_the_adapter_of_two_processes_on_one_node(shared_folder,
                                                                                          fsdp_resumed_run):
    import socket

    with socket.socket() as probe:  # a free port for node 0's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = _command(shared_folder, "nodes", 2, 1, *FSDP)
    nodes = [subprocess.Popen([*command, "--nnodes=2", f"--node-rank={rank}", f"--rdzv=127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "distributed: FSDP2 over 2 processes, 2 nodes (gloo)" in outputs[0]
    assert "step " not in outputs[1]  # node 1's rank is no rank 0: it shows nothing
    record = json.loads((shared_folder / "nodes" / "run.json").read_text())
    assert record["distributed"]["nodes"] == 2 and record["distributed"]["processes"] == 2
    one_node, two_nodes = _adapter(fsdp_resumed_run[0]), _adapter(shared_folder / "nodes")
    assert one_node.keys() == two_nodes.keys()
    assert max((one_node[k] - two_nodes[k]).abs().max().item() for k in one_node) < 1e-4
