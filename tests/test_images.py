"""data/images.py and the image paths of templates, prepare and collate: an image conversation's ids
equal mistral-common's `encode_chat_completion`, its pixels equal mistral-common's arrays, image
tokens are never trained, and packed rows carry their examples' images in order."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import mistral_common
import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image, ImageDraw

from conftest import assert_user_error, qlora
from qlora_cli.data.collate import PackedCollator
from qlora_cli.data.images import (ImageSettings, image_grid, image_settings, image_token_count, pixels,
                                   read_image)
from qlora_cli.data.templates import IGNORE_INDEX, encode_chat, encode_prompt
from qlora_cli.data.tokenizer import load_tokenizer

TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
# Two checkpoint shapes: Pixtral 12B's (v3, 16-pixel patches, no merge, up to 1024 pixels) and a
# Mistral Small 3.1-like one (v7, 14-pixel patches merged 2x2) with a small maximum size, so that
# large images are scaled down as mistral-common does.
SHAPES = {
    "v3-patch16": ("v3", {"image_patch_size": 16, "max_image_size": 1024, "spatial_merge_size": 1}),
    "v7-patch14-merge2": ("v7", {"image_patch_size": 14, "max_image_size": 224, "spatial_merge_size": 2}),
}


def write_tiny_tekken(folder: Path, version: str, image: dict | None) -> Path:
    """A tekken.json of mistral-common's shipped vocabulary cut to 2,000 tokens (converts in
    seconds), with this version and image section: a model folder as Mistral publishes it."""
    raw = json.loads(TEKKEN.read_text(encoding="utf-8"))
    raw["vocab"] = raw["vocab"][:2000]
    raw["config"].update(version=version, default_vocab_size=3000, num_vocab_tokens=2000)
    raw.pop("image", None)
    if image:
        raw["image"] = image
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tekken.json").write_text(json.dumps(raw), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def vision(tmp_path_factory) -> dict:
    """shape -> (HF tokenizer, mistral-common reference) for each tiny tekken with an image section."""
    class Loaded(dict):
        folders: dict = {}

    loaded = Loaded()
    for name, (version, image) in SHAPES.items():
        folder = write_tiny_tekken(tmp_path_factory.mktemp(name), version, image)
        loaded.folders[name] = folder
        loaded[name] = (load_tokenizer(str(folder)),
                        MistralTokenizer.from_file(folder / "tekken.json", mode=ValidationMode.finetuning))
    return loaded


# ---------------------------------------------------------------- random pictures and conversations


def random_png(rng: random.Random, width: int | None = None, height: int | None = None, fmt: str = "PNG") -> bytes:
    width, height = width or rng.randint(1, 400), height or rng.randint(1, 400)
    mode = rng.choice(["RGB", "RGBA", "L"])
    image = Image.new(mode, (width, height), tuple(rng.randrange(256) for _ in mode) if mode != "L" else 128)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        box = sorted(rng.sample(range(max(width, 2)), 2)), sorted(rng.sample(range(max(height, 2)), 2))
        draw.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]],
                     fill=tuple(rng.randrange(256) for _ in mode) if mode != "L" else rng.randrange(256))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


WORDS = ["What", "colour", "is", "this?", "Describe", "the", "picture.", "red", "circle", "\n", "é", "  ", "42"]


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))).strip() or "x"


def random_image_conversation(rng: random.Random, end: str = "assistant") -> list[dict]:
    messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 3)):
        parts = [{"type": "image", "image": read_image(random_png(rng), "random.png", "test")}
                 for _ in range(rng.randint(0, 3))]
        parts += [{"type": "text", "text": random_text(rng)} for _ in range(rng.randint(0, 2))]
        rng.shuffle(parts)
        if not any(p["type"] == "image" for p in parts):
            parts.append({"type": "image", "image": read_image(random_png(rng), "random.png", "test")})
        messages.append({"role": "user", "content": parts})
        messages.append({"role": "assistant", "content": random_text(rng)})
    return messages if end == "assistant" else messages[:-1]


def reference_request(messages: list[dict]) -> ChatCompletionRequest:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def chunk(part):
        if part["type"] == "text":
            return TextChunk(text=part["text"])
        return ImageChunk(image=Image.open(io.BytesIO(part["image"].data)))

    return ChatCompletionRequest(messages=[
        kinds[m["role"]](content=m["content"] if isinstance(m["content"], str) else [chunk(p) for p in m["content"]])
        for m in messages])


# ---------------------------------------------------------------- exact ids and pixels


@pytest.mark.parametrize("shape", SHAPES)
def test_image_conversations_encode_as_mistral_commons_ids_and_pixels(shape, vision):
    tokenizer, reference = vision[shape]
    settings = image_settings(tokenizer)
    rng = random.Random(shape)
    for _ in range(25):
        messages = random_image_conversation(rng)
        expected = reference.encode_chat_completion(reference_request(messages))
        ids, _ = encode_chat(messages, tokenizer)
        assert ids == expected.tokens, messages
        images = [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
                  if p["type"] == "image"]
        assert len(images) == len(expected.images)
        for image, array in zip(images, expected.images):
            ours = pixels(image.data, settings)
            assert ours.dtype == np.float32 and ours.shape == array.shape
            np.testing.assert_allclose(ours, array, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_image_prompt_equals_mistral_commons_prompt(shape, vision):
    tokenizer, _ = vision[shape]
    serving = MistralTokenizer.from_file(vision.folders[shape] / "tekken.json")  # ends with the user's turn
    rng = random.Random(7)
    for _ in range(10):
        messages = random_image_conversation(rng, end="user")
        prompt = encode_prompt(messages, tokenizer)
        assert prompt == serving.encode_chat_completion(reference_request(messages)).tokens
        full = encode_chat([*messages, {"role": "assistant", "content": "Red."}], tokenizer)[0]
        assert full[: len(prompt)] == prompt


def test_image_grid_follows_patch_merge_and_maximum_size():
    pixtral = ImageSettings(patch_size=16, spatial_merge_size=1, max_image_size=1024)
    small = ImageSettings(patch_size=14, spatial_merge_size=2, max_image_size=1540)
    assert image_grid(448, 336, pixtral) == (21, 28)  # rows, cols: 336/16, 448/16
    assert image_grid(448, 336, small) == (12, 16)  # 28-pixel tokens: ceil(336/28), 448/28
    assert image_grid(4000, 1000, pixtral) == (16, 64)  # scaled to 1024x256 first
    assert image_grid(1, 1, small) == (1, 1)
    assert image_token_count(448, 336, small) == 12 * 17  # each row ends in [IMG_BREAK] / [IMG_END]


def test_image_tokens_are_never_trained_and_answers_are(vision):
    tokenizer, _ = vision["v7-patch14-merge2"]
    image_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")}
    rng = random.Random(3)
    messages = random_image_conversation(rng)
    for train_on in ("responses", "all"):
        ids, labels = encode_chat(messages, tokenizer, train_on=train_on)
        at_images = [label for token, label in zip(ids, labels) if token in image_ids]
        assert at_images and set(at_images) == {IGNORE_INDEX}, train_on
        others = [(token, label) for token, label in zip(ids, labels) if token not in image_ids]
        if train_on == "all":
            assert all(token == label for token, label in others)
    ids, labels = encode_chat(messages, tokenizer)
    trained = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode(trained).replace("</s>", "|") == "".join(a.rstrip(" ") + "|" for a in answers)


# ---------------------------------------------------------------- collate


def test_collate_pads_images_of_different_sizes_into_pixel_values_and_image_sizes(vision):
    tokenizer, _ = vision["v3-patch16"]
    settings = image_settings(tokenizer)
    rng = random.Random(5)
    images = [random_png(rng, 50, 37), random_png(rng, 300, 20), random_png(rng, 16, 200)]
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "images": images[:2]},
            {"input_ids": [1, 2], "labels": [1, 2], "images": images[2:]}]
    batch = PackedCollator(tokenizer.pad_token_id, image_settings=settings)(rows)
    assert batch["pixel_values"].dtype.is_floating_point and batch["pixel_values"].shape == (3, 3, 208, 304)
    assert batch["image_sizes"].tolist() == [[48, 64], [32, 304], [208, 16]]
    for i, image in enumerate(images):
        height, width = batch["image_sizes"][i].tolist()
        np.testing.assert_array_equal(batch["pixel_values"][i, :, :height, :width].numpy(), pixels(image, settings))
        assert not batch["pixel_values"][i, :, height:, :].any() and not batch["pixel_values"][i, :, :, width:].any()


# ---------------------------------------------------------------- rows -> prepared data

QUESTION = "What colour is the shape?"


def image_folder(root: Path, rng: random.Random, count: int = 3) -> list[Path]:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / "imgs" / f"{i}.png"
        path.write_bytes(random_png(rng))
        paths.append(path)
    return paths


def vision_recipe(tmp_path: Path, data: dict, tokenizer: Path | str, name: str = "recipe.yaml",
                  extends: str = "tiny-mistral3-vision") -> Path:
    """A recipe extending tiny-mistral3-vision (a tiny mistral3) with this tokenizer and data section."""
    import yaml

    for source in data.get("sources", []):
        source["path"] = str(source["path"])
    section = {"prepared_dir": str(tmp_path / "prepared"), "val_size": 0, "shuffle": False, "max_length": 4096, **data}
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"extends": extends, "model": {"tokenizer": str(tokenizer)}, "data": section},
                                   sort_keys=False))
    return path


def prepared(tmp_path: Path, vision, rows: list[dict], name: str, shape: str = "v3-patch16", **data):
    from qlora_cli.data.prepare import build_dataset
    from qlora_cli.recipe.load import load_recipe

    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    section = {"sources": [{"path": path, "format": "chat"}], "packing": False, "max_length": 4096, **data}
    recipe = load_recipe([str(vision_recipe(tmp_path, section, vision.folders[shape], f"{name}.yaml"))])
    return build_dataset(recipe.data, vision[shape][0], 0, "test")


def test_every_image_layout_prepares_the_same_ids_and_file_bytes(vision, tmp_path):
    rng = random.Random(11)
    a, b = image_folder(tmp_path, rng, 2)
    data_uri = "data:image/png;base64," + base64.b64encode(b.read_bytes()).decode()

    def row(first: dict, second: dict, **extra) -> dict:
        return {"messages": [{"role": "user", "content": [first, {"type": "text", "text": QUESTION}, second]},
                             {"role": "assistant", "content": "Red."}], **extra}

    layouts = {
        "path": row({"type": "image", "path": "imgs/0.png"}, {"type": "image", "path": str(b)}),
        "uris": row({"type": "image_url", "image_url": f"file://{a}"},
                    {"type": "image_url", "image_url": {"url": data_uri}}),
        "hf": row({"type": "image"}, {"type": "image"}, images=["imgs/0.png", {"bytes": None, "path": str(b)}]),
        "trl": row({"type": "image", "image": "imgs/0.png"}, {"type": "image", "image": data_uri}),
    }
    results = {name: prepared(tmp_path, vision, [layout], name)[0]["train"][0] for name, layout in layouts.items()}
    for name, result in results.items():
        assert result["images"] == [a.read_bytes(), b.read_bytes()], name
        assert result["input_ids"] == results["path"]["input_ids"], name
    _, reference, = vision["v3-patch16"]
    messages = [{"role": "user", "content": [
        {"type": "image", "image": read_image(a.read_bytes(), "a", "t")}, {"type": "text", "text": QUESTION},
        {"type": "image", "image": read_image(b.read_bytes(), "b", "t")}]}, {"role": "assistant", "content": "Red."}]
    assert results["path"]["input_ids"] == reference.encode_chat_completion(reference_request(messages)).tokens


def test_a_saved_dataset_with_the_datasets_image_feature_keeps_the_files_bytes(vision, tmp_path):
    from datasets import Dataset, Features, Image as ImageFeature, List, Value

    from qlora_cli.data.prepare import build_dataset
    from qlora_cli.recipe.load import load_recipe

    rng = random.Random(12)
    files = [random_png(rng), random_png(rng, fmt="JPEG")]
    part = {"type": Value("string"), "text": Value("string")}
    features = Features({"messages": List({"role": Value("string"), "content": List(part)}),
                         "images": List(ImageFeature())})
    rows = {"messages": [[{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": QUESTION},
                                                        {"type": "image", "text": None}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]],
            "images": [[{"bytes": files[0], "path": None}, {"bytes": files[1], "path": None}]]}
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    section = {"sources": [{"path": tmp_path / "saved", "format": "chat"}], "packing": False}
    recipe = load_recipe([str(vision_recipe(tmp_path, section, vision.folders["v3-patch16"]))])
    row = build_dataset(recipe.data, vision["v3-patch16"][0], 0, "test")[0]["train"][0]
    assert row["images"] == files


def test_packed_rows_carry_their_examples_images_in_order_and_count_image_tokens(vision, tmp_path):
    from qlora_cli.data.images import image_spans, image_token_ids, image_size

    tokenizer = vision["v7-patch14-merge2"][0]
    settings, ids = image_settings(tokenizer), image_token_ids(tokenizer)
    rng = random.Random(13)
    paths = image_folder(tmp_path, rng, 12)
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": f"Question {i}"}]
                           + [{"type": "image", "path": f"imgs/{(i + k) % 12}.png"} for k in range(i % 3 + 1)]},
                          {"role": "assistant", "content": f"Answer {i}"}]} for i in range(12)]
    dataset, summary = prepared(tmp_path, vision, rows, "packed", "v7-patch14-merge2", packing=True, max_length=512)
    train = dataset["train"]
    assert len(train) < 12 and sum(len(row["seq_lengths"]) for row in train) == 12
    for row in train:
        spans = image_spans(row["input_ids"], ids)
        assert len(spans) == len(row["images"])
        for (start, end, cols, rows_), image in zip(spans, row["images"]):
            assert image_grid(*image_size(image), settings) == (rows_, cols)  # this image's own grid, in order
            assert set(row["labels"][start:end]) == {IGNORE_INDEX}
    assert summary.images["train"] == sum(i % 3 + 1 for i in range(12))
    assert summary.image_tokens["train"] == sum(image_token_count(*image_size(paths[(i + k) % 12].read_bytes()), settings)
                                                for i in range(12) for k in range(i % 3 + 1))


def test_a_changed_image_file_or_image_section_changes_the_data_fingerprint(vision, tmp_path):
    from qlora_cli.data.prepare import data_fingerprint
    from qlora_cli.recipe.load import load_recipe

    rng = random.Random(14)
    image_folder(tmp_path, rng, 1)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "path": "imgs/0.png"}]},
                                             {"role": "assistant", "content": "Red."}]}) + "\n")
    recipe = load_recipe([str(vision_recipe(tmp_path, {"sources": [{"path": path, "format": "chat"}]},
                                            vision.folders["v3-patch16"]))])
    before = data_fingerprint(recipe.data, vision["v3-patch16"][0], 0)
    assert data_fingerprint(recipe.data, vision["v3-patch16"][0], 0) == before
    (tmp_path / "imgs" / "0.png").write_bytes(random_png(rng))
    changed = data_fingerprint(recipe.data, vision["v3-patch16"][0], 0)
    assert changed != before
    other_shape = load_tokenizer(str(vision.folders["v3-patch16"]))  # the same vocabulary, another image section
    other_shape.init_kwargs["mistral_common_image"] = SHAPES["v7-patch14-merge2"][1]
    assert data_fingerprint(recipe.data, other_shape, 0) != changed


# ---------------------------------------------------------------- bad input, through `qlora prepare`


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its pixel data is empty): what PIL reads first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def user_turn(*parts: dict, answer: str = "Red.") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": answer}]


IMAGE = {"type": "image", "path": "imgs/good.png"}
PLACEHOLDER = {"type": "image"}
BAD_ROWS = {  # name: (the bad row, what the message names besides the row's file:line)
    "missing image": ({"messages": user_turn({"type": "image", "path": "imgs/nope.png"})}, ["imgs/nope.png", "does not exist"]),
    "not an image": ({"messages": user_turn({"type": "image", "path": "imgs/notes.png"})}, ["imgs/notes.png", "cannot be read"]),
    "truncated png": ({"messages": user_turn({"type": "image", "path": "imgs/cut.png"})}, ["imgs/cut.png", "cannot be read"]),
    "0-pixel image": ({"messages": user_turn({"type": "image", "path": "imgs/empty.png"})}, ["imgs/empty.png"]),
    "100-megapixel image": ({"messages": user_turn({"type": "image", "path": "imgs/huge.png"})},
                            ["imgs/huge.png", "10000x10000", "megapixels"]),
    "bad data uri": ({"messages": user_turn({"type": "image_url", "image_url": "data:image/png;base64,%%%"})},
                     ["not valid base64"]),
    "more placeholders than images": ({"messages": user_turn(PLACEHOLDER, PLACEHOLDER), "images": ["imgs/good.png"]},
                                      ["more image placeholders"]),
    "fewer placeholders than images": ({"messages": user_turn(PLACEHOLDER), "images": ["imgs/good.png"] * 2},
                                       ["1 more image(s) than its messages have"]),
    "image in an assistant turn": ({"messages": [{"role": "user", "content": QUESTION},
                                                 {"role": "assistant", "content": [IMAGE]}]},
                                   ["message 2 (assistant) holds an image", "user messages only"]),
    "image for a text-only tokenizer": ({"messages": user_turn(IMAGE)}, ["mistral-common v1", "no image tokens"]),
    "image for a text-only model": ({"messages": user_turn(IMAGE)}, ["text-only", "model.init_from_config"]),
    "tokenizer and vision tower disagree": ({"messages": user_turn(IMAGE)},
                                            ["14-pixel patches merged 2x2", "16-pixel patches merged 1x1"]),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_images_exit_2_naming_the_row_and_write_nothing(case, vision, tmp_path):
    rng = random.Random(15)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "good.png").write_bytes(random_png(rng, 40, 30))
    (tmp_path / "imgs" / "notes.png").write_text("not a picture")
    whole = random_png(rng, 300, 300)
    (tmp_path / "imgs" / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "imgs" / "empty.png").write_bytes(png_claiming(0, 10))
    (tmp_path / "imgs" / "huge.png").write_bytes(png_claiming(10000, 10000))
    row, needles = BAD_ROWS[case]
    good = {"messages": user_turn(IMAGE)}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    tokenizer = {"image for a text-only tokenizer": "mistral-common:v1",
                 "tokenizer and vision tower disagree": vision.folders["v7-patch14-merge2"]}.get(
        case, vision.folders["v3-patch16"])
    extends = "tiny-mistral" if case == "image for a text-only model" else "tiny-mistral3-vision"
    recipe = vision_recipe(tmp_path, {"sources": [{"path": data, "format": "chat"}]}, tokenizer, extends=extends)
    result = qlora("prepare", recipe)
    model_side = case.startswith("image for a text-only") or case.endswith("disagree")  # at the first image
    where = str(recipe) if case.endswith("disagree") else f"{data}:1" if model_side else f"{data}:2"
    assert_user_error(result, where, *needles, wrapped=True)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_preference_pairs_on_image_prompts_carry_the_images_and_mistral_commons_prompt_ids(vision, tmp_path):
    from qlora_cli.data.prepare import build_dataset
    from qlora_cli.recipe.load import load_recipe

    rng = random.Random(16)
    a, b = image_folder(tmp_path, rng, 2)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
             "images": ["imgs/0.png"], "chosen": "Red.", "rejected": "Blue."},
            {"chosen": [{"role": "user", "content": [{"type": "image", "path": "imgs/1.png"}]},
                        {"role": "assistant", "content": "A circle."}],
             "rejected": [{"role": "user", "content": [{"type": "image", "path": "imgs/1.png"}]},
                          {"role": "assistant", "content": "A square."}]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    section = {"sources": [{"path": path, "format": "preference"}]}
    recipe = load_recipe([str(vision_recipe(tmp_path, section, vision.folders["v3-patch16"]))], ["method=dpo"])
    tokenizer, _ = vision["v3-patch16"]
    train = build_dataset(recipe.data, tokenizer, 0, "test")[0]["train"]
    serving = MistralTokenizer.from_file(vision.folders["v3-patch16"] / "tekken.json")
    for row, image, question in zip(train, (a, b), (QUESTION, None)):
        assert row["images"] == [image.read_bytes()]
        parts = [{"type": "image", "image": read_image(image.read_bytes(), "i", "t")}]
        parts += [{"type": "text", "text": question}] if question else []
        expected = serving.encode_chat_completion(reference_request([{"role": "user", "content": parts}])).tokens
        assert row["prompt_ids"] == expected
        assert row["chosen_ids"] != row["rejected_ids"] and all(row["chosen_mask"])


def test_prepare_show_draws_each_image_with_its_size_and_grid(vision, tmp_path):
    rng = random.Random(17)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(random_png(rng, 40, 30))
    (tmp_path / "imgs" / "b.png").write_bytes(random_png(rng, 448, 336))
    data = tmp_path / "data.jsonl"
    row = {"messages": user_turn({"type": "image", "path": "imgs/a.png"}, {"type": "image", "path": "imgs/b.png"})}
    data.write_text(json.dumps(row) + "\n")
    recipe = vision_recipe(tmp_path, {"sources": [{"path": data, "format": "chat"}]}, vision.folders["v3-patch16"])
    result = qlora("prepare", recipe, "--show", "1")
    assert result.exit_code == 0, result.output
    assert "[image 1: 40x30 -> 3x2 tokens][image 2: 448x336 -> 28x21 tokens]" + QUESTION in result.output
    assert "2 images" in result.output and "[IMG]" not in result.output
    tokens = 2 * 4 + 21 * 29  # rows x (cols + 1) each
    assert f"({tokens:,} in 2 images, never trained)" in result.output


def test_an_overlong_example_is_cut_only_after_its_last_image(vision, tmp_path):
    rng = random.Random(18)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(random_png(rng, 40, 30))
    image = {"type": "image", "path": "imgs/a.png"}
    long = " ".join(["word"] * 200)
    rows = [{"messages": user_turn(image, answer=long)},  # the cut falls in the answer: kept, cut
            {"messages": [{"role": "user", "content": [{"type": "text", "text": long}, image]},
                          {"role": "assistant", "content": "Red."}]}]  # the cut would fall before the image ends
    dataset, summary = prepared(tmp_path, vision, rows, "overlong", max_length=64, overlong="truncate")
    (counts,) = summary.sources
    assert (counts.read, counts.kept, counts.truncated, counts.dropped) == (2, 1, 1, 1)
    (row,) = dataset["train"]
    assert len(row["input_ids"]) == 64 and row["images"] == [(tmp_path / "imgs" / "a.png").read_bytes()]
    from qlora_cli.data.images import image_spans, image_token_ids

    assert [span[2:] for span in image_spans(row["input_ids"], image_token_ids(vision["v3-patch16"][0]))] == [(3, 2)]


def test_a_pil_image_is_kept_as_lossless_png_bytes():
    from qlora_cli.data.images import load_image

    picture = Image.open(io.BytesIO(random_png(random.Random(19), 33, 21))).convert("RGB")
    image = load_image(picture, None, "test")
    assert (image.width, image.height) == (33, 21)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.data))), np.asarray(picture))
