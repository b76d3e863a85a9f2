"""Preference data (DPO pairs, KTO signed examples): rows -> exact token ids -> a prepared dataset.

A `preference` row holds a prompt (`prompt` text, or `prompt`/`messages` as a list of messages
ending with a user turn) and two answers, `chosen` and `rejected`: each a text, one assistant
message, or a list of messages. Hub datasets (UltraFeedback-binarized, HH-RLHF) often write
`chosen` and `rejected` as whole conversations sharing their prompt; then the shared leading
messages are the prompt. An `unpaired` row (KTO) holds a prompt, one `completion` and `label`.

Each side is encoded as one whole conversation, prompt + answer, by the recipe's template, so its
ids are mistral-common's token for token; the shared prompt is then split off where the answers
begin. Rows carry TRL's columns (`prompt_ids`, `chosen_ids`, `rejected_ids`, or `completion_ids`
and `label`) plus a mask per answer: 1 on the assistant tokens and their </s>, 0 on a user turn
inside a multi-turn answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

from qlora_cli.errors import UserError
from qlora_cli.data.images import check_all_images_used, images_of, message_content
from qlora_cli.data.templates import chat_segments, check_roles, encode_prompt

PAIRED, UNPAIRED = "preference", "unpaired"
FORMATS = (PAIRED, UNPAIRED)
# The answer columns of each format: (ids, mask) per answer.
ANSWERS = {PAIRED: ("chosen", "rejected"), UNPAIRED: ("completion",)}


@dataclass
class PreferenceExample:
    """One pair (chosen, rejected) or one signed example (chosen = the completion, `label`)."""

    where: str
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict] | None = None
    label: bool | None = None


def is_preference_data(data) -> bool:
    """Whether the data section's sources are preference data (load_recipe keeps them all alike)."""
    return any(source.format in FORMATS for source in [*data.sources, *data.validation_sources])


# ---------------------------------------------------------------- rows -> examples


def pair_from_row(value: dict, where: str, base: Path | None = None) -> PreferenceExample:
    """A `preference` row (fields as sources.to_example found them) as a checked pair. Images sit
    in the prompt's user messages (data/images.py's parts; the `images` column fills placeholders)."""
    images = _RowImages(value.get("images"), base)
    prompt = _prompt(value, where, images)
    if prompt is None:  # the hub layout: whole conversations sharing their prompt
        prompt, chosen, rejected = _split_shared_prompt(value["chosen"], value["rejected"], where, images)
    else:
        chosen, rejected = _answer(value["chosen"], "chosen", where), _answer(value["rejected"], "rejected", where)
        check_all_images_used(images.row, where)
    for answer in (chosen, rejected):
        _check_conversation(prompt + answer, where)
    if chosen == rejected:
        raise UserError("`chosen` and `rejected` are the same answer: the pair teaches nothing", where=where,
                        fix="give two different answers, or drop the row")
    return PreferenceExample(where, prompt, chosen, rejected)


def signed_from_row(value: dict, where: str, base: Path | None = None) -> PreferenceExample:
    """An `unpaired` row as a checked signed example."""
    images = _RowImages(value.get("images"), base)
    prompt = _prompt(value, where, images)
    check_all_images_used(images.row, where)
    if prompt is None:
        raise UserError("row has no `prompt` or `messages` field, which the `unpaired` format needs", where=where,
                        fix="give the prompt as `prompt` (text or messages) or `messages`, or map it with `columns:`")
    completion = _answer(value["completion"], "completion", where)
    _check_conversation(prompt + completion, where)
    label = value["label"]
    if not isinstance(label, bool):
        raise UserError(f"`label` must be true or false, got {label!r}", where=where,
                        fix="write label: true for a desirable completion, false for an undesirable one")
    return PreferenceExample(where, prompt, completion, label=label)


class _RowImages:
    """A row's `images` column (placeholders take them in order) and where relative paths start."""

    def __init__(self, column, base: Path | None):
        self.row = [] if column is None else list(column) if isinstance(column, list) else [column]
        self.base = base


def _prompt(value: dict, where: str, images: _RowImages | None = None) -> list[dict] | None:
    prompt, messages = value.get("prompt"), value.get("messages")
    if prompt is not None and messages is not None:
        raise UserError("row has both `prompt` and `messages`", where=where, fix="give the prompt in one of them")
    prompt = messages if prompt is None else prompt
    if prompt is None:
        return None
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("`prompt` is empty", where=where)
        return [{"role": "user", "content": prompt}]
    messages = _messages(prompt, "prompt", where, images)
    if messages[-1]["role"] != "user":
        raise UserError("the prompt must end with a user message", where=where,
                        fix="end `prompt`/`messages` with the user turn the answers reply to")
    return messages


def _answer(value, name: str, where: str) -> list[dict]:
    """An answer as messages: a text, one assistant message, or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"`{name}` is empty", where=where, fix="give every answer some text, or drop the row")
        return [{"role": "assistant", "content": value}]
    messages = _messages([value] if isinstance(value, dict) else value, name, where)
    if messages[0]["role"] != "assistant":
        raise UserError(f"`{name}` must start with an assistant message (it starts with {messages[0]['role']})",
                        where=where, fix="give the answer alone, or the whole conversations without `prompt`")
    return messages


def _messages(value, name: str, where: str, images: _RowImages | None = None, row: list | None = None) -> list[dict]:
    """Checked messages; user messages' image parts read (`row`: the images placeholders take,
    the row's own list unless given)."""
    if not isinstance(value, list) or not value:
        raise UserError(f"`{name}` must be text or a non-empty list of {{role, content}} messages", where=where)
    messages = []
    for number, message in enumerate(value, start=1):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and message.get("role"):
            if images is None:
                raise UserError(f"`{name}` message {number} holds parts: images go in the prompt's user messages",
                                where=where, fix="give the answers as text")
            content = message_content(content, message["role"], images.row if row is None else row, images.base,
                                      where, number)
        if not isinstance(content, (str, list)) or not message.get("role"):
            raise UserError(f"`{name}` message {number} needs `role` and text `content`", where=where)
        if message["role"] == "assistant" and not content.strip():
            raise UserError(f"`{name}` message {number} (assistant) is empty", where=where,
                            fix="give every answer some text, or drop the row")
        messages.append({"role": message["role"], "content": content})
    return messages


def _split_shared_prompt(chosen, rejected, where: str, images: _RowImages | None = None):
    """Whole conversations -> (shared prompt, chosen answer, rejected answer). Each conversation
    repeats the prompt's image placeholders, so each takes the row's images from the start."""
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise UserError("row has no `prompt` or `messages` field, and `chosen`/`rejected` are not whole "
                        "conversations to take a shared prompt from", where=where,
                        fix="add the prompt as `prompt` (or map your field with `columns: {prompt: ...}`)")
    chosen = _messages(chosen, "chosen", where, images, list(images.row) if images else None)
    rejected = _messages(rejected, "rejected", where, images, list(images.row) if images else None)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] != "user":  # the prompt ends where the first answer starts
        shared -= 1
    if not shared:
        raise UserError("`chosen` and `rejected` share no prompt (no leading messages up to a user turn)", where=where,
                        fix="give the prompt as `prompt`, and the two answers alone")
    if shared == len(chosen) or shared == len(rejected):
        raise UserError("`chosen` or `rejected` has no answer after the shared prompt", where=where)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_conversation(messages: list[dict], where: str) -> None:
    try:
        check_roles(messages, last="assistant")
    except UserError as err:  # the template knows what is wrong, the row knows where
        raise UserError(err.message, where=where, fix=err.fix) from None


# ---------------------------------------------------------------- examples -> token ids


def encode_preference(example: PreferenceExample, template: str, tokenizer) -> dict:
    """TRL's columns for one example: `prompt_ids` + each answer's ids and loss mask (and `label`)."""
    sides = [example.chosen] if example.rejected is None else [example.chosen, example.rejected]
    try:
        encoded = [_encode_side(example.prompt + answer, template, tokenizer) for answer in sides]
        prompt = encode_prompt(example.prompt, tokenizer, template)
    except UserError as err:  # the template knows what is wrong, the example knows where
        raise UserError(err.message, where=example.where, fix=err.fix) from None
    # The prompt ends where the answers begin, and never beyond what every side shares with it (a
    # v2/v3 system prompt moves into the last user turn, which a multi-turn answer can change).
    prompt_length = min(_shared_length(prompt, ids) for ids, _ in encoded)
    names = ANSWERS[PAIRED] if example.rejected is not None else ANSWERS[UNPAIRED]
    row = {"prompt_ids": encoded[0][0][:prompt_length]}
    if images := images_of(example.prompt):
        row["images"] = [image.data for image in images]
    for name, (ids, mask) in zip(names, encoded):
        row[f"{name}_ids"], row[f"{name}_mask"] = ids[prompt_length:], mask[prompt_length:]
    if example.label is not None:
        row["label"] = example.label
    return row


def _encode_side(messages: list[dict], template: str, tokenizer) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    for piece, trained in chat_segments(messages, tokenizer, template, "responses"):
        ids.extend(piece)
        mask.extend([int(bool(trained))] * len(piece))  # image tokens (NEVER) are never trained
    return ids, mask


def _shared_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def fit_to_length(row: dict, max_length: int) -> dict:
    """A row whose longest side exceeds `max_length`, cut the way that keeps the answers: the
    prompt loses tokens after its BOS (down to half of max_length), then the answers lose their
    ends. The cut prompt still ends right before the answers, as the model will see it."""
    names = [name for name in ("chosen", "rejected", "completion") if f"{name}_ids" in row]
    prompt, longest = row["prompt_ids"], max(len(row[f"{name}_ids"]) for name in names)
    keep = max(max_length - longest, min(len(prompt), max_length // 2))
    if row.get("images"):
        keep = len(prompt)  # a cut through an image's tokens would not match its pixels: the answers are cut
    if keep < len(prompt):
        prompt = prompt[:1] + prompt[len(prompt) - keep + 1:]
    room = max_length - len(prompt)
    cut = {"prompt_ids": prompt}
    for name in names:
        cut[f"{name}_ids"], cut[f"{name}_mask"] = row[f"{name}_ids"][:room], row[f"{name}_mask"][:room]
    return {**row, **cut}


def sequence_lengths(row: dict) -> list[int]:
    """Length of prompt + answer for each side of a row."""
    return [len(row["prompt_ids"]) + len(row[f"{name}_ids"]) for name in ("chosen", "rejected", "completion")
            if f"{name}_ids" in row]


def trained_tokens(row: dict) -> int:
    return sum(sum(row[f"{name}_mask"]) for name in ("chosen", "rejected", "completion") if f"{name}_mask" in row)
