"""GRPO with qlora vs TRL's stock GRPOTrainer, same tiny model, prompts, rewards and steps, one invocation.

qlora: `qlora train recipes/tiny-mistral-grpo.yaml` (prompts encoded by the mistral template, the
trainer generating from those ids, LoRA weights kept as peft made them). Baseline: `trl.GRPOTrainer`
given the same 4-bit base + LoRA (the SFT adapter the recipe starts from), the same reward
functions and arguments, and the prompts as text in the v1 `[INST]` format, tokenized by TRL
itself (stock: it casts a quantized model's LoRA weights to bf16). Each side runs in its own
process, so its peak RSS is its own; the sides alternate --repeats times. Prints each run, then
each side's median completions/s, peak memory and held-out reward (one evaluation after the last
step), as RESULTS.md rows.

    python bench/grpo_speed.py [--steps 8] [--repeats 2] [--set KEY=VALUE ...]

Needs runs/tiny-mistral/adapter (`qlora train recipes/tiny-mistral.yaml`), or
`--set model.adapter=null` for a fresh LoRA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

from sides import alternated, medians, report

RECIPE = "tiny-mistral-grpo"


def load(folder: Path, side: str, steps: int, overrides: list[str]):
    from qlora_cli.recipe.load import load_recipe

    return load_recipe([RECIPE], [f"training.output_dir={folder / side}", f"data.prepared_dir={folder / 'prepared'}",
                                  f"training.max_steps={steps}", "training.eval_strategy=no",
                                  "training.eval_on_start=false", *overrides])


def run_qlora(folder: Path, steps: int, overrides: list[str]) -> dict:
    from qlora_cli.training.run import train

    started = time.monotonic()
    result = train(load(folder, "qlora", steps, overrides))
    history = json.loads((result.run.last_checkpoint() / "trainer_state.json").read_text())["log_history"]
    return {"completions_per_s": result.metrics["train_samples_per_second"], "wall_s": time.monotonic() - started,
            "eval_reward": result.metrics.get("eval_reward"), **where_time_goes(history)}


def where_time_goes(history: list[dict]) -> dict:
    """The mean completion length and the mean step time TRL logged (a longer answer costs its
    tokens' generation, which is most of a step here)."""
    def mean(key):
        values = [entry[key] for entry in history if entry.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"completion_tokens": mean("completions/mean_length"), "step_s": mean("step_time")}


def run_trl(folder: Path, steps: int, overrides: list[str]) -> dict:
    from datasets import Dataset
    from trl import GRPOTrainer

    from qlora_cli.data.prepare import prepare_dataset
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.recipe.builders import build_training_arguments
    from qlora_cli.rewards import reward_functions

    recipe = load(folder, "trl", steps, overrides)
    tokenizer = load_recipe_tokenizer(recipe)
    prepared = prepare_dataset(recipe, tokenizer).dataset  # the same split; its prompts as text for TRL

    def as_text(split):
        return Dataset.from_list([{"prompt": f"[INST] {row['prompt']} [/INST]", "answer": row["answer"]}
                                  for row in prepared[split]])

    args = build_training_arguments(recipe.written("training"), method="grpo", output_dir=str(folder / "trl"),
                                    disable_tqdm=True, reward_weights=[r.weight for r in recipe.rewards])
    trainer = GRPOTrainer(model=load_trainable_model(recipe, tokenizer=tokenizer), args=args,
                          reward_funcs=reward_functions(recipe.rewards, args.max_completion_length),
                          train_dataset=as_text("train"), eval_dataset=as_text("validation"),
                          processing_class=tokenizer)
    started = time.monotonic()
    output = trainer.train()
    seconds = time.monotonic() - started
    return {"completions_per_s": output.metrics["train_samples_per_second"], "wall_s": seconds,
            "eval_reward": trainer.evaluate().get("eval_reward"), **where_time_goes(trainer.state.log_history)}


def child(side: str, folder: Path, steps: int, overrides: list[str]) -> None:
    report((run_qlora if side == "qlora" else run_trl)(folder, steps, overrides))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternated (medians reported)")
    parser.add_argument("--side", choices=["qlora", "trl"])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for both sides")
    options = parser.parse_args()
    if options.side:
        return child(options.side, options.folder, options.steps, options.set)
    with tempfile.TemporaryDirectory() as folder:
        args = ["--steps", str(options.steps), *(["--set", *options.set] if options.set else [])]
        runs = alternated(__file__, options.repeats, folder, args)
    typical = medians(runs, ("completions_per_s", "peak_rss_mib", "eval_reward", "completion_tokens", "step_s"))
    q, t = typical["qlora"], typical["trl"]
    print(f"\nmedians of {options.repeats} alternated runs per side, {options.steps} steps"
          f"{', with ' + ' '.join(options.set) if options.set else ''}; rows for bench/RESULTS.md:\n")
    print("| date       | side  | completions/s | peak RSS MiB | held-out reward | tokens per completion | s per step |")
    print("|------------|-------|--------------:|-------------:|----------------:|----------------------:|-----------:|")
    today = datetime.date.today().isoformat()
    for side, label in (("qlora", "qlora"), ("trl", "TRL")):
        m = typical[side]
        print(f"| {today} | {label:5s} | {m['completions_per_s']:.3f} | {m['peak_rss_mib']:,.0f} | {m['eval_reward']:.3f} "
              f"| {m['completion_tokens']:.1f} | {m['step_s']:.2f} |")
    print(f"| ratio      |       | {q['completions_per_s'] / t['completions_per_s']:.2f}x "
          f"| {q['peak_rss_mib'] / t['peak_rss_mib']:.2f}x | {q['eval_reward'] - t['eval_reward']:+.3f} |")


if __name__ == "__main__":
    main()
