"""Batches for the Trainer: pad to the longest row, and keep packed examples apart."""

from __future__ import annotations

from dataclasses import dataclass

from qlora_cli.data.images import ImageSettings, pixels
from qlora_cli.data.packing import position_ids
from qlora_cli.data.templates import IGNORE_INDEX


@dataclass
class PackedCollator:
    """Pads `input_ids`/`labels` to the longest row of the batch (never to `max_length`).

    Rows holding several examples (`seq_lengths`) get position ids that restart at each example
    and, for `sdpa`/`eager` attention, a 4-D block-diagonal causal mask: with those kernels
    position ids alone do not stop a token attending to the previous example. Flash-attention
    kernels read the boundaries from the position ids instead and take no mask.

    Rows with `images` (file bytes) add `pixel_values` and `image_sizes` (pixel_batch), all the
    batch's images in row order, as Mistral3 / Llava(Pixtral) models take them.
    """

    pad_token_id: int
    attn_implementation: str | None = "sdpa"
    pad_to_multiple_of: int | None = None
    image_settings: ImageSettings | None = None

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        lengths = [row.get("seq_lengths") or [len(row["input_ids"])] for row in rows]
        batch = {
            "input_ids": torch.tensor([_pad(r["input_ids"], width, self.pad_token_id) for r in rows]),
            "labels": torch.tensor([_pad(r["labels"], width, IGNORE_INDEX) for r in rows]),
            "position_ids": torch.tensor([_pad(position_ids(ls), width, 0) for ls in lengths]),
        }
        images = [image for row in rows for image in (row.get("images") or ())]
        if images:
            if self.image_settings is None:
                raise ValueError("rows hold images and the collator was given no image_settings")
            batch.update(pixel_batch(images, self.image_settings))
        if "flash" in (self.attn_implementation or ""):
            return batch  # boundaries come from position_ids; pads sit after the last example
        if all(len(ls) == 1 for ls in lengths):
            real = [[1] * len(r["input_ids"]) for r in rows]
            batch["attention_mask"] = torch.tensor([_pad(m, width, 0) for m in real])
        else:
            mask = block_causal_mask(lengths, width)
            # sdpa takes a boolean mask as is; eager attention adds the mask to its scores.
            batch["attention_mask"] = mask if self.attn_implementation != "eager" else _additive(mask)
        return batch


def pixel_batch(images: list[bytes], settings: ImageSettings) -> dict:
    """`pixel_values` float32 (N, 3, Hmax, Wmax), each image mistral-common's pixels zero-padded
    at the bottom and right, and `image_sizes` (N, 2) = each image's (H, W) before padding."""
    import numpy as np
    import torch

    if not images:
        return {}
    arrays = [pixels(image, settings) for image in images]
    height = max(a.shape[1] for a in arrays)
    width = max(a.shape[2] for a in arrays)
    batch = np.zeros((len(arrays), 3, height, width), np.float32)
    for i, array in enumerate(arrays):
        batch[i, :, : array.shape[1], : array.shape[2]] = array
    sizes = [array.shape[1:] for array in arrays]
    return {"pixel_values": torch.from_numpy(batch), "image_sizes": torch.tensor(sizes, dtype=torch.long)}


def block_causal_mask(lengths: list[list[int]], width: int):
    """Boolean (batch, 1, width, width) mask: True where a token may attend (same example, earlier).

    Padding rows attend to themselves only, so no row of the softmax is empty (which would give NaN).
    """
    import torch

    masks = torch.zeros(len(lengths), 1, width, width, dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for b, seq_lengths in enumerate(lengths):
        start = 0
        for length in seq_lengths:
            end = start + length
            masks[b, 0, start:end, start:end] = causal[:length, :length]
            start = end
        masks[b, 0, start:, start:] = torch.eye(width - start, dtype=torch.bool)
    return masks


def _additive(mask):
    import torch

    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)


def _pad(values: list[int], width: int, fill: int) -> list[int]:
    return list(values) + [fill] * (width - len(values))


def shared_prefix_rows(input_ids, attention_mask, eager: bool = False):
    """DPO's batch (chosen rows, then rejected rows, each right-padded) as one row per pair: the
    pair's common prefix once, then the chosen tail, then the rejected tail, which attends to the
    prefix and to itself but never to the chosen tail, at the positions it has in its own
    sequence. So the prompt runs through the model once per pair instead of twice.

    Returns the model inputs of that layout (`input_ids`, 4-D `attention_mask`, `position_ids`)
    and `index`, shaped like `input_ids`: where each token of the original rows sits in the
    flattened new rows (padding points at its row's first token). None where the new rows,
    padded, would hold no fewer tokens than the batch as it came."""
    import torch

    pairs = input_ids.shape[0] // 2
    lengths = attention_mask.sum(-1).tolist()
    ids = input_ids.tolist()
    rows, positions, spans = [], [], []
    for i in range(pairs):
        chosen, rejected = ids[i][:lengths[i]], ids[pairs + i][:lengths[pairs + i]]
        shared = next((t for t, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        rows.append(chosen + rejected[shared:])
        positions.append(list(range(len(chosen))) + list(range(shared, len(rejected))))
        spans.append((len(chosen), shared, len(rejected) - shared))
    width = max(len(row) for row in rows)
    if pairs * width >= input_ids.numel():
        return None
    device, columns = input_ids.device, input_ids.shape[1]
    chosen_index, rejected_index = [], []
    mask = torch.zeros(pairs, 1, width, width, dtype=torch.bool, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    for i, (chosen_length, shared, tail) in enumerate(spans):
        base, end = i * width, chosen_length + tail
        chosen_index.append(_pad(range(base, base + chosen_length), columns, base))
        rejected_index.append(_pad([*range(base, base + shared), *range(base + chosen_length, base + end)], columns, base))
        mask[i, 0, :chosen_length, :chosen_length] = causal[:chosen_length, :chosen_length]
        mask[i, 0, chosen_length:end, :shared] = True
        mask[i, 0, chosen_length:end, chosen_length:end] = causal[:tail, :tail]
        mask[i, 0, end:, end:] = torch.eye(width - end, dtype=torch.bool, device=device)  # padding: itself (no NaN)
    return {  # padding: token 0, which only padding sees (its mask row is its own diagonal)
        "input_ids": torch.tensor([_pad(row, width, 0) for row in rows], device=device),
        "attention_mask": _additive(mask) if eager else mask,
        "position_ids": torch.tensor([_pad(p, width, 0) for p in positions], device=device),
    }, torch.tensor(chosen_index + rejected_index, device=device)
