"""`method: grpo`: prompt rows -> mistral-common's ids, rewards named in the recipe (built in or a
user's file), checked at load and during training, and the reward rising through the real CLI."""

from __future__ import annotations

import json
import random
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from qlora_cli.data.prompts import encode_prompt_row, prompt_from_row
from qlora_cli.errors import UserError
from qlora_cli.rewards import RewardSection, exact_match, length, regex, reward_functions
from conftest import QLORA, TINY_OVERRIDES, assert_user_error, qlora, stop_at_first_step
from test_templates import MISTRAL_COMMON_FILES, SHIPPED_VERSIONS, VERSIONS, random_conversation, tokenizers  # noqa: F401

REPOSITORY = Path(__file__).resolve().parent.parent
# The 64-wide tiny model, and generations short enough for a test
TINY_OVERRIDES_64 = [*TINY_OVERRIDES, "training.max_completion_length=8", "training.per_device_train_batch_size=4",
                     "training.num_generations=2"]


@pytest.fixture(scope="module")
def prompt_references() -> dict:
    """mistral-common's encoders in their default mode, which encodes a conversation ending with a user turn
    as the model will be asked to answer it."""
    import mistral_common
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    data = Path(mistral_common.__file__).parent / "data"

    class Loaded(dict):
        def __missing__(self, version):
            self[version] = MistralTokenizer.from_file(data / MISTRAL_COMMON_FILES[version])
            return self[version]

    return Loaded()


def reference_prompt_ids(reference, messages: list[dict]) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return reference.encode_chat_completion(request).tokens


# ---------------------------------------------------------------- prompts -> ids


@pytest.mark.parametrize("version", SHIPPED_VERSIONS)
def test_prompt_ids_equal_mistral_common_on_random_conversations(version, tokenizers, prompt_references):
    rng = random.Random(300 + VERSIONS.index(version))
    for _ in range(50):
        messages = random_conversation(rng, end="user")
        row, _ = encode_prompt_row(prompt_from_row({"messages": messages}, {"answer": 4}, "p.jsonl:1"), "mistral",
                                   tokenizers[version], max_length=10_000)
        assert row["prompt_ids"] == reference_prompt_ids(prompt_references[version], messages)
        assert row["prompt"] == messages and row["answer"] == 4  # as the row gave it, for the rewards


def test_a_text_prompt_is_one_user_turn_and_stays_text_for_the_rewards(tokenizers, prompt_references):
    row, length_before = encode_prompt_row(prompt_from_row({"prompt": "What is 2+2?"}, {}, "p:1"), "mistral",
                                           tokenizers["v3"], max_length=10_000)
    assert row["prompt"] == "What is 2+2?"
    assert row["prompt_ids"] == reference_prompt_ids(prompt_references["v3"], [{"role": "user", "content": "What is 2+2?"}])
    assert length_before == len(row["prompt_ids"])


def test_an_overlong_prompt_keeps_its_bos_and_its_end(tokenizers):
    example = prompt_from_row({"prompt": "word " * 50 + "last"}, {}, "p:1")
    whole, _ = encode_prompt_row(example, "mistral", tokenizers["v3"], max_length=10_000)
    cut, length_before = encode_prompt_row(example, "mistral", tokenizers["v3"], max_length=16)
    assert length_before == len(whole["prompt_ids"]) > 16
    assert cut["prompt_ids"] == whole["prompt_ids"][:1] + whole["prompt_ids"][-15:]


@pytest.mark.parametrize("row, columns, complaint", [
    ({}, {}, "no `prompt` or `messages`"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, {}, "both"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, {}, "end with a user"),
    ({"prompt": "  "}, {}, "empty"),
    ({"prompt": "q"}, {"completions": "x"}, "`completions`"),
])
def test_bad_prompt_rows_are_user_errors_naming_the_row(row, columns, complaint):
    with pytest.raises(UserError) as caught:
        prompt_from_row(row, columns, "prompts.jsonl:3")
    assert complaint in caught.value.message and caught.value.where == "prompts.jsonl:3"


def grpo_recipe(tmp_path, rows: list[dict], **sections) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    recipe = {"extends": "tiny-mistral-grpo",
              "data": {"sources": [{"path": str(data), "format": "prompt"}], "val_size": 0,
                       "prepared_dir": str(tmp_path / "prepared")},
              "training": {"eval_strategy": "no", "eval_on_start": False}, **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_prepare_keeps_every_column_for_the_rewards(tmp_path):
    from datasets import load_from_disk

    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "level": i} for i in range(6)]
    result = qlora("prepare", grpo_recipe(tmp_path, rows))
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in (tmp_path / "prepared").iterdir() if p.is_dir() and not p.name.startswith(".")]
    train = load_from_disk(str(folder / "train")) if (folder / "train").exists() else load_from_disk(str(folder))["train"]
    assert sorted(train.column_names) == ["answer", "level", "prompt", "prompt_ids"]
    assert sorted(train["answer"]) == sorted(row["answer"] for row in rows)


def test_prepare_refuses_prompts_given_two_ways(tmp_path):
    rows = [{"prompt": "q"}, {"messages": [{"role": "user", "content": "q2"}]}]
    assert_user_error(qlora("prepare", grpo_recipe(tmp_path, rows)), "as text and others as messages", wrapped=True)


# ---------------------------------------------------------------- the recipe's rewards


def test_the_tiny_recipe_validates_and_training_is_checked_against_grpo_config():
    assert qlora("config", "validate", "tiny-mistral-grpo").exit_code == 0
    assert qlora("config", "validate", "magistral-grpo").exit_code == 0
    assert_user_error(qlora("config", "validate", "tiny-mistral-grpo", "training.epsilon_hihg=0.28"),
                      "training.epsilon_hihg", "epsilon_high")
    # TRL's own check: every prompt's group of generations fits in the generation batch
    assert_user_error(qlora("config", "validate", "tiny-mistral-grpo", "training.num_generations=3"),
                      "number of generations", wrapped=True)
    assert_user_error(qlora("config", "validate", "tiny-mistral-grpo", "rewards=[]"), "`rewards` section")
    assert_user_error(qlora("config", "validate", "tiny-mistral", "rewards=[{function: length}]"),
                      "method: grpo", wrapped=True)


def test_built_in_options_are_checked_at_load():
    assert_user_error(qlora("config", "validate", "tiny-mistral-grpo", "rewards=[{function: regex}]"),
                      "needs a `pattern`", wrapped=True)
    assert_user_error(qlora("config", "validate", "tiny-mistral-grpo", "rewards=[{function: regex, pattern: '('}]"),
                      "no regular expression", wrapped=True)
    assert_user_error(qlora("config", "validate", "tiny-mistral-grpo", "rewards=[{function: length, column: x}]"),
                      "rewards.0.column", wrapped=True)
    assert_user_error(qlora("config", "validate", "tiny-mistral-grpo", "rewards=[{function: exact_mach}]"),
                      "exact_match", wrapped=True)


def write_reward_file(folder: Path, text: str) -> None:
    (folder / "my_rewards.py").write_text(text, encoding="utf-8")


GOOD = "def short(completions, **kwargs):\n    return [-len(c) for c in completions]\n"


def test_a_reward_file_is_found_beside_the_recipe_and_checked(tmp_path, monkeypatch):
    recipe = grpo_recipe(tmp_path, [{"prompt": "q"}], rewards=[{"function": "my_rewards.py:short"}])
    write_reward_file(tmp_path, GOOD)
    monkeypatch.chdir(REPOSITORY)  # not the recipe's folder: the file is found beside the recipe anyway
    assert qlora("config", "validate", recipe).exit_code == 0


@pytest.mark.parametrize("text, function, complaint", [
    (GOOD, "shrot", "has no function `shrot`"),  # a typo: the nearest name is offered
    ("def short(completions):\n    return [0.0] * len(completions)\n", "short", "(completions)"),
    ("def short(completions, **kwargs)\n    return []\n", "short", "does not parse"),
    ("import not_a_module\n", "short", "ModuleNotFoundError"),
])
def test_a_bad_reward_file_exits_2_naming_the_file_and_function(tmp_path, text, function, complaint):
    recipe = grpo_recipe(tmp_path, [{"prompt": "q"}], rewards=[{"function": f"my_rewards.py:{function}"}])
    write_reward_file(tmp_path, text)
    result = qlora("config", "validate", recipe)
    assert_user_error(result, "my_rewards.py", function, complaint, wrapped=True)


def test_a_missing_reward_file_exits_2(tmp_path):
    recipe = grpo_recipe(tmp_path, [{"prompt": "q"}], rewards=[{"function": "nowhere.py:short"}])
    assert_user_error(qlora("config", "validate", recipe), "nowhere.py", "does not exist", wrapped=True)


def test_a_reward_that_raises_or_miscounts_during_training_names_itself_and_the_prompt(tmp_path):
    write_reward_file(tmp_path, "def picky(completions, answer, **kwargs):\n"
                                "    return [1.0 / (len(c) - 3) for c in completions]\n"
                                "def short(completions, **kwargs):\n    return [0.0]\n")
    picky, short = reward_functions([RewardSection(f"{tmp_path}/my_rewards.py:picky"),
                                     RewardSection(f"{tmp_path}/my_rewards.py:short")], 16)
    with pytest.raises(UserError) as caught:
        picky(completions=["fine", "bad"], prompts=["first?", "second?"], answer=["a", "b"])
    assert "my_rewards.py:picky" in caught.value.message and "ZeroDivisionError" in caught.value.message
    assert "'second?'" in caught.value.message  # the prompt whose completion makes it raise
    with pytest.raises(UserError) as caught:
        short(completions=["a", "b"], prompts=["p", "p"])
    assert "returned 1 values for 2 completions" in caught.value.message
    assert picky.__name__ == "picky"  # TRL logs it as rewards/picky/mean


def test_built_in_rewards():
    texts = ["The answer is \\boxed{4}.", "4", "five"]
    assert exact_match(texts, column="answer", pattern=None, answer=["4", "4", "4"]) == [0.0, 1.0, 0.0]
    assert exact_match(texts, column="answer", pattern=r"\\boxed\{(.*?)\}", answer=[4, 4, 4]) == [1.0, 0.0, 0.0]
    assert regex(texts, pattern=r"\d+") == [0.0, 1.0, 0.0]  # the whole completion must match
    # conversational prompts get assistant messages: their text is judged
    assert regex([[{"role": "assistant", "content": "42"}]], pattern=r"\d+") == [1.0]
    ids = [[1] * 4, [1] * 10, [1] * 20]
    assert length(texts, max_tokens=16, buffer=8, completion_ids=ids) == [0.0, -0.25, -1.0]
    assert length(texts, max_tokens=16, buffer=16, completion_ids=ids) == [-0.25, -0.625, -1.0]


def test_exact_match_names_a_missing_column():
    (reward,) = reward_functions([RewardSection("exact_match", column="solution")], 16)
    with pytest.raises(UserError) as caught:
        reward(completions=["4"], prompts=["2+2?"], answer=["4"])
    assert "solution" in caught.value.message and "exact_match" in caught.value.message


# ---------------------------------------------------------------- training (slow tier)


@pytest.mark.slow
def test_the_trainer_generates_from_the_prepared_ids_and_stops_at_eos(tmp_path):
    from qlora_cli.data.prepare import prepare_dataset
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.recipe.builders import build_training_arguments
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.training.grpo_trainer import build_grpo_trainer

    rows = [{"prompt": "What is 2+2?", "answer": "4"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]}]
    recipes = []
    for number, row in enumerate(rows):
        (tmp_path / str(number)).mkdir()
        path = grpo_recipe(tmp_path / str(number), [row] * 2)
        recipes.append(load_recipe([str(path)], [*TINY_OVERRIDES_64, "training.beta=0.1", "model.adapter=null",
                                                 f"training.output_dir={tmp_path / str(number) / 'run'}"]))
    for recipe, row in zip(recipes, rows):
        tokenizer = load_recipe_tokenizer(recipe)
        dataset = prepare_dataset(recipe, tokenizer).dataset
        args = build_training_arguments(recipe.written("training"), method="grpo", output_dir=str(tmp_path / "out"),
                                        remove_unused_columns=False, reward_weights=[1.0, 1.0])
        trainer = build_grpo_trainer(model=load_trainable_model(recipe, tokenizer=tokenizer), args=args,
                                     dataset=dataset, tokenizer=tokenizer, callbacks=[], from_adapter=False,
                                     rewards=reward_functions(recipe.rewards, 16))
        given = row.get("prompt", row.get("messages"))
        ids, _, _ = trainer._tokenize_prompts([given, given])
        assert ids == [dataset["train"]["prompt_ids"][0]] * 2  # mistral-common's, as prepared
        assert tokenizer.eos_token_id in trainer.generation_config.eos_token_id  # </s> ends a completion
        # a fresh LoRA's reference is the base with the adapter off: no copy of the adapter
        assert list(trainer.model.peft_config) == ["default"]


@pytest.mark.slow
def test_a_reward_that_raises_during_training_exits_2_naming_it_and_the_prompt(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def broken(completions, **kwargs):\n    raise ValueError('no')\n")
    recipe = grpo_recipe(tmp_path, [{"prompt": "What is 2+2?"}] * 4, rewards=[{"function": "my_rewards.py:broken"}])
    result = qlora("train", recipe, *TINY_OVERRIDES_64, "model.adapter=null", "training.max_steps=1",
                   f"training.output_dir={tmp_path / 'run'}")
    assert_user_error(result, "my_rewards.py:broken", "ValueError: no", "What is 2+2?", wrapped=True)


def test_tiny_grpo_raises_the_reward_on_held_out_prompts(answering_run, tmp_path):
    """SFT -> GRPO through the real CLI: the tiny recipe from an SFT adapter, its rewards (a word, in
    fewer tokens) measured by the validation split before the first step and after the last."""
    result = qlora("train", "tiny-mistral-grpo", f"model.adapter={answering_run.adapter}",
                   f"data.prepared_dir={tmp_path / 'prepared'}", f"training.output_dir={tmp_path / 'run'}")
    assert result.exit_code == 0, result.output
    before = float(result.output.split("eval at step 0: reward ")[1].split()[0])
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    after = record["metrics"]["eval_reward"]
    assert after > before + 0.15, result.output
    assert record["metrics"]["eval_rewards/length/mean"] > -0.5  # shorter answers...
    assert record["metrics"]["eval_rewards/regex/mean"] > 0.75  # ...that still hold a word
    assert (tmp_path / "run" / "loss.png").is_file()


@pytest.mark.slow
def test_grpo_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path):
    """The sampling RNG included: the resumed run draws the answers the uninterrupted one drew."""
    # A reward that tells a random model's answers apart, so that every step moves the adapter.
    (tmp_path / "vowels.py").write_text("def vowels(completions, **kwargs):\n"
                                        "    return [sum(map(c.count, 'aeiou')) / (len(c) or 1) for c in completions]\n")

    def args(output_dir: Path) -> list[str]:
        return ["tiny-mistral-grpo", *TINY_OVERRIDES_64, "model.adapter=null", f"training.output_dir={output_dir}",
                f"rewards=[{{function: {tmp_path / 'vowels.py'}:vowels}}]",
                f"data.prepared_dir={tmp_path / 'prepared'}", "training.max_steps=4", "training.save_steps=2",
                "training.eval_strategy=no", "training.eval_on_start=false", "training.learning_rate=1e-2"]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert qlora("train", *args(straight)).exit_code == 0
    returncode, output = stop_at_first_step(args(stopped))
    assert returncode == 143, output
    command = output.split("resume with:", 1)[1].replace("\n", "").strip()
    done = subprocess.run([QLORA, *shlex.split(command)[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    uninterrupted = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= 1e-5
    assert max(uninterrupted[k].abs().max().item() for k in resumed if "lora_B" in k) > 1e-3  # it trained
