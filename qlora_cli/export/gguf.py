"""`qlora export RUN --to gguf|ollama`: the merged model as GGUF files llama.cpp (and Ollama,
LM Studio) serve, written by llama.cpp's own converter and quantizer, checked in llama.cpp.

The story: the run's adapter must exist; the merged model is made when the run has none (`qlora
merge`); llama.cpp's converter writes f16 (or the 16-bit types asked) from a copy of the merged
folder whose tokenizer_config.json holds the chat template written for llama.cpp's tokenizer
(`chat_template.ENGINES`); the quantizer writes each other type from f16; the engine check
(`engine_check`) runs on every file; only then does `<run>/export/` appear, whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import atomic_folder, free_bytes, remove_stale_temporaries
from qlora_cli.errors import UserError
from qlora_cli.export import engine_check, llama_cpp
from qlora_cli.run_folder import is_current_merge, is_merged_model, merge_adapter_dir, merge_output_dir

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

DEFAULT_TYPES = ["f16"]
BASE_TYPE = "f16"  # what the quantizer starts from, and what quantized types are measured against
MMPROJ = "mmproj"  # a vision-language model's projector, which llama.cpp loads beside the GGUF
# Bytes per weight of each written type, for the disk check (a k-quant's blocks hold scales too).
BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5, "q4_k_m": 4.9}


@dataclass
class ExportResult:
    folder: Path
    files: list[Path]
    report: engine_check.CheckReport
    merged_now: bool  # the run had no merged model: export merged it first


def export_gguf(recipe: Recipe, types: list[str], *, ollama: bool = False, llama_cpp_dir: str | None = None,
                overwrite: bool = False) -> ExportResult:
    """Convert, quantize and check; `<run>/export/` appears only when every check passed."""
    from qlora_cli.plan.preflight import check_adapter

    check_adapter(merge_adapter_dir(recipe), recipe)
    target = Path(recipe.run_dir) / "export"
    check_target(target, overwrite)
    types = llama_cpp.check_types(types or DEFAULT_TYPES)
    converter = llama_cpp.converter_dir(llama_cpp_dir)
    probes = probe_conversations(recipe)
    merged, merged_now = _merged_model(recipe)
    _check_disk(target, merged, types)
    _check_vision_tower(merged)
    remove_stale_temporaries(target.parent, target.name)
    name = Path(recipe.run_dir).name
    from qlora_cli.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(merged))  # the converter's chat template and the engine check's ids
    with atomic_folder(target, replace=overwrite) as work:
        written = _write_ggufs(recipe, merged, tokenizer, converter, work, name, types)
        report = check_in_engine(recipe, merged, tokenizer, written, probes)
        for outtype in set(written) - {*types, MMPROJ}:  # f16 made only to quantize from and to measure against
            written.pop(outtype).unlink()
        files = list(written.values())
        if report.problems:  # llama.cpp and what was trained disagree: a bug, not the user's (exit 1)
            raise llama_cpp.ConversionFailed(
                "llama.cpp disagrees with what was trained, so nothing was written:\n  " + "\n  ".join(report.problems)
                + "\n  please report this with the run's recipe.yaml and export.json's probes")
        if ollama:
            from qlora_cli.export.ollama import write_modelfile

            projector = written.get(MMPROJ)
            write_modelfile(recipe, work, [p for t, p in written.items() if t != MMPROJ][-1].name,
                            projector.name if projector else None)
        (work / "export.json").write_text(json.dumps(_summary(report, files), indent=2) + "\n")
    return ExportResult(target, [target / f.name for f in files], report, merged_now)


def check_target(target: Path, overwrite: bool) -> None:
    """An export folder is replaced only with --overwrite (gguf, ollama and adapter alike)."""
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists", fix="pass --overwrite to replace it, or move it away")


def _merged_model(recipe: Recipe) -> tuple[Path, bool]:
    """The run's merged model, merged now (verified, as `qlora merge` does) when there is none, or
    when the one there was merged from another adapter (or the run's adapter before it was trained
    again): qlora wrote that folder, and exporting it would serve weights that were not asked for."""
    from qlora_cli.export.merge import merge

    if is_current_merge(recipe):
        return merge_output_dir(recipe), False
    return merge(recipe, overwrite=is_merged_model(merge_output_dir(recipe))).output, True


def _check_vision_tower(merged: Path) -> None:
    """llama.cpp's converter names the projector's `linear_N` only for N below the vision tower's
    layer count (its tensor map is built per block): a tower too shallow for its projector cannot
    be converted, which a tiny test tower can be (real Pixtral towers have 24 layers)."""
    import re

    from safetensors import safe_open

    vision = json.loads((merged / "config.json").read_text()).get("vision_config")
    if not vision:
        return
    linear = re.compile(r"multi_modal_projector\.linear_(\d+)\.")
    linears = set()
    for part in merged.glob("model*.safetensors"):
        with safe_open(part, framework="pt") as weights:
            linears |= {int(m[1]) for name in weights.keys() if (m := linear.search(name))}
    layers, top = vision.get("num_hidden_layers", 0), max(linears, default=-1)
    if top >= layers:
        raise UserError(f"llama.cpp's converter cannot write the mmproj of a vision tower of {layers} layer(s): "
                        f"it maps the projector's linear_{top} only when the tower has more than {top} layers",
                        key="model.init_from_config.vision_config.num_hidden_layers",
                        fix=f"train with a tower of {top + 1} layers or more (tiny-mistral3-vision has 3)")


def _check_disk(target: Path, merged: Path, types: list[str]) -> None:
    """Refuse before converting when the GGUFs cannot fit (weights counted from the merged shards)."""
    from qlora_cli.atomic import folder_size

    config = json.loads((merged / "config.json").read_text())
    width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(config.get("torch_dtype") or config.get("dtype")), 2)
    weights = folder_size(merged) / width
    need = int(sum(weights * BITS.get(t, 16) / 8 for t in {BASE_TYPE, *types}) * 1.05)
    free = free_bytes(target.parent)
    if need > free:
        raise UserError(f"the GGUF files need about {need / 2**30:.2f} GiB ({', '.join(types)}) but "
                        f"{target.parent} has {free / 2**30:.2f} GiB free", fix="free space, or ask for fewer types")


def _write_ggufs(recipe: Recipe, merged: Path, tokenizer, converter: Path, work: Path, name: str,
                 types: list[str]) -> dict[str, Path]:
    """The converter's types first (f16 always: the quantizer starts from it), then the quantizer's."""
    source = _converter_input(recipe, merged, tokenizer, work)
    written = {}
    for outtype in dict.fromkeys([BASE_TYPE] + [t for t in types if t in llama_cpp.CONVERTER_TYPES]):
        written[outtype] = work / f"{name}-{outtype}.gguf"
        llama_cpp.convert(source, written[outtype], outtype, converter)
    for quant in [t for t in types if t not in llama_cpp.CONVERTER_TYPES]:
        written[quant] = work / f"{name}-{quant}.gguf"
        llama_cpp.quantize(written[BASE_TYPE], written[quant], quant)
    if "vision_config" in json.loads((merged / "config.json").read_text()):  # a vision-language model
        written[MMPROJ] = work / f"{name}-mmproj-f16.gguf"
        llama_cpp.convert(_mmproj_input(source, work), written[MMPROJ], "f16", converter, mmproj=True)
        shutil.rmtree(work / MMPROJ_INPUT)
    shutil.rmtree(source)
    return written


def _converter_input(recipe: Recipe, merged: Path, tokenizer, work: Path) -> Path:
    """The merged folder as the converter reads it, its chat template written for llama.cpp's tokenizer."""
    from qlora_cli.data.chat_template import chat_template

    source = work / ".converter-input"
    source.mkdir()
    for file in merged.iterdir():
        (source / file.name).symlink_to(file.resolve())
    config_file = source / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.unlink()
    template = chat_template(tokenizer, recipe.data.template, engine="llama.cpp")
    if template:
        config["chat_template"] = template
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (source / "chat_template.jinja").unlink(missing_ok=True)  # tokenizer_config.json's is the one
    sentencepiece = sentencepiece_model(recipe)
    if sentencepiece and not (source / SENTENCEPIECE).exists():
        (source / SENTENCEPIECE).symlink_to(sentencepiece.resolve())
    return source


MMPROJ_INPUT = ".mmproj-input"
EMBEDDING = "embed_tokens.weight"
EMBEDDING_FILE = "model-mmproj-embed_tokens.safetensors"  # the converter reads every model*.safetensors


def _mmproj_input(source: Path, work: Path) -> Path:
    """The converter's input for its `--mmproj` pass: `source`'s files plus the language model's
    token embedding under a name without "language_model.".

    The pass drops every tensor named `*language_model.*` before it looks for `embed_tokens.weight`
    to copy the [IMG_BREAK] row from (llama.cpp's MmprojModel.filter_tensors, then
    LlavaVisionModel.modify_tensors); transformers keeps Mistral3's embedding at
    `model.language_model.embed_tokens.weight`, so without this copy the projector lacks
    `v.token_embd.img_break` and llama.cpp's mtmd refuses it.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = work / MMPROJ_INPUT
    folder.mkdir()
    for file in source.iterdir():
        (folder / file.name).symlink_to(file.resolve() if file.is_symlink() else file)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.exists() else None
    parts = sorted(set(index["weight_map"].values())) if index else sorted(
        f.name for f in source.iterdir() if f.name.startswith("model") and f.name.endswith(".safetensors"))
    for part in parts:
        with safe_open(source / part, framework="pt") as weights:
            names = [n for n in weights.keys() if n.endswith(EMBEDDING) and "language_model." in n]
            if names:
                save_file({EMBEDDING: weights.get_tensor(names[0])}, folder / EMBEDDING_FILE)
                break
    else:
        return folder  # no language-model embedding to copy: the converter says what it misses
    if index:
        index["weight_map"][EMBEDDING] = EMBEDDING_FILE
        index_file.unlink()  # a link to the merged model's own index: write a new file, not through it
        index_file.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


SENTENCEPIECE = "tokenizer.model"


def sentencepiece_model(recipe: Recipe) -> Path | None:
    """The SentencePiece model of the recipe's tokenizer, when it has one.

    The converter reads a SentencePiece vocabulary's scores from tokenizer.model, which llama.cpp's
    tokenizer merges by; from tokenizer.json alone it writes other scores, and llama.cpp then
    splits words otherwise ("▁Ju pite r" for "▁J upiter"): the engine check refuses such a GGUF.
    """
    from qlora_cli.data.tokenizer import tokenizer_spec

    return sentencepiece_file(tokenizer_spec(recipe.model), recipe.model.revision)


def sentencepiece_file(spec: str, revision: str | None = None) -> Path | None:
    """tokenizer.model of the tokenizer `spec` names (a mistral-common name, a folder, a hub id)."""
    from transformers.utils import cached_file

    from qlora_cli.data.tokenizer import MISTRAL_COMMON_FILES, MISTRAL_COMMON_PREFIX

    if spec.startswith(MISTRAL_COMMON_PREFIX):
        import mistral_common

        name = MISTRAL_COMMON_FILES.get(spec[len(MISTRAL_COMMON_PREFIX):], "")
        return Path(mistral_common.__file__).parent / "data" / name if name and ".model" in name else None
    found = cached_file(spec, SENTENCEPIECE, revision=revision,
                        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def probe_conversations(recipe: Recipe) -> list[list[dict]]:
    """The conversations the engine check asks, taken before anything is merged or converted."""
    system = recipe.generate.options.system_prompt
    probes = [engine_check.with_system_prompt(m, system) for m in engine_check.probe_conversations(recipe)]
    if not probes:
        raise UserError("the run's data has no conversation or prompt to probe the export with",
                        key="data.sources", fix="export a run whose first source holds chats, text, prompts or pairs")
    return probes


def check_in_engine(recipe: Recipe, merged: Path, tokenizer, written: dict[str, Path],
                    probes: list[list[dict]]) -> engine_check.CheckReport:
    """The engine check on every GGUF written (see engine_check)."""
    llama = llama_cpp.engine()
    template = recipe.data.template
    prompts = [engine_check.encode_prompt(engine_check.prompt_of(m), tokenizer, template) for m in probes]
    report = engine_check.CheckReport(probes, *engine_check.transformers_answers(merged, prompts, tokenizer.eos_token_id))
    context = max(1024, max(map(len, prompts)) + engine_check.MAX_NEW_TOKENS + 1)  # the longest probe and its answer
    f16, f16_log_probs = None, []
    mmproj = written.get(MMPROJ)
    for name, path in [(t, p) for t, p in written.items() if t != MMPROJ]:  # f16 first
        llm = llama.Llama(model_path=str(path), n_ctx=context, logits_all=True, verbose=False, seed=0)
        try:
            report.problems += [f"{name}: {p}" for p in engine_check.template_problems(llm, probes, tokenizer, template)]
            if mmproj and name == BASE_TYPE:
                report.problems += engine_check.mmproj_problems(llm, mmproj)
            answers = [engine_check.greedy(llm, prompt) for prompt in prompts]
            type_report = engine_check.compare(name, answers, f16, f16_log_probs, llm, prompts)
            if name in engine_check.EXACT_TYPES:
                report.problems += engine_check.against_transformers(type_report, report, llm, prompts)
            if name == BASE_TYPE:
                f16 = type_report
                f16_log_probs = [engine_check.log_probs_along(llm, p, a) for p, a in zip(prompts, answers)]
            report.types.append(type_report)
        finally:
            llm.close()
    return report


def _summary(report: engine_check.CheckReport, files: list[Path]) -> dict:
    return {
        "files": [f.name for f in files],
        "probes": [engine_check.prompt_of(m) for m in report.probes],
        "transformers_answers": report.reference,
        "types": [{"type": t.name, "same_greedy_tokens_as_f16": t.same_tokens, "mean_kl_vs_f16": t.mean_kl,
                   "mean_kl_vs_transformers": t.kl_vs_transformers} for t in report.types],
    }
