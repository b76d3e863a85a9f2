"""Writes the shipped image data set: small PNGs of one coloured shape each, drawn with PIL, and
the chat rows that ask about them: sample_images/train.jsonl (conversations, for training) and
sample_images/heldout.jsonl (questions with their `reference`, for `qlora eval --input`).

The answer (the colour, or the shape) is in the picture only: every question is asked of every
colour and shape, so a model that does not look at the image can do no better than chance (1 in
4 for a colour, 1 in 3 for a shape). Images come in four sizes (mixed-size batches), the shape's
size and place and the background's shade vary. The held-out images are drawn from another seed:
none of them is in the training set.

Deterministic: the same files, byte for byte, on every run (tests/test_vision.py checks it).

    python bench/make_image_data.py
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "sample_images"
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((32, 32), (48, 32), (32, 48), (48, 48))  # 16-pixel patches: 2x2 to 3x3 image tokens
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is drawn?"}
SPLITS = {"train": (0, 8), "heldout": (1, 2)}  # seed, images of each colour and shape


def draw(rng: random.Random, colour: str, shape: str, size: tuple[int, int]) -> bytes:
    """One PNG: a light background, the shape somewhere on it."""
    from PIL import Image, ImageDraw

    width, height = size
    shade = rng.randint(200, 255)
    image = Image.new("RGB", size, (shade, shade, shade))
    side = rng.randint(min(size) * 5 // 8, min(size) - 4)
    left, top = rng.randint(1, width - side - 1), rng.randint(1, height - side - 1)
    box = (left, top, left + side, top + side)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(left + side / 2, top), (left, top + side), (left + side, top + side)], fill=fill)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def rows(split: str) -> list[tuple[str, bytes, list[dict]]]:
    """(file name, PNG bytes, the rows that ask about it) of one split, in a fixed order. The
    names say nothing of what is drawn."""
    seed, repeats = SPLITS[split]
    rng = random.Random(seed)
    drawn = [(colour, shape, draw(rng, colour, shape, rng.choice(SIZES)))
             for _ in range(repeats) for colour in COLOURS for shape in SHAPES]
    rng.shuffle(drawn)
    made = []
    for number, (colour, shape, png) in enumerate(drawn):
        name = f"{split}-{number:03d}.png"
        made.append((name, png, [conversation(name, QUESTIONS["colour"], colour, split),
                                 conversation(name, QUESTIONS["shape"], shape, split)]))
    return made


def conversation(image: str, question: str, answer: str, split: str) -> dict:
    """A training conversation, or a held-out question with its `reference` (as `qlora eval
    --input` reads it)."""
    asked = {"role": "user", "content": [{"type": "image", "path": f"imgs/{image}"}, {"type": "text", "text": question}]}
    if split == "heldout":
        return {"messages": [asked], "reference": answer}
    return {"messages": [asked, {"role": "assistant", "content": answer}]}


def main() -> None:
    (FOLDER / "imgs").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = []
        for name, png, asked in rows(split):
            (FOLDER / "imgs" / name).write_bytes(png)
            lines += [json.dumps(row) + "\n" for row in asked]
        (FOLDER / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        print(f"{split}: {len(lines)} questions")


if __name__ == "__main__":
    main()
