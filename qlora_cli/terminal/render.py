"""How results look on the terminal: rich tables and highlighted tokens. Only the CLI calls this."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from qlora_cli.data.images import image_size, image_spans, image_token_ids
from qlora_cli.data.templates import IGNORE_INDEX


def prepare_summary(console: Console, prepared) -> None:
    """Counts per source, length percentiles, trained share and packing efficiency."""
    summary = prepared.summary
    state = "reused" if prepared.reused else "prepared"
    console.print(f"[bold]data[/] {state}: {prepared.path} (fingerprint {summary.fingerprint})", highlight=False)
    if prepared.rebuilt_because:
        console.print(f"the cached entry was damaged ({escape(prepared.rebuilt_because)}): prepared again", highlight=False)
    # A long path wraps rather than being cut to "…": the file name is what the user needs to see.
    table = Table(Column("source", overflow="fold"), "read", "kept", "truncated", "dropped", box=None, pad_edge=False)
    for counts in summary.sources:
        table.add_row(counts.path, *(f"{n:,}" for n in (counts.read, counts.kept, counts.truncated, counts.dropped)))
    console.print(table)
    lengths = ", ".join(f"{k} {v:,}" for k, v in summary.length_percentiles.items())
    console.print(f"tokens per example: {lengths} (max_length {summary.max_length:,})", highlight=False)
    for split, examples in summary.examples.items():
        images = getattr(summary, "images", {}).get(split)
        pictures = f" ({summary.image_tokens[split]:,} in {images:,} images, never trained)" if images else ""
        console.print(f"{split}: {examples:,} examples in {summary.rows[split]:,} rows, "
                      f"{summary.tokens[split]:,} tokens{pictures}, {summary.trained_tokens[split]:,} trained",
                      highlight=False)
    if summary.trained_tokens.get("train"):
        console.print(f"trained on {100 * summary.trained_fraction:.1f}% of tokens", highlight=False)
    else:  # GRPO's prompts
        console.print("no answers in the data: the model writes them while it trains", highlight=False)
    if summary.packing_efficiency is not None:
        console.print(f"packing efficiency: {100 * summary.packing_efficiency:.1f}% of row capacity holds real tokens",
                      highlight=False)


SHOWN_TOKENS = 1024  # `prepare --show`: an example longer than this shows its first and last halves
TRAINED = "bold green"
PLAIN_MARKS = ("{+", "+}")  # around trained tokens where the output has no colour (piped, TERM=dumb)


def print_example(console: Console, text: Text) -> None:
    """An example from highlight_trained: trained tokens bright, or between {+ and +} without colour."""
    if console.color_system is not None:
        console.print(text)
        return
    plain, pieces, at = text.plain, [], 0
    for span in sorted(span for span in text.spans if span.style == TRAINED):
        pieces += [plain[at:span.start], PLAIN_MARKS[0], plain[span.start:span.end], PLAIN_MARKS[1]]
        at = span.end
    console.print("".join(pieces) + plain[at:], markup=False, highlight=False)


def _say_marks(console: Console) -> None:
    if console.color_system is None:
        console.print(f"(no colour here: trained tokens are shown between {PLAIN_MARKS[0]} and {PLAIN_MARKS[1]})",
                      markup=False, highlight=False)


def show_examples(console: Console, dataset, tokenizer, count: int) -> None:
    """The first `count` training examples: tokens without loss dimmed, trained tokens bright."""
    if "prompt_ids" in dataset.column_names:
        return show_preference_examples(console, dataset, tokenizer, count)
    _say_marks(console)
    shown = 0
    token_ids = image_token_ids(tokenizer) if "images" in dataset.column_names else None
    for row in dataset:
        start = 0
        images = list(row.get("images") or [])
        for length in row["seq_lengths"]:
            if shown == count:
                return
            ids, labels = row["input_ids"][start:start + length], row["labels"][start:start + length]
            spans = image_spans(ids, token_ids) if token_ids else []
            pictures = f", {len(spans)} image{'s' * (len(spans) != 1)}" if spans else ""
            console.rule(f"example {shown + 1} ({length} tokens, {sum(l != IGNORE_INDEX for l in labels[1:])} "
                         f"trained{pictures})")
            if spans or length <= SHOWN_TOKENS:
                print_example(console, highlight_with_images(ids, labels, tokenizer, spans, images[:len(spans)]))
            else:  # a long row (64K tokens of a contract) would fill the scrollback
                print_example(console, highlight_elided(ids, labels, tokenizer))
            images = images[len(spans):]
            start += length
            shown += 1


def highlight_elided(ids: list[int], labels: list[int], tokenizer, shown: int = SHOWN_TOKENS) -> Text:
    """highlight_trained of the first and the last `shown / 2` tokens, and how many lie between."""
    half = shown // 2
    text = highlight_trained(ids[:half], labels[:half], tokenizer)
    text.append(f"\n[... {len(ids) - 2 * half:,} tokens not shown ...]\n", style="bold cyan")
    text.append_text(highlight_trained(ids[-half:], labels[-half:], tokenizer))
    return text


def highlight_with_images(ids: list[int], labels: list[int], tokenizer, spans: list, images: list[bytes]) -> Text:
    """highlight_trained, each image's tokens shown as `[image 1: 448x336 -> 28x21 tokens]`
    (its size as given, then its grid of tokens: columns x rows)."""
    text, position = Text(), 0
    for number, ((start, end, cols, rows), image) in enumerate(zip(spans, images), start=1):
        text.append_text(highlight_trained(ids[position:start], labels[position:start], tokenizer))
        width, height = image_size(image)
        text.append(f"[image {number}: {width}x{height} -> {cols}x{rows} tokens]", style="bold cyan")
        position = end
    text.append_text(highlight_trained(ids[position:], labels[position:], tokenizer))
    return text


def show_preference_examples(console: Console, dataset, tokenizer, count: int) -> None:
    """Each pair as its two whole sequences (or a signed example as one): prompt dim, answers bright."""
    _say_marks(console)
    for number, row in enumerate(dataset.select(range(min(count, len(dataset)))), start=1):
        names = [name for name in ("chosen", "rejected", "completion") if f"{name}_ids" in row]
        if not names:  # GRPO's prompts: the model writes the answers, the other columns go to the rewards
            console.rule(f"example {number} prompt ({len(row['prompt_ids'])} tokens)")
            prompt = row["prompt_ids"]
            print_example(console, highlight_trained(prompt, [IGNORE_INDEX] * len(prompt), tokenizer))
            columns = {key: value for key, value in row.items() if key not in ("prompt", "prompt_ids")}
            if columns:
                console.print(f"columns for the rewards: {columns}", highlight=False, markup=False)
        for name in names:
            ids = row["prompt_ids"] + row[f"{name}_ids"]
            labels = [IGNORE_INDEX] * len(row["prompt_ids"]) + [
                i if m else IGNORE_INDEX for i, m in zip(row[f"{name}_ids"], row[f"{name}_mask"])]
            title = name if "label" not in row else f"completion, label {str(row['label']).lower()}"
            console.rule(f"example {number} {title} ({len(ids)} tokens, {sum(row[f'{name}_mask'])} trained)")
            images = row.get("images") or []
            spans = image_spans(ids, image_token_ids(tokenizer)) if images else []
            print_example(console, highlight_with_images(ids, labels, tokenizer, spans, images))


def highlight_trained(ids: list[int], labels: list[int], tokenizer) -> Text:
    """The decoded text with untrained spans dim and trained spans bold green."""
    text = Text()
    decoded_before = ""
    if not ids:
        return text
    for end in range(1, len(ids) + 1):
        trained = labels[end - 1] != IGNORE_INDEX
        if end == len(ids) or (labels[end] != IGNORE_INDEX) != trained:
            # Decode the prefix and take the difference: decoding a span alone would lose the
            # leading space SentencePiece folds into its first token.
            decoded = tokenizer.decode(ids[:end], skip_special_tokens=False)
            text.append(decoded[len(decoded_before):], style=TRAINED if trained else "dim")
            decoded_before = decoded
    return text


def _plan_longest(console: Console, plan) -> None:
    """The longest row that fits at this batch, as the recipe is and with each long-row switch."""
    figures = ", ".join(f"{name} {f'{n:,}' if n else 'none'}" for name, n in plan.longest.items())
    console.print(f"longest rows by memory at batch {plan.batch}, with model.tiled_mlp / training.activation_offloading "
                  f"on: {figures}", highlight=False)
    positions = plan.max_positions
    if positions and max(n or 0 for n in plan.longest.values()) > positions:
        console.print(f"  the model's positions end at {positions:,} (max_position_embeddings): longer rows need the "
                      "rope scaling its config gives", highlight=False)


def plan_report(console: Console, plan) -> None:
    """`qlora plan`: memory item by item against the device, time, data, disk, resume, verdict."""
    from qlora_cli.plan.estimate import format_durations

    gib = 2**30
    console.rule(f"[bold]plan[/]: {plan.model}")
    table = Table("memory per device", Column("GiB", justify="right"), "how", box=None, pad_edge=False)
    for item in plan.memory:
        table.add_row(item.name, f"{item.bytes / gib:.3f}", item.how)
    table.add_row("[bold]total[/]", f"[bold]{plan.total / gib:.2f}[/]", f"device: {plan.device}")
    console.print(table)
    if plan.capacity is not None:
        verdict = "[green]fits[/]" if plan.fits else "[bold red]does not fit[/]"
        console.print(f"{verdict} in {plan.capacity / gib:.1f} GiB; largest batch at {plan.seq:,} tokens: "
                      f"{plan.max_batch or 'none'}; longest rows at batch {plan.batch}: "
                      f"{f'{plan.max_seq:,}' if plan.max_seq else 'none'} tokens", highlight=False)
        if plan.longest:
            _plan_longest(console, plan)
    else:
        console.print("device memory unknown: no GPU here; pass --gpu-memory GiB to check the fit", highlight=False)
    for change in plan.changes:
        console.print(f"  change: {change}", highlight=False)
    for change in plan.faster:
        console.print(f"  faster: {change}", highlight=False)
    for note in plan.notes:
        console.print(note, highlight=False)
    if plan.data:
        _plan_data(console, plan)
    if plan.durations:
        table = Table("time", Column("duration", justify="right"), box=None, pad_edge=False)
        for name, (fast, slow) in plan.durations.items():
            table.add_row(name, format_durations(fast, slow))
        console.print(f"{plan.steps:,} optimizer steps ({plan.epochs:.3g} epochs), {plan.flops:.3g} FLOPs; "
                      "duration assumes 25% to 45% of the GPU's dense bf16 peak (MFU)", highlight=False)
        console.print(table)
    disk = Table("disk", Column("GiB", justify="right"), "how", box=None, pad_edge=False)
    for item in plan.disk:
        disk.add_row(item.name, f"{item.bytes / gib:.3f}", item.how)
    console.print(disk)
    for where, free in plan.disk_free.items():
        console.print(f"free under {where}: {free / gib:,.1f} GiB", highlight=False)
    for line in plan.resume:
        console.print(f"resume: {line}", highlight=False)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    for problem in plan.problems:
        console.print(f"[bold red]will not work:[/] {problem}", highlight=False)
    if plan.ok:
        console.print("[green]ok[/]: the run should work", highlight=False)


def _plan_data(console: Console, plan) -> None:
    data = plan.data
    splits = ", ".join(f"{name} {count:,}" for name, count in data.examples.items())
    lengths = ", ".join(f"{k} {v:,}" for k, v in data.percentiles.items())
    packing = f", packing efficiency {data.packing_efficiency:.1%}" if data.packing_efficiency is not None else ""
    console.print(f"data: examples {splits}; tokens per example {lengths}; {data.trained_fraction:.1%} of tokens "
                  f"carry a loss{packing}; {data.tokens_computed:,} tokens computed per epoch (padding included)",
                  highlight=False)
    if data.images:
        console.print(data.images.line(), highlight=False)




def eval_table(console: Console, scores: dict[str, dict[str, float]]) -> None:
    """A row per metric, a column per model, and each model's difference from the base: a rich
    table on a terminal, aligned plain text (one row a line) when piped."""
    models = list(scores)
    others = [m for m in models if m != "base"]
    metrics = list(dict.fromkeys(metric for values in scores.values() for metric in values))
    header = ["metric", *models, *[f"{m} - base" for m in others]]
    rows = [[metric, *[_number(scores[m].get(metric)) for m in models],
             *[_difference(scores[m].get(metric), scores["base"].get(metric)) for m in others]]
            for metric in metrics]
    if console.is_terminal:
        table = Table(*header, box=box.SIMPLE_HEAD)
        for column in table.columns[1:]:
            column.justify = "right"
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), *[cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]]
        console.print("  ".join(cells).rstrip(), highlight=False, markup=False, soft_wrap=True)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4f}"


def _difference(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    return f"{value - base:+.4f}"
