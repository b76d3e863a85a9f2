"""Raw data sources -> examples in one of four shapes, each remembering its file and line.

A source is a local file (jsonl, json, csv, parquet), a folder saved by `datasets`, or a hub
dataset id. Every row is checked against its format here, so that a bad row is reported with
its file and line before anything is tokenized.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.errors import UserError
from qlora_cli.data.templates import check_roles

ROLES = ("system", "user", "assistant")

# The fields each format reads; `columns:` in a source maps them to the file's own names.
FORMAT_FIELDS = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output"),
    # `images`: the Hugging Face layout, each {"type": "image"} placeholder taking the next one.
    "chat": ("messages", "images"),
    "completion": ("prompt", "completion"),
    # Preference data (data/preference.py): the prompt is `prompt` or `messages`, or, for pairs,
    # the shared start of two whole conversations.
    "preference": ("prompt", "messages", "chosen", "rejected", "images"),
    "unpaired": ("prompt", "messages", "completion", "label", "images"),
    # Prompts for GRPO (qlora_cli/data/prompts.py): the other columns of a row reach the rewards.
    "prompt": ("prompt", "messages"),
}
OPTIONAL_FIELDS = {"chat": {"images"}, "alpaca": {"input"}, "preference": {"prompt", "messages", "images"},
                   "unpaired": {"prompt", "messages", "images"},
                   "prompt": {"prompt", "messages"}}


@dataclass
class Example:
    """One example: either a `text` in the seed's [INST] format or a list of chat `messages`."""

    where: str  # file:line (or file:row) it came from
    text: str | None = None
    messages: list[dict[str, str]] | None = None


def read_source(source) -> list[Example]:
    """All examples of one source, in its format, after `limit`; `weight` is the caller's to apply
    (after the validation split, so a repeated example never lands in both splits)."""
    rows = _read_rows(source)
    if source.limit is not None:
        rows = rows[: source.limit]
    examples = [to_example(row, where, source) for where, row in rows]
    if not examples:
        raise UserError(f"source `{source.path}` has no examples", where=source.path,
                        fix="check the file, its `split`, and `limit`")
    return examples


def apply_weight(examples: list, weight: float, rng: random.Random) -> list:
    """Mix by weight: 0.5 keeps a random half, 2 repeats every example twice, 1.5 once and a half."""
    whole, fraction = divmod(weight, 1)
    extra = rng.sample(examples, round(fraction * len(examples)))
    return examples * int(whole) + extra


def read_rows(source) -> list[tuple[str, Any]]:
    """The raw rows of a source, each with its file:line (or file:row)."""
    return _read_rows(source)


def _read_rows(source) -> list[tuple[str, Any]]:
    path = Path(source.path)
    if path.is_dir():
        return _read_saved_dataset(path, source.split)
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise UserError(f"cannot read `{path.suffix}` files", where=str(path),
                            fix="use .jsonl, .json, .csv or .parquet, or a folder saved by datasets")
        return reader(path)
    if _looks_like_hub_id(source.path):
        return _read_hub_dataset(source.path, source.split)
    raise UserError(f"data source `{source.path}` does not exist", where=source.path,
                    fix="fix `data.sources[].path` (relative paths are looked up beside the recipe, "
                        "then in the current folder)")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # Excel and Windows tools start UTF-8 files with a BOM
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 text (byte {err.start}: {err.reason})", where=f"{path}:{line}",
                        fix="re-save the file as UTF-8") from None


def load_json(text: str, where: str, fix: str | None = None) -> Any:
    """`json.loads`, with what a file can hold that nothing downstream could use as user errors:
    malformed JSON, nesting deeper than Python's recursion allows, and lone surrogates (`"\\ud800"`
    escapes half of a UTF-16 pair: no UTF-8 text can hold it, so the tokenizer cannot encode it)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        line = f":{err.lineno}" if err.lineno > 1 else ""
        raise UserError(f"malformed JSON: {err.msg} (column {err.colno})", where=f"{where}{line}", fix=fix) from None
    except RecursionError:
        raise UserError("JSON nested too deeply to read", where=where,
                        fix="flatten the record: examples need objects and lists a few levels deep") from None
    if (lone := _lone_surrogate(value)) is not None:
        raise UserError(f"text holds a lone surrogate ({lone!r}), half of a UTF-16 pair, which is not a character",
                        where=where, fix="remove the \\ud8xx-\\udfxx escape, or write the whole pair") from None
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The first unpaired surrogate in a JSON value's keys and strings (without recursion: the
    value may be as deep as the parser allows)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                return item[err.start:err.end]
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return None


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    # JSON Lines ends a line at "\n" only: str.splitlines() would also split at U+2028, U+2029 or
    # U+0085, which json.dumps(ensure_ascii=False) writes raw inside strings.
    for number, line in enumerate(_decode(path).split("\n"), start=1):
        if line.strip():
            rows.append((f"{path}:{number}", load_json(line, f"{path}:{number}", fix="each line must be one JSON object")))
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    data = load_json(_decode(path), str(path))
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} as many exports write it
    if not isinstance(data, list):
        raise UserError("a .json source must hold a list of objects", where=str(path),
                        fix="write a JSON array, or use .jsonl with one object per line")
    return [(f"{path}:row {i + 1}", row) for i, row in enumerate(data)]


def _read_csv(path: Path) -> list[tuple[str, Any]]:
    text = _decode(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # DictReader counts the header as line 1, so row i (0-based) starts at line i + 2
    # unless earlier fields held newlines; line_num after reading is exact.
    rows = []
    # csv refuses fields over 128 KiB (a guard for streams of unknown size): a long document is
    # an example like any other, and no field can be longer than the file, which is in memory.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
        for row in reader:
            rows.append((f"{path}:{reader.line_num}", dict(row)))
    except csv.Error as err:
        raise UserError(f"malformed CSV: {err}", where=f"{path}:{reader.line_num}") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"cannot read parquet: {err}", where=str(path)) from None
    return [(f"{path}:row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path, split: str) -> list[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError("folder is not a dataset saved by `datasets.save_to_disk`", where=str(path)) from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise UserError(f"saved dataset has no split `{split}` (it has {', '.join(data)})", where=str(path),
                            fix="set `split:` on this source")
        data = data[split]
    return [(f"{path}:row {i + 1}", row) for i, row in enumerate(_undecoded(data))]


def _undecoded(data):
    """The rows of a `datasets` table, with `datasets.Image` columns as their stored {bytes, path}:
    decoding to PIL and back would lose the file's own bytes, which the prepared cache keeps."""
    from datasets.features.features import require_decoding

    if not any(require_decoding(feature) for feature in data.features.values()):
        return data
    return data.with_format("arrow")[:].to_pylist()


# A missing `data/train.parquet` is a typo in a path, not a hub id to look up over the network.
_FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz", ".zip", ".xlsx"}


def _looks_like_hub_id(name: str) -> bool:
    from qlora_cli.hub import is_hub_id

    return name.count("/") == 1 and is_hub_id(name) and Path(name).suffix.lower() not in _FILE_SUFFIXES


def _read_hub_dataset(name: str, split: str) -> list[tuple[str, Any]]:
    from datasets import load_dataset

    try:
        data = load_dataset(name, split=split)
    except Exception as err:  # offline, unknown id, missing split: all the user's to fix
        raise UserError(f"cannot load hub dataset `{name}` (split `{split}`): {err}", where=name,
                        fix="check the id and the network, or give a local file") from None
    return [(f"{name}:row {i + 1}", row) for i, row in enumerate(_undecoded(data))]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def to_example(row: Any, where: str, source):
    """Check one row against its source's format and turn it into an `Example`."""
    if not isinstance(row, dict):
        raise UserError(f"expected a JSON object, got {type(row).__name__}", where=where)
    fields = {name: source.columns.get(name, name) for name in FORMAT_FIELDS[source.format]}
    for name, column in fields.items():
        if column not in row and name not in OPTIONAL_FIELDS.get(source.format, ()):
            have = ", ".join(sorted(map(str, row))) or "none"
            likely = _likely_format(row, source.format)
            fix = (f"set `format: {likely}` on this source (its rows have the fields of that format), or "
                   if likely else "") + f"map it with `columns: {{{name}: <your field>}}` on this source"
            raise UserError(f"row has no `{column}` field, which the `{source.format}` format needs "
                            f"(the row has: {have})", where=where, fix=fix)
    value = {name: row.get(column) for name, column in fields.items()}
    if source.format in ("preference", "unpaired"):
        from qlora_cli.data.preference import pair_from_row, signed_from_row

        return (pair_from_row if source.format == "preference" else signed_from_row)(value, where,
                                                                                     image_base(source.path))
    if source.format == "prompt":
        from qlora_cli.data.prompts import prompt_from_row

        others = {name: cell for name, cell in row.items() if name not in fields.values()}
        return prompt_from_row(value, others, where)
    if source.format == "chat":
        return _chat(value, where, image_base(source.path))
    return _BUILDERS[source.format](value, where)


def image_base(source_path: str) -> Path | None:
    """Where a source's relative image paths start: beside a data file, inside a saved dataset's
    folder, the current folder for a hub dataset."""
    path = Path(source_path)
    return path.parent if path.is_file() else path if path.is_dir() else None


def _likely_format(row: dict, current: str) -> str | None:
    """Another format whose fields the row has: `format:` left at its default (text) on a chat
    file is a likelier mistake than a column to rename."""
    for name, fields in FORMAT_FIELDS.items():
        required = [f for f in fields if f not in OPTIONAL_FIELDS.get(name, ())]
        if name != current and required and all(f in row for f in required):
            return name
    return None


def _text(value: dict, where: str) -> Example:
    return Example(where, text=_string(value, "text", where))


def _alpaca(value: dict, where: str) -> Example:
    instruction = _string(value, "instruction", where)
    extra = value.get("input") or ""
    if not isinstance(extra, str):
        raise UserError(f"`input` must be text, got {type(extra).__name__}", where=where)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(where, messages=[{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": _string(value, "output", where)}])


def _completion(value: dict, where: str) -> Example:
    return Example(where, messages=[{"role": "user", "content": _string(value, "prompt", where)},
                                    {"role": "assistant", "content": _string(value, "completion", where)}])


def _chat(value: dict, where: str, base: Path | None = None) -> Example:
    from qlora_cli.data.images import check_all_images_used, message_content

    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError("`messages` must be a non-empty list of {role, content} objects", where=where)
    row_images = _row_images(value.get("images"), where)
    contents = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"message {index + 1} needs `role` (one of {', '.join(ROLES)})", where=where)
        content = message.get("content")
        if isinstance(content, list):  # parts: text and images
            content = message_content(content, message["role"], row_images, base, where, index + 1)
        if not isinstance(content, (str, list)):
            raise UserError(f"message {index + 1} needs `content` as text", where=where)
        contents.append(content)
    check_all_images_used(row_images, where)
    for index, (message, content) in enumerate(zip(messages, contents)):
        # mistral-common refuses an empty answer; a blank one would train a bare </s>, as an
        # empty `completion` or `output` would, which those formats refuse too.
        if message["role"] == "assistant" and not content.strip():
            raise UserError(f"message {index + 1} (assistant) is empty", where=where,
                            fix="give every assistant message the answer to learn, or drop the row")
    messages = [{"role": m["role"], "content": content} for m, content in zip(messages, contents)]
    try:
        check_roles(messages, last="assistant")
    except UserError as err:  # the template knows what is wrong, the row knows where
        raise UserError(err.message, where=where, fix=err.fix) from None
    return Example(where, messages=messages)


def _row_images(images, where: str) -> list:
    """The row's `images` column (the Hugging Face layout) as a list to take placeholders' images from."""
    if images is None:
        return []
    if not isinstance(images, list):
        images = [images]  # one image given alone
    return list(images)


def _string(value: dict, name: str, where: str) -> str:
    text = value[name]
    if not isinstance(text, str):
        raise UserError(f"`{name}` must be text, got {type(text).__name__}", where=where)
    if not text.strip():
        raise UserError(f"`{name}` is empty", where=where)
    return text


_BUILDERS = {"text": _text, "alpaca": _alpaca, "chat": _chat, "completion": _completion}
