"""`qlora export --to adapter`: the LoRA adapter alone, for engines that load one beside the base
(vLLM `--enable-lora`, TGI `LORA_ADAPTERS`, LoRAX), into `<run>/export-adapter/`.

The weights keep peft's names for transformers' module tree (`base_model.model.<module>.lora_A`),
which is what these engines map onto their own: for `mistral3` that tree puts the language
model under `model.language_model.`, the prefix vLLM's Mistral3 weight mapper expects. The
folder says its rank, alpha, targets and base model; that an engine applies it can only be checked
in that engine (none runs offline here), so the notes say so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import atomic_folder, hub_id
from qlora_cli.run_folder import merge_adapter_dir

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

WEIGHTS = "adapter_model.safetensors"
ENGINES = ("vLLM: vllm serve BASE --enable-lora --lora-modules NAME=FOLDER --max-lora-rank R",
           "TGI: LORA_ADAPTERS=FOLDER text-generation-launcher --model-id BASE",
           "LoRAX: an adapter_id naming FOLDER on a LoRAX server of BASE",
           "transformers/peft: PeftModel.from_pretrained(base, FOLDER)")


@dataclass
class AdapterExport:
    folder: Path
    notes: list[str] = field(default_factory=list)


def export_adapter(recipe: Recipe, *, overwrite: bool = False) -> AdapterExport:
    """Copy the run's adapter (weights, config, tokenizer with its chat template) and describe it."""
    from safetensors import safe_open

    from qlora_cli.export.gguf import check_target
    from qlora_cli.model.load import adapter_config
    from qlora_cli.plan.preflight import check_adapter

    adapter = merge_adapter_dir(recipe)
    check_adapter(adapter, recipe)
    target = Path(recipe.run_dir) / "export-adapter"
    check_target(target, overwrite)
    config = adapter_config(adapter)
    with safe_open(str(adapter / WEIGHTS), "pt") as weights:
        modules = sorted({key.split(".lora_")[0] for key in weights.keys() if ".lora_" in key})
    # The hub id engines download the base by; a local folder's path would only show this machine's.
    base = hub_id(recipe.model.name_or_path or config.get("base_model_name_or_path"))
    notes = [f"rank {config.get('r')}, alpha {config.get('lora_alpha')}, base model "
             + (base or "a local model (set base_model_name_or_path in adapter_config.json to where the engine finds it)"),
             f"{len(modules)} LoRA modules, e.g. {modules[0] if modules else 'none'}",
             "loads in: " + "; ".join(ENGINES),
             *_beyond_lora(config),
             "checked here: the adapter's files against the sha256 recorded when it was saved; not checked "
             "offline: that vLLM, TGI or LoRAX apply it (run one request against the engine and compare with "
             "`qlora generate`)"]
    with atomic_folder(target, replace=overwrite) as work:
        for file in adapter.iterdir():
            if file.is_file():
                shutil.copy2(file, work / file.name)
        config["base_model_name_or_path"] = base
        (work / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (work / "EXPORT.md").write_text("# LoRA adapter export\n\n" + "\n".join(f"- {n}" for n in notes)
                                        + "\n\nModules:\n\n" + "\n".join(f"    {m}" for m in modules) + "\n")
    return AdapterExport(target, notes)


def _beyond_lora(config: dict) -> list[str]:
    """What the adapter holds besides LoRA on Linear modules, which the serving engines load."""
    notes = []
    if config.get("modules_to_save"):
        notes.append(f"it also holds whole trained modules ({', '.join(config['modules_to_save'])}): vLLM and TGI "
                     "load LoRA weights only and would leave those out")
    if config.get("target_parameters"):
        notes.append("it holds LoRA on expert parameters (`target_parameters`), which vLLM, TGI and LoRAX may not "
                     "load: check the engine, or export the merged model with --to gguf")
    return notes
