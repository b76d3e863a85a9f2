"""DPO with qlora vs TRL's stock DPOTrainer, same tiny model, same pairs, one invocation.

qlora: `qlora train recipes/tiny-mistral-dpo.yaml` (pairs encoded by the mistral template,
our collator, our pass over the lm_head for the answers' log-probs). Baseline: `trl.DPOTrainer` given the same 4-bit base + LoRA and the raw pairs as
text, tokenized by TRL itself with its own collator (no chat template: the v1 `[INST]` format is
written into the prompt text). Same schedule, batch, seed. Each side runs in its own process, so
its peak RSS is its own. The sides alternate --repeats times; prints each run, then each side's
median pairs/s, peak memory and held-out reward accuracy and the ratios, as RESULTS.md rows.

    python bench/dpo_speed.py [--epochs 2] [--repeats 3] [--set KEY=VALUE ...]

`--set` overrides the recipe of both sides alike, e.g. a GPU-sized model:
`--set model.init_from_config.hidden_size=4096 model.init_from_config.num_hidden_layers=8
model.dtype=bfloat16 quantization.bnb_4bit_compute_dtype=bfloat16 training.bf16=true`.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

from sides import alternated, medians, report

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "tiny-mistral-dpo"
# Both sides from a fresh LoRA on the random model, at the step the figures in RESULTS.md were
# measured with (the shipped recipe starts from the quick start's SFT adapter, at 1e-3).
FROM_SCRATCH = ["model.adapter=null", "training.learning_rate=5e-3"]


def run_qlora(folder: Path, epochs: int, overrides: list[str]) -> dict:
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.training.run import train

    recipe = load_recipe([RECIPE], [f"training.output_dir={folder / 'qlora'}", f"data.prepared_dir={folder / 'prepared'}",
                                    f"training.num_train_epochs={epochs}", "training.eval_strategy=no", *FROM_SCRATCH,
                                    *overrides])
    started = time.monotonic()
    result = train(recipe)
    seconds = time.monotonic() - started
    return {"pairs_per_s": result.metrics["train_samples_per_second"], "wall_s": seconds,
            "eval_reward_accuracy": result.metrics.get("eval_rewards/accuracies")}


def run_trl(folder: Path, epochs: int, overrides: list[str]) -> dict:
    from datasets import Dataset
    from trl import DPOTrainer

    from qlora_cli.recipe.builders import build_training_arguments
    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.data.preference import pair_from_row
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.data.sources import _read_jsonl

    recipe = load_recipe([RECIPE], [f"training.output_dir={folder / 'trl'}", f"training.num_train_epochs={epochs}",
                                    "training.eval_strategy=no", *FROM_SCRATCH, *overrides])
    rows = [pair_from_row({k: row.get(k) for k in ("prompt", "messages", "chosen", "rejected")}, where)
            for where, row in _read_jsonl(ROOT / "sample_preference.jsonl")]
    texts = [{"prompt": f"[INST] {p.prompt[-1]['content']} [/INST]", "chosen": f" {p.chosen[0]['content']}",
              "rejected": f" {p.rejected[0]['content']}"} for p in rows]
    held_out = len(texts) // 5  # as data.val_size: 0.2
    train_set, eval_set = Dataset.from_list(texts[held_out:]), Dataset.from_list(texts[:held_out])
    tokenizer = load_recipe_tokenizer(recipe)
    args = build_training_arguments(recipe.written("training"), method="dpo", output_dir=str(folder / "trl"),
                                    disable_tqdm=True, max_length=recipe.data.max_length)
    trainer = DPOTrainer(model=load_trainable_model(recipe), args=args, train_dataset=train_set,
                         eval_dataset=eval_set, processing_class=tokenizer)
    started = time.monotonic()
    output = trainer.train()
    seconds = time.monotonic() - started
    return {"pairs_per_s": output.metrics["train_samples_per_second"], "wall_s": seconds,
            "eval_reward_accuracy": trainer.evaluate().get("eval_rewards/accuracies")}


def child(side: str, folder: Path, epochs: int, overrides: list[str]) -> None:
    report((run_qlora if side == "qlora" else run_trl)(folder, epochs, overrides))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated (medians reported)")
    parser.add_argument("--side", choices=["qlora", "trl"])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for both sides")
    options = parser.parse_args()
    if options.side:
        return child(options.side, options.folder, options.epochs, options.set)
    with tempfile.TemporaryDirectory() as folder:
        args = ["--epochs", str(options.epochs), *(["--set", *options.set] if options.set else [])]
        runs = alternated(__file__, options.repeats, folder, args)
    typical = medians(runs, ("pairs_per_s", "peak_rss_mib", "eval_reward_accuracy"))
    q, t = typical["qlora"], typical["trl"]
    print(f"\nmedians of {options.repeats} alternated runs per side, {options.epochs} epoch(s)"
          f"{', with ' + ' '.join(options.set) if options.set else ''}; rows for bench/RESULTS.md:\n")
    print("| date       | side  | pairs/s | peak RSS MiB | held-out reward accuracy |")
    print("|------------|-------|--------:|-------------:|-------------------------:|")
    today = datetime.date.today().isoformat()
    for side, label in (("qlora", "qlora"), ("trl", "TRL")):
        m = typical[side]
        print(f"| {today} | {label:5s} | {m['pairs_per_s']:.3f} | {m['peak_rss_mib']:,.0f} | {m['eval_reward_accuracy']:.3f} |")
    print(f"| ratio      |       | {q['pairs_per_s'] / t['pairs_per_s']:.2f}x | {q['peak_rss_mib'] / t['peak_rss_mib']:.2f}x "
          f"| {q['eval_reward_accuracy'] - t['eval_reward_accuracy']:+.3f} |")


if __name__ == "__main__":
    main()
