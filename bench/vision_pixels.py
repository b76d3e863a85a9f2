"""How far transformers' own Pixtral image processors are from mistral-common's pixels.

qlora's pixels are mistral-common's `ImageEncoder` output (data/images.py calls it): the reference
the Mistral vision models were trained with. This draws random pictures (noise and shapes, random
sizes, some above the maximum so that they are scaled down), runs them through mistral-common and
through transformers' `PixtralImageProcessor` (torchvision, "fast") and `PixtralImageProcessorPil`
("slow"), set to the same patch size and maximum size, and prints per processor: how many images
came out at another size, and the largest and mean absolute difference where the sizes agree
(in normalised units: one 8-bit grey level is about 0.015).

    python bench/vision_pixels.py [--images 200] [--seed 0]

The fast processor needs torchvision, which qlora does not depend on; without it, that row says so.
"""

from __future__ import annotations

import argparse
import io
import random

import numpy as np
from PIL import Image, ImageDraw

from qlora_cli.data.images import ImageSettings, pixels

SHAPES = {  # name: (mistral-common settings, the processor's patch size and longest edge)
    "pixtral-12b (patch 16, max 1024)": (ImageSettings(16, 1, 1024), 16, 1024),
    "small-3.1 grid (patch 14 x merge 2, max 1540)": (ImageSettings(14, 2, 1540), 28, 1540),
}


def random_picture(rng: random.Random, kind: str) -> bytes:
    """`noise`: every pixel random (the worst case for resampling); `drawn`: flat shapes, as in a
    chart or a screenshot."""
    big = rng.random() < 0.25
    width, height = (rng.randint(1100, 2400), rng.randint(300, 2400)) if big else (rng.randint(8, 1000), rng.randint(8, 1000))
    if kind == "noise":
        image = Image.fromarray(np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (height, width, 3), np.uint8))
    else:
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x0, x1 = sorted(rng.sample(range(width), 2))
        y0, y1 = sorted(rng.sample(range(height), 2))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def processors(patch: int, longest: int) -> dict:
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    found = {"slow (PIL)": PixtralImageProcessorPil(patch_size={"height": patch, "width": patch},
                                                    size={"longest_edge": longest})}
    try:
        from transformers.models.pixtral.image_processing_pixtral import PixtralImageProcessor

        found["fast (torchvision)"] = PixtralImageProcessor(patch_size={"height": patch, "width": patch},
                                                             size={"longest_edge": longest})
    except ImportError as err:
        found["fast (torchvision)"] = err
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    kinds = ["noise", "drawn"] * (args.images // 2)
    pictures = [(kind, random_picture(rng, kind)) for kind in kinds]
    print(f"{len(pictures)} random pictures (seed {args.seed}); differences in normalised units (1/255 grey ~ 0.015)")
    print(f"{'shape':46} {'processor':19} {'pictures':8} {'other size':>10} {'max |diff|':>11} {'mean |diff|':>12}")
    for name, (settings, patch, longest) in SHAPES.items():
        for label, processor in processors(patch, longest).items():
            if isinstance(processor, Exception):
                print(f"{name:46} {label:19} not measured: {processor}")
                continue
            for kind in ("noise", "drawn"):
                report(name, label, kind, processor, [data for k, data in pictures if k == kind], settings)


def report(name: str, label: str, kind: str, processor, pictures: list[bytes], settings: ImageSettings) -> None:
    """One line: pictures the processor sizes otherwise, and its differences on the others."""
    other, worst, means = 0, 0.0, []
    for data in pictures:
        reference = pixels(data, settings)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        theirs = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"][0], np.float32)
        if theirs.shape != reference.shape:
            other += 1
            continue
        diff = np.abs(theirs - reference)
        worst, means = max(worst, float(diff.max())), means + [float(diff.mean())]
    mean = f"{np.mean(means):12.4f}" if means else f"{'-':>12}"
    print(f"{name:46} {label:19} {kind:8} {other:>10} {worst:>11.4f} {mean}")

if __name__ == "__main__":
    main()
