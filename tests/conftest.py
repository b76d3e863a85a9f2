"""Shared fixtures: an isolated cache and recipe path for every test, and the tiny model built once."""

from __future__ import annotations

import os

import pytest

# A 64-wide, 2-layer Mistral with rank-4 LoRA: real shapes, 4-bit layers and tokenizer, in seconds.
# Shapes are set here, not taken from the recipe, so tuning the recipe cannot break the tests.
TINY_OVERRIDES = [
    "model.init_from_config.hidden_size=64",
    "model.init_from_config.intermediate_size=128",
    "model.init_from_config.num_hidden_layers=2",
    "model.init_from_config.num_attention_heads=4",
    "model.init_from_config.num_key_value_heads=2",
    "lora.target_modules=all-linear",
    "lora.r=4",
    "lora.lora_alpha=8",
]


@pytest.fixture(scope="session", autouse=True)
def qlora_cache(tmp_path_factory):
    """Built models and converted tokenizers go to a temporary folder, never ~/.cache/qlora."""
    folder = tmp_path_factory.mktemp("qlora-cache")
    previous = os.environ.get("QLORA_CACHE")
    os.environ["QLORA_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("QLORA_CACHE", None)
    else:
        os.environ["QLORA_CACHE"] = previous


@pytest.fixture(autouse=True)
def _no_user_recipe_path(monkeypatch):
    # A developer's own $QLORA_RECIPE_PATH must not change what the tests find.
    monkeypatch.delenv("QLORA_RECIPE_PATH", raising=False)


@pytest.fixture(scope="session")
def tiny_recipe():
    """recipes/tiny-mistral.yaml shrunk to 64 wide: the recipe the model tests load."""
    from qlora_cli.recipe import load_recipe

    return load_recipe(["tiny-mistral"], TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_model(tiny_recipe):
    """The tiny recipe's 4-bit base + LoRA `PeftModel`, built once per session."""
    from qlora_cli.model import load_trainable_model

    return load_trainable_model(tiny_recipe)


# ---------------------------------------------------------------- data (test_sources, test_prepare, test_packing)


@pytest.fixture(scope="session")
def v1_tokenizer(qlora_cache):
    """mistral-common's v1 tokenizer as an HF fast tokenizer (the one tiny-mistral uses)."""
    from qlora_cli.tokenizer import load_tokenizer

    return load_tokenizer("mistral-common:v1")


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name="data.jsonl") -> path of a jsonl file with one JSON object per row."""
    import json

    def write(rows: list, name: str = "data.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def data_recipe(tmp_path):
    """data_recipe(data_section) -> a recipe file extending tiny-mistral with that data section.

    `data.prepared_dir` defaults to tmp_path/"prepared"; source paths are written as strings.
    """
    import yaml

    def write(data: dict, name: str = "recipe.yaml"):
        data = {"prepared_dir": str(tmp_path / "prepared"), **data}
        for key in ("sources", "validation_sources"):
            for source in data.get(key, []):
                source["path"] = str(source["path"])
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"extends": "tiny-mistral", "data": data}, sort_keys=False))
        return path

    return write
