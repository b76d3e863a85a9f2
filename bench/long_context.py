"""Long rows on the CPU: peak memory and tokens/s per row length, with `model.tiled_mlp` off and on.

    python bench/long_context.py                      # rows of 2K, 4K, 8K, 16K tokens
    python bench/long_context.py --lengths 2048 4096 8192 16384 32768 --steps 2
    python bench/long_context.py --lengths 4096 8192 --repeats 3 --steps 3   # tokens/s, medians

Each (length, side) trains in a process of its own (bench/sides.py: its peak RSS is its own) the
qlora way: `load_trainable_model` on the tiny recipe widened to Mistral's MLP ratio (4-bit NF4 base,
LoRA on every linear layer, activation checkpointing, the chunked loss), one row of `length` random
tokens per step, AdamW. The sides alternate at each length (the machine is shared: neither side gets
the quiet minutes; with --repeats, each length runs that many times per side and its figures are
medians). Printed per length: the peak resident memory while training (the process's
peak reset after loading, so the floor is the loaded model, not the imports), tokens/s (steps after the first), the first step's
loss; then each side's peak growth per added token between the shortest and longest rows (fitted
by least squares), the ratio tiled/untiled of that growth, and of tokens/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sides import ROOT, report, run_side  # noqa: E402

SIDES = ("whole", "tiled")
# Mistral's shape in small: MLP 3.5x the hidden size, grouped-query attention, no sliding window
# (a window makes sdpa take a tokens x tokens mask), positions for the longest row.
MODEL = {"model_type": "mistral", "hidden_size": 128, "intermediate_size": 448, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 65536,
         "sliding_window": None, "initializer_range": 0.1, "seed": 0}


def overrides(length: int, tiled: bool) -> list[str]:
    model = "{" + ", ".join(f"{k}: {'null' if v is None else v}" for k, v in MODEL.items()) + "}"
    return [f"model.init_from_config={model}", f"model.tiled_mlp={str(tiled).lower()}", "lora.r=8",
            "lora.target_modules=all-linear", "training.activation_checkpointing=true", f"data.max_length={length}"]


def side(args) -> None:
    """One process: train `args.steps` steps on rows of `args.length` tokens, report the figures."""
    import torch

    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.model.loss import loss_in_chunks
    from qlora_cli.recipe.load import load_recipe

    torch.set_num_threads(args.threads)
    recipe = load_recipe(["tiny-mistral"], overrides(args.length, args.side == "tiled"))
    model = load_trainable_model(recipe)
    model.train()
    generator = torch.Generator().manual_seed(args.length)
    ids = torch.randint(3, model.config.vocab_size, (1, args.length), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses, seconds = [], []
    _reset_peak_rss()  # the step's peak, not the imports' and the loading's
    for _ in range(args.steps):
        start = time.perf_counter()
        with loss_in_chunks(model):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = seconds[1:] or seconds  # the first step allocates and warms up
    report({"side": args.side, "length": args.length, "tokens_per_s": args.length * len(timed) / sum(timed),
            "loss": losses[0], "last_loss": losses[-1], "train_peak_mib": _peak_rss_mib()})


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM) to its current one."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mib() -> float:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares growth of y per unit of x."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--length", type=int)
    parser.add_argument("--folder", default="bench-runs/long_context")
    args = parser.parse_args()
    if args.side:
        return side(args)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    runs: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in args.lengths} for name in SIDES}
    turn = 0
    for length in args.lengths:
        for _ in range(args.repeats):
            for name in SIDES if turn % 2 == 0 else SIDES[::-1]:
                figures = run_side(__file__, name, f"{args.folder}/{name}-{length}-{turn}",
                                   ["--length", str(length), "--steps", str(args.steps), "--threads", str(args.threads)])
                runs[name][length].append(figures)
                print(f"{length:>7,} {name:5s} peak {figures['train_peak_mib']:8.1f} MiB  "
                      f"{figures['tokens_per_s']:8.1f} tokens/s  loss {figures['loss']:.6f}", flush=True)
            turn += 1
    results = {name: {n: {key: statistics.median(r[key] for r in rs) for key in ("train_peak_mib", "tokens_per_s", "loss")}
                      for n, rs in by_length.items()} for name, by_length in runs.items()}
    print("\n| row tokens | peak MiB untiled | peak MiB tiled | tokens/s untiled | tokens/s tiled | loss untiled | loss tiled |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        w, t = results["whole"][length], results["tiled"][length]
        print(f"| {length:,} | {w['train_peak_mib']:.0f} | {t['train_peak_mib']:.0f} | {w['tokens_per_s']:.0f} | "
              f"{t['tokens_per_s']:.0f} | {w['loss']:.6f} | {t['loss']:.6f} |")
    growth = {name: slope([(n, r["train_peak_mib"] * 2**20) for n, r in results[name].items()]) for name in SIDES}
    speed = sum(results["tiled"][n]["tokens_per_s"] / results["whole"][n]["tokens_per_s"] for n in args.lengths) \
        / len(args.lengths)
    print(f"\npeak growth per token: untiled {growth['whole']:,.0f} B, tiled {growth['tiled']:,.0f} B "
          f"(ratio {growth['tiled'] / growth['whole']:.2f}); tokens/s tiled/untiled, mean over lengths {speed:.2f}")


if __name__ == "__main__":
    main()
