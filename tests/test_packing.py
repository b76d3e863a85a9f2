"""packing.py and collate.py: rows hold several examples that never see each other, so a packed
row gives the same logits as its examples run one by one, for sdpa and eager attention."""

from __future__ import annotations

import random

import pytest
import torch

from qlora_cli.data.collate import PackedCollator, block_causal_mask
from qlora_cli.data.packing import pack_lengths, position_ids
from qlora_cli.data.prepare import build_dataset
from qlora_cli.recipe.load import load_recipe
from qlora_cli.data.templates import IGNORE_INDEX

TINY_CONFIG = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "seed": 0}


@pytest.fixture(scope="module")
def tiny_model_path(v1_tokenizer):
    from qlora_cli.model.load import build_init_model

    return build_init_model(TINY_CONFIG, v1_tokenizer)


def load_tiny(path, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(scope="module")
def packed(tmp_path_factory, v1_tokenizer):
    """Packed (rows, unpacked examples) of 24 conversations of varied lengths, max_length 96."""
    import json

    folder = tmp_path_factory.mktemp("packed")
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran far away from home today".split()
    rows = [{"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 20)))},
                          {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 25)))}]}
            for _ in range(24)]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_file = folder / "recipe.yaml"
    recipe_file.write_text(f"extends: tiny-mistral\ndata:\n  sources: [{{path: {folder / 'chat.jsonl'}, format: chat}}]\n"
                           f"  max_length: 96\n  shuffle: false\n")
    recipe = load_recipe([str(recipe_file)])
    packed_rows, _ = build_dataset(recipe.data, v1_tokenizer, 42, "test")
    unpacked_recipe = load_recipe([str(recipe_file)], ["data.packing=false"])
    single, _ = build_dataset(unpacked_recipe.data, v1_tokenizer, 42, "test")
    return packed_rows["train"], single["train"]


# ---------------------------------------------------------------- packing


def test_pack_lengths_places_every_example_once_within_capacity():
    lengths = [random.Random(i).randint(1, 100) for i in range(200)]
    rows = pack_lengths(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert rows == pack_lengths(lengths, 128), "deterministic"
    assert len(rows) <= -(-sum(lengths) // 128) + 2, "best fit wastes at most a couple of rows here"


def test_position_ids_restart_for_each_example():
    assert position_ids([3, 1, 2]) == [0, 1, 2, 0, 0, 1]


def test_packed_rows_hold_the_examples_with_the_first_token_of_each_unlabelled(packed):
    rows, single = packed
    assert len(rows) < len(single)
    examples = {tuple(ids): labels for ids, labels in zip(single["input_ids"], single["labels"])}
    seen = 0
    for row in rows:
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) == len(row["labels"]) <= 96
        start = 0
        for length in row["seq_lengths"]:
            ids, labels = row["input_ids"][start:start + length], row["labels"][start:start + length]
            assert labels[0] == IGNORE_INDEX, "never predicted from the example before it"
            assert labels[1:] == examples[tuple(ids)][1:]
            start += length
            seen += 1
    assert seen == len(single)


# ---------------------------------------------------------------- collator


def test_collator_pads_to_the_longest_row_with_unlabelled_pads(packed, v1_tokenizer):
    rows, _ = packed
    batch_rows = [rows[0], rows[-1]]
    width = max(len(r["input_ids"]) for r in batch_rows)
    batch = PackedCollator(v1_tokenizer.pad_token_id)(batch_rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, width)
    short = min(range(2), key=lambda b: len(batch_rows[b]["input_ids"]))
    n = len(batch_rows[short]["input_ids"])
    assert n < width, "the fixture should give rows of different lengths"
    assert (batch["input_ids"][short, n:] == v1_tokenizer.pad_token_id).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert batch["position_ids"][short, :n].tolist() == position_ids(batch_rows[short]["seq_lengths"])
    assert PackedCollator(0, pad_to_multiple_of=64)(batch_rows)["input_ids"].shape[1] % 64 == 0


def test_block_mask_never_lets_a_token_see_another_example():
    mask = block_causal_mask([[2, 3]], 6)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends to itself only: no empty softmax row
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_flash_attention_batches_carry_no_mask(packed):
    rows, _ = packed
    batch = PackedCollator(0, attn_implementation="flash_attention_2")(list(rows)[:2])
    assert "attention_mask" not in batch and "position_ids" in batch


@pytest.mark.slow
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_give_the_logits_of_their_examples_run_one_by_one(
        packed, tiny_model_path, v1_tokenizer, attn_implementation):
    rows, _ = packed
    model = load_tiny(tiny_model_path, attn_implementation)
    batch_rows = [rows[i] for i in range(min(3, len(rows)))]
    batch = PackedCollator(v1_tokenizer.pad_token_id, attn_implementation=attn_implementation)(batch_rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        worst, checked = 0.0, 0
        for b, row in enumerate(batch_rows):
            start = 0
            for length in row["seq_lengths"]:
                alone = model(input_ids=torch.tensor([row["input_ids"][start:start + length]])).logits[0]
                worst = max(worst, (logits[b, start:start + length] - alone).abs().max().item())
                start += length
                checked += 1
    assert checked > len(batch_rows), "the rows hold several examples each"
    assert worst < 1e-4


def test_a_dpo_pair_runs_as_one_row_with_its_shared_prefix_once():
    """Chosen [1 2 3 4 5] and rejected [1 2 3 9] (prefix [1 2 3]) become [1 2 3 4 5 9]: the
    rejected tail sees the prefix and itself, never the chosen tail, at its own positions."""
    from qlora_cli.data.collate import shared_prefix_rows

    ids = torch.tensor([[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 3, 9, 0], [7, 6, 6, 0, 0]])
    attention = (ids != 0).long()
    shared, index = shared_prefix_rows(ids, attention)
    assert shared["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9], [7, 8, 6, 6, 0, 0]]
    assert shared["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 0, 0]]
    mask = shared["attention_mask"][0, 0].int().tolist()
    assert mask[5] == [1, 1, 1, 0, 0, 1]  # the rejected tail: prefix and itself
    assert mask[4] == [1, 1, 1, 1, 1, 0]  # the chosen tail: causal, never the rejected tail
    # each original token's place in the flattened rows holds that token
    flat = shared["input_ids"].reshape(-1)
    real = attention.bool()
    assert torch.equal(flat[index][real], ids[real])
    assert index[2].tolist()[:4] == [0, 1, 2, 5] and index[3].tolist()[:3] == [6, 8, 9]
    mask = shared["attention_mask"][1, 0].int().tolist()
    assert mask[2] == [1, 0, 1, 0, 0, 0] and mask[3] == [1, 0, 1, 1, 0, 0]  # prefix [7] only
    assert mask[4][4] == 1 and mask[5][5] == 1  # padding attends to itself (no empty softmax row)
    # answers with no common start and no padding to save: the batch runs as it came
    unshared = torch.tensor([[1, 2], [3, 4]])
    assert shared_prefix_rows(unshared, torch.ones_like(unshared)) is None
