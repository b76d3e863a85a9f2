"""Recipe.data + tokenizer -> the tokens, labels and packed rows the model trains on, cached.

The result is a `datasets.DatasetDict` (`train`, and `validation` where there is one) with
columns `input_ids`, `labels` and `seq_lengths` (the lengths of the examples packed into each
row), saved in `data.prepared_dir/<fingerprint>`. The fingerprint covers the data section, the
tokenizer and the bytes of every source, so a later `prepare` or `train` reuses it only when
nothing that shapes the tokens has changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import (
    MARKER, atomic_folder, can_create_in, disk_full, has_marker, marker, nearest_existing, remove_stale_temporaries,
)
from qlora_cli.errors import UserError, first_line
from qlora_cli.data.packing import build_rows
from qlora_cli.data.preference import (encode_preference, fit_to_length, is_preference_data, sequence_lengths,
                                       trained_tokens)
from qlora_cli.data.prompts import IDS, check_alike, encode_prompt_row, is_prompt_data
from qlora_cli.data.sources import Example, apply_weight, read_source
from qlora_cli.data.images import check_model_for_images, images_of
from qlora_cli.data.templates import IGNORE_INDEX, NEVER, Ids, chat_segments, ids_of, text_segments
from qlora_cli.data.tokenizer import IMAGE_KEY, VERSION_KEY

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

# Bump when the prepared format or the tokenization changes, so old caches are not reused.
PREPARED_FORMAT = 2
SUMMARY_FILE = "qlora_prepared.json"  # the summary, with qlora's marker (atomic.marker)
KIND = "prepared"

# An encoded example: its token ids, (length, trained) spans covering them in order, and its
# images' file bytes in order. Labels are made from the spans in one numpy step for the whole data
# set, not list by list; a span trained `None` (image tokens) is never trained.
Encoded = tuple[Ids, list[tuple[int, "bool | None"]], list[bytes]]


@dataclass
class SourceCounts:
    """What happened to the examples of one source."""

    path: str
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclass
class PrepareSummary:
    """The figures a user checks before spending GPU hours on the data."""

    fingerprint: str
    sources: list[SourceCounts] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)  # split -> examples
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows (after packing)
    tokens: dict[str, int] = field(default_factory=dict)  # split -> real tokens
    trained_tokens: dict[str, int] = field(default_factory=dict)  # split -> tokens with a label
    length_percentiles: dict[str, int] = field(default_factory=dict)  # p50/p90/p99/max of examples
    packing_efficiency: float | None = None  # real tokens / (rows x max_length)
    max_length: int = 0
    images: dict[str, int] = field(default_factory=dict)  # split -> images (none for text data)
    image_tokens: dict[str, int] = field(default_factory=dict)  # split -> [IMG]/[IMG_BREAK]/[IMG_END] tokens
    first_image: str | None = None  # file:line of the first example with an image

    @property
    def trained_fraction(self) -> float:
        return sum(self.trained_tokens.values()) / max(sum(self.tokens.values()), 1)


@dataclass
class PreparedData:
    """A prepared dataset on disk, loaded."""

    path: Path
    dataset: object  # datasets.DatasetDict
    summary: PrepareSummary
    reused: bool
    rebuilt_because: str | None = None  # why the cached entry of the same fingerprint could not be read


def prepare_dataset(recipe: Recipe, tokenizer, *, force: bool = False) -> PreparedData:
    """Prepare the recipe's data, or reuse the cached result with the same fingerprint."""
    data = recipe.data
    _check_data_section(data)
    seed = recipe.training.seed
    fingerprint = data_fingerprint(data, tokenizer, seed)
    target = Path(data.prepared_dir) / fingerprint
    damage = None
    if has_marker(target / SUMMARY_FILE, KIND) and not force:
        try:
            return load_prepared(target, reused=True)
        except (OSError, ValueError, KeyError, TypeError) as err:  # pyarrow's, datasets' and json's objections
            damage = first_line(err, named=True)  # a cut .arrow, a missing state.json, a split it lacks: rebuilt
    _check_prepared_dir(target.parent)
    if target.parent.is_dir():  # a killed prepare leaves its staging (tens of MB) beside the cache entries
        remove_stale_temporaries(target.parent)
    # Built before any folder is made, so a bad row leaves nothing at all under prepared_dir.
    dataset, summary = build_dataset(data, tokenizer, seed, fingerprint)
    if summary.first_image:
        check_model_for_images(recipe.model, tokenizer, summary.first_image)
    try:
        with atomic_folder(target, replace=True) as tmp:
            dataset.save_to_disk(str(tmp))
            (tmp / SUMMARY_FILE).write_text(json.dumps(marker(KIND) | dataclasses.asdict(summary), indent=2))
    except OSError as err:  # what the check above cannot foresee: a full disk, a read-only mount
        needed = sum(split.data.nbytes for split in dataset.values())
        raise disk_full(err, target, needed, key="data.prepared_dir") or UserError(
            f"`data.prepared_dir` {target.parent} cannot be written: {err.strerror or err}",
            key="data.prepared_dir", fix="set data.prepared_dir to a folder you can write") from None
    prepared = load_prepared(target, reused=False)
    prepared.rebuilt_because = damage
    return prepared


def load_prepared(path: Path, reused: bool = True) -> PreparedData:
    """A prepared dataset folder and its summary."""
    from datasets import load_from_disk

    raw = json.loads((path / SUMMARY_FILE).read_text())
    raw.pop(MARKER, None)
    raw["sources"] = [SourceCounts(**s) for s in raw["sources"]]
    return PreparedData(path, load_from_disk(str(path)), PrepareSummary(**raw), reused)


def _check_prepared_dir(folder: Path) -> None:
    """Before the data is read and tokenized: a cache folder that is a file, or lies under one or
    under a folder we cannot write, fails at once, naming the key. Nothing is created yet."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        problem = "is a file" if existing == folder.resolve() else f"lies under {existing}, which is a file"
    elif not can_create_in(existing):
        problem = f"cannot be written ({existing} is read-only)"
    else:
        return
    raise UserError(f"`data.prepared_dir` {folder} {problem}", key="data.prepared_dir",
                    fix="set data.prepared_dir to a folder you can write")


def _check_data_section(data) -> None:
    if not data.sources:
        raise UserError("the recipe has no data: `data.sources` is empty", key="data.sources",
                        fix="add - {path: my.jsonl, format: chat}")


def data_fingerprint(data, tokenizer, seed: int) -> str:
    """A hash of everything that shapes the prepared tokens."""
    digest = hashlib.sha256()
    section = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("prepared_dir", "num_proc")}
    digest.update(json.dumps([section, seed, PREPARED_FORMAT], sort_keys=True, default=str).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    recorded = getattr(tokenizer, "init_kwargs", {})
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None),
                              recorded.get(VERSION_KEY)], default=str).encode())
    if recorded.get(IMAGE_KEY):  # the patch size, merge and maximum size lay out the image tokens
        digest.update(json.dumps(recorded[IMAGE_KEY], sort_keys=True).encode())
    for source in [*data.sources, *data.validation_sources]:
        _hash_path(digest, Path(source.path))
        _hash_image_files(digest, source)
    return digest.hexdigest()[:16]


def _hash_image_files(digest, source) -> None:
    """The bytes of the image files a source's rows name: a changed PNG rebuilds the cache."""
    from qlora_cli.data.images import image_path, referenced_files
    from qlora_cli.data.sources import image_base, read_rows

    path = Path(source.path)
    if not path.exists() or (path.is_file() and b"image" not in path.read_bytes()):
        return  # a hub dataset (its images are in its own files), or no image anywhere in the file
    base = image_base(source.path)
    for _, row in read_rows(source):
        for name in referenced_files(row, source.columns.get("images", "images")):
            digest.update(name.encode())
            _hash_path(digest, image_path(name, base))


def _hash_path(digest, path: Path) -> None:
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    elif path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            _hash_path(digest, child)
    else:
        digest.update(str(path).encode())  # a hub id: its name (and the data section's split)


def build_dataset(data, tokenizer, seed: int, fingerprint: str):
    """Read, tokenize, truncate, split and pack; returns (DatasetDict, PrepareSummary)."""
    from datasets import Dataset, DatasetDict

    if is_preference_data(data):  # pairs and signed examples: their own columns, never packed
        return _build_preference_dataset(data, tokenizer, seed, fingerprint)
    if is_prompt_data(data):  # GRPO's prompts: the model writes the answers while it trains
        return _build_prompt_dataset(data, tokenizer, seed, fingerprint)

    summary = PrepareSummary(fingerprint=fingerprint, max_length=data.max_length)
    rng = random.Random(seed)
    per_source = _encode_sources(data.sources, data, tokenizer, summary)
    splits = split_examples(per_source, _encode_sources(data.validation_sources, data, tokenizer, summary), data, rng)
    rows = {}
    for name, encoded in splits.items():
        rows[name] = build_rows(encoded, data.max_length, data.packing, rng, IGNORE_INDEX)
        _count_split(summary, name, encoded, rows[name])
    summary.length_percentiles = length_percentiles([len(example[0]) for example in splits["train"]])
    if data.packing:
        summary.packing_efficiency = summary.tokens["train"] / (summary.rows["train"] * data.max_length)
    # Our own fingerprint names each split: datasets would otherwise hash the whole table again.
    splits = {name: Dataset(split_rows.table(), fingerprint=f"{fingerprint}-{name}") for name, split_rows in rows.items()}
    return DatasetDict(splits), summary


def split_examples(per_source: list, validation_sources: list, data, rng: random.Random) -> dict[str, list]:
    """The weighted, split and shuffled examples: {"train": [...]}, and "validation" where there is one."""
    validation = _weighted(validation_sources, rng)
    if data.val_size and not data.validation_sources:
        validation = _split_off_validation(per_source, data, rng)
    train = _weighted(per_source, rng)
    if not train:
        raise UserError("no training examples left: the sources' weights keep none", key="data.sources",
                        fix="give at least one source a weight above 0 (2 repeats it, 0.5 keeps half)")
    if data.shuffle:
        rng.shuffle(train)
    return {"train": train, "validation": validation} if validation else {"train": train}


def length_percentiles(lengths: list[int]) -> dict[str, int]:
    """p50/p90/p99/max of the examples' lengths."""
    lengths = sorted(lengths)
    percentiles = {f"p{q}": lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (50, 90, 99)}
    return percentiles | {"max": lengths[-1]}


@dataclass
class _SourceExamples:
    """One source's encoded examples before its weight is applied."""

    weight: float
    counts: SourceCounts
    encoded: list[Encoded]


def _split_off_validation(per_source: list[_SourceExamples], data, rng: random.Random) -> list[Encoded]:
    """Take the validation examples out of the sources before weights repeat any: a repeat in
    both splits would make the eval loss measure memorisation."""
    # A source weighted 0 is left out of training: it is left out of validation too.
    pool = [(source, example) for source in per_source if source.weight > 0 for example in source.encoded]
    count = data.val_size if isinstance(data.val_size, int) else round(data.val_size * len(pool))
    if count < 1:
        raise UserError(f"`data.val_size` {data.val_size} holds out no example of {len(pool)} for validation",
                        key="data.val_size", fix="use a larger fraction, or a count of at least 1")
    if count >= len(pool):
        raise UserError(f"`data.val_size` {data.val_size} would hold out {count} of {len(pool)} examples for "
                        "validation, leaving none to train on", key="data.val_size",
                        fix=f"use a smaller fraction, or a count below {len(pool)}")
    if data.shuffle:
        rng.shuffle(pool)
    for source in per_source:
        source.encoded = []
    for source, example in pool[count:]:
        source.encoded.append(example)
    return [example for _, example in pool[:count]]


def _weighted(per_source: list[_SourceExamples], rng: random.Random) -> list[Encoded]:
    """Every source's examples, repeated or sampled by its weight; `kept` counts what it contributes."""
    examples = []
    for source in per_source:
        weighted = apply_weight(source.encoded, source.weight, rng)
        source.counts.kept += len(weighted) - len(source.encoded)
        examples += weighted
    return examples


def _encode_sources(sources, data, tokenizer, summary: PrepareSummary) -> list[_SourceExamples]:
    per_source = []
    for source in sources:
        counts = SourceCounts(source.path)
        examples = read_source(source)
        counts.read = len(examples)
        encoded = []
        for example, (ids, spans, images) in zip(examples, encode_examples(examples, data, tokenizer)):
            if images and summary.first_image is None:
                summary.first_image = example.where
            truncated = len(ids) > data.max_length
            if truncated:
                if _drops_overlong(example, len(ids), data, counts):
                    continue
                if _image_end(spans) > data.max_length:  # a cut image would not match its pixels
                    counts.dropped += 1
                    continue
                ids, spans = ids[: data.max_length], _cut_spans(spans, data.max_length)
            if not any(trained for _, trained in spans):
                counts.dropped += 1  # nothing left to learn from (the response was cut off)
                continue
            counts.truncated += truncated  # counted among the kept, never twice
            encoded.append((ids, spans, images))
            counts.kept += 1
        summary.sources.append(counts)
        per_source.append(_SourceExamples(source.weight, counts, encoded))
    if sources and not any(source.encoded for source in per_source):
        truncate = "" if data.overlong == "truncate" else " or set data.overlong: truncate"
        raise UserError("no examples left after filtering: every one is longer than data.max_length or its answer starts beyond it",
                        where=sources[0].path, fix=f"raise data.max_length{truncate}")
    return per_source


def _drops_overlong(example, length: int, data, counts: SourceCounts) -> bool:
    """`data.overlong` for an example longer than max_length: error raises, drop counts it and says
    so (True), truncate leaves the cut to the caller (False), SFT and preference data alike."""
    if data.overlong == "error":
        raise UserError(f"example has {length} tokens, more than data.max_length={data.max_length}",
                        where=example.where, fix="raise data.max_length, or set data.overlong: truncate or drop")
    if data.overlong == "drop":
        counts.dropped += 1
        return True
    return False


def _image_end(spans) -> int:
    """Where the last image's tokens end (0 without images): a cut must not fall before it."""
    end = position = 0
    for size, trained in spans:
        position += size
        if trained is NEVER:
            end = position
    return end


def _cut_spans(spans: list[tuple[int, bool]], length: int) -> list[tuple[int, bool]]:
    """The spans of the first `length` tokens."""
    kept, room = [], length
    for size, trained in spans:
        if room <= 0:
            break
        kept.append((min(size, room), trained))
        room -= size
    return [(size, trained) for size, trained in kept if size]


def encode_examples(examples: list[Example], data, tokenizer):
    """Each example encoded, in order; in `data.num_proc` forked processes when it is > 1."""
    if not data.num_proc or data.num_proc < 2 or len(examples) < 1000:
        return [encode_example(example, data, tokenizer) for example in examples]
    import multiprocessing

    # Forked workers inherit the tokenizer instead of unpickling it per task; the first bad
    # example (in order) still raises its UserError here, with its file and line.
    with multiprocessing.get_context("fork").Pool(data.num_proc, _start_worker, (data, tokenizer)) as pool:
        return list(pool.imap(_encode_in_worker, examples, chunksize=256))


_worker: dict = {}


def _start_worker(data, tokenizer) -> None:
    _worker.update(data=data, tokenizer=tokenizer)


def _encode_in_worker(example: Example) -> Encoded:
    return encode_example(example, _worker["data"], _worker["tokenizer"])


def encode_example(example: Example, data, tokenizer) -> Encoded:
    """Token ids of one example, formatted by the recipe's template, and its (length, trained) spans."""
    try:
        if example.text is not None:
            segments = text_segments(example.text, tokenizer, data.train_on)
        else:
            segments = chat_segments(example.messages, tokenizer, data.template, data.train_on)
    except UserError as err:  # templates know what is wrong, the example knows where
        raise UserError(err.message, where=example.where, fix=err.fix) from None
    everything = data.train_on == "all"
    ids = ids_of()
    for piece, _ in segments:
        ids += piece
    spans = [(len(piece), trained if trained is NEVER else trained or everything) for piece, trained in segments]
    return ids, spans, [image.data for image in images_of(example.messages or [])]


def _count_split(summary: PrepareSummary, name: str, encoded, rows) -> None:
    summary.examples[name] = len(encoded)
    summary.rows[name] = len(rows)
    summary.tokens[name] = len(rows.input_ids)
    summary.trained_tokens[name] = int((rows.labels != IGNORE_INDEX).sum())
    images = sum(len(example[2]) for example in encoded)
    if images:
        summary.images[name] = images
        summary.image_tokens[name] = sum(size for example in encoded for size, trained in example[1] if trained is NEVER)


# ---------------------------------------------------------------- the prepared dataset


def _build_preference_dataset(data, tokenizer, seed: int, fingerprint: str):
    """Read, encode, fit to max_length and split preference sources; (DatasetDict, PrepareSummary).
    No packing: a pair is two sequences that the trainer batches side by side."""
    summary = PrepareSummary(fingerprint=fingerprint, max_length=data.max_length)
    rng = random.Random(seed)
    per_source = _encode_preference_sources(data.sources, data, tokenizer, summary)
    splits = split_examples(per_source, _encode_preference_sources(data.validation_sources, data, tokenizer, summary), data, rng)
    summary.length_percentiles = length_percentiles([max(sequence_lengths(row)) for row in splits["train"]])
    for name, rows in splits.items():
        summary.examples[name] = summary.rows[name] = len(rows)
        summary.tokens[name] = sum(sum(sequence_lengths(row)) for row in rows)
        summary.trained_tokens[name] = sum(trained_tokens(row) for row in rows)
    return _preference_dataset_dict(splits, fingerprint), summary


def _encode_preference_sources(sources, data, tokenizer, summary):
    def encode(example):
        row = encode_preference(example, data.template, tokenizer)
        longest = max(sequence_lengths(row))
        return (fit_to_length(row, data.max_length) if longest > data.max_length else row), longest

    per_source = _encode_one_by_one(sources, data, summary, encode)
    if sources and not any(source.encoded for source in per_source):
        raise UserError("no examples left after filtering: every one is longer than data.max_length",
                        where=sources[0].path, fix="raise data.max_length or set data.overlong: truncate")
    return per_source


def _encode_one_by_one(sources, data, summary, encode) -> list[_SourceExamples]:
    """Each source's rows, `encode(example)` giving the row cut to data.max_length and its length
    before the cut; what each source read, kept, dropped for its length and cut, in the summary."""
    per_source = []
    for source in sources:
        counts = SourceCounts(source.path)
        examples = read_source(source)
        counts.read = len(examples)
        encoded = []
        for example in examples:
            row, length = encode(example)
            if row.get("images") and summary.first_image is None:
                summary.first_image = example.where
            if length > data.max_length and _drops_overlong(example, length, data, counts):
                continue
            counts.truncated += length > data.max_length
            encoded.append(row)
            counts.kept += 1
        summary.sources.append(counts)
        per_source.append(_SourceExamples(source.weight, counts, encoded))
    return per_source


def _preference_dataset_dict(splits: dict[str, list[dict]], fingerprint: str):
    import pyarrow as pa
    from datasets import Dataset, DatasetDict

    def column(rows, name):
        if name == "label":
            return pa.array([row[name] for row in rows], pa.bool_())
        if name == "images":
            return pa.array([row.get(name, []) for row in rows], pa.list_(pa.binary()))
        return pa.array([row[name] for row in rows], pa.list_(pa.int32()))

    tables = {}
    for name, rows in splits.items():
        columns = list(dict.fromkeys(column for row in rows for column in row))  # `images` may be in some rows only
        tables[name] = Dataset(pa.table({c: column(rows, c) for c in columns}), fingerprint=f"{fingerprint}-{name}")
    return DatasetDict(tables)


def _build_prompt_dataset(data, tokenizer, seed: int, fingerprint: str):
    """Read, encode and split prompt sources; (DatasetDict, PrepareSummary). A prompt longer than
    max_length is cut, dropped or refused as `data.overlong` says."""
    import pyarrow as pa
    from datasets import Dataset, DatasetDict

    summary = PrepareSummary(fingerprint=fingerprint, max_length=data.max_length)
    rng = random.Random(seed)
    per_source = _encode_prompt_sources(data.sources, data, tokenizer, summary)
    splits = split_examples(per_source, _encode_prompt_sources(data.validation_sources, data, tokenizer, summary), data, rng)
    summary.length_percentiles = length_percentiles([len(row[IDS]) for row in splits["train"]])
    tables = {}
    for name, rows in splits.items():
        check_alike(rows, data.sources[0].path)
        summary.examples[name] = summary.rows[name] = len(rows)
        summary.tokens[name] = sum(len(row[IDS]) for row in rows)
        summary.trained_tokens[name] = 0  # the answers are the model's own, written while it trains
        try:
            tables[name] = Dataset(pa.Table.from_pylist(rows), fingerprint=f"{fingerprint}-{name}")
        except (TypeError, ValueError) as err:  # pyarrow's errors are ValueErrors: a column of mixed types
            raise UserError(f"the rows' columns do not make one table: {err}", where=data.sources[0].path,
                            fix="give each column one type in every row (all numbers, or all text, ...)") from None
    return DatasetDict(tables), summary


def _encode_prompt_sources(sources, data, tokenizer, summary):
    return _encode_one_by_one(sources, data, summary,
                              lambda example: encode_prompt_row(example, data.template, tokenizer, data.max_length))
