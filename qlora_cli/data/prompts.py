"""Prompt data (`method: grpo`): rows -> the prompt's exact token ids, with the row's other columns.

A `prompt` row holds a prompt, either as `prompt` text or as `messages`, a list of messages ending
with a user turn, plus any other columns (`answer`, `tests`, ...), which reach the reward functions
as they are. The model answers each prompt itself during training, so a row has no answer.

The prompt is encoded by the recipe's template exactly as SFT encodes a conversation up to its
answer (mistral-common's ids, token for token). Rows keep the prompt as the row gave it (TRL hands
text completions to rewards of text prompts, and assistant messages to rewards of conversations)
beside its `prompt_ids`, which the trainer generates from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_cli.errors import UserError
from qlora_cli.data.templates import check_roles, encode_prompt

FORMAT = "prompt"
PROMPT_FIELDS = ("prompt", "messages")
IDS = "prompt_ids"
# What TRL passes to a reward function by name besides the row's columns: a column may not take one.
RESERVED = ("prompts", "completions", "completion_ids", "completion", "trainer_state", "log_extra", "log_metric",
            "environments", IDS)


@dataclass
class PromptExample:
    """One prompt: as the row gave it (text or messages), as messages, and the row's other columns."""

    where: str
    given: str | list[dict]
    messages: list[dict]
    columns: dict = field(default_factory=dict)


def is_prompt_data(data) -> bool:
    """Whether the data section's sources are prompts (load_recipe keeps them all alike)."""
    return any(source.format == FORMAT for source in [*data.sources, *data.validation_sources])


def prompt_from_row(value: dict, columns: dict, where: str) -> PromptExample:
    """A `prompt` row (its prompt fields as sources.to_example found them, and its other columns) as
    a checked example."""
    prompt, messages = value.get("prompt"), value.get("messages")
    if prompt is not None and messages is not None:
        raise UserError("row has both `prompt` and `messages`", where=where, fix="give the prompt in one of them")
    given = messages if prompt is None else prompt
    if given is None:
        raise UserError("row has no `prompt` or `messages` field, which the `prompt` format needs", where=where,
                        fix="give the prompt as `prompt` (text) or `messages`, or map it with `columns:`")
    reserved = sorted(set(columns) & set(RESERVED))
    if reserved:
        raise UserError(f"column `{reserved[0]}` has a name TRL gives its own argument to reward functions",
                        where=where, fix="rename that column in the data")
    return PromptExample(where, _given(given, where), _as_messages(given, where), dict(columns))


def _given(given, where: str):
    if isinstance(given, str):
        return given
    return [{"role": m["role"], "content": m["content"]} for m in _checked_messages(given, where)]


def _as_messages(given, where: str) -> list[dict]:
    if isinstance(given, str):
        if not given.strip():
            raise UserError("`prompt` is empty", where=where, fix="give every row a prompt, or drop the row")
        return [{"role": "user", "content": given}]
    return _checked_messages(given, where)


def _checked_messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise UserError("the prompt must be text or a non-empty list of {role, content} messages", where=where)
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in value]
    if any(isinstance(m["content"], list) for m in messages):
        raise UserError("a GRPO prompt holds content parts (images): prompts for `method: grpo` are text only",
                        where=where, fix="give each message's content as text")
    try:
        check_roles(messages, last="user")
    except UserError as err:  # the template knows what is wrong, the row knows where
        raise UserError(err.message, where=where, fix=err.fix) from None
    return messages


def encode_prompt_row(example: PromptExample, template: str, tokenizer, max_length: int) -> tuple[dict, int]:
    """The prepared row (`prompt` as given, `prompt_ids`, the other columns) and the prompt's length
    before a cut to `max_length`, which keeps its BOS and its last tokens (they lead into the answer)."""
    try:
        ids = list(encode_prompt(example.messages, tokenizer, template))
    except UserError as err:  # the template knows what is wrong, the example knows where
        raise UserError(err.message, where=example.where, fix=err.fix) from None
    length = len(ids)
    if length > max_length:
        ids = ids[:1] + ids[length - max_length + 1:]
    return {"prompt": example.given, IDS: ids, **example.columns}, length


def check_alike(rows: list[dict], where: str) -> None:
    """Every row gives its prompt the same way (text or messages) and has the same columns: TRL reads
    the first prompt to tell text from conversation, and a table needs one type per column."""
    first = rows[0]
    for row in rows[1:]:
        if isinstance(row["prompt"], str) != isinstance(first["prompt"], str):
            raise UserError("some rows give the prompt as text and others as messages", where=where,
                            fix="give every prompt the same way (all `prompt` text, or all `messages`)")
        if row.keys() != first.keys():
            differ = sorted(set(row) ^ set(first))
            raise UserError(f"rows have different columns (`{differ[0]}` is in some rows only)", where=where,
                            fix="give every row the same columns (null where a row has no value)")
