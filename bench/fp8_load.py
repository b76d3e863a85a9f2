"""Peak memory of loading an FP8 checkpoint into 4 bits (qlora_cli.model.fp8) against loading the
same model's BF16 checkpoint into 4 bits, and against transformers' own FP8 load (dequantized into a
16-bit model, the only way it loads FP8 without an FP8 GPU).

A ~0.2B mistral3 (Pixtral tower + 8-layer, 1024-wide language model, random weights) is saved in
bf16 and in Mistral's FP8 layout (tests/fp8_checkpoint.py, 128 x 128 blocks); each load runs in a
process of its own, which samples its anonymous resident memory (RssAnon: what the load allocates,
not the safetensors files it maps) every 2 ms; glibc is told to give every allocation over 128 KiB
back to the system when freed (MALLOC_MMAP_THRESHOLD_), so RssAnon follows the live tensors rather
than the allocator's cache. Sides alternate, `--rounds` times; medians are printed.
Run: python bench/fp8_load.py [--keep DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = {"model_type": "mistral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
        "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32768}
VISION = {"model_type": "pixtral", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
          "num_attention_heads": 4, "head_dim": 64, "image_size": 224, "patch_size": 14}
SIDES = {"fp8 -> 4-bit (qlora)": ("fp8", True), "bf16 -> 4-bit (qlora)": ("bf16", True),
         "fp8 -> bf16 (transformers)": ("fp8", False)}


def rss_anon_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def build(folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    sys.path.insert(0, str(ROOT / "tests"))
    from fp8_checkpoint import save_fp8_checkpoint

    config = AutoConfig.for_model("mistral3", text_config=TEXT, vision_config=VISION, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).save_pretrained(folder / "bf16")
    save_fp8_checkpoint(folder / "bf16", folder / "fp8", (128, 128))


def load_one(folder: Path, quantized: bool) -> dict:
    """In this process: load, sampling RssAnon; the peak above the baseline after imports."""
    import torch

    from qlora_cli.model.load import load_base_model
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe(["tiny-mistral"], ["~model.init_from_config", f"model.name_or_path={folder}",
                                            "model.dtype=bfloat16", "quantization.bnb_4bit_compute_dtype=bfloat16"])
    base, peak, done = rss_anon_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    model = load_base_model(recipe, quantized=quantized)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    params = sum(p.numel() for p in model.parameters())
    return {"peak_mib": max(peak[0], rss_anon_mib()) - base, "held_mib": rss_anon_mib() - base,
            "footprint_mib": model.get_memory_footprint() / 2**20, "seconds": seconds, "params": params,
            "dtype": str(next(model.parameters()).dtype), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, help="build the checkpoints here (reused when present)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        kind, quantized = SIDES[args.side]
        print("RESULT " + json.dumps(load_one(args.keep / kind, quantized)))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="fp8-bench-"))
    if not (folder / "fp8" / "config.json").is_file():
        build(folder)
    sizes = {k: sum(f.stat().st_size for f in (folder / k).glob("*.safetensors")) / 2**20 for k in ("bf16", "fp8")}
    print(f"checkpoint files: bf16 {sizes['bf16']:.0f} MiB, fp8 {sizes['fp8']:.0f} MiB")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            out = subprocess.run([sys.executable, __file__, "--keep", str(folder), "--side", side],
                                 capture_output=True, text=True, check=True, env=env).stdout
            results[side].append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for side, runs in results.items():
        median = {key: statistics.median(r[key] for r in runs) for key in ("peak_mib", "held_mib", "footprint_mib",
                                                                          "seconds")}
        peaks = ", ".join(f"{r['peak_mib']:.0f}" for r in runs)
        print(f"{side:28} peak {median['peak_mib']:5.0f} MiB  held after {median['held_mib']:5.0f} MiB  "
              f"footprint {median['footprint_mib']:5.0f} MiB  {median['seconds']:5.1f} s  "
              f"(peaks {peaks}; {runs[0]['params'] / 1e6:.0f} M "
              f"params as loaded, {runs[0]['dtype']}, torch {runs[0]['torch']})")

if __name__ == "__main__":
    main()
