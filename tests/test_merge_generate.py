"""`qlora merge` and `qlora generate` through the real command.

Merging writes a standalone model that plain transformers loads and that answers like the
adapter; generating formats prompts exactly as training did, answers files resumably, and
refuses bad input with its file and line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from qlora_cli.export.generate import Generator, load_generator
from qlora_cli.data.tokenizer import load_recipe_tokenizer
from qlora_cli.data.prepare import load_prepared
from qlora_cli.recipe.load import load_recipe
from qlora_cli.data.templates import IGNORE_INDEX

from conftest import assert_user_error, qlora, sample_pairs

PAIRS = sample_pairs(12)


def write_prompts(path: Path, pairs=PAIRS) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": q, "expected": a}) + "\n"
                            for i, (q, a) in enumerate(pairs)))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def logit_distance(card: str) -> float:
    """The largest logit difference to the 4-bit base + adapter that the merged model card reports."""
    return float(re.search(r"4-bit base \+ adapter it was trained as: max (\S+),", card).group(1))


@pytest.fixture(scope="module")
def adapter_answers(answering_run, tmp_path_factory) -> list[dict]:
    """The answering run's adapter (4-bit base, as trained) on its 12 training instructions."""
    folder = tmp_path_factory.mktemp("adapter-answers")
    output = folder / "answers.jsonl"
    result = qlora("generate", answering_run.root, "--input", write_prompts(folder / "prompts.jsonl"),
                   "--output", output)
    assert result.exit_code == 0, result.output
    return read_jsonl(output)


@pytest.fixture(scope="module")
def merged_answering(answering_run, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("merged") / "merged"
    result = qlora("merge", answering_run.root, f"merge.output_dir={output}")
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="module")
def merged_small(trained_run, tmp_path_factory) -> Path:
    """The 64-wide run merged in ~1 MB shards (its embeddings and head are 8 MB each)."""
    output = tmp_path_factory.mktemp("merged-small") / "merged"
    result = qlora("merge", trained_run.root, f"merge.output_dir={output}", "merge.max_shard_size=1MB")
    assert result.exit_code == 0, result.output
    return output


# ---------------------------------------------------------------- merge


@pytest.mark.slow
def test_merged_folder_holds_safetensors_shards_config_tokenizer_and_card(merged_small, trained_run):
    from huggingface_hub import ModelCard

    files = {p.name for p in merged_small.iterdir()}
    index = json.loads((merged_small / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and set(shards) <= files
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) for name in shards)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth"))]  # safetensors only
    card = (merged_small / "README.md").read_text()
    assert "merge.base: dequantized" in card and "quantized and dequantized again" in card
    # a built base: the card names what it was built from, never its cache folder on this machine
    built = json.loads((trained_run.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert ModelCard(card).data.base_model is None and built not in card
    assert "into a model built from its config (init_from_config, mistral) with `qlora merge`" in card


@pytest.mark.slow
def test_merged_weights_are_as_readable_as_their_folder(merged_small):
    # safetensors writes owner-only files: teammates who can open the folder must read the weights.
    shared = merged_small.stat().st_mode & 0o044
    assert shared and all(p.stat().st_mode & 0o044 == shared for p in merged_small.iterdir())


@pytest.mark.slow
def test_merged_model_loads_with_plain_transformers_and_answers_like_the_adapter(merged_answering, answering_run,
                                                                                  adapter_answers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged_answering)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_answering))
    assert not any("lora" in name for name, _ in model.named_parameters())
    generator = Generator(None, tokenizer, "mistral", None)
    for row in adapter_answers[:4]:
        ids = torch.tensor([generator.prompt_ids([{"role": "user", "content": row["prompt"]}])])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                 do_sample=False)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == row["response"]


@pytest.mark.slow
def test_generate_with_the_merged_model_agrees_with_the_adapter(merged_answering, answering_run, adapter_answers,
                                                                tmp_path, monkeypatch):
    # Paths given as `--model=~/merged` reach qlora unexpanded: `~` is the home folder there too.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "merged").symlink_to(merged_answering)
    write_prompts(tmp_path / "prompts.jsonl")
    result = qlora("generate", answering_run.root, "--model=~/merged", "--input=~/prompts.jsonl",
                   "--output=~/merged-answers.jsonl")
    assert result.exit_code == 0, result.output
    answers = read_jsonl(tmp_path / "merged-answers.jsonl")
    assert [row["response"] for row in answers] == [row["response"] for row in adapter_answers]


@pytest.mark.slow
def test_merge_into_the_original_weights_also_works_and_is_further_from_training(trained_run, merged_small,
                                                                                 tmp_path):
    output = tmp_path / "original"
    result = qlora("merge", trained_run.root, f"merge.output_dir={output}", "merge.base=original")
    assert result.exit_code == 0, result.output
    card = (output / "README.md").read_text()
    assert "merge.base: original" in card and "original unquantized base weights" in card
    # One line says both checks: against base + adapter unmerged, and against the 4-bit model trained
    checks = [line for line in result.output.splitlines() if "logits vs" in line]
    assert len(checks) == 1 and "; as trained in 4 bits: max " in checks[0], result.output
    # The adapter was trained on the 4-bit weights: merged into them (dequantized) it reproduces the
    # trained model to rounding; merged into the original weights it does not.
    dequantized = logit_distance((merged_small / "README.md").read_text())
    original = logit_distance(card)
    assert dequantized < 1e-3 < original, (dequantized, original)


@pytest.mark.slow
def test_a_dequantized_merge_keeps_the_layers_training_kept_in_16_bits(trained_run, tmp_path):
    # down_proj was never quantized in training: the merge must not quantize it either.
    output = tmp_path / "merged"
    result = qlora("merge", trained_run.root, "quantization.llm_int8_skip_modules=[lm_head,down_proj]",
                   f"merge.output_dir={output}")
    assert result.exit_code == 0, result.output
    assert logit_distance((output / "README.md").read_text()) < 1e-3
    # merged into what training saw, the two checks agree: said once
    assert result.output.count("logits vs") == 1 and "logits vs base + adapter (as trained in 4 bits): max" in result.output


@pytest.mark.slow
def test_a_merge_without_quantization_does_not_claim_it_dequantized(trained_run, tmp_path):
    output = tmp_path / "merged"
    result = qlora("merge", trained_run.root, "quantization=null", f"merge.output_dir={output}")
    assert result.exit_code == 0, result.output
    for text in (result.output.replace("\n", ""), (output / "README.md").read_text()):
        assert "nothing to dequantize" in text and "4-bit weight quantized" not in text


DEEP = ["model.init_from_config.num_hidden_layers=16"]  # 256 wide: bf16 rounding alone moves logits by ~0.6


@pytest.fixture(scope="module")
def deep_adapter(tmp_path_factory):
    """A LoRA with random, non-zero A and B (no training needed) on the 16-layer tiny model, as
    a run folder's adapter; returns (the unmerged bf16 model, the run folder)."""
    from peft import LoraConfig, get_peft_model

    from qlora_cli.model.load import load_base_model

    run = tmp_path_factory.mktemp("deep") / "run"
    recipe = load_recipe(["tiny-mistral"], [*DEEP, f"training.output_dir={run}"])
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(recipe, quantized=False, dtype=torch.bfloat16),
                           LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()
    model.save_pretrained(str(run / "adapter"))
    return model, run


@pytest.mark.slow
def test_a_correct_bf16_merge_of_a_deep_model_passes_verification(deep_adapter, tmp_path):
    _, run = deep_adapter
    output = tmp_path / "merged"
    result = qlora("merge", "tiny-mistral", *DEEP, f"training.output_dir={run}", "merge.dtype=bfloat16",
                   f"merge.output_dir={output}")
    assert result.exit_code == 0, result.output
    assert (output / "config.json").is_file()
    assert "cannot tell" not in result.output  # this adapter moves the logits far beyond rounding


@pytest.mark.slow
def test_a_merge_whose_adapter_changes_less_than_rounding_says_the_check_cannot_tell(tmp_path):
    from peft import LoraConfig, get_peft_model

    from qlora_cli.model.load import load_base_model

    run = tmp_path / "run"
    recipe = load_recipe(["tiny-mistral"], [f"training.output_dir={run}"])
    untrained = LoraConfig(r=8, target_modules="all-linear")  # B starts at zero: no effect at all
    get_peft_model(load_base_model(recipe, quantized=False), untrained).save_pretrained(str(run / "adapter"))
    result = qlora("merge", "tiny-mistral", f"training.output_dir={run}", "merge.dtype=bfloat16")
    assert result.exit_code == 0, result.output
    assert "cannot tell whether the adapter survived" in " ".join(result.output.split())  # across line wraps


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["adapter not applied", "scaling doubled"])
def test_a_wrong_merge_fails_verification_in_bf16(mistake, deep_adapter):
    import copy

    from qlora_cli.export.merge import MergeVerificationFailed, _logits, check_merged, rounding_tolerance

    model = copy.deepcopy(deep_adapter[0])
    tokenizer = load_recipe_tokenizer(load_recipe(["tiny-mistral"]))
    probe = {"input_ids": tokenizer("[INST] What is 7 times 8? [/INST] 56", return_tensors="pt").input_ids}
    unmerged = _logits(model, probe)
    tolerance = rounding_tolerance(model, probe, unmerged)
    check_merged(copy.deepcopy(model).merge_and_unload(), probe, unmerged, tolerance, "bfloat16")  # the right one
    if mistake == "adapter not applied":
        wrong = model.unload()
    else:
        for module in model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {name: 2 * value for name, value in module.scaling.items()}
        wrong = model.merge_and_unload()
    with pytest.raises(MergeVerificationFailed, match="nothing was written"):
        check_merged(wrong, probe, unmerged, tolerance, "bfloat16")


@pytest.fixture
def other_base_adapter(trained_run, tmp_path) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "mistralai/Mistral-7B-v0.1"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


@pytest.mark.slow
@pytest.mark.parametrize("adapter, message", [
    ("missing", "does not exist"),
    ("empty", "no adapter_config.json"),
    ("other-base", "trained on `mistralai/Mistral-7B-v0.1`"),
    ("not-json", "adapter_config.json is not JSON"),
])
def test_merge_refuses_a_wrong_adapter_with_exit_2(adapter, message, trained_run, other_base_adapter, tmp_path):
    folder = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "other-base": other_base_adapter,
              "not-json": tmp_path / "damaged"}[adapter]
    (tmp_path / "empty").mkdir()
    shutil.copytree(trained_run.adapter, tmp_path / "damaged")
    (tmp_path / "damaged" / "adapter_config.json").write_text('{"r": 4, "lora_al')
    output = tmp_path / "merged"
    result = qlora("merge", trained_run.root, f"merge.adapter={folder}", f"merge.output_dir={output}")
    assert_user_error(result, message, wrapped=True)
    assert not output.exists()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # in the tensors, past the header: only the recorded sha256 tells
    path.write_bytes(bytes(data))


WEIGHTS_DAMAGE = {
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:5000]), "bytes;"),
    "empty": (lambda path: path.write_bytes(b""), "is empty"),
    "missing": (lambda path: path.unlink(), "is missing"),
    "flipped": (_flip_a_byte, "sha256 differs"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", WEIGHTS_DAMAGE)
@pytest.mark.parametrize("command", ["generate", "merge"])
def test_a_damaged_adapter_exits_2_naming_the_file_and_the_way_back(command, damage, trained_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run.adapter, adapter)
    spoil, message = WEIGHTS_DAMAGE[damage]
    spoil(adapter / "adapter_model.safetensors")
    asked = ["--prompt", "Hi"] if command == "generate" else [f"merge.output_dir={tmp_path / 'merged'}"]
    result = qlora(command, trained_run.root, f"merge.adapter={adapter}", *asked)
    assert_user_error(result, "adapter is damaged", f"{adapter / 'adapter_model.safetensors'}", message,
                      "checkpoint-12", wrapped=True)
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_merged_model_exits_2_naming_the_shard(damage, merged_small, trained_run, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(merged_small, merged)
    shard = sorted(merged.glob("*.safetensors"))[1]
    WEIGHTS_DAMAGE[damage][0](shard)
    result = qlora("generate", trained_run.root, "--model", merged, "--prompt", "Hi")
    assert_user_error(result, "--model", "model is damaged", shard.name, "qlora merge", wrapped=True)


@pytest.mark.slow
def test_merging_a_stopped_run_points_at_resume_and_its_last_checkpoint(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.root / "checkpoints", run / "checkpoints")  # stopped: no adapter/ yet
    result = qlora("merge", "tiny-mistral", f"training.output_dir={run}")
    assert_user_error(result, "does not exist", "--resume", f"merge.adapter={run / 'checkpoints' / 'checkpoint-12'}",
                      wrapped=True)


@pytest.mark.slow
def test_merge_refuses_an_existing_output_unless_overwrite_and_overwrites_only_a_merge(trained_run, tmp_path):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    result = qlora("merge", trained_run.root, f"merge.output_dir={output}")
    assert_user_error(result, "already exists", "--overwrite", wrapped=True)
    result = qlora("merge", trained_run.root, f"merge.output_dir={output}", "--overwrite")
    assert_user_error(result, "merge.output_dir", "not a merged model that qlora wrote", wrapped=True)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("card, merged", [
    (None, True),  # written by qlora merge now: huggingface_hub's ModelCard, tagged qlora and merged
    ("---\nbase_model: base\ntags: [qlora, merged]\n---\n\n# Merged model\n", True),  # by earlier versions
    ("---\nbase_model: base\ntags: [merged]\n---\n", False),  # someone else's merge
    ("# My model\n\ntags: [qlora, merged]\n", False),  # the words, not the card's front matter
    ("---\ntags: [qlora, merged\n---\n", False),  # front matter that is not YAML
])
def test_overwrite_knows_a_merged_folder_by_its_model_card(card, merged, tmp_path):
    from qlora_cli.atomic import model_card
    from qlora_cli.plan.preflight import is_merged_folder

    (tmp_path / "config.json").write_text("{}")
    if card is None:
        model_card("merged", "base", "# Merged model\n", library_name="transformers").save(tmp_path / "README.md")
    else:
        (tmp_path / "README.md").write_text(card)
    assert is_merged_folder(tmp_path) is merged
    (tmp_path / "config.json").unlink()
    assert not is_merged_folder(tmp_path)  # a card without a model


@pytest.mark.slow
def test_overwriting_a_merge_says_the_adapter_s_lora_settings_are_used(trained_run, merged_small, tmp_path):
    output = tmp_path / "merged"
    shutil.copytree(merged_small, output)
    trained_rank = json.loads((trained_run.adapter / "adapter_config.json").read_text())["r"]
    result = qlora("merge", trained_run.root, f"merge.output_dir={output}", f"lora.r={trained_rank * 2}", "--overwrite")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert f"lora.r: the recipe says {trained_rank * 2}, the adapter was trained with {trained_rank}" in said
    assert "merged as the adapter was trained" in said and (output / "config.json").is_file()


@pytest.mark.slow
def test_a_merge_removes_what_a_killed_merge_left_but_not_a_running_ones(trained_run, tmp_path):
    import os

    output = tmp_path / "merged"
    killed, running = tmp_path / ".merged.tmp-999999999-x1", tmp_path / f".merged.tmp-{os.getpid()}-x2"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"half")
    result = qlora("merge", trained_run.root, f"merge.output_dir={output}")
    assert result.exit_code == 0, result.output
    assert not killed.exists() and running.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", running.name])


@pytest.mark.slow
@pytest.mark.parametrize("size", ["abc", "0GB", "-1GB"])
def test_a_shard_size_that_is_not_a_size_exits_2_before_loading(size, trained_run, tmp_path):
    output = tmp_path / "merged"
    result = qlora("merge", trained_run.root, f"merge.max_shard_size={size}", f"merge.output_dir={output}")
    assert_user_error(result, "merge.max_shard_size", "5GB", wrapped=True)
    assert not output.exists()
    assert qlora("config", "validate", trained_run.root, f"merge.max_shard_size={size}").exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("output", [".", "adapter", "adapter/merged", "..", "checkpoints", "<base>", "<base>/merged"])
def test_merge_never_overwrites_the_run_its_adapter_checkpoints_or_base_model(output, trained_run, tmp_path):
    run = tmp_path / "runs" / "run"
    shutil.copytree(trained_run.adapter, run / "adapter")
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    base = Path(json.loads((trained_run.adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    before = sorted(p.name for p in base.iterdir())
    target = base / output.removeprefix("<base>").lstrip("/") if output.startswith("<base>") else run / output
    result = qlora("merge", trained_run.root, f"training.output_dir={run}", "model.init_from_config=null",
                   f"model.name_or_path={base}", f"merge.output_dir={target}", "--overwrite")
    assert_user_error(result, "merge.output_dir", "could delete", wrapped=True)
    assert (run / "adapter" / "adapter_config.json").is_file() and not (run / "adapter" / "merged").exists()
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and sorted(p.name for p in base.iterdir()) == before


# ---------------------------------------------------------------- generate


@pytest.mark.slow
def test_prompt_prints_the_answer(answering_run, adapter_answers):
    question, answer = PAIRS[2]
    result = qlora("generate", answering_run.root, "--prompt", question)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == answer
    assert answer == adapter_answers[2]["response"]  # alone or in a padded batch: the same answer


@pytest.mark.slow
def test_answers_file_keeps_each_record_and_adds_its_response(adapter_answers):
    assert [{k: v for k, v in row.items() if k != "response"} for row in adapter_answers] == [
        {"id": i, "prompt": q, "expected": a} for i, (q, a) in enumerate(PAIRS)]
    assert all(row["response"] for row in adapter_answers)


@pytest.mark.slow
def test_resume_answers_only_the_lines_not_yet_written(answering_run, adapter_answers, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PAIRS[:4])
    output = tmp_path / "answers.jsonl"
    output.write_text("".join(json.dumps({**row, "response": "answered before"}) + "\n" for row in adapter_answers[:2]))

    result = qlora("generate", answering_run.root, "--input", prompts, "--output", output)
    assert_user_error(result, "already exists", "--resume", wrapped=True)

    result = qlora("generate", answering_run.root, "--input", prompts, "--output", output, "--resume")
    assert result.exit_code == 0, result.output
    responses = [row["response"] for row in read_jsonl(output)]
    assert responses == ["answered before"] * 2 + [row["response"] for row in adapter_answers[2:4]]


# Sampling from the top token only: several sequences per prompt, each the greedy answer.
SEVERAL_ANSWERS = ["generate.num_return_sequences=2", "generate.do_sample=true", "generate.top_k=1"]


@pytest.mark.slow
def test_several_answers_per_prompt_stay_on_their_own_record(answering_run, adapter_answers, tmp_path):
    output = tmp_path / "answers.jsonl"
    result = qlora("generate", answering_run.root, *SEVERAL_ANSWERS, "generate.batch_size=3",
                   "--input", write_prompts(tmp_path / "prompts.jsonl", PAIRS[:4]), "--output", output)
    assert result.exit_code == 0, result.output
    rows = read_jsonl(output)
    assert [row["id"] for row in rows] == [0, 1, 2, 3]
    assert [row["responses"] for row in rows] == [[row["response"]] * 2 for row in adapter_answers[:4]]


@pytest.mark.slow
def test_several_answers_to_one_prompt_are_all_printed(answering_run, adapter_answers):
    result = qlora("generate", answering_run.root, *SEVERAL_ANSWERS, "--prompt", PAIRS[2][0])
    assert result.exit_code == 0, result.output
    answer = adapter_answers[2]["response"]
    assert f"answer 1: {answer}" in result.output and f"answer 2: {answer}" in result.output


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parent.parent.glob("recipes/*.yaml")),
                         ids=lambda p: p.name)
def test_the_shipped_recipes_stream_answers_to_a_prompt(path):
    from qlora_cli.recipe.builders import build_generation_config
    from qlora_cli.recipe.load import load_recipe

    config = build_generation_config(load_recipe([str(path)]).written("generate"))
    assert Generator(None, None, "mistral", config).streams
    assert not Generator(None, None, "mistral", build_generation_config({"num_beams": 2})).streams


@pytest.mark.slow
def test_beam_search_answers_a_prompt_without_streaming(answering_run, adapter_answers):
    result = qlora("generate", answering_run.root, "generate.num_beams=2", "--prompt", PAIRS[2][0])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == adapter_answers[2]["response"]


@pytest.mark.slow
def test_a_chat_with_several_answers_per_prompt_exits_2(answering_run):
    result = qlora("generate", answering_run.root, *SEVERAL_ANSWERS, "--interactive", input="Hi\n/exit\n")
    assert_user_error(result, "generate.num_return_sequences", "--interactive", wrapped=True)


@pytest.mark.slow
def test_stop_strings_end_answers_to_a_prompt_and_to_a_file(answering_run, tmp_path):
    question, answer = PAIRS[0]
    assert answer.startswith("The capital of France") and "Paris" in answer
    result = qlora("generate", answering_run.root, "generate.stop_strings=[France]", "--prompt", question)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "The capital of France"
    output = tmp_path / "answers.jsonl"
    result = qlora("generate", answering_run.root, "generate.stop_strings=[France]",
                   "--input", write_prompts(tmp_path / "prompts.jsonl", PAIRS[:1]), "--output", output)
    assert result.exit_code == 0, result.output
    assert read_jsonl(output)[0]["response"] == "The capital of France"


@pytest.mark.slow
def test_return_dict_in_generate_still_writes_the_answers(answering_run, adapter_answers, tmp_path):
    output = tmp_path / "answers.jsonl"
    result = qlora("generate", answering_run.root, "generate.return_dict_in_generate=true",
                   "--input", write_prompts(tmp_path / "prompts.jsonl", PAIRS[:2]), "--output", output)
    assert result.exit_code == 0, result.output
    assert [row["response"] for row in read_jsonl(output)] == [row["response"] for row in adapter_answers[:2]]


@pytest.mark.slow
def test_prompt_ids_equal_the_prompt_part_of_the_prepared_training_examples(answering_run):
    recipe = load_recipe([str(answering_run.root)])
    record = json.loads((answering_run.root / "run.json").read_text())
    train = load_prepared(Path(recipe.data.prepared_dir) / record["data_fingerprint"]).dataset["train"]
    prompts = []
    for row in train:  # packed rows: split them back into examples
        start = 0
        for length in row["seq_lengths"]:
            ids, labels = row["input_ids"][start:start + length], row["labels"][start:start + length]
            first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            prompts.append(ids[:first_trained])
            start += length
    generator = Generator(None, load_recipe_tokenizer(recipe), recipe.data.template, None)
    expected = [generator.prompt_ids([{"role": "user", "content": q}]) for q, _ in PAIRS]
    assert sorted(prompts) == sorted(expected)


@pytest.fixture(scope="module")
def generator(answering_run):
    return load_generator(load_recipe([str(answering_run.root)]))


@pytest.mark.slow
def test_greedy_generation_is_deterministic_and_stops_at_eos(generator):
    question, answer = PAIRS[0]
    ids = torch.tensor([generator.prompt_ids([{"role": "user", "content": question}])])
    runs = []
    for _ in range(2):
        with torch.no_grad():
            out = generator.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                           generation_config=generator.generation_config)
        runs.append(out[0, ids.shape[1]:].tolist())
    assert runs[0] == runs[1]
    new = runs[0]
    assert new[-1] == generator.tokenizer.eos_token_id and len(new) < 64  # stopped at EOS, not at the limit
    assert new.count(generator.tokenizer.eos_token_id) == 1
    assert generator.tokenizer.decode(new, skip_special_tokens=True).strip() == answer


@pytest.mark.slow
def test_unquantized_generation_computes_what_was_trained(answering_run, generator):
    # generate.quantized=false follows merge.base (dequantized): the 4-bit weights training saw.
    unquantized = load_generator(load_recipe([str(answering_run.root)], ["generate.quantized=false"]))
    assert not any("4bit" in type(m).__name__ for m in unquantized.model.modules())
    ids = torch.tensor([generator.prompt_ids([{"role": "user", "content": "Name a colour of the sky."}])])
    with torch.no_grad():
        expected, got = (g.model(input_ids=ids).logits for g in (generator, unquantized))
    assert (expected - got).abs().max().item() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("lines, line_number, message", [
    (['{"prompt": "fine"}', '{"prompt": "broken"'], 2, "malformed JSON"),
    (['{"prompt": "fine"}', '{"question": "where is the prompt?"}'], 2, "needs `prompt`"),
    (['{"prompt": "   "}'], 1, "the prompt is empty"),
])
def test_bad_prompt_files_exit_2_with_file_and_line(lines, line_number, message, answering_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    output = tmp_path / "answers.jsonl"
    result = qlora("generate", answering_run.root, "--input", prompts, "--output", output)
    assert_user_error(result, f"{prompts}:{line_number}", message, wrapped=True)
    assert not output.exists()


@pytest.mark.slow
def test_a_prompts_file_that_is_not_utf8_exits_2_with_file_and_line(trained_run, tmp_path):
    prompts = tmp_path / "latin1.jsonl"
    prompts.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    result = qlora("generate", trained_run.root, "--input", prompts, "--output", tmp_path / "answers.jsonl")
    assert_user_error(result, f"{prompts}:2", "not UTF-8", "0xe9", wrapped=True)


@pytest.mark.slow
def test_a_prompts_folder_is_named_a_folder(trained_run, tmp_path):
    result = qlora("generate", trained_run.root, "--input", tmp_path, "--output", tmp_path / "answers.jsonl")
    assert_user_error(result, "--input", "is a folder", wrapped=True)


@pytest.mark.slow
@pytest.mark.parametrize("size", [0, -1])
def test_a_batch_size_below_1_exits_2_before_loading(size, trained_run, tmp_path):
    output = tmp_path / "answers.jsonl"
    result = qlora("generate", trained_run.root, f"generate.batch_size={size}",
                   "--input", write_prompts(tmp_path / "prompts.jsonl", PAIRS[:2]), "--output", output)
    assert_user_error(result, "generate.batch_size", "at least 1", wrapped=True)
    assert not output.exists()


@pytest.mark.slow
def test_a_missing_model_source_exits_2(answering_run, tmp_path):
    result = qlora("generate", answering_run.root, "--model", tmp_path / "no-model", "--prompt", "Hi")
    assert_user_error(result, "--model", "no-model", "does not exist", wrapped=True)
    result = qlora("generate", answering_run.root, f"training.output_dir={tmp_path / 'never-trained'}",
                   "--prompt", "Hi")
    assert_user_error(result, "never-trained", "does not exist", wrapped=True)


@pytest.mark.slow
@pytest.mark.parametrize("source, message", [
    ("run folder", "has no config.json"),
    ("unknown config", "cannot load model"),
    ("file", "is a file"),
])
def test_a_model_option_that_names_no_model_exits_2(source, message, trained_run, tmp_path):
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text("{}")
    path = {"run folder": trained_run.root, "unknown config": tmp_path / "unknown",
            "file": trained_run.root / "recipe.yaml"}[source]
    result = qlora("generate", trained_run.root, "--model", path, "--prompt", "Hi")
    assert_user_error(result, "--model", message, wrapped=True)


@pytest.mark.slow
def test_prompt_and_interactive_win_over_the_recipes_input_file(answering_run, tmp_path):
    recipe_io = [f"generate.input={write_prompts(tmp_path / 'prompts.jsonl', PAIRS[:1])}",
                 f"generate.output={tmp_path / 'answers.jsonl'}"]
    question, answer = PAIRS[1]
    result = qlora("generate", answering_run.root, *recipe_io, "--prompt", question)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == answer
    result = qlora("generate", answering_run.root, *recipe_io, "--interactive", input=f"{question}\n/exit\n")
    assert result.exit_code == 0 and answer in result.output, result.output
    assert not (tmp_path / "answers.jsonl").exists()


@pytest.mark.slow
def test_a_recipe_without_max_new_tokens_is_warned_that_answers_are_cut_short(trained_run):
    result = qlora("generate", trained_run.root, "~generate.max_new_tokens", "--prompt", "Hi")
    assert result.exit_code == 0, result.output
    assert "generate.max_new_tokens" in result.output.replace("\n", "")


@pytest.mark.slow
def test_interactive_answers_until_exit(answering_run):
    question, answer = PAIRS[1]
    result = qlora("generate", answering_run.root, "--interactive", input=f"{question}\n/exit\n")
    assert result.exit_code == 0, result.output
    assert answer in result.output


class _EchoGenerator:
    """Answers each conversation with its prompt: enough to drive `answer_file` without a model."""

    def answer_batch(self, conversations):
        return [[messages[-1]["content"]] for messages in conversations]


def test_resume_drops_a_last_line_cut_short_by_a_kill_and_answers_it_again(tmp_path):
    from qlora_cli.export.generate import answer_file, read_prompts

    records = read_prompts(write_prompts(tmp_path / "prompts.jsonl", PAIRS[:4]))
    output = tmp_path / "answers.jsonl"
    whole = json.dumps({**records[0].record, "response": "before"}, ensure_ascii=False) + "\n"
    cut = json.dumps({**records[1].record, "response": "caf\u00e9"}, ensure_ascii=False).encode()[:-3]
    output.write_bytes(whole.encode() + cut)  # the next answer, cut inside a character
    assert answer_file(_EchoGenerator(), records, output, batch_size=2, resume=True) == 3
    rows = read_jsonl(output)
    assert [row["id"] for row in rows] == [0, 1, 2, 3] and rows[0]["response"] == "before"



def test_resume_keeps_a_cut_line_of_prompts_that_have_a_response_column(tmp_path):
    """A prompts file with its own `response` column (a reference, an old answer): the answer
    takes that key's place in the line, and a line cut there is still recognised as the next answer."""
    from qlora_cli.export.generate import answer_file, read_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q, "response": "old", "id": i}) + "\n"
                               for i, (q, _) in enumerate(PAIRS[:3])))
    records = read_prompts(prompts)
    output = tmp_path / "answers.jsonl"
    whole = json.dumps({**records[0].record, "response": "before"}, ensure_ascii=False) + "\n"
    cut = json.dumps({**records[1].record, "response": "a new answer"}, ensure_ascii=False).encode()[:-20]
    output.write_bytes(whole.encode() + cut)
    assert answer_file(_EchoGenerator(), records, output, batch_size=2, resume=True) == 2
    rows = read_jsonl(output)
    assert [row["id"] for row in rows] == [0, 1, 2] and rows[0]["response"] == "before"
    assert rows[1]["response"] == PAIRS[1][0]  # answered again (the echo), in the record's `response` place

NOT_ANSWERS = {
    "notes": "my notes\nsecond line\n",
    "one line without a newline": "hello",
    "JSON lines without a response": '{"id": 0, "prompt": "x"}\n',
    "answers to other prompts": json.dumps({"id": 7, "prompt": "another question", "response": "r"}) + "\n",
    "a partial line of the user's": json.dumps({"id": 0, "prompt": PAIRS[0][0], "expected": PAIRS[0][1],
                                                "response": "r"}) + "\n" + '{"note": "mine, not finished',
    "more answers than prompts": "".join(json.dumps({"id": i, "prompt": q, "expected": a, "response": a}) + "\n"
                                         for i, (q, a) in enumerate(PAIRS[:3])),
}


@pytest.mark.parametrize("text", NOT_ANSWERS.values(), ids=NOT_ANSWERS.keys())
def test_resume_refuses_a_file_that_is_not_its_answers_and_leaves_it_whole(text, trained_run, tmp_path):
    output = tmp_path / "notes.txt"
    output.write_text(text)
    result = qlora("generate", trained_run.root, "--input", write_prompts(tmp_path / "prompts.jsonl", PAIRS[:2]),
                   "--output", output, "--resume")
    assert_user_error(result, "not this command's answers file", f"{output}:", wrapped=True)
    assert output.read_text() == text


@pytest.mark.slow
def test_a_prompt_with_output_writes_its_answer_there(answering_run, adapter_answers, tmp_path):
    output = tmp_path / "one.jsonl"
    result = qlora("generate", answering_run.root, "--prompt", PAIRS[0][0], "--output", output)
    assert result.exit_code == 0, result.output
    assert read_jsonl(output) == [{"prompt": PAIRS[0][0], "response": adapter_answers[0]["response"]}]


def test_a_second_generate_into_an_answers_file_being_written_exits_2_before_loading(trained_run, tmp_path):
    from qlora_cli.atomic import lock_output_file, release_folder

    output = tmp_path / "answers.jsonl"
    first = lock_output_file(output, "generate")  # as a first `qlora generate --output` holds it
    try:
        result = qlora("generate", trained_run.root, "--input", write_prompts(tmp_path / "prompts.jsonl", PAIRS[:2]),
                       "--output", output)
    finally:
        release_folder(first)
    assert_user_error(result, f"{output} is in use by pid", "another file", wrapped=True)
    assert not output.exists() and not list(tmp_path.glob(".answers*"))


@pytest.mark.slow
def test_a_full_disk_while_answering_exits_2_with_the_space_needed_and_leaves_no_empty_file(trained_run, tmp_path,
                                                                                            small_disk):
    from conftest import fill_disk

    disk = small_disk(64)
    answered = disk / "answered.jsonl"  # one answer from before, to resume, filling a whole page of the tmpfs
    line = json.dumps({"id": 0, "prompt": PAIRS[0][0], "expected": PAIRS[0][1], "response": ""})
    answered.write_text(line.replace('"response": ""', f'"response": "{"a" * (4095 - len(line))}"') + "\n")
    assert answered.stat().st_size == 4096
    fill_disk(disk)
    prompts = write_prompts(tmp_path / "prompts.jsonl", PAIRS[:3])
    for output, flags in ((disk / "answers.jsonl", []), (answered, ["--resume"])):
        before = output.read_bytes() if output.exists() else None
        result = qlora("generate", trained_run.root, "generate.max_new_tokens=4", "--input", prompts,
                       "--output", output, *flags)
        assert_user_error(result, "no space left", "it needs", "free at least", wrapped=True)
        assert (output.read_bytes() if output.exists() else None) == before  # no empty file, no half line


def test_answer_file_refuses_an_existing_output_without_resume(tmp_path):
    from qlora_cli.errors import UserError
    from qlora_cli.export.generate import check_output

    output = tmp_path / "answers.jsonl"
    check_output(output, resume=False)
    output.write_text("")
    check_output(output, resume=True, records=[])
    with pytest.raises(UserError, match="already exists") as error:
        check_output(output, resume=False)
    assert error.value.where == "--output"


@pytest.mark.slow
@pytest.mark.parametrize("output, message", [
    ("/proc/no-such-folder/answers.jsonl", "is not writable"),
    (".", "is a folder"),
])
def test_an_output_that_cannot_be_written_exits_2_before_loading(output, message, trained_run, tmp_path):
    # trained_run's adapter is never loaded: the check comes first (else: a traceback after loading).
    result = qlora("generate", trained_run.root, "--input", write_prompts(tmp_path / "prompts.jsonl", PAIRS[:1]),
                   "--output", tmp_path / output, "--resume")
    assert_user_error(result, "--output", message, wrapped=True)


def test_an_output_in_a_folder_not_yet_made_is_written(tmp_path):
    from qlora_cli.export.generate import answer_file, check_output, read_prompts

    output = tmp_path / "new" / "folder" / "answers.jsonl"
    check_output(output, resume=False)
    answer_file(_EchoGenerator(), read_prompts(write_prompts(tmp_path / "prompts.jsonl", PAIRS[:1])), output, 1)
    assert read_jsonl(output)[0]["response"] == PAIRS[0][0]


class _FailingModel:
    device = torch.device("cpu")

    def generate(self, **kwargs):
        raise RuntimeError("CUDA out of memory (pretend)")


def test_a_generation_that_fails_leaves_no_answers_file(tmp_path):
    from transformers import GenerationConfig

    from qlora_cli.export.generate import answer_file, read_prompts
    from qlora_cli.data.tokenizer import load_tokenizer

    generator = Generator(_FailingModel(), load_tokenizer("mistral-common:v1"), "mistral", GenerationConfig())
    output = tmp_path / "answers.jsonl"
    with pytest.raises(RuntimeError, match="out of memory"):
        answer_file(generator, read_prompts(write_prompts(tmp_path / "prompts.jsonl", PAIRS[:2])), output, 2)
    assert not output.exists()


def test_streaming_raises_the_models_error_instead_of_waiting_forever():
    import threading

    from qlora_cli.data.tokenizer import load_tokenizer

    generator = Generator(_FailingModel(), load_tokenizer("mistral-common:v1"), "mistral", None)
    raised = []

    def consume():
        try:
            list(generator.stream([{"role": "user", "content": "Hi"}]))
        except RuntimeError as err:
            raised.append(err)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "stream() hung after model.generate raised"
    assert "out of memory" in str(raised[0])


HOSTILE_PROMPTS = {
    "lone surrogate": ('{"prompt": "a\\ud800b"}\n', "prompts.jsonl:1", "lone surrogate"),
    "nested 10,000 deep": ('{"prompt": "hi"}\n' + "[" * 10_000 + "]" * 10_000 + "\n", "prompts.jsonl:2",
                           "nested too deeply"),
}


@pytest.mark.parametrize("text, where, problem", HOSTILE_PROMPTS.values(), ids=HOSTILE_PROMPTS)
def test_a_hostile_prompts_file_exits_2_at_its_line_before_any_model_loads(tmp_path, text, where, problem):
    (tmp_path / "prompts.jsonl").write_text(text, encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    result = qlora("generate", "tiny-mistral", "--input", tmp_path / "prompts.jsonl", "--output", output)
    assert_user_error(result, where, problem, wrapped=True)
    assert not output.exists()


def test_a_prompt_the_shell_could_not_decode_exits_2():
    # bytes that are not UTF-8 reach Python's argv as lone surrogates
    assert_user_error(qlora("generate", "tiny-mistral", "--prompt", "caf\udce9"), "--prompt", "not UTF-8 text")


@pytest.mark.slow
def test_a_merge_of_another_adapter_is_not_taken_for_the_runs_merged_model(merged_small, trained_run, tmp_path):
    """Export and eval reuse the run's merged model only when it was merged from the adapter they
    are asked for, as it is now: a retrained run or another `merge.adapter` must not serve old weights."""
    from safetensors.torch import load_file, save_file

    from qlora_cli.atomic import write_checksums
    from qlora_cli.plan.preflight import existing_merged_model
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.run_folder import is_current_merge

    recipe = load_recipe([str(trained_run.root)], [f"merge.output_dir={merged_small}"])
    assert is_current_merge(recipe) and existing_merged_model(recipe) == str(merged_small)
    other = tmp_path / "adapter"
    shutil.copytree(trained_run.root / "adapter", other)
    weights = load_file(other / "adapter_model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] * 2
    save_file(weights, other / "adapter_model.safetensors")
    write_checksums(other)
    retrained = load_recipe([str(trained_run.root)], [f"merge.output_dir={merged_small}", f"merge.adapter={other}"])
    assert not is_current_merge(retrained) and existing_merged_model(retrained) is None
