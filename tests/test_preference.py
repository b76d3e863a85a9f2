"""Preference data: pairs and signed examples -> exact token ids, masks, prepared datasets, bad rows."""

from __future__ import annotations

import random

import pytest

from qlora_cli.errors import UserError
from qlora_cli.data.preference import encode_preference, fit_to_length, pair_from_row, signed_from_row
from qlora_cli.data.tokenizer import load_tokenizer
from conftest import assert_user_error, qlora
from test_templates import (  # noqa: F401 (fixtures: references, tekken_folder, tokenizers, each loaded lazily)
    SHIPPED_VERSIONS, VERSIONS, random_conversation, reference_ids, references, tekken_folder, tekken_with_version,
    tokenizers,
)


def random_pair(rng: random.Random) -> tuple[list[dict], list[dict], list[dict]]:
    """A random multi-turn prompt (ending with a user turn) and two different answers."""
    prompt = random_conversation(rng, end="user")
    chosen = random_conversation(rng)[-1:]
    rejected = [{"role": "assistant", "content": chosen[0]["content"] + " no"}]
    return prompt, chosen, rejected


def assert_pair_matches_reference(row: dict, prompt, chosen, rejected, reference) -> None:
    for answer, name in ((chosen, "chosen"), (rejected, "rejected")):
        assert row["prompt_ids"] + row[f"{name}_ids"] == reference_ids(reference, prompt + answer)
        # Trained: exactly the answer and its </s>, i.e. what follows the reference prompt.
        prompt_ids = reference_ids(reference, prompt + answer)[: len(row["prompt_ids"])]
        assert row["prompt_ids"] == prompt_ids
        assert all(row[f"{name}_mask"]), "a one-message answer is trained whole"


@pytest.mark.parametrize("version", SHIPPED_VERSIONS)  # the tekken ones convert a vocabulary: slow tier
def test_pair_ids_equal_mistral_common_on_random_conversations(version, tokenizers, references):
    rng = random.Random(100 + VERSIONS.index(version))
    for _ in range(50):
        prompt, chosen, rejected = random_pair(rng)
        example = pair_from_row({"messages": prompt, "chosen": chosen, "rejected": rejected}, "pairs.jsonl:1")
        row = encode_preference(example, "mistral", tokenizers[version])
        assert_pair_matches_reference(row, prompt, chosen, rejected, references[version])
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizers[version].eos_token_id


@pytest.mark.parametrize("version", ["v3", "v7"])
def test_pair_ids_equal_mistral_common_for_tekken(version, tekken_folder, tmp_path):
    folder, reference = tekken_with_version(tekken_folder, tmp_path, version)
    tokenizer = load_tokenizer(str(folder))
    rng = random.Random(7)
    for _ in range(25):
        prompt, chosen, rejected = random_pair(rng)
        row = encode_preference(pair_from_row({"messages": prompt, "chosen": chosen, "rejected": rejected}, "x:1"),
                                "mistral", tokenizer)
        assert_pair_matches_reference(row, prompt, chosen, rejected, reference)


def test_multi_turn_answers_train_only_the_assistant_turns(tokenizers, references):
    prompt = [{"role": "user", "content": "Hi"}]
    chosen = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More?"},
              {"role": "assistant", "content": "Sure."}]
    rejected = [{"role": "assistant", "content": "Go away."}]
    row = encode_preference(pair_from_row({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "x:1"),
                            "mistral", tokenizers["v3"])
    assert row["prompt_ids"] + row["chosen_ids"] == reference_ids(references["v3"], prompt + chosen)
    trained = [i for i, m in zip(row["chosen_ids"], row["chosen_mask"]) if m]
    tokenizer = tokenizers["v3"]
    assert tokenizer.decode(trained, skip_special_tokens=True).replace(" ", "") == "Hello!Sure."
    assert 0 in row["chosen_mask"], "the user turn inside the answer is not trained"


def test_hub_layout_whole_conversations_share_their_prompt(tokenizers, references):
    user = {"role": "user", "content": "Capital of France?"}
    row = {"chosen": [user, {"role": "assistant", "content": "Paris."}],
           "rejected": [user, {"role": "assistant", "content": "No idea."}]}
    example = pair_from_row(row, "hub.jsonl:3")
    assert example.prompt == [user] and example.chosen == [{"role": "assistant", "content": "Paris."}]
    encoded = encode_preference(example, "mistral", tokenizers["v7"])
    assert encoded["prompt_ids"] == reference_ids(references["v7"], [user, row["chosen"][1]])[: len(encoded["prompt_ids"])]
    assert encoded["prompt_ids"] + encoded["rejected_ids"] == reference_ids(references["v7"], row["rejected"])


def test_signed_example_ids_and_label(tokenizers, references):
    example = signed_from_row({"prompt": "2+2?", "completion": "4", "label": False}, "kto.jsonl:1")
    row = encode_preference(example, "mistral", tokenizers["v1"])
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert row["prompt_ids"] + row["completion_ids"] == reference_ids(references["v1"], messages)
    assert row["label"] is False and all(row["completion_mask"])


@pytest.mark.parametrize("row, complaint", [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "the same answer"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "`chosen` is empty"),
    ({"prompt": "Q", "chosen": {"role": "assistant", "content": ""}, "rejected": "b"}, "is empty"),
    ({"chosen": "a", "rejected": "b"}, "no `prompt` or `messages`"),
    ({"prompt": "Q", "messages": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"}, "both"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "P"}, {"role": "assistant", "content": "b"}]}, "share no prompt"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "end with a user message"),
])
def test_bad_pairs_are_user_errors_naming_the_row(row, complaint):
    with pytest.raises(UserError, match=complaint) as error:
        pair_from_row(row, "pairs.jsonl:4")
    assert error.value.where == "pairs.jsonl:4"


def test_signed_example_label_must_be_a_boolean():
    with pytest.raises(UserError, match="true or false") as error:
        signed_from_row({"prompt": "Q", "completion": "a", "label": "yes"}, "kto.jsonl:2")
    assert error.value.where == "kto.jsonl:2"


def test_truncation_cuts_the_prompt_before_the_answers():
    row = {"prompt_ids": [1] + list(range(100, 140)), "chosen_ids": [5, 6, 7, 2], "chosen_mask": [1] * 4,
           "rejected_ids": [8, 2], "rejected_mask": [1, 1]}
    cut = fit_to_length(row, 16)
    assert cut["prompt_ids"] == [1] + list(range(129, 140))  # BOS kept, then the end of the prompt
    assert cut["chosen_ids"] == [5, 6, 7, 2] and cut["rejected_ids"] == [8, 2]
    assert len(cut["prompt_ids"] + cut["chosen_ids"]) == 16


def test_an_answer_longer_than_max_length_keeps_half_the_prompt_and_the_answers_start():
    row = {"prompt_ids": list(range(1, 21)), "completion_ids": list(range(50, 90)), "completion_mask": [1] * 40,
           "label": True}
    cut = fit_to_length(row, 16)
    assert cut["prompt_ids"] == [1] + list(range(14, 21)) and cut["completion_ids"] == list(range(50, 58))


# ---------------------------------------------------------------- through `qlora prepare`


def pair_recipe(data_recipe, write_jsonl, rows, **data):
    path = write_jsonl(rows, "pairs.jsonl")
    recipe = data_recipe({"sources": [{"path": path, "format": "preference"}], "max_length": 64, **data})
    return recipe, path


def test_prepare_shows_a_pair_and_caches_it(data_recipe, write_jsonl):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(6)]
    recipe, _ = pair_recipe(data_recipe, write_jsonl, rows)
    first = qlora("prepare", recipe, "method=dpo", "--show", "1")
    assert first.exit_code == 0, first.output
    assert "example 1 chosen" in first.output and "example 1 rejected" in first.output
    assert "[INST] Question" in first.output and "prepared:" in first.output
    again = qlora("prepare", recipe, "method=dpo")
    assert again.exit_code == 0 and "reused:" in again.output


def test_prepare_refuses_a_bad_pair_with_its_line(data_recipe, write_jsonl):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a", "rejected": "a"}]
    recipe, path = pair_recipe(data_recipe, write_jsonl, rows)
    assert_user_error(qlora("prepare", recipe, "method=dpo"), f"{path.name}:2", "the same answer", wrapped=True)


def test_prepare_refuses_a_missing_field_with_its_line(data_recipe, write_jsonl):
    recipe, path = pair_recipe(data_recipe, write_jsonl, [{"prompt": "Q", "chosen": "a"}])
    assert_user_error(qlora("prepare", recipe, "method=dpo"), f"{path.name}:1", "`rejected`", wrapped=True)


def test_overlong_error_names_the_pair(data_recipe, write_jsonl):
    rows = [{"prompt": "word " * 80, "chosen": "a", "rejected": "b"}]
    recipe, path = pair_recipe(data_recipe, write_jsonl, rows, overlong="error")
    assert_user_error(qlora("prepare", recipe, "method=dpo"), f"{path.name}:1", "more than data.max_length",
                      wrapped=True)


def test_method_and_format_must_agree(data_recipe, write_jsonl):
    recipe, _ = pair_recipe(data_recipe, write_jsonl, [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    assert_user_error(qlora("config", "validate", recipe), "trains on text", "method: dpo", wrapped=True)
    assert_user_error(qlora("config", "validate", recipe, "method=kto"), "trains on unpaired", wrapped=True)


def test_training_is_checked_against_the_methods_config_class():
    assert qlora("config", "validate", "tiny-mistral-dpo", "training.beta=0.5", "training.loss_type=ipo").exit_code == 0
    assert_user_error(qlora("config", "validate", "tiny-mistral-dpo", "training.betta=0.5"),
                      "training.betta", "did you mean `beta`")
    assert_user_error(qlora("config", "validate", "tiny-mistral", "training.beta=0.5"), "training.beta")
    assert qlora("config", "validate", "tiny-mistral-kto", "training.desirable_weight=2").exit_code == 0
    assert_user_error(qlora("config", "validate", "tiny-mistral-kto", "training.loss_type=sigmoid"),
                      "training.loss_type", "kto, apo_zero_unpaired")


def test_kto_refuses_what_its_kl_term_cannot_do_at_validate_time():
    # TRL's KL estimate pairs each completion with a neighbour's prompt of the same fixed-order batch.
    assert_user_error(qlora("config", "validate", "tiny-mistral-kto", "training.per_device_train_batch_size=1"),
                      "training.per_device_train_batch_size", "2 examples per device", "apo_zero_unpaired", wrapped=True)
    assert_user_error(qlora("config", "validate", "tiny-mistral-kto", "training.train_sampling_strategy=random"),
                      "training.train_sampling_strategy", "sequential", wrapped=True)
    # Without a KL term one example per device is fine; SFT and DPO are not concerned.
    assert qlora("config", "validate", "tiny-mistral-kto", "training.per_device_train_batch_size=1",
                 "training.loss_type=apo_zero_unpaired").exit_code == 0
    assert qlora("config", "validate", "tiny-mistral-dpo", "training.per_device_train_batch_size=1").exit_code == 0


def test_plan_counts_two_sequences_per_pair_and_the_reference_forward(tmp_path):
    result = qlora("plan", "tiny-mistral-dpo", "model.adapter=null", f"data.prepared_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert "8 examples per step run as 16 sequences" in result.output
    assert "reference forward with the adapter off" in result.output and "16 x 51 tokens" in result.output


def test_collator_keeps_the_reference_log_probs_trl_precomputed():
    # training.precompute_ref_log_probs: TRL adds them to the rows; dropping them crashed the first step.
    from qlora_cli.training.preference_trainer import PreferenceCollator

    rows = [{"prompt_ids": [1, 5], "chosen_ids": [7, 2], "chosen_mask": [1, 1], "rejected_ids": [8], "rejected_mask": [1],
             "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}]
    batch = PreferenceCollator(pad_token_id=0, answers=("chosen", "rejected"))(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 7, 2], [1, 5, 8, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert batch["ref_chosen_logps"].tolist() == [-1.5] and batch["ref_rejected_logps"].tolist() == [-2.5]
