"""chat_template.py: the Jinja template in every model folder renders the ids qlora trains on."""

from __future__ import annotations

import json
import random

import pytest
from test_templates import TEKKEN_VERSIONS, chat, reference_ids, references, tekken_folder, tekken_with_version  # noqa: F401

from qlora_cli.data.chat_template import chat_template, save_tokenizer
from qlora_cli.data.templates import encode_chat, encode_prompt
from qlora_cli.data.tokenizer import load_tokenizer

# Text as people write it: words, punctuation, digits, accents, CJK, emoji, newlines, tabs, and
# the markers users paste. Left out: runs of spaces and leading/trailing spaces in a message,
# where transformers' tokenizer itself splits otherwise than SentencePiece (templates.py says why).
WORDS = ["hello", "world", "What", "is", "2+2?", "4", "3.14", "Paris.", "é", "Überall", "日本語", "🙂", "x = 1;",
         "def f():\nreturn 1", "**bold**", "ok,", "line\nnext", "two\n\nparagraphs", "tab\there", "(a)", "'q'",
         '"d"', "-", "#"]


def natural_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 7)))


def natural_conversations(seed: int, count: int = 150) -> list[list[dict]]:
    """System prompt or not, one to three turns."""
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        messages = [{"role": "system", "content": natural_text(rng)}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": natural_text(rng)},
                         {"role": "assistant", "content": natural_text(rng)}]
        found.append(messages)
    return found


def rendered_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """What an engine that has only the saved folder gets: apply_chat_template's ids."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def assert_template_gives_mistral_commons_ids(tokenizer, reference, seed: int, count: int = 150) -> None:
    tokenizer.chat_template = chat_template(tokenizer)
    for messages in natural_conversations(seed, count):
        expected = reference_ids(reference, messages)
        assert encode_chat(messages, tokenizer)[0] == expected  # what qlora trains on
        assert rendered_ids(tokenizer, messages) == expected, messages
        # The prompt an engine builds to answer is the one qlora generates from.
        prompt = messages[:-1]
        assert rendered_ids(tokenizer, prompt, add_generation_prompt=True) == encode_prompt(prompt, tokenizer)


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "v7"])
def test_sentencepiece_template_renders_mistral_commons_ids(version, references):
    assert_template_gives_mistral_commons_ids(load_tokenizer(f"mistral-common:{version}"), references[version], seed=1)


@pytest.mark.parametrize("version", TEKKEN_VERSIONS)
def test_tekken_template_renders_mistral_commons_ids_of_its_version(version, tekken_folder, tmp_path):
    folder, reference = tekken_with_version(tekken_folder, tmp_path, version)
    assert_template_gives_mistral_commons_ids(load_tokenizer(str(folder)), reference, seed=2, count=50)


def test_system_prompt_goes_where_each_version_puts_it():
    messages = [{"role": "system", "content": "Be brief."}, *chat("a", "b", "c", "d")]
    rendered = {version: load_tokenizer(f"mistral-common:{version}") for version in ("v1", "v3", "v7")}
    texts = {v: t.apply_chat_template(messages, chat_template=chat_template(t), tokenize=False)
             for v, t in rendered.items()}
    assert texts["v1"] == "<s> [INST] Be brief.\n\na [/INST] b</s> [INST] c [/INST] d</s>"  # the first user turn
    assert texts["v3"] == "<s>[INST] a[/INST] b</s>[INST] Be brief.\n\nc[/INST] d</s>"  # the last one
    assert texts["v7"] == "<s>[SYSTEM_PROMPT] Be brief.[/SYSTEM_PROMPT][INST] a[/INST] b</s>[INST] c[/INST] d</s>"


def test_llama_cpp_template_leaves_the_prefix_space_to_the_engine():
    # llama.cpp's tokenizer adds SentencePiece's dummy prefix after every special token itself.
    tokenizer = load_tokenizer("mistral-common:v3")
    text = tokenizer.apply_chat_template(chat("a", "b"), chat_template=chat_template(tokenizer, engine="llama.cpp"),
                                         tokenize=False)
    assert text == "<s>[INST]a[/INST]b</s>"


def test_recipe_jinja_template_is_written_as_is_and_tokenizer_keeps_its_own(tmp_path):
    tokenizer = load_tokenizer("mistral-common:v3")
    jinja = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_template(tokenizer, jinja) == jinja
    tokenizer.chat_template = jinja
    assert chat_template(tokenizer, "tokenizer") == jinja


def test_saved_folder_carries_the_template_in_tokenizer_config(tmp_path, references):
    tokenizer = load_tokenizer("mistral-common:v7")
    save_tokenizer(tokenizer, tmp_path)
    assert tokenizer.chat_template is None  # the caller's tokenizer is left as it was
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat_template(tokenizer)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # as vLLM, TGI or a user would load it
    messages = [{"role": "system", "content": "Be brief."}, *chat("What is 2+2?", "4")]
    assert rendered_ids(reloaded, messages) == reference_ids(references["v7"], messages)


def test_trained_adapter_folder_carries_the_chat_template(trained_run, v1_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_run.adapter)
    messages = chat("Which planet is known as the red planet?", "Mars is known as the red planet.")
    assert rendered_ids(tokenizer, messages) == encode_chat(messages, v1_tokenizer)[0]
