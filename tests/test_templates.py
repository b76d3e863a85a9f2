"""templates.py: token ids equal mistral-common's reference encoder; labels train exactly the answers."""

from __future__ import annotations

import os
import random
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from qlora_cli.errors import UserError
from qlora_cli.data.templates import IGNORE_INDEX, encode_chat, encode_prompt, encode_text
from qlora_cli.data.tokenizer import MISTRAL_COMMON_FILES, load_tokenizer

VERSIONS = ["v1", "v2", "v3", "v7", "tekken_240718", "tekken_240911"]  # as the recipe names them
# Converting a tekken vocabulary takes tens of seconds: those versions run in the slow tier.
SHIPPED_VERSIONS = [pytest.param(v, marks=pytest.mark.slow) if v.startswith("tekken") else v for v in VERSIONS]
CONVERSATIONS_PER_VERSION = 300


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    os.environ.setdefault("QLORA_CACHE", str(tmp_path_factory.mktemp("qlora-cache")))


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    """Each shipped tokenizer, loaded when a test first asks for it."""

    class Loaded(dict):
        def __missing__(self, version):
            self[version] = load_tokenizer(f"mistral-common:{version}")
            return self[version]

    return Loaded()


@pytest.fixture(scope="module")
def references() -> dict:
    # finetuning mode: the default validator rejects a conversation that ends with an answer.
    data = Path(mistral_common.__file__).parent / "data"

    class Loaded(dict):  # each loaded when a test first asks for it
        def __missing__(self, version):
            self[version] = MistralTokenizer.from_file(data / MISTRAL_COMMON_FILES[version],
                                                       mode=ValidationMode.finetuning)
            return self[version]

    return Loaded()


def chat(*texts: str) -> list[dict]:
    """user, assistant, user, ... messages from their texts."""
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(texts)]


def reference_ids(reference, messages: list[dict]) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return reference.encode_chat_completion(request).tokens


# ---------------------------------------------------------------- random conversations

PIECES = [
    "hello", "world", "What is 2+2?", "4", "42", "3.14", "Paris", "ok", ",", ".", "!", "?", "'", '"', "()",
    "é", "日本語", "🙂", "Ⅻ", "\u00a0", "\t", "\n", "\n\n", "\r\n", " ", "  ", "   ", " " * 17,
    "x = 1;", "def f():", "    return 1", "[INST]", "</s>", "<s>", "[/INST]", "▁", "-", "#", "**bold**",
]


def random_text(rng: random.Random) -> str:
    text = "".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(1, 6)))
    if not text.strip():
        text += "x"
    if rng.random() < 0.2:
        text = " " + text  # leading space: where the HF tokenizer and SentencePiece disagree
    if rng.random() < 0.2:
        text += rng.choice([" ", "  ", "\n", " \n"])
    return text


def random_conversation(rng: random.Random, *, end: str = "assistant") -> list[dict]:
    messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": random_text(rng)})
        messages.append({"role": "assistant", "content": random_text(rng)})
    return messages if end == "assistant" else messages[:-1]


def conversations(seed: int, count: int = CONVERSATIONS_PER_VERSION) -> list[list[dict]]:
    rng = random.Random(seed)
    return [random_conversation(rng) for _ in range(count)]


def trained_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


# ---------------------------------------------------------------- mistral-common exactness


@pytest.mark.parametrize("version", SHIPPED_VERSIONS)
def test_mistral_template_equals_mistral_common_on_random_conversations(version, tokenizers, references):
    for messages in conversations(seed=VERSIONS.index(version)):
        ids, _ = encode_chat(messages, tokenizers[version])
        assert ids == reference_ids(references[version], messages), messages


@pytest.mark.parametrize("version", SHIPPED_VERSIONS)
def test_known_pitfalls_match_mistral_common(version, tokenizers, references):
    # "[/INST] 4" vs "[/INST]4", a space before "</s>", a leading space, a system prompt, an empty one.
    for messages in [
        [{"role": "system", "content": ""}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": " hi"}, {"role": "assistant", "content": "answer "}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
    ]:
        ids, _ = encode_chat(messages, tokenizers[version])
        assert ids == reference_ids(references[version], messages)
        assert ids.count(tokenizers[version].bos_token_id) == 1


def test_v1_formats_inst_markers_as_text_with_the_prefix_space(tokenizers):
    ids, _ = encode_chat(chat("hi", "4"), tokenizers["v1"])
    assert ids[:4] == [1, 733, 16289, 28793]  # <s> ▁[ INST ]


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
def test_only_answers_and_their_eos_are_trained(version, tokenizers, references):
    tokenizer = tokenizers[version]
    for messages in conversations(seed=10 + VERSIONS.index(version), count=100):
        ids, labels = encode_chat(messages, tokenizer)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        spans = trained_spans(ids, labels)
        assert len(spans) == len(answers)
        for span, answer in zip(spans, answers):
            assert span[-1] == tokenizer.eos_token_id
            expected = answer if version == "v1" else answer.rstrip(" ")
            sentencepiece = references[version].instruct_tokenizer.tokenizer
            assert span[:-1] == sentencepiece.encode(expected, bos=False, eos=False)
            assert tokenizer.decode(span[:-1]).strip() == expected.replace("▁", " ").strip()


def test_train_on_all_labels_every_token(tokenizers):
    messages = conversations(seed=99, count=1)[0]
    ids, labels = encode_chat(messages, tokenizers["v3"], train_on="all")
    assert labels == ids


@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
def test_prompt_is_the_prefix_of_the_chat_up_to_the_answer(version, tokenizers):
    tokenizer = tokenizers[version]
    for messages in conversations(seed=20 + VERSIONS.index(version), count=100):
        ids, labels = encode_chat(messages, tokenizer)
        prompt = encode_prompt(messages[:-1], tokenizer)
        first_trained_of_last_answer = len(ids) - len(trained_spans(ids, labels)[-1])
        assert prompt == ids[:first_trained_of_last_answer]


# ---------------------------------------------------------------- seed text format


@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
def test_canonical_text_equals_mistral_common(version, tokenizers, references):
    cases = [
        ("<s>[INST] What is 2+2? [/INST] 4</s>", chat("What is 2+2?", "4")),
        ("<s>[INST] hi [/INST] hello there</s>[INST] and? [/INST] bye</s>", chat("hi", "hello there", "and?", "bye")),
        ("<s>[INST] Überall 日本 [/INST] ok.\nnext line</s>", chat("Überall 日本", "ok.\nnext line")),
    ]
    for text, messages in cases:
        ids, _ = encode_text(text, tokenizers[version])
        assert ids == reference_ids(references[version], messages), text


def test_seed_text_space_before_eos_encodes_like_the_canonical_form(tokenizers):
    for tokenizer in tokenizers.values():
        assert encode_text("<s>[INST] q [/INST] answer </s>", tokenizer) == encode_text(
            "<s>[INST] q [/INST] answer</s>", tokenizer
        )


def test_text_markers_become_special_ids_and_bos_is_never_doubled(tokenizers):
    tokenizer = tokenizers["v3"]
    with_bos, _ = encode_text("<s>[INST] q [/INST] a</s>", tokenizer)
    without_bos, _ = encode_text("[INST] q [/INST] a</s>", tokenizer)
    assert with_bos == without_bos
    assert with_bos[:2] == [tokenizer.bos_token_id, 3] and with_bos.count(tokenizer.bos_token_id) == 1
    assert with_bos[-1] == tokenizer.eos_token_id and "<" not in tokenizer.convert_ids_to_tokens(with_bos)[-2]


def test_text_labels_train_what_follows_each_inst_up_to_its_eos(tokenizers):
    tokenizer = tokenizers["v1"]
    ids, labels = encode_text("<s>[INST] q1 [/INST] a1 </s>[INST] q2 [/INST] a2</s>", tokenizer)
    spans = trained_spans(ids, labels)
    assert [tokenizer.decode(s[:-1]) for s in spans] == ["a1", "a2"]
    assert all(s[-1] == tokenizer.eos_token_id for s in spans)


def test_plain_text_needs_train_on_all(tokenizers):
    tokenizer = tokenizers["v3"]
    with pytest.raises(UserError, match="does not follow"):
        encode_text("just some text", tokenizer)
    ids, labels = encode_text("<s>just some text</s>", tokenizer, train_on="all")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id and labels == ids


# ---------------------------------------------------------------- Jinja and the tokenizer's own template

SIMPLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_jinja_template_trains_only_the_answers(tokenizers):
    tokenizer = tokenizers["v3"]
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "six"},
    ]
    ids, labels = encode_chat(messages, tokenizer, template=SIMPLE_TEMPLATE)
    assert [tokenizer.decode(s) for s in trained_spans(ids, labels)] == ["four</s>\n", "six</s>\n"]
    prompt = encode_prompt(messages[:-1], tokenizer, template=SIMPLE_TEMPLATE)
    assert ids[: len(prompt)] == prompt
    assert labels[len(prompt)] != IGNORE_INDEX and labels[len(prompt) - 1] == IGNORE_INDEX


def test_tokenizer_template_uses_the_tokenizers_own_chat_template(tokenizers):
    tokenizer = load_tokenizer("mistral-common:v3")  # a fresh copy: the fixture's stays template-less
    tokenizer.chat_template = SIMPLE_TEMPLATE
    messages = chat("What is 2+2?", "four")
    assert encode_chat(messages, tokenizer, template="tokenizer") == encode_chat(
        messages, tokenizer, template=SIMPLE_TEMPLATE
    )


def test_template_that_rewrites_earlier_turns_cannot_be_masked(tokenizers):
    counts_messages = "{{ messages | length }}" + SIMPLE_TEMPLATE  # the first line changes every turn
    with pytest.raises(UserError, match="renders earlier turns differently"):
        encode_chat(chat("q", "a"), tokenizers["v3"], template=counts_messages)
    ids, labels = encode_chat(chat("q", "a"), tokenizers["v3"], template=counts_messages, train_on="all")
    assert labels == ids


def test_tokenizer_template_without_chat_template_is_a_user_error(tokenizers):
    messages = chat("q", "a")
    with pytest.raises(UserError, match="no chat_template"):
        encode_chat(messages, tokenizers["v1"], template="tokenizer")


# ---------------------------------------------------------------- user mistakes


@pytest.mark.parametrize(
    "messages, complaint",
    [
        ([{"role": "assistant", "content": "a"}], "message 1 has role 'assistant'"),
        ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], "message 2 has role 'user'"),
        ([{"role": "user", "content": "q"}], "must end with an assistant"),
        ([{"role": "system", "content": "s"}], "must end with an assistant"),
        ([], "no messages"),
        ([{"role": "user", "content": None}], "string 'content'"),
        ([*chat("q"), {"role": "system", "content": "s"}], "message 2 has role 'system'"),
    ],
)
def test_malformed_conversations_are_user_errors(messages, complaint, tokenizers):
    with pytest.raises(UserError, match=complaint):
        encode_chat(messages, tokenizers["v3"])


def test_unknown_template_name_is_a_user_error(tokenizers):
    messages = chat("q", "a")
    with pytest.raises(UserError, match="unknown template 'chatml'"):
        encode_chat(messages, tokenizers["v3"], template="chatml")


def test_unknown_train_on_is_a_user_error(tokenizers):
    messages = chat("q", "a")
    with pytest.raises(UserError, match="train_on"):
        encode_chat(messages, tokenizers["v3"], train_on="prompts")


def test_the_vocabulary_cache_does_not_keep_a_tokenizer_alive():
    import gc
    import weakref

    tokenizer = load_tokenizer("mistral-common:v1")
    encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenizer, "mistral")
    alive = weakref.ref(tokenizer)
    del tokenizer
    gc.collect()
    assert alive() is None


# ---------------------------------------------------------------- tekken tokenizers

TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"  # Mistral-Nemo's, version v3
# The versions mistral-common encodes the shipped tekken files as: from v11 on it wants the file
# to list its special tokens, which these do not.
TEKKEN_VERSIONS = ["v3", "v7"]


@pytest.fixture(scope="module")
def tekken_folder(tmp_path_factory) -> Path:
    """mistral-common's tekken file converted to an HF tokenizer by transformers, saved without tekken.json."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    folder = tmp_path_factory.mktemp("tekken") / "hf"
    convert_tekken_tokenizer(str(TEKKEN)).save_pretrained(folder)
    return folder


def tekken_with_version(tekken_folder: Path, tmp_path: Path, version: str) -> tuple[Path, MistralTokenizer]:
    """A copy of the converted tokenizer with the model's tekken.json beside it, as hub repos ship
    it, declaring `version`; and mistral-common's reference encoder for that same file."""
    import json
    import shutil

    folder = tmp_path / f"tekken-{version}"
    shutil.copytree(tekken_folder, folder)
    raw = json.loads(TEKKEN.read_text(encoding="utf-8"))
    raw["config"]["version"] = version
    (folder / "tekken.json").write_text(json.dumps(raw), encoding="utf-8")
    return folder, MistralTokenizer.from_file(folder / "tekken.json", mode=ValidationMode.finetuning)


@pytest.mark.parametrize("version", TEKKEN_VERSIONS)
def test_tekken_tokenizer_follows_the_version_its_tekken_json_declares(version, tekken_folder, tmp_path):
    # Every tekken vocabulary lists [SYSTEM_PROMPT]; only tekken.json tells v3 from v7.
    folder, reference = tekken_with_version(tekken_folder, tmp_path, version)
    tokenizer = load_tokenizer(str(folder))
    for messages in conversations(seed=40, count=100):
        ids, _ = encode_chat(messages, tokenizer)
        assert ids == reference_ids(reference, messages), messages


def test_tekken_version_survives_save_pretrained_without_tekken_json(tekken_folder, tmp_path):
    folder, reference = tekken_with_version(tekken_folder, tmp_path, "v3")
    load_tokenizer(str(folder)).save_pretrained(tmp_path / "adapter")  # as train and merge save it
    assert not (tmp_path / "adapter" / "tekken.json").exists()
    messages = [{"role": "system", "content": "Be brief."}, *chat("Hi", "Hello!")]
    ids, _ = encode_chat(messages, load_tokenizer(str(tmp_path / "adapter")))
    assert ids == reference_ids(reference, messages)


def test_tekken_tokenizer_of_unknown_version_refuses_only_system_prompts(tekken_folder):
    _, reference = tekken_with_version(tekken_folder, tekken_folder.parent, "v3")
    tokenizer = load_tokenizer(str(tekken_folder))
    for messages in [chat("Hi", "Hello!"), chat("a", "b", "c", "d")]:  # v3 and v7 agree without one
        assert encode_chat(messages, tokenizer)[0] == reference_ids(reference, messages)
    with pytest.raises(UserError, match="does not say its mistral-common version") as error:
        encode_chat([{"role": "system", "content": "Be brief."}, *chat("Hi", "Hello!")], tokenizer)
    assert "tekken.json" in error.value.fix and "template: tokenizer" in error.value.fix


def test_a_tekken_version_without_a_known_chat_format_still_prepares_plain_text(tekken_folder, tmp_path):
    import json
    import shutil

    folder = tmp_path / "tekken-v15"
    shutil.copytree(tekken_folder, folder)
    raw = json.loads(TEKKEN.read_text(encoding="utf-8"))
    raw["config"]["version"] = "v15"  # a version whose chat format needs more than we reproduce
    (folder / "tekken.json").write_text(json.dumps(raw), encoding="utf-8")
    tokenizer = load_tokenizer(str(folder))
    ids, _ = encode_text("Just some plain text.", tokenizer, train_on="all")
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]).strip() == "Just some plain text."
    with pytest.raises(UserError, match="version v15") as error:
        encode_chat(chat("Hi", "Hello!"), tokenizer)
    assert "template: tokenizer" in error.value.fix


def random_rows(rng: random.Random, format: str, count: int) -> list[dict]:
    """Rows of an alpaca or completion file, of random text."""
    if format == "alpaca":
        return [{"instruction": random_text(rng), "input": rng.choice(["", random_text(rng)]),
                 "output": random_text(rng)} for _ in range(count)]
    return [{"prompt": random_text(rng), "completion": random_text(rng)} for _ in range(count)]


def as_messages(format: str, row: dict) -> list[dict]:
    """The conversation README says a row of `format` is."""
    if format == "chat":
        return row["messages"]
    if format == "alpaca":
        user = f"{row['instruction']}\n\n{row['input']}" if row["input"].strip() else row["instruction"]
        return chat(user, row["output"])
    return chat(row["prompt"], row["completion"])


@pytest.mark.slow  # converting each tekken vocabulary takes tens of seconds
@pytest.mark.parametrize("shipped", ["tekken_240718.json", "tekken_240911.json"])
@pytest.mark.parametrize("version", TEKKEN_VERSIONS)
def test_a_model_folder_with_only_tekken_json_prepares_mistral_commons_ids(shipped, version, tmp_path, data_recipe,
                                                                             write_jsonl):
    # As Mistral publishes its 2025-2026 models: config.json and tekken.json, no tokenizer.json.
    import json

    from qlora_cli.data.prepare import build_dataset
    from qlora_cli.recipe.load import load_recipe

    raw = json.loads((TEKKEN.parent / shipped).read_text(encoding="utf-8"))
    raw["config"]["version"] = version
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral3"}))
    (folder / "tekken.json").write_text(json.dumps(raw), encoding="utf-8")
    tokenizer = load_tokenizer(str(folder))
    reference = MistralTokenizer.from_file(folder / "tekken.json", mode=ValidationMode.finetuning)
    rng = random.Random(TEKKEN_VERSIONS.index(version))
    rows = {"chat": [{"messages": m} for m in conversations(seed=rng.random(), count=40)],
            "alpaca": random_rows(rng, "alpaca", 40), "completion": random_rows(rng, "completion", 40)}
    for format, format_rows in rows.items():
        data = {"sources": [{"path": write_jsonl(format_rows, f"{format}.jsonl"), "format": format}],
                "packing": False, "shuffle": False, "max_length": 4096, "val_size": 0}
        recipe = load_recipe([str(data_recipe(data, f"{format}.yaml"))])
        prepared = build_dataset(recipe.data, tokenizer, 0, "test")[0]["train"]["input_ids"]
        assert prepared == [reference_ids(reference, as_messages(format, row)) for row in format_rows], format
