"""`qlora export`: GGUF files by llama.cpp's converter and quantizer, checked in llama.cpp, served
through its OpenAI-compatible server; the Ollama Modelfile; the adapter alone; the user's mistakes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from conftest import assert_user_error, qlora

needs_llama_cpp = pytest.mark.skipif(find_spec("llama_cpp") is None,
                                     reason="the gguf extra (llama-cpp-python) is not installed: pip install '.[gguf]'")
TYPES = "f16,q8_0,q4_k_m"


@pytest.fixture(scope="session")
def exported(answering_run, tmp_path_factory):
    """The answering run exported once for Ollama in f16, q8_0 and q4_k_m (merged first, into a
    folder of its own so that no other test finds a merged model it did not make)."""
    if find_spec("llama_cpp") is None:
        pytest.skip("the gguf extra (llama-cpp-python) is not installed: pip install '.[gguf]'")
    merged = tmp_path_factory.mktemp("export-merged") / "merged"
    result = qlora("export", answering_run.root, f"merge.output_dir={merged}", "--to", "ollama", "--quant", TYPES)
    assert result.exit_code == 0, result.output
    return answering_run.root / "export", merged, result.output


def trained_pair(answering_run) -> tuple[str, str]:
    """The first training question and its answer, as the answering run learnt them."""
    from conftest import sample_pairs

    return sample_pairs(1)[0]


@pytest.mark.slow
def test_export_writes_each_type_checked_in_llama_cpp(exported, answering_run):
    folder, merged, output = exported
    name = answering_run.root.name
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{name}-{t}.gguf" for t in TYPES.split(",")] + ["Modelfile", "export.json"])
    assert (merged / "config.json").exists()  # merged first: the run had no merged model
    assert "merged the adapter first" in output and "engine check passed" in output
    report = json.loads((folder / "export.json").read_text())
    rows = {row["type"]: row for row in report["types"]}
    assert rows["f16"]["same_greedy_tokens_as_f16"] is None  # the reference
    assert 0 <= rows["f16"]["mean_kl_vs_transformers"] < 1e-3  # the limit is 0.02: f16 is far inside it
    assert rows["q8_0"]["mean_kl_vs_transformers"] is None  # quantized types are measured against f16
    assert rows["q8_0"]["same_greedy_tokens_as_f16"] >= 0.9 and rows["q8_0"]["mean_kl_vs_f16"] < 0.05
    assert 0 <= rows["q4_k_m"]["same_greedy_tokens_as_f16"] <= 1 and rows["q4_k_m"]["mean_kl_vs_f16"] >= 0
    for type_name in ("q8_0", "q4_k_m"):
        assert type_name in output
    assert not list(answering_run.root.glob(".export.tmp-*"))


@pytest.mark.slow
def test_modelfile_names_the_gguf_template_stops_and_mistral_v1_format(exported):
    folder, _, _ = exported
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{sorted(folder.glob('*-q4_k_m.gguf'))[0].name}\n")
    assert 'PARAMETER stop "</s>"' in modelfile and 'PARAMETER stop "[INST]"' in modelfile
    assert " [INST] " in modelfile and " [/INST]" in modelfile  # v1: the markers are text


@pytest.mark.slow
def test_served_gguf_gives_the_trained_answer_through_the_openai_client(exported, answering_run):
    from openai import OpenAI

    folder, _, _ = exported
    question, answer = trained_pair(answering_run)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # `timeout` ends the server even if this test dies before its `finally`.
    server = subprocess.Popen(["timeout", "180", sys.executable, "-m", "llama_cpp.server", "--model",
                               str(next(folder.glob("*-f16.gguf"))), "--host", "127.0.0.1", "--port", str(port),
                               "--n_ctx", "512", "--n_threads", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0)
        _wait_until_up(client, server)
        messages = [{"role": "user", "content": question}]
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=32)
        assert reply.choices[0].message.content.strip() == answer
        streamed = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=32,
                                                  stream=True)
        pieces = [chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices]
        assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip() == answer
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_until_up(client, server, seconds: float = 90) -> None:
    import openai

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            time.sleep(0.5)
    raise AssertionError("the server did not answer within 90 s")


# ---------------------------------------------------------------- the template in the GGUF, per tokenizer version


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("version", ["v3", "v7", "tekken_240911"])
def test_gguf_embedded_template_gives_qlora_ids(version, tmp_path):
    """A vocabulary-only GGUF written by llama.cpp's converter from a folder qlora saved: the chat
    as its embedded template formats it, tokenized by llama.cpp, is what qlora trains on. (v1 is
    the tiny recipe's: every export of it runs this same check, `exported` among them.)"""
    import llama_cpp
    from transformers import MistralConfig

    from qlora_cli.data.chat_template import chat_template
    from qlora_cli.data.tokenizer import load_tokenizer
    from qlora_cli.export import engine_check
    from qlora_cli.export.gguf import sentencepiece_file
    from qlora_cli.export.llama_cpp import convert, converter_dir

    tokenizer = load_tokenizer(f"mistral-common:{version}")
    folder = tmp_path / version
    tokenizer.chat_template = chat_template(tokenizer, engine="llama.cpp")
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    config.architectures = ["MistralForCausalLM"]
    config.save_pretrained(folder)
    sentencepiece = sentencepiece_file(f"mistral-common:{version}")  # as `qlora export` hands it over
    if sentencepiece:
        shutil.copy(sentencepiece, folder / "tokenizer.model")
    convert(folder, tmp_path / "vocab.gguf", "f16", converter_dir(), vocab_only=True)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "Jupiter is the largest planet in the solar system. Buenos días."}],
        [{"role": "user", "content": "Überall 日本語 🙂"}, {"role": "assistant", "content": "ok.\nnext line"},
         {"role": "user", "content": "and (x = 1;)?"}, {"role": "assistant", "content": "**bold** done."}],
    ]
    assert engine_check.template_problems(llm, conversations, tokenizer, "mistral") == []


# ---------------------------------------------------------------- the adapter alone


@pytest.mark.slow
def test_adapter_export_keeps_peft_names_and_says_what_loads_it(trained_run):
    result = qlora("export", trained_run.root, "--to", "adapter")
    assert result.exit_code == 0, result.output
    folder = trained_run.root / "export-adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "EXPORT.md"} <= {
        p.name for p in folder.iterdir()}
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    notes = (folder / "EXPORT.md").read_text()
    assert "rank 4" in notes and "base_model.model.model.layers.0.self_attn.q_proj" in notes and "vLLM" in notes
    assert "not checked offline" in result.output


# ---------------------------------------------------------------- mistakes


@needs_llama_cpp
@pytest.mark.slow
def test_unknown_type_lists_the_valid_ones(trained_run):
    result = qlora("export", trained_run.root, "--to", "gguf", "--quant", "q8_0,q4_km")
    assert_user_error(result, "unknown GGUF type q4_km", "q4_k_m", "q6_k", "bf16")
    assert not (trained_run.root / "export").exists()


@pytest.mark.slow
def test_missing_llama_cpp_names_the_extra(trained_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    result = qlora("export", trained_run.root, "--to", "gguf")
    assert_user_error(result, "llama.cpp is not installed", "[gguf]")


def test_run_without_adapter_says_to_train_first(tmp_path):
    result = qlora("export", "tiny-mistral", f"training.output_dir={tmp_path / 'run'}", "--to", "gguf")
    assert_user_error(result, "does not exist", "train first")


def test_gguf_flags_with_the_adapter_target_are_refused(tmp_path):
    result = qlora("export", "tiny-mistral", f"training.output_dir={tmp_path / 'run'}", "--to", "adapter",
                   "--quant", "q8_0")
    assert_user_error(result, "--quant is for GGUF files", "--to gguf")


@pytest.mark.parametrize("recipe, last_role", [("tiny-mistral", "assistant"), ("tiny-mistral-dpo", "assistant"),
                                               ("tiny-mistral-kto", "assistant"), ("tiny-mistral-grpo", "user")])
def test_every_kind_of_run_has_probes_taken_before_anything_is_merged(recipe, last_role):
    """Chats end with their answer, preference pairs with the chosen one, GRPO prompts with the
    question (no answer to format): each kind of run can be exported and checked."""
    from qlora_cli.data.sources import read_rows
    from qlora_cli.export.gguf import probe_conversations
    from qlora_cli.recipe.load import load_recipe

    loaded = load_recipe([recipe], [])
    probes = probe_conversations(loaded)
    assert len(probes) == 4 and {p[-1]["role"] for p in probes} == {last_role}
    if recipe == "tiny-mistral-dpo":
        first = read_rows(loaded.data.sources[0])[0][1]
        assert probes[0][-1]["content"] == first["chosen"] if isinstance(first["chosen"], str) \
            else first["chosen"][-1]["content"]


def test_a_vision_models_modelfile_names_its_projector_as_a_second_from(tmp_path):
    from qlora_cli.export.ollama import write_modelfile
    from qlora_cli.recipe.load import load_recipe

    modelfile = write_modelfile(load_recipe(["tiny-mistral3-vision"], []), tmp_path, "v-f16.gguf", "v-mmproj-f16.gguf")
    assert modelfile.read_text().splitlines()[:2] == ["FROM ./v-f16.gguf", "FROM ./v-mmproj-f16.gguf"]


def test_unknown_target_lists_the_targets(tmp_path):
    result = qlora("export", "tiny-mistral", f"training.output_dir={tmp_path / 'run'}", "--to", "onnx")
    assert_user_error(result, "unknown export target 'onnx'", "gguf, ollama, adapter")


@needs_llama_cpp
@pytest.mark.slow
def test_too_little_disk_says_the_space_needed(exported, answering_run, small_disk):
    _, merged, _ = exported
    run = small_disk(4096) / "run"  # 4 MiB: the adapter fits, the GGUFs do not
    shutil.copytree(answering_run.root, run, ignore=shutil.ignore_patterns("export", "checkpoints", "merged"))
    result = qlora("export", run, f"merge.output_dir={merged}", "training.output_dir=" + str(run), "--to", "gguf")
    assert_user_error(result, "GiB free", "need about", wrapped=True)
    assert not (run / "export").exists()


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_a_vision_tower_too_shallow_for_llama_cpps_projector_map_is_refused_before_converting(layers, tmp_path):
    import torch
    from safetensors.torch import save_file

    from qlora_cli.errors import UserError
    from qlora_cli.export.gguf import _check_vision_tower

    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"num_hidden_layers": layers}}))
    save_file({f"model.multi_modal_projector.linear_{n}.weight": torch.zeros(2, 2) for n in (1, 2)},
              tmp_path / "model.safetensors")
    if layers == 3:
        _check_vision_tower(tmp_path)  # the shipped tiny-mistral3-vision's tower: converted
        return
    with pytest.raises(UserError) as refused:
        _check_vision_tower(tmp_path)
    assert "linear_2" in str(refused.value) and refused.value.key.endswith("vision_config.num_hidden_layers")
    assert "3 layers or more" in refused.value.fix
