"""How fast `qlora prepare` turns raw examples into tokens, against a one-at-a-time baseline.

    python bench/prepare_speed.py [--examples 20000] [--tokenizer mistral-common:v1] [--num-proc N]

Both sides start from the same jsonl files (half chat, with system prompts and several turns;
half seed-format text; lengths from a few words to a few hundred) and end with a packed
`datasets.Dataset`. The baseline is what a first script does: format each example as one string,
`tokenizer(text)` it alone in a Python loop, pack, build the Dataset. Ours is `build_dataset`,
which also checks every row, masks labels and reproduces mistral-common's ids exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from qlora_cli.data.packing import pack_lengths

SYLLABLES = ["ka", "to", "ri", "men", "sa", "lo", "pe", "qu", "an", "ti", "ver", "dom", "el", "ix", "u", "ar",
             "ble", "ing", "tion", "st", "or", "ge", "ph", "ny"]


def synthetic_rows(count: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(chat rows, text rows): Zipf-distributed words from a 20,000-word vocabulary, varied lengths."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(20_000)]
    extras = [",", ".", "?", "!", "\n", "42", "3.14", "(x)", "é", "naïve", "日本"]

    def sentence(words: int) -> str:
        picks = (vocabulary[min(int(rng.paretovariate(0.9)) - 1, len(vocabulary) - 1)] for _ in range(words))
        return " ".join(w if rng.random() > 0.05 else w + rng.choice(extras) for w in picks)

    def length() -> int:
        return int(rng.lognormvariate(3.5, 1.0)) + 2  # median ~35 words, a long tail to several hundred

    chats, texts = [], []
    for i in range(count):
        if i % 2 == 0:
            messages = [{"role": "system", "content": sentence(8)}] if rng.random() < 0.3 else []
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                messages += [{"role": "user", "content": sentence(length())},
                             {"role": "assistant", "content": sentence(length())}]
            chats.append({"messages": messages})
        else:
            texts.append({"text": f"<s>[INST] {sentence(length())} [/INST] {sentence(length())}</s>"})
    return chats, texts


def ours(folder: Path, tokenizer, max_length: int, num_proc: int | None):
    from qlora_cli.data.prepare import build_dataset
    from qlora_cli.recipe.sections import DataSection, DataSource

    data = DataSection(sources=[DataSource(str(folder / "chat.jsonl"), format="chat"),
                                DataSource(str(folder / "text.jsonl"), format="text")],
                       max_length=max_length, num_proc=num_proc)
    dataset, summary = build_dataset(data, tokenizer, 42, "bench")
    return dataset["train"], summary.tokens["train"]


def baseline(folder: Path, tokenizer, max_length: int):
    from datasets import Dataset

    encoded = []
    for name in ("chat.jsonl", "text.jsonl"):
        for line in (folder / name).read_text().splitlines():
            row = json.loads(line)
            text = row.get("text") or _format_chat(row["messages"])
            ids = tokenizer(text, add_special_tokens=False).input_ids[:max_length]
            encoded.append(ids)
    bins = pack_lengths([len(ids) for ids in encoded], max_length)
    columns = {"input_ids": [], "labels": [], "seq_lengths": []}
    for members in bins:
        ids = [t for i in members for t in encoded[i]]
        columns["input_ids"].append(ids)
        columns["labels"].append(list(ids))
        columns["seq_lengths"].append([len(encoded[i]) for i in members])
    return Dataset.from_dict(columns), sum(map(len, encoded))


def _format_chat(messages: list[dict]) -> str:
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    turns = [m for m in messages if m["role"] != "system"]
    text = "<s>"
    for user, assistant in zip(turns[::2], turns[1::2]):
        text += f"[INST] {system}{user['content']} [/INST]{assistant['content']}</s>"
        system = ""
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--tokenizer", default="mistral-common:v1")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc for our side")
    args = parser.parse_args()

    os.environ.setdefault("QLORA_CACHE", tempfile.mkdtemp(prefix="qlora-bench-cache-"))
    from datasets import disable_progress_bars

    from qlora_cli.data.tokenizer import load_tokenizer

    disable_progress_bars()
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        chats, texts = synthetic_rows(args.examples)
        for name, rows in (("chat.jsonl", chats), ("text.jsonl", texts)):
            (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        timings = {}
        for name, run in (("baseline", lambda: baseline(folder, tokenizer, args.max_length)),
                          ("ours", lambda: ours(folder, tokenizer, args.max_length, args.num_proc))):
            start = time.perf_counter()
            dataset, tokens = run()
            timings[name] = time.perf_counter() - start
            print(f"{name:9s} {args.examples / timings[name]:9,.0f} examples/s  "
                  f"({timings[name]:.2f} s, {len(dataset):,} packed rows, {tokens:,} tokens)")
    print(f"ratio     {timings['baseline'] / timings['ours']:.2f}x (ours vs one-at-a-time baseline)")


if __name__ == "__main__":
    main()
