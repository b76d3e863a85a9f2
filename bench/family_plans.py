"""`qlora plan` of the family recipes at 1 x 2,048 and 4 x 2,048 tokens, offline.

The recipes name hub checkpoints, whose config.json this machine cannot download; so each plan
is made from the architecture's published config values (below, as `init_from_config`, with the
real tekken vocabulary), through the same `model_shape` / `recipe_settings` / `memory_items`
that `qlora plan` uses. Run: python bench/family_plans.py
"""

from __future__ import annotations

import json

from qlora_cli.hub import PUBLISHED as HUB  # the checkpoints `qlora plan` knows offline

SMALL_3_2 = HUB["mistralai/Mistral-Small-3.2-24B-Instruct-2506"][0]
TEXT_24B, PIXTRAL = SMALL_3_2["text_config"], SMALL_3_2["vision_config"]
TEXT_MINISTRAL_3_8B = {"model_type": "ministral3", "hidden_size": 4096, "intermediate_size": 14336,
                       "num_hidden_layers": 34, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
PUBLISHED = {  # recipe -> its checkpoint's architecture (config.json values)
    "mistral-nemo-12b": HUB["mistralai/Mistral-Nemo-Instruct-2407"][0],
    "mistral-small-3.2-24b": {"model_type": "mistral3", "text_config": TEXT_24B, "vision_config": PIXTRAL},
    "ministral-3-8b": {"model_type": "mistral3", "text_config": TEXT_MINISTRAL_3_8B, "vision_config": PIXTRAL},
    "mistral-small-3.2-24b-vision": {"model_type": "mistral3", "text_config": TEXT_24B, "vision_config": PIXTRAL},
}
SHAPES = [(1, 2048), (4, 2048)]
# The image rows of the vision recipe: one 1024 x 1024 picture in each 2,048-token row, laid out as
# mistral-common does for Mistral Small 3.x (14-pixel patches, 2 x 2 merge, 1,540-pixel maximum).
IMAGE = (1024, 1024)
SMALL_3_IMAGES = {"patch_size": 14, "spatial_merge_size": 2, "max_image_size": 1540}


def image_row(size=IMAGE) -> dict:
    """The image tokens and vision-tower patches one picture of `size` takes in Mistral Small 3.x."""
    from qlora_cli.data.images import ImageSettings, image_grid

    settings = ImageSettings(**SMALL_3_IMAGES)
    rows, cols = image_grid(*size, settings)
    return {"image_tokens": rows * (cols + 1), "patches": rows * cols * settings.spatial_merge_size ** 2}

# Mixture-of-experts rows: (recipe, config values, overrides, GPUs). Mixtral's values are its
# checkpoints' config.json as remembered (8x7B's are qlora_cli/hub.py's; 8x22B: v0.1's vocabulary
# of 32,000), not read from the hub; Mistral Small 4 and Large 4 are transformers' own config
# classes (Mistral4Config, MistralLarge4Config), whose defaults are those checkpoints (their docstrings name
# mistralai/Mistral-Small-4-119B-2603 and mistralai/Mistral-Large-4-1T-A52B). Vocabulary sizes are
# the configs' (no tokenizer for them here). With GPUs > 1 the row is FSDP across them.
MIXTRAL_8X7B = HUB["mistralai/Mixtral-8x7B-Instruct-v0.1"][0]
MIXTRAL_8X22B = {**MIXTRAL_8X7B, "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56,
                 "num_attention_heads": 48, "max_position_embeddings": 65536}
FSDP = ["training.fsdp=true", "training.fsdp_config={activation_checkpointing: true}",
        "training.activation_checkpointing=false"]
EXPERT_LORA = ["lora.target_parameters=[experts]"]
MOE = {
    "Mixtral-8x7B": ("mixtral-8x7b", MIXTRAL_8X7B, [], 1),
    "Mixtral-8x22B": ("mixtral-8x7b", MIXTRAL_8X22B, [], 1),
    "Mixtral-8x22B, FSDP": ("mixtral-8x7b", MIXTRAL_8X22B, FSDP, 2),
    "Mistral Small 4": ("mistral-small-4", {"model_type": "mistral4"}, [], 1),
    "Mistral Small 4 + expert LoRA": ("mistral-small-4", {"model_type": "mistral4"}, EXPERT_LORA, 1),
    "Mistral Small 4, FSDP": ("mistral-small-4", {"model_type": "mistral4"}, FSDP, 2),
    "Mistral Small 4 + expert LoRA, FSDP": ("mistral-small-4", {"model_type": "mistral4"}, [*FSDP, *EXPERT_LORA], 2),
    "Mistral Large 4, FSDP": ("mistral-small-4", {"model_type": "mistral_large4", "text_config": {
        "model_type": "mistral_large4_text"}, "vision_config": {"model_type": "pixtral"}}, FSDP, 8),
}


def plan_gib(name: str) -> dict:
    from dataclasses import replace

    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.plan.estimate import load_model_config, recipe_settings
    from qlora_cli.plan.memory import GiB, memory_items, model_shape
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe([name], ["~model.name_or_path", f"model.init_from_config={json.dumps(PUBLISHED[name])}",
                                  "model.tokenizer=mistral-common:tekken_240911"])
    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    settings = recipe_settings(recipe, shape)
    if name.endswith("-vision"):  # one picture per row (image_row): its tokens are part of the 2,048
        settings = replace(settings, image_patches=image_row()["patches"])
    totals = {f"{b}x{s}": sum(i.bytes for i in memory_items(shape, settings, b, s)) / GiB for b, s in SHAPES}
    return {"params": shape.total_params, **totals}


def moe_plan_gib(label: str) -> dict:
    from qlora_cli.families import build_init_config
    from qlora_cli.plan.estimate import recipe_settings
    from qlora_cli.plan.memory import GiB, memory_items, model_shape
    from qlora_cli.recipe.load import load_recipe

    name, values, overrides, gpus = MOE[label]
    recipe = load_recipe([name], ["~model.name_or_path", f"model.init_from_config={json.dumps(values)}", *overrides])
    shape = model_shape(build_init_config(recipe.model.init_from_config))
    settings = recipe_settings(recipe, shape, gpus=gpus)
    totals = {f"{b}x{s}": sum(i.bytes for i in memory_items(shape, settings, b, s)) / GiB for b, s in SHAPES}
    return {"params": shape.total_params, "gpus": gpus, **totals}


if __name__ == "__main__":
    for name in PUBLISHED:
        result = plan_gib(name)
        print(f"{name:24} {result['params'] / 1e9:5.1f} B params  "
              + "  ".join(f"{k}: {v:5.1f} GiB" for k, v in result.items() if k != "params"))
    for label in MOE:
        result = moe_plan_gib(label)
        print(f"{label:36} {result['params'] / 1e9:6.1f} B params  {result['gpus']} GPU  "
              + "  ".join(f"{k}: {v:6.1f} GiB/GPU" for k, v in result.items() if "x" in k))
