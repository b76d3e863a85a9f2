"""Image+text SFT with qlora (packed) vs qlora with one conversation per row vs TRL's stock
SFTTrainer, same tiny mistral3, same images, same LoRA, one invocation.

qlora: `qlora train tiny-mistral3-vision` (mistral-common's ids and pixels, examples packed into
rows of `data.max_length` tokens, the loss over the answers only, in chunks). rows: the same with
`data.packing=false` (one conversation per row, batches of --batch rows). TRL: `SFTTrainer` given
the same 4-bit base + LoRA, the conversations as prompt/completion with their PIL images, and a
PixtralProcessor (the image processor transformers pairs with mistral3, set to the model's patch
size, as `qlora merge` writes it) with a chat template of the same [INST] format: its vision
collator, its loss (completion only), batches of --batch conversations. Same epochs, learning
rate, schedule and seed. Each side runs in its own process (peak RSS is its own); the sides
alternate --repeats times. Prints each run, then each side's median trained tokens/s (real,
non-pad tokens the model ran on per second of training), peak RSS and held-out accuracy (greedy
answers to sample_images/heldout.jsonl, scored by exact match, the same code for every side), as
RESULTS.md rows.

    python bench/vision_speed.py [--epochs 4] [--repeats 3] [--batch 12] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

from sides import alternated, medians, report

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "tiny-mistral3-vision"
IMAGES = ROOT / "sample_images"
SIDES = ("qlora", "rows", "trl")
# The [INST] format of tekken v3 (mistral-common's ids: no spaces around the control tokens), with
# an [IMG] where each image goes: PixtralProcessor expands it into the image's rows of tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}[/INST]{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)


def recipe_for(folder: Path, epochs: int, batch: int, side: str, overrides: list[str]):
    from qlora_cli.recipe.load import load_recipe

    per_row = ["data.packing=false", f"training.per_device_train_batch_size={batch}"] if side != "qlora" else []
    return load_recipe([RECIPE], [f"training.output_dir={folder / side}", f"data.prepared_dir={folder / 'prepared'}",
                                  f"training.num_train_epochs={epochs}", "training.save_strategy=no",
                                  "training.report_to=none", *per_row, *overrides])


def run_qlora(folder: Path, epochs: int, batch: int, side: str, overrides: list[str]) -> dict:
    from qlora_cli.export.generate import load_generator
    from qlora_cli.training.run import train

    recipe = recipe_for(folder, epochs, batch, side, overrides)
    started = time.monotonic()
    result = train(recipe)
    seconds = time.monotonic() - started
    generator = load_generator(recipe, tokenizer=result.tokenizer)
    return {"tokens_per_s": result.metrics["tokens_per_second"], "train_s": result.metrics["train_runtime"],
            "wall_s": seconds, "heldout_accuracy": held_out_accuracy(generator)}


def run_trl(folder: Path, epochs: int, batch: int, side: str, overrides: list[str]) -> dict:
    from datasets import Dataset
    from PIL import Image
    from transformers import PixtralImageProcessor, PixtralProcessor
    from trl import SFTConfig, SFTTrainer

    from qlora_cli.data.images import image_settings
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.export.generate import Generator
    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.recipe.builders import build_generation_config

    recipe = recipe_for(folder, epochs, batch, side, overrides)
    tokenizer = load_recipe_tokenizer(recipe)
    model = load_trainable_model(recipe, tokenizer=tokenizer)
    settings = image_settings(tokenizer, model.config)
    patch = {"height": settings.patch_size, "width": settings.patch_size}
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=patch, size={"longest_edge": settings.max_image_size}),
        tokenizer=tokenizer, patch_size=settings.patch_size, spatial_merge_size=settings.spatial_merge_size,
        chat_template=CHAT_TEMPLATE)
    rows = []
    for line in (IMAGES / "train.jsonl").read_text().splitlines():
        user, answer = json.loads(line)["messages"]
        image = Image.open(IMAGES / user["content"][0]["path"]).convert("RGB")
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"}, user["content"][1]]}],
                     "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer["content"]}]}],
                     "images": [image]})
    training = recipe.training
    args = SFTConfig(output_dir=str(folder / "trl"), num_train_epochs=epochs, per_device_train_batch_size=batch,
                     learning_rate=training.learning_rate, lr_scheduler_type=training.lr_scheduler_type,
                     warmup_steps=training.warmup_steps, optim=training.optim, bf16=False, seed=training.seed,
                     logging_steps=training.logging_steps, save_strategy="no", report_to="none", max_length=None,
                     remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(examples):
        batch_ = collate(examples)
        counted["tokens"] += int(batch_["attention_mask"].sum())
        return batch_

    trainer.data_collator = counting
    started = time.monotonic()
    output = trainer.train()
    seconds = time.monotonic() - started
    runtime = output.metrics["train_runtime"]
    config = build_generation_config(recipe.written("generate") or {}, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    generator = Generator(trainer.model.eval(), tokenizer, "mistral", config, None, settings)
    return {"tokens_per_s": counted["tokens"] / runtime, "train_s": runtime, "wall_s": seconds,
            "heldout_accuracy": held_out_accuracy(generator)}


def held_out_accuracy(generator) -> float:
    """Exact match of the greedy answers to sample_images/heldout.jsonl (as `qlora eval` scores)."""
    from qlora_cli.eval.evaluate import read_eval_records

    records = read_eval_records(IMAGES / "heldout.jsonl")
    right = 0
    for start in range(0, len(records), 8):
        batch = records[start:start + 8]
        answers = generator.answer_batch([r.prompt.messages for r in batch])
        right += sum(answer[0].strip() == r.reference for answer, r in zip(answers, batch))
    return right / len(records)


def child(side: str, folder: Path, epochs: int, batch: int, overrides: list[str]) -> None:
    report((run_trl if side == "trl" else run_qlora)(folder, epochs, batch, side, overrides))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=12, help="conversations per step of the rows and TRL sides")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated (medians reported)")
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for every side")
    options = parser.parse_args()
    if options.side:
        return child(options.side, options.folder, options.epochs, options.batch, options.set)
    with tempfile.TemporaryDirectory() as folder:
        args = ["--epochs", str(options.epochs), "--batch", str(options.batch),
                *(["--set", *options.set] if options.set else [])]
        runs = alternated(__file__, options.repeats, folder, args, sides=SIDES)
    typical = medians(runs, ("tokens_per_s", "peak_rss_mib", "heldout_accuracy"))
    print(f"\nmedians of {options.repeats} alternated runs per side, {options.epochs} epoch(s), batch {options.batch}"
          f"{', with ' + ' '.join(options.set) if options.set else ''}; rows for bench/RESULTS.md:\n")
    print("| date       | side                     | trained tokens/s | peak RSS MiB | held-out accuracy |")
    print("|------------|--------------------------|-----------------:|-------------:|------------------:|")
    today = datetime.date.today().isoformat()
    labels = {"qlora": "qlora (packed)", "rows": "qlora, one conversation/row", "trl": "TRL SFTTrainer"}
    for side in SIDES:
        m = typical[side]
        print(f"| {today} | {labels[side]:24s} | {m['tokens_per_s']:.1f} | {m['peak_rss_mib']:,.0f} "
              f"| {m['heldout_accuracy']:.3f} |")
    q = typical["qlora"]
    for side in ("rows", "trl"):
        m = typical[side]
        print(f"| qlora / {side:4s} |                          | {q['tokens_per_s'] / m['tokens_per_s']:.2f}x "
              f"| {q['peak_rss_mib'] / m['peak_rss_mib']:.2f}x | {q['heldout_accuracy'] - m['heldout_accuracy']:+.3f} |")


if __name__ == "__main__":
    main()
