"""How fast `qlora generate --input` answers a prompts file, by batch size, adapter merged or not.

    python bench/generate_speed.py [--prompts 32] [--new-tokens 32]

On the tiny-mistral recipe (a 256-wide, 2-layer random Mistral with the real v1 tokenizer): an
adapter with non-zero LoRA weights is saved into a run folder, then `qlora merge` makes the
merged model. For each model, `answer_file` (what `qlora generate --input` runs) answers the
same prompts at batch sizes 1 (one prompt at a time, the baseline), 4 and 16. Every answer is
exactly `--new-tokens` long (min_new_tokens = max_new_tokens), so tokens/s compare like for like.

- unmerged: the 4-bit base + LoRA adapter, as training saw it (`generate.quantized: true`);
- merged:   the standalone model `qlora merge` wrote (float32 here; no LoRA matmuls, no 4-bit).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

BATCH_SIZES = (1, 4, 16)


def make_run(folder: Path, new_tokens: int):
    """A tiny-mistral recipe whose run folder holds a (randomly perturbed) LoRA adapter."""
    import torch

    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe(["tiny-mistral"], [f"training.output_dir={folder / 'run'}",
                                            f"generate.max_new_tokens={new_tokens}",
                                            f"generate.min_new_tokens={new_tokens}", "generate.do_sample=false"])
    model = load_trainable_model(recipe)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    adapter = folder / "run" / "adapter"
    model.save_pretrained(str(adapter), safe_serialization=True)
    load_recipe_tokenizer(recipe).save_pretrained(str(adapter))
    return recipe


def prompt_records(count: int):
    from qlora_cli.export.generate import PromptRecord

    rng = random.Random(0)
    words = ["the", "a", "model", "river", "city", "question", "answer", "why", "how", "green", "seven", "quickly", "under", "paper", "light"]
    return [PromptRecord(f"prompt:{i}", [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(4, 60)))}],
                         {"id": i}) for i in range(count)]


def time_batches(generator, records, folder: Path, name: str, new_tokens: int) -> dict[int, float]:
    """Generated tokens per second of `answer_file` at each batch size (after one warm-up batch)."""
    from qlora_cli.export.generate import answer_file

    generator.answer_batch([records[0].messages])  # warm-up: first-call allocations and kernels
    rates = {}
    for batch_size in BATCH_SIZES:
        output = folder / f"{name}-{batch_size}.jsonl"
        output.unlink(missing_ok=True)
        start = time.perf_counter()
        answer_file(generator, records, output, batch_size)
        rates[batch_size] = len(records) * new_tokens / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="generate-speed-"))
    os.environ.setdefault("QLORA_CACHE", str(folder / "cache"))
    import torch

    from qlora_cli.export.generate import load_generator
    from qlora_cli.export.merge import merge

    torch.manual_seed(0)
    recipe = make_run(folder, args.new_tokens)
    merged = merge(recipe).output
    records = prompt_records(args.prompts)
    results = {
        "unmerged": time_batches(load_generator(recipe), records, folder, "unmerged", args.new_tokens),
        "merged": time_batches(load_generator(recipe, str(merged)), records, folder, "merged", args.new_tokens),
    }
    baseline = results["unmerged"][1]
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, greedy; torch threads {torch.get_num_threads()}")
    print("| model    | batch | tokens/s | vs one at a time (same model) | vs unmerged one at a time |")
    print("|----------|------:|---------:|------------------------------:|--------------------------:|")
    for name, rates in results.items():
        for batch_size, rate in rates.items():
            print(f"| {name:<8} | {batch_size:>5} | {rate:>8,.0f} | {rate / rates[1]:>28.2f}x | {rate / baseline:>24.2f}x |")
    print(f"speedup: {results['merged'][16] / baseline:.2f}x (merged, batch 16, over unmerged one at a time)")


if __name__ == "__main__":
    main()
