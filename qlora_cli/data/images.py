"""Images in conversations: where a row's images come from, and their exact tokens and pixels.

An image part of a user message becomes the image's FILE BYTES as read (png, jpeg, ...), checked
here once (decodable, not empty, not a decompression bomb) with its width and height. Tokens and
pixels are mistral-common's own: its `ImageEncoder` lays out `[IMG]` rows ended by `[IMG_BREAK]`
and a final `[IMG_END]` for the model's patch size, spatial merge and maximum image size, and
resizes (bicubic, OpenCV) and normalises the pixels. The prepared cache keeps the bytes; pixels
are made batch by batch (data/collate.py), so no float copy of every image sits on disk.

Where the settings come from: the tokenizer's tekken.json `image` section (recorded in the HF
tokenizer's init kwargs by data/tokenizer.py, so it survives save_pretrained), else the
checkpoint's vision config (`vision_config.patch_size`, `spatial_merge_size`, `image_size`).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from qlora_cli.errors import UserError
from qlora_cli.data.tokenizer import IMAGE_KEY

IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


@dataclass(frozen=True)
class ImageSettings:
    """How a model sees images: mistral-common's ImageConfig, and the normalisation it applies."""

    patch_size: int
    spatial_merge_size: int
    max_image_size: int
    mean: tuple[float, float, float] = field(default_factory=lambda: _normalisation()[0])
    std: tuple[float, float, float] = field(default_factory=lambda: _normalisation()[1])

    def image_config(self):
        """mistral-common's ImageConfig of these settings."""
        from mistral_common.tokens.tokenizers.image import ImageConfig

        return ImageConfig(image_patch_size=self.patch_size, max_image_size=self.max_image_size,
                           spatial_merge_size=self.spatial_merge_size)

    def as_dict(self) -> dict:
        return {"image_patch_size": self.patch_size, "max_image_size": self.max_image_size,
                "spatial_merge_size": self.spatial_merge_size}


def _normalisation() -> tuple[tuple, tuple]:
    """mistral-common's per-channel mean and std (its transform_image applies these, whatever the
    checkpoint's processor config says). Imported when asked: `qlora --help` stays fast."""
    from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD

    return tuple(DATASET_MEAN), tuple(DATASET_STD)


@dataclass(frozen=True, eq=False)
class ImageFile:
    """One image of a row: its file bytes as read, its size, and a name for messages."""

    data: bytes
    width: int
    height: int
    name: str

    def __repr__(self) -> str:  # a row printed in an error must not dump megabytes
        return f"ImageFile({self.name}, {self.width}x{self.height})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageFile) and self.data == other.data


# ---------------------------------------------------------------- settings


def settings_from_config(raw: dict | None) -> ImageSettings | None:
    """Settings from a tekken.json `image` (or older `multimodal`) section, as mistral-common reads it."""
    if not raw:
        return None
    return ImageSettings(patch_size=int(raw["image_patch_size"]), max_image_size=int(raw["max_image_size"]),
                         spatial_merge_size=int(raw.get("spatial_merge_size", 1)))


def image_settings(tokenizer, model_config=None) -> ImageSettings | None:
    """The image settings of a tokenizer (its tekken.json image section), else of a checkpoint's
    config (mistral3, llava with a pixtral vision config); None for a text-only model."""
    recorded = getattr(tokenizer, "init_kwargs", {}).get(IMAGE_KEY) if tokenizer is not None else None
    if recorded:
        return settings_from_config(recorded)
    vision = getattr(model_config, "vision_config", None)
    if vision is None or getattr(vision, "patch_size", None) is None:
        return None
    return ImageSettings(patch_size=int(vision.patch_size),
                         spatial_merge_size=int(getattr(model_config, "spatial_merge_size", 1) or 1),
                         max_image_size=int(getattr(vision, "image_size", 1024)))


def check_model_for_images(model, tokenizer, where: str) -> None:
    """Images in the data (first at `where`) need a model with a vision tower, whose patch size and
    spatial merge are the ones the tokenizer lays image tokens out for: else the number of image
    tokens would not match the tower's features, which fails deep in the first training step."""
    config = _model_config(model)
    if config is None:
        return  # a hub model not downloaded: the model stage reads its config
    key = "model.init_from_config" if model.init_from_config is not None else "model.name_or_path"
    if getattr(config, "vision_config", None) is None:
        raise UserError(f"this example holds an image, and the model ({key}) is text-only: it has no vision tower",
                        where=where, fix="fine-tune a vision-language model (mistral3, pixtral), or remove the images")
    ours, theirs = image_settings(tokenizer), image_settings(None, config)
    if ours and theirs and (ours.patch_size, ours.spatial_merge_size) != (theirs.patch_size, theirs.spatial_merge_size):
        raise UserError(f"the tokenizer lays images out in {ours.patch_size}-pixel patches merged "
                        f"{ours.spatial_merge_size}x{ours.spatial_merge_size}, and the model's vision tower ({key}) "
                        f"takes {theirs.patch_size}-pixel patches merged {theirs.spatial_merge_size}x"
                        f"{theirs.spatial_merge_size}", key="model.tokenizer",
                        fix="use the model's own tokenizer (its tekken.json), or make the model's vision_config."
                            "patch_size and spatial_merge_size those of the tokenizer's image section")


def _model_config(model):
    """The recipe's model config, read without weights; None where it cannot be without the network."""
    if model.init_from_config is not None:
        from qlora_cli.families import build_init_config

        return build_init_config(dict(model.init_from_config))
    from transformers import AutoConfig
    from transformers.utils import cached_file

    try:
        path = cached_file(model.name_or_path, "config.json", revision=model.revision,
                           _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
        return None if path is None else AutoConfig.from_pretrained(Path(path).parent)
    except (OSError, ValueError):  # not a folder nor a hub id, a damaged config: the model stage says so
        return None


def image_token_ids(tokenizer) -> tuple[int, int, int] | None:
    """The ids of [IMG], [IMG_BREAK], [IMG_END] in the tokenizer, or None where it lacks one."""
    backend = tokenizer.backend_tokenizer
    ids = tuple(backend.token_to_id(token) for token in IMAGE_TOKENS)
    return None if None in ids else ids


# ---------------------------------------------------------------- tokens and pixels


def _encoder(settings: ImageSettings, ids: tuple[int, int, int] = (0, 1, 2)):
    from mistral_common.tokens.tokenizers.image import ImageEncoder, SpecialImageIDs

    return ImageEncoder(settings.image_config(), SpecialImageIDs(*ids))


def image_grid(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """(rows, cols) of image tokens for an image of that size, as mistral-common lays them out
    (it only reads the image's size, so no pixel is decoded)."""
    cols, rows = _encoder(settings)._image_to_num_tokens(SimpleNamespace(size=(width, height)))
    return rows, cols


def image_tokens(width: int, height: int, settings: ImageSettings, ids: tuple[int, int, int]) -> list[int]:
    """The token ids of one image: each row `cols` [IMG] and an [IMG_BREAK], the last break an [IMG_END]."""
    img, brk, end = ids
    rows, cols = image_grid(width, height, settings)
    tokens = ([img] * cols + [brk]) * rows
    tokens[-1] = end
    return tokens


def image_token_count(width: int, height: int, settings: ImageSettings) -> int:
    """How many tokens an image of that size takes ([IMG_BREAK]s and [IMG_END] included)."""
    rows, cols = image_grid(width, height, settings)
    return rows * (cols + 1)


def pixels(image_bytes: bytes, settings: ImageSettings):
    """The float32 (3, H, W) array the model sees: mistral-common's ImageEncoder's own output
    (RGB over white, bicubic resize to the token grid, normalised)."""
    from mistral_common.protocol.instruct.chunk import ImageChunk
    from PIL import Image

    return _encoder(settings)(ImageChunk(image=Image.open(io.BytesIO(image_bytes)))).image


# ---------------------------------------------------------------- reading images


def _pixel_limit() -> int:
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb threshold


def read_image(data: bytes, name: str, where: str) -> ImageFile:
    """Check that `data` is a whole, decodable image of sensible size; its ImageFile."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # a large image is refused below, by its size, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            width, height = image.size
            if width * height == 0:
                raise UserError(f"image {name} has no pixels ({width}x{height})", where=where,
                                fix="replace the image, or remove it from the row")
            limit = _pixel_limit()
            if width * height > limit:
                raise UserError(f"image {name} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than "
                                f"the {limit / 1e6:.0f} megapixels an image may have", where=where,
                                fix="resize it first (the model sees at most its max_image_size anyway)")
            image.load()  # a truncated or damaged file fails here, not halfway through training
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"image {name} cannot be read: {err}", where=where,
                        fix="replace it with a whole png/jpeg/webp file") from None
    return ImageFile(data, width, height, name)


def _read_file(path: Path, where: str) -> ImageFile:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"image file {path} does not exist", where=where,
                        fix="fix the path (relative paths are read beside the data file)") from None
    except OSError as err:
        raise UserError(f"image file {path} cannot be read: {err.strerror or err}", where=where) from None
    return read_image(data, str(path), where)


def image_path(value: str, base: Path | None) -> Path:
    """A path or file:// URI, relative ones read beside the data file."""
    if value.startswith("file://"):
        value = value[len("file://"):]
    path = Path(value).expanduser()
    return path if path.is_absolute() or base is None else base / path


def load_image(value: Any, base: Path | None, where: str) -> ImageFile:
    """An image given as a path, a file:// or data: URI, bytes, a {"bytes", "path"} dict (the
    `datasets.Image` feature undecoded), or a PIL image (saved as PNG: lossless)."""
    if isinstance(value, ImageFile):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return read_image(bytes(value), "(bytes)", where)
    if isinstance(value, dict):
        if value.get("bytes"):
            return read_image(bytes(value["bytes"]), value.get("path") or "(bytes)", where)
        if value.get("path"):
            return _read_file(image_path(value["path"], base), where)
        if isinstance(value.get("url"), str):  # {"image_url": {"url": ...}} as OpenAI writes it
            return load_image(value["url"], base, where)
    if isinstance(value, str):
        if value.startswith("data:"):
            return _data_uri(value, where)
        if value.startswith(("http://", "https://")):
            raise UserError(f"image {value[:80]} is a web address: qlora reads images from local files only",
                            where=where, fix="download the images and give their paths (the cache "
                                             "fingerprints the files' bytes)")
        return _read_file(image_path(value, base), where)
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return read_image(buffer.getvalue(), "(PIL image)", where)
    raise UserError(f"cannot read an image from {type(value).__name__}", where=where,
                    fix="give a path, a file:// or data: URI, bytes, or a {bytes, path} dict")


def _data_uri(value: str, where: str) -> ImageFile:
    header, _, payload = value.partition(",")
    if ";base64" not in header:
        raise UserError(f"data URI {value[:40]}... is not base64", where=where,
                        fix="write data:image/png;base64,<base64 of the file>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"data URI {value[:40]}... is not valid base64", where=where) from None
    return read_image(data, f"{header},...", where)


# ---------------------------------------------------------------- message parts


def message_content(content: Any, role: str, row_images: list, base: Path | None, where: str, number: int):
    """A message's content as the templates take it: text, or (when it holds an image) a list of
    {"type": "text", "text"} and {"type": "image", "image": ImageFile} parts in order.
    Image placeholders ({"type": "image"} alone) take the next of `row_images`, consumed in place."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise UserError(f"message {number} needs `content` as text or a list of parts", where=where)
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise UserError(f"message {number}: a text part needs `text`", where=where)
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "image_url"):
            if role != "user":
                raise UserError(f"message {number} ({role}) holds an image: images go in user messages only "
                                "(mistral-common encodes no image in system or assistant turns)", where=where,
                                fix="move the image into the user message before it")
            parts.append({"type": "image", "image": _part_image(part, kind, row_images, base, where, number)})
        else:
            raise UserError(f"message {number} has a part of type {kind!r}", where=where,
                            fix="parts are {type: text, text: ...}, {type: image, path: ...} or "
                                "{type: image_url, image_url: ...}")
    if not any(part["type"] == "image" for part in parts):
        return "\n\n".join(p["text"] for p in parts if p["text"])  # as mistral-common joins text chunks
    return parts


def _part_image(part: dict, kind: str, row_images: list, base: Path | None, where: str, number: int) -> ImageFile:
    given = part.get("image_url") if kind == "image_url" else next(
        (part[key] for key in ("path", "image", "url") if part.get(key) is not None), None)
    if given is None:
        if kind == "image_url" or not row_images:
            raise UserError(f"message {number} has more image placeholders than the row's `images` has images",
                            where=where, fix="give one image per {type: image} part, in order")
        given = row_images.pop(0)
    return load_image(given, base, where)


def images_of(messages: list[dict]) -> list[ImageFile]:
    """The images of a conversation, in order of appearance."""
    return [part["image"] for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if part["type"] == "image"]


def check_all_images_used(row_images: list, where: str) -> None:
    """The row's `images` column had no more images than the messages' placeholders took."""
    if row_images:
        raise UserError(f"the row's `images` has {len(row_images)} more image(s) than its messages have "
                        "{type: image} placeholders", where=where,
                        fix="put one {type: image} part in a user message for each image, in order")


def referenced_files(row: Any, images_column: str = "images") -> list[str]:
    """The image file paths (and file:// URIs) a raw row names, wherever its image parts sit, and
    in its `images` column: what the data fingerprint hashes beside the data file itself (bytes
    and data: URIs inside the row are covered by the row's own bytes)."""
    found: list = []
    stack = [row]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack += item
        elif isinstance(item, dict):
            if item.get("type") in ("image", "image_url"):
                found += [item.get(key) for key in ("path", "image", "url", "image_url")]
            stack += [value for value in item.values() if isinstance(value, (list, dict))]
    if isinstance(row, dict):
        column = row.get(images_column)
        found += column if isinstance(column, list) else [column]
    names = []
    for value in found:
        if isinstance(value, dict):
            value = None if value.get("bytes") else value.get("path") or value.get("url")
        if isinstance(value, str) and not value.startswith(("data:", "http://", "https://")):
            names.append(value)
    return names


def image_spans(ids: list[int], token_ids: tuple[int, int, int]) -> list[tuple[int, int, int, int]]:
    """(start, end, cols, rows) of each image's tokens in a row of ids, in order (prepare --show)."""
    img, brk, end = token_ids
    spans, start = [], None
    for position, token in enumerate(ids):
        if token in (img, brk) and start is None:
            start = position
        elif token == end and start is not None:
            tokens = ids[start:position + 1]
            rows = tokens.count(brk) + 1
            spans.append((start, position + 1, tokens.count(img) // rows, rows))
            start = None
    return spans


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image's file bytes, read from its header."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size
