"""Packing several examples into each row, and what attention needs to keep them apart."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import chain


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens (best-fit decreasing).

    Best fit leaves the fewest half-empty rows of the simple heuristics: with many short SFT
    examples it reaches 95%+ of capacity. Deterministic for the same lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for index in order:
        need = lengths[index]
        slot = bisect.bisect_left(free, (need, -1))
        if slot == len(free):
            rows.append([index])
            bisect.insort(free, (capacity - need, len(rows) - 1))
            continue
        room, row = free.pop(slot)
        rows[row].append(index)
        bisect.insort(free, (room - need, row))
    return rows


def position_ids(seq_lengths: list[int]) -> list[int]:
    """Positions restart at 0 for each example of a packed row."""
    return [p for length in seq_lengths for p in range(length)]


@dataclass
class Rows:
    """Training rows in flat int32 buffers, ready for Arrow without a Python list per row."""

    input_ids: object  # numpy int32, every row's tokens one after the other
    labels: object  # numpy int32, aligned with input_ids
    row_offsets: object  # numpy int32, where each row starts (and the end)
    seq_lengths: list[list[int]]  # the lengths of the examples in each row
    images: list[list[bytes]] | None = None  # each row's image file bytes in order; None: no images at all

    def __len__(self) -> int:
        return len(self.seq_lengths)

    def table(self):
        import pyarrow as pa

        offsets = pa.array(self.row_offsets)
        columns = {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(self.input_ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(self.labels)),
            "seq_lengths": pa.array(self.seq_lengths, type=pa.list_(pa.int32())),
        }
        if self.images is not None:
            columns["images"] = pa.array(self.images, type=pa.list_(pa.binary()))
        return pa.table(columns)


def build_rows(encoded: list[tuple], max_length: int, packing: bool, rng, ignore_index: int) -> Rows:
    """One row per example, or examples packed into rows of `max_length` (shuffled with `rng`).

    Each example is its token ids (an int32 `array`), the (length, trained) spans that cover
    them and, optionally, its images' bytes; labels are the ids where trained, `ignore_index`
    elsewhere. A packed row carries its examples' images in the order of its examples.

    Works on one flat numpy buffer: the examples' tokens are gathered into row order in a
    single indexing step instead of concatenating Python lists row by row.
    """
    import numpy as np

    count = len(encoded)
    lengths = np.fromiter((len(example[0]) for example in encoded), np.int64, count)
    starts = np.concatenate(([0], np.cumsum(lengths)))
    total = int(starts[-1])
    ids = np.frombuffer(b"".join(example[0] for example in encoded), np.int32)  # int32 arrays: no per-token work
    span_lengths = np.fromiter((size for example in encoded for size, _ in example[1]), np.int64)
    span_trained = np.fromiter((bool(trained) for example in encoded for _, trained in example[1]), bool)
    labels = np.where(np.repeat(span_trained, span_lengths), ids, np.int32(ignore_index)).astype(np.int32)
    if packing:
        rows = pack_lengths(lengths.tolist(), max_length)
        rng.shuffle(rows)
        labels[starts[:-1]] = ignore_index  # an example's first token is never predicted from the one before
    else:
        rows = [[i] for i in range(count)]
    order = np.fromiter(chain.from_iterable(rows), np.int64, count)
    ordered = lengths[order]
    new_starts = np.concatenate(([0], np.cumsum(ordered)))
    gather = np.repeat(starts[order] - new_starts[:-1], ordered) + np.arange(total)
    row_ends = np.cumsum([len(members) for members in rows])
    row_offsets = new_starts[np.concatenate(([0], row_ends))].astype(np.int32)
    images = None
    if any(len(example) > 2 and example[2] for example in encoded):
        images = [[image for i in members for image in encoded[i][2]] for members in rows]
    return Rows(ids[gather], labels[gather], row_offsets, [lengths[members].tolist() for members in rows], images)
