"""`qlora plan` of the family recipes at 1 x 2,048 and 4 x 2,048 tokens, offline.

The recipes name hub checkpoints, whose config.json this machine cannot download; so each plan
is made from the architecture's published config values (below, as `init_from_config`, with the
real tekken vocabulary), through the same `model_shape` / `recipe_settings` / `memory_items`
that `qlora plan` uses. Run: python bench/family_plans.py
"""

from __future__ import annotations

import json

TEXT_24B = {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
            "rope_theta": 1.0e9, "sliding_window": None}
PIXTRAL = {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
           "num_attention_heads": 16, "head_dim": 64, "patch_size": 14, "image_size": 1540, "hidden_act": "silu"}
TEXT_MINISTRAL_3_8B = {"model_type": "ministral3", "hidden_size": 4096, "intermediate_size": 14336,
                       "num_hidden_layers": 34, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
PUBLISHED = {  # recipe -> its checkpoint's architecture (config.json values)
    "mistral-nemo-12b": {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 14336,
                         "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                         "max_position_embeddings": 1024000, "rope_theta": 1.0e6, "sliding_window": None},
    "mistral-small-3.2-24b": {"model_type": "mistral3", "text_config": TEXT_24B, "vision_config": PIXTRAL},
    "ministral-3-8b": {"model_type": "mistral3", "text_config": TEXT_MINISTRAL_3_8B, "vision_config": PIXTRAL},
}
SHAPES = [(1, 2048), (4, 2048)]


def plan_gib(name: str) -> dict:
    from qlora_cli.tokenizer import load_recipe_tokenizer
    from qlora_cli.plan import load_model_config, recipe_settings
    from qlora_cli.plan_memory import GiB, memory_items, model_shape
    from qlora_cli.recipe import load_recipe

    recipe = load_recipe([name], ["~model.name_or_path", f"model.init_from_config={json.dumps(PUBLISHED[name])}",
                                  "model.tokenizer=mistral-common:tekken_240911"])
    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    settings = recipe_settings(recipe, shape)
    totals = {f"{b}x{s}": sum(i.bytes for i in memory_items(shape, settings, b, s)) / GiB for b, s in SHAPES}
    return {"params": shape.total_params, **totals}


if __name__ == "__main__":
    for name in PUBLISHED:
        result = plan_gib(name)
        print(f"{name:24} {result['params'] / 1e9:5.1f} B params  "
              + "  ".join(f"{k}: {v:5.1f} GiB" for k, v in result.items() if k != "params"))
