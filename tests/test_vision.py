"""Image+text fine-tuning, the model side: the shipped image data set, training a tiny mistral3 on
it through the real CLI (it learns what only the pictures say), `generate --image`, `eval` with
images, merge, and packing with images against one example per row."""

from __future__ import annotations

import importlib.util
import io
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "sample_images"


def _image_data_maker():
    spec = importlib.util.spec_from_file_location("make_image_data", ROOT / "bench" / "make_image_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_image_data_is_what_its_script_draws_byte_for_byte():
    maker = _image_data_maker()
    for split in maker.SPLITS:
        lines = []
        for name, png, asked in maker.rows(split):
            assert (IMAGES / "imgs" / name).read_bytes() == png, f"run python bench/make_image_data.py ({name})"
            lines += [json.dumps(row) + "\n" for row in asked]
        assert (IMAGES / f"{split}.jsonl").read_text(encoding="utf-8") == "".join(lines)


def test_only_the_picture_tells_the_answer_and_held_out_images_are_new():
    from PIL import Image

    answers = {}
    for split in ("train", "heldout"):
        for line in (IMAGES / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            question = next(p["text"] for p in row["messages"][0]["content"] if p["type"] == "text")
            answer = row.get("reference") or row["messages"][1]["content"]
            answers.setdefault((split, question), Counter())[answer] += 1
    # Every answer comes as often for each question: the text alone gives chance, no more.
    for (split, question), counts in answers.items():
        assert len(set(counts.values())) == 1 and len(counts) in (3, 4), (split, question, counts)
    train = {(IMAGES / "imgs" / p.name).read_bytes() for p in (IMAGES / "imgs").glob("train-*.png")}
    heldout = [p.read_bytes() for p in (IMAGES / "imgs").glob("heldout-*.png")]
    assert len(train) == 96 and len(heldout) == 24 and not train & set(heldout)
    sizes = {Image.open(io.BytesIO(data)).size for data in heldout + list(train)}
    assert len(sizes) == 4  # mixed sizes in every batch
