"""How results look on the terminal: rich tables and highlighted tokens. Only the CLI calls this."""

from __future__ import annotations

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from qlora_cli.templates import IGNORE_INDEX


def prepare_summary(console: Console, prepared) -> None:
    """Counts per source, length percentiles, trained share and packing efficiency."""
    summary = prepared.summary
    state = "reused" if prepared.reused else "prepared"
    console.print(f"[bold]data[/] {state}: {prepared.path} (fingerprint {summary.fingerprint})", highlight=False)
    # A long path wraps rather than being cut to "…": the file name is what the user needs to see.
    table = Table(Column("source", overflow="fold"), "read", "kept", "truncated", "dropped", box=None, pad_edge=False)
    for counts in summary.sources:
        table.add_row(counts.path, *(f"{n:,}" for n in (counts.read, counts.kept, counts.truncated, counts.dropped)))
    console.print(table)
    lengths = ", ".join(f"{k} {v:,}" for k, v in summary.length_percentiles.items())
    console.print(f"tokens per example: {lengths} (max_length {summary.max_length:,})", highlight=False)
    for split, examples in summary.examples.items():
        console.print(f"{split}: {examples:,} examples in {summary.rows[split]:,} rows, "
                      f"{summary.tokens[split]:,} tokens, {summary.trained_tokens[split]:,} trained", highlight=False)
    console.print(f"trained on {100 * summary.trained_fraction:.1f}% of tokens", highlight=False)
    if summary.packing_efficiency is not None:
        console.print(f"packing efficiency: {100 * summary.packing_efficiency:.1f}% of row capacity holds real tokens",
                      highlight=False)


def show_examples(console: Console, dataset, tokenizer, count: int) -> None:
    """The first `count` training examples: tokens without loss dimmed, trained tokens bright."""
    shown = 0
    for row in dataset:
        start = 0
        for length in row["seq_lengths"]:
            if shown == count:
                return
            ids, labels = row["input_ids"][start:start + length], row["labels"][start:start + length]
            console.rule(f"example {shown + 1} ({length} tokens, {sum(l != IGNORE_INDEX for l in labels[1:])} trained)")
            console.print(highlight_trained(ids, labels, tokenizer))
            start += length
            shown += 1


def highlight_trained(ids: list[int], labels: list[int], tokenizer) -> Text:
    """The decoded text with untrained spans dim and trained spans bold green."""
    text = Text()
    start = 0
    decoded_before = ""
    for end in range(1, len(ids) + 1):
        trained = labels[end - 1] != IGNORE_INDEX
        if end == len(ids) or (labels[end] != IGNORE_INDEX) != trained:
            # Decode the prefix and take the difference: decoding a span alone would lose the
            # leading space SentencePiece folds into its first token.
            decoded = tokenizer.decode(ids[:end], skip_special_tokens=False)
            text.append(decoded[len(decoded_before):], style="bold green" if trained else "dim")
            decoded_before, start = decoded, end
    return text
