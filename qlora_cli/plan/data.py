"""The data half of `qlora plan`: lengths, padding and attention context of the prepared data, and
what in it is legal but probably not what the user meant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlora_cli.errors import UserError
from qlora_cli.data.templates import IGNORE_INDEX

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

SMALL_VALIDATION = 50  # fewer validation examples than this give a loss that is mostly noise


@dataclass
class DataReport:
    examples: dict[str, int]
    percentiles: dict[str, int]
    trained_fraction: float
    packing_efficiency: float | None
    tokens_computed: int  # per epoch, padding included
    mean_context: float  # tokens each token attends to, on average (causal, within its example)
    row_width: int  # the widest row: the micro-batch width memory must hold
    rows: int
    images: ImageCounts | None = None  # image data only


@dataclass
class ImageCounts:
    """The training split's images as the model sees them: their tokens in the rows, and the Pixtral
    patches the vision tower runs on (before its spatial merge) in the row that has the most."""

    images: int
    image_tokens: int
    tokens: int  # every real token of the split, image tokens included
    max_row_images: int
    max_row_patches: int

    def line(self) -> str:
        return (f"images: {self.images:,} in the training rows, {self.image_tokens:,} image tokens "
                f"({self.image_tokens / max(self.tokens, 1):.1%} of tokens, never trained); the vision tower runs on "
                f"up to {self.max_row_images} image(s), {self.max_row_patches:,} patches, per row")


def describe_data(prepared, batch: int) -> DataReport:
    """Lengths, padding and attention context of the prepared training split; `batch` counts
    sequences (a DPO pair is two: prompt + chosen, prompt + rejected)."""
    summary, train = prepared.summary, prepared.dataset["train"]
    seq_lengths = train["seq_lengths"] if "seq_lengths" in train.column_names else _sequences_of(train)
    widths = [sum(lengths) for lengths in seq_lengths]
    examples = [length for lengths in seq_lengths for length in lengths]
    # Each batch is padded to its widest row (Trainer order is random; the file order stands in).
    computed = sum(batch * max(widths[i:i + batch]) for i in range(0, len(widths), batch))
    context = sum(n * (n + 1) / 2 for n in examples) / max(sum(examples), 1)
    return DataReport(dict(summary.examples), dict(summary.length_percentiles), summary.trained_fraction,
                      summary.packing_efficiency, computed, context, max(widths), len(widths))


def count_images(prepared, settings) -> ImageCounts | None:
    """Image tokens and vision-tower patches of the prepared training split, from each image's size
    (its file header: no pixel is decoded, no weight loaded); None without images or settings."""
    import io

    from PIL import Image

    from qlora_cli.data.images import image_grid, image_token_count

    train = prepared.dataset["train"]
    if settings is None or "images" not in train.column_names:
        return None
    images = tokens = most_images = most_patches = 0
    for batch in train.select_columns(["images"]).iter(batch_size=256):  # not every image's bytes at once
        for row in batch["images"]:
            sizes = [Image.open(io.BytesIO(data)).size for data in row]
            patches = sum(r * c for r, c in (image_grid(w, h, settings) for w, h in sizes))
            images, tokens = images + len(sizes), tokens + sum(image_token_count(w, h, settings) for w, h in sizes)
            most_images = max(most_images, len(sizes))
            most_patches = max(most_patches, patches * settings.spatial_merge_size ** 2)
    return ImageCounts(images, tokens, prepared.summary.tokens.get("train", 0), most_images, most_patches)


def _sequences_of(train) -> list[list[int]]:
    """Preference rows as the sequences the trainer runs, each pair's (or KTO example's) side by side:
    prompt + each answer; a KTO example also runs the mismatched completion of its KL term."""
    answers = [name for name in ("chosen", "rejected", "completion") if f"{name}_ids" in train.column_names]
    prompts = [len(ids) for ids in train["prompt_ids"]]
    if not answers:  # GRPO's prompts: the generations are not counted yet, only the prompts
        return [[p] for p in prompts]
    sides = [[p + len(ids) for p, ids in zip(prompts, train[f"{name}_ids"])] for name in answers]
    sides = sides * 2 if len(sides) == 1 else sides
    return [[side[i]] for i in range(len(prompts)) for side in sides]


def data_warnings(recipe: Recipe, prepared, tokenizer) -> list[str]:
    """What is legal but probably not what the user meant."""
    summary, warnings = prepared.summary, []
    if summary.trained_fraction < 0.05 and recipe.method != "grpo":  # GRPO trains on its own generations
        warnings.append(f"only {summary.trained_fraction:.1%} of tokens carry a loss: almost every label is masked")
    packed = "seq_lengths" in prepared.dataset["train"].column_names
    unended = _responses_without_eos(prepared.dataset["train"], tokenizer.eos_token_id) if packed else 0
    if unended:
        warnings.append(f"{unended:.0%} of examples end their trained tokens without {tokenizer.eos_token}: "
                        "the model will not learn to stop")
    cut = sum(s.truncated for s in summary.sources)
    if cut:
        warnings.append(f"{cut:,} examples were cut at data.max_length={summary.max_length:,}")
    rows, batch = len(prepared.dataset["train"]), recipe.training.per_device_train_batch_size
    if batch > rows:  # legal: every step takes the rows there are (the sample data on the 7B recipe)
        warnings.append(f"training.per_device_train_batch_size is {batch} but the training set has {rows} "
                        f"row{'s' if rows != 1 else ''}: each step trains on {rows}")
    validation = summary.examples.get("validation")
    if validation is not None and validation < SMALL_VALIDATION:
        warnings.append(f"the validation split has only {validation} examples (< {SMALL_VALIDATION}): its loss is noise")
    differs = _template_differs(recipe.data, tokenizer)
    if differs:
        warnings.append(differs)
    return warnings


def _responses_without_eos(rows, eos_id: int, sample: int = 2000) -> float:
    seen = unended = 0
    for row in rows.select(range(min(len(rows), sample))):
        start = 0
        for length in row["seq_lengths"]:
            trained = [t for t in row["labels"][start:start + length] if t != IGNORE_INDEX]
            seen, unended, start = seen + 1, unended + bool(trained and trained[-1] != eos_id), start + length
    return unended / max(seen, 1)


def _template_differs(data, tokenizer) -> str | None:
    from qlora_cli.data.templates import encode_chat

    if data.template == "tokenizer" or not getattr(tokenizer, "chat_template", None):
        return None
    sample = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    try:
        ours = encode_chat(sample, tokenizer, data.template)[0]
        theirs = encode_chat(sample, tokenizer, "tokenizer")[0]
    except UserError:
        return None
    if ours == theirs:
        return None
    return (f"data.template {data.template if '{' not in data.template else '(Jinja)'} formats a conversation "
            "differently from the tokenizer's own chat template: use the same format at inference")
