"""Packing several examples into each row, and what attention needs to keep them apart."""

from __future__ import annotations

import bisect


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
