"""Conversations and seed text to exact token ids and loss labels. Pure: no model, only a tokenizer.

The default template, ``mistral``, reproduces mistral-common's reference encoder
(``MistralTokenizer.v1/v2/v3/v7().encode_chat_completion``) token for token:

- v1: ``[INST] {user} [/INST]`` is *text* (SentencePiece, with its dummy prefix space); a system
  prompt goes before the FIRST user message, joined by a blank line; assistant text is kept as is.
- v2/v3: ``[INST]``/``[/INST]`` are control tokens; a system prompt goes before the LAST user
  message; assistant text is ``rstrip(" ")``-ed.
- v7 (and v11, v13): as v3, but the system prompt stays in place between ``[SYSTEM_PROMPT]``
  control tokens.

A SentencePiece vocabulary tells its version by its control tokens; a tekken one does not, so its
version is the one its tekken.json declares (see `tokenizer.load_tokenizer`).

Every piece of text is encoded on its own, as mistral-common does, and then concatenated; encoding
one formatted string would lose the dummy prefix space after each control token.
"""

from __future__ import annotations

import re
from array import array
import weakref
from dataclasses import dataclass
from functools import lru_cache

from qlora_cli.errors import UserError
from qlora_cli.recipe.sections import is_jinja
from qlora_cli.recipe.template_sandbox import bound_chat_templates
from qlora_cli.data.tokenizer import TEKKEN_FILE, VERSION_KEY

IGNORE_INDEX = -100  # the label that the loss skips
TRAIN_ON = ("responses", "all")
SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# Token ids travel as int32 arrays: a word's ids are joined as bytes (a memcpy) and handed to
# numpy without a Python int per token, which is most of what preparing data costs.
Ids = array
Segment = tuple[Ids, "bool | None"]  # token ids, and whether the loss trains on them
NEVER = None  # a segment never trained, whatever train_on says: image tokens


def ids_of(values=()) -> Ids:
    """An int32 array of token ids."""
    return array("i", values)


assert ids_of().itemsize == 4, "array('i') must be 32-bit for numpy int32 views"


# ---------------------------------------------------------------- public API


def encode_chat(
    messages: list[dict], tokenizer, template: str = "mistral", train_on: str = "responses"
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation that ends with an assistant turn."""
    return _ids_and_labels(chat_segments(messages, tokenizer, template, train_on), train_on)


def chat_segments(
    messages: list[dict], tokenizer, template: str = "mistral", train_on: str = "responses"
) -> list[Segment]:
    """The conversation as (token ids, trained) pieces in order: what `encode_chat` labels."""
    _check_train_on(train_on)
    check_roles(messages, last="assistant")
    if template == "mistral":
        return _mistral_segments(messages, tokenizer)
    _refuse_images(messages)
    chat_template = _jinja(template, tokenizer)
    return _chat_template_segments(messages, tokenizer, chat_template, find_answers=train_on != "all")


def encode_prompt(messages: list[dict], tokenizer, template: str = "mistral") -> list[int]:
    """Token ids of a conversation that ends with a user turn, ready for the model to answer.

    Equals the start of ``encode_chat(messages + [answer])`` up to where the answer begins.
    """
    check_roles(messages, last="user")
    if template == "mistral":
        return [i for ids, _ in _mistral_segments(messages, tokenizer) for i in ids]
    _refuse_images(messages)
    chat_template = _jinja(template, tokenizer)
    return _tokenize(tokenizer, _render(tokenizer, messages, chat_template, generation_prompt=True))


def encode_text(text: str, tokenizer, train_on: str = "responses") -> tuple[list[int], list[int]]:
    """Token ids and labels of seed-format text: ``<s>[INST] question [/INST] answer </s>...``."""
    return _ids_and_labels(text_segments(text, tokenizer, train_on), train_on)


def text_segments(text: str, tokenizer, train_on: str = "responses") -> list[Segment]:
    """Seed-format text as (token ids, trained) pieces in order: what `encode_text` labels.

    ``<s>``/``</s>`` become the BOS/EOS ids; BOS is added when missing and never doubled. The
    whitespace around each question and answer is dropped, so ``[/INST] answer </s>`` encodes as
    mistral-common's canonical ``[/INST] answer</s>`` for every version (v2+ rstrip answers anyway;
    v1 would otherwise train a stray space before EOS). With ``responses``, each answer and its
    ``</s>`` are trained; everything else is masked.
    """
    _check_train_on(train_on)
    turns = _parse_turns(text)
    if turns is None:
        if train_on == "responses":
            raise UserError(
                "text does not follow '<s>[INST] question [/INST] answer</s>' (one or more turns)",
                fix="write every turn in that form, use the chat format, or set data.train_on: all",
            )
        return _plain_text_segments(text, tokenizer)
    flavour = _mistral_flavour(tokenizer)
    segments: list[Segment] = [(ids_of([_vocabulary(tokenizer).bos]), False)]
    for index, (bos, question, answer) in enumerate(turns):
        if bos and index > 0:  # a <s> written before a later turn is kept, as the text asks
            segments.append((ids_of([_vocabulary(tokenizer).bos]), False))
        segments.append((_user_ids(tokenizer, flavour, question.strip()), False))
        segments.append((_assistant_ids(tokenizer, flavour, answer.strip()), True))
    return segments


# ---------------------------------------------------------------- checks


def _check_train_on(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise UserError(f"unknown train_on {train_on!r}", fix=f"use one of {', '.join(TRAIN_ON)}")


def check_roles(messages: list[dict], *, last: str) -> None:
    """Roles alternate user/assistant after an optional leading system message, ending with `last`."""
    if not messages:
        raise UserError("the conversation has no messages")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), (str, list)):
            raise UserError(f"message {number} needs a 'role' and a string 'content'")
        for text in _texts(message["content"]):
            try:  # bytes the shell could not decode reach a --prompt as lone surrogates, which no tokenizer encodes
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise UserError(f"message {number} holds {text[err.start:err.end]!r}, which is not "
                                "UTF-8 text (half of a UTF-16 surrogate pair, or an undecodable byte)",
                                fix="write the text as UTF-8") from None
        if isinstance(message["content"], list) and message.get("role") != "user":
            raise UserError(f"message {number} ({message.get('role')}) holds an image: images go in user "
                            "messages only", fix="move the image into the user message before it")
    roles = [m.get("role") for m in messages]
    start = 1 if roles[0] == "system" else 0
    for number, role in enumerate(roles[start:], start=start + 1):
        expected = "user" if (number - start) % 2 == 1 else "assistant"
        if role != expected:
            raise UserError(
                f"roles out of order: {' -> '.join(map(str, roles))}; message {number} has role {role!r} "
                f"where {expected!r} was expected",
                fix="roles must alternate user, assistant, ... after an optional leading system message",
            )
    if len(roles) == start or roles[-1] != last:
        article, purpose = ("an", "to learn from") if last == "assistant" else ("a", "to answer")
        raise UserError(f"the conversation must end with {article} {last} message: it has no {last} turn "
                        f"{purpose} at its end", fix=f"end each conversation with {article} {last} message")


def _refuse_images(messages: list[dict]) -> None:
    if any(isinstance(m["content"], list) for m in messages):
        raise UserError("conversations with images need data.template: mistral (mistral-common's image tokens); "
                        "a Jinja chat template cannot say where an image's tokens go", key="data.template",
                        fix="set data.template: mistral")


def _texts(content) -> list[str]:
    """The text of a message's content: itself, or its text parts (data/images.py's parts)."""
    if isinstance(content, str):
        return [content]
    if not all(isinstance(part, dict) and part.get("type") in ("text", "image") for part in content):
        raise UserError("a message's content parts must be text and image parts")
    return [part["text"] for part in content if part["type"] == "text"]


# ---------------------------------------------------------------- mistral-common's format


def _mistral_flavour(tokenizer) -> str:
    """v1, v2 (same as v3 for chat), v7, or UNKNOWN_TEKKEN: how mistral-common formats chats for it."""
    flavour = _vocabulary(tokenizer).flavour
    if flavour.startswith(UNSUPPORTED):
        raise UserError(f"the tokenizer is mistral-common version {flavour[len(UNSUPPORTED):]}, whose chat format "
                        "template: mistral does not reproduce", key="data.template",
                        fix="set data.template: tokenizer to use the tokenizer's own chat template")
    return flavour


# A tekken vocabulary of no known version: v3 and v7 format it alike until a system prompt.
UNKNOWN_TEKKEN = "v3 or v7"
UNSUPPORTED = "unsupported "  # + the version: refused only where a chat is formatted (plain text needs no format)
# The mistral-common versions whose chats of system, user and assistant text we reproduce (v11
# and v13 format them as v7 does; v15 needs model settings).
_FLAVOUR_OF_VERSION = {"v1": "v1", "v2": "v2", "v3": "v2", "v7": "v7", "v11": "v7", "v13": "v7"}


def _flavour_of(tokenizer, backend, sentencepiece: bool) -> str:
    version = getattr(tokenizer, "init_kwargs", {}).get(VERSION_KEY)
    if version is not None:
        return _FLAVOUR_OF_VERSION.get(version, f"{UNSUPPORTED}{version}")
    if backend.token_to_id("[INST]") is None:
        return "v1"
    if not sentencepiece:  # every tekken vocabulary lists [SYSTEM_PROMPT], v3 ones too
        return UNKNOWN_TEKKEN
    return "v7" if backend.token_to_id("[SYSTEM_PROMPT]") is not None else "v2"


@dataclass
class _Vocabulary:
    """What the templates read of a tokenizer, looked up once: each read of an HF tokenizer's
    attributes costs microseconds, which adds up over millions of messages."""

    flavour: str
    bos: int
    eos: int
    words: "_Words | None"  # None: not a SentencePiece BPE vocabulary whose words encode alone


# Keyed by the tokenizer object itself (identity hash), held weakly: a tokenizer no one uses
# any more takes its cache with it.
_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer) -> _Vocabulary:
    vocabulary = _VOCABULARIES.get(tokenizer)
    if vocabulary is None:
        backend = tokenizer.backend_tokenizer
        vocab = backend.get_vocab(with_added_tokens=False)
        flavour = _flavour_of(tokenizer, backend, sentencepiece=SPACE in vocab)
        # Words encode one by one only when no piece has a "▁" inside it (else words could merge).
        spaced = SPACE in vocab and not any(SPACE in piece[1:] and piece.strip(SPACE) for piece in vocab)
        vocabulary = _Vocabulary(flavour, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                 _Words() if spaced else None)
        _VOCABULARIES[tokenizer] = vocabulary
    return vocabulary


def _mistral_segments(messages: list[dict], tokenizer) -> list[Segment]:
    flavour = _mistral_flavour(tokenizer)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    # Where mistral-common puts a system prompt: v1 the first user message, v2/v3 the last.
    system_at = users[0] if flavour == "v1" else users[-1]
    if system is not None and flavour == UNKNOWN_TEKKEN:
        raise UserError("the conversation has a system prompt, and this tekken tokenizer does not say its "
                        "mistral-common version: v3 puts a system prompt into the last user message, v7 "
                        "between [SYSTEM_PROMPT] tokens", key="model.tokenizer",
                        fix=f"put the model's {TEKKEN_FILE} beside the tokenizer (its `version` decides), "
                            "or set data.template: tokenizer")
    segments: list[Segment] = [(ids_of([_vocabulary(tokenizer).bos]), False)]
    # v7 keeps even an empty system prompt ([SYSTEM_PROMPT][/SYSTEM_PROMPT]); v1-v3 drop it.
    if system is not None and flavour == "v7":
        segments.append((_control_wrapped(tokenizer, "[SYSTEM_PROMPT]", system, "[/SYSTEM_PROMPT]"), False))
    for i, message in enumerate(turns):
        content = message["content"]
        if message["role"] == "assistant":
            segments.append((_assistant_ids(tokenizer, flavour, content), True))
            continue
        prefix = system if system and flavour != "v7" and i == system_at else None
        if isinstance(content, list):
            segments += _user_image_segments(tokenizer, flavour, content, prefix)
            continue
        if prefix:
            content = f"{prefix}\n\n{content}"
        segments.append((_user_ids(tokenizer, flavour, content), False))
    return segments


def _user_image_segments(tokenizer, flavour: str, parts: list[dict], system: str | None) -> list[Segment]:
    """A user message with images, as mistral-common's v3/v7 instruct tokenizers encode chunks:
    adjacent text parts joined by a blank line, a lone trailing image after text moved first,
    each chunk encoded on its own (a v3 system prompt + "\n\n" too, before the first chunk);
    image tokens never trained (NEVER), whatever train_on says."""
    from qlora_cli.data.images import image_tokens

    if flavour == "v1":
        raise UserError("this tokenizer (mistral-common v1) has no image tokens", key="model.tokenizer",
                        fix="use the vision model's own tokenizer (a tekken.json with an image section)")
    settings, ids = _image_encoding(tokenizer)
    chunks = _joined_chunks(parts)
    if len(chunks) >= 2 and not isinstance(chunks[-1], str) and all(isinstance(c, str) for c in chunks[:-1]):
        chunks = [chunks[-1], *chunks[:-1]]  # mistral-common's force_img_first
    backend = tokenizer.backend_tokenizer
    segments: list[Segment] = [(ids_of([backend.token_to_id("[INST]")]), False)]
    if system:
        segments.append((_text_ids(tokenizer, f"{system}\n\n"), False))
    for chunk in chunks:
        if isinstance(chunk, str):
            segments.append((_text_ids(tokenizer, chunk), False))
        else:
            segments.append((ids_of(image_tokens(chunk.width, chunk.height, settings, ids)), NEVER))
    segments.append((ids_of([backend.token_to_id("[/INST]")]), False))
    return segments


def _joined_chunks(parts: list[dict]) -> list:
    """Text runs joined by "\n\n" (empty texts skipped) and images, as mistral-common normalises."""
    chunks: list = []
    for part in parts:
        if part["type"] == "image":
            chunks.append(part["image"])
        elif part["text"]:
            if chunks and isinstance(chunks[-1], str):
                chunks[-1] += "\n\n" + part["text"]
            else:
                chunks.append(part["text"])
    return chunks


def _image_encoding(tokenizer):
    """The tokenizer's image settings and [IMG]/[IMG_BREAK]/[IMG_END] ids, or a UserError."""
    from qlora_cli.data.images import image_settings, image_token_ids

    settings, ids = image_settings(tokenizer), image_token_ids(tokenizer)
    if settings is None or ids is None:
        raise UserError("the conversation holds an image, and the tokenizer is text-only (no image section in its "
                        f"{TEKKEN_FILE}, or no [IMG] tokens)", key="model.tokenizer",
                        fix="use a vision model and its tokenizer (mistral3, pixtral), or remove the images")
    return settings, ids


def _user_ids(tokenizer, flavour: str, content: str) -> Ids:
    if flavour == "v1":  # no control tokens: the markers are plain text, encoded with the content
        return _text_ids(tokenizer, f"[INST] {content} [/INST]")
    return _control_wrapped(tokenizer, "[INST]", content, "[/INST]")


def _assistant_ids(tokenizer, flavour: str, content: str) -> Ids:
    if flavour != "v1":
        content = content.rstrip(" ")  # mistral-common >= v2 drops trailing spaces of answers
    ids = _text_ids(tokenizer, content)
    ids.append(_vocabulary(tokenizer).eos)
    return ids


def _control_wrapped(tokenizer, begin: str, content: str, end: str) -> Ids:
    backend = tokenizer.backend_tokenizer
    return ids_of([backend.token_to_id(begin)]) + _text_ids(tokenizer, content) + ids_of([backend.token_to_id(end)])


# ---------------------------------------------------------------- text exactly as SentencePiece


def _text_ids(tokenizer, text: str) -> Ids:
    """Ids of `text` exactly as mistral-common's SentencePiece encode gives them (dummy prefix included).

    The HF tokenizer cannot be trusted for this: its Metaspace pre-tokenizer skips the dummy prefix
    when text starts with a space, it splits out special tokens written in the text, and its BPE
    merges runs of spaces first where SentencePiece scores whitespace-only pieces lowest (-1e9) and
    merges them last. So we run the BPE model on each "▁word" alone (no piece has a "▁" inside a
    word, so BPE never merges across one; each distinct word is encoded once and remembered) and
    join runs of spaces the way SentencePiece does. Tokenizers without "▁" are not SentencePiece.
    """
    ids = ids_of()
    if not text:
        return ids
    backend = tokenizer.backend_tokenizer
    words = _vocabulary(tokenizer).words
    if words is None:
        return ids_of(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    if "  " not in text and SPACE not in text and text[0] != " " and text[-1] != " ":
        # The common case, at C speed: single spaces, each joined to the next word's first piece.
        try:
            ids.frombytes(b"".join(map(words.joined.__getitem__, text.split(" "))))
            return ids
        except KeyError:  # a word not seen yet, or one that keeps its space apart: the full path
            pass
    run = 0  # spaces before the current word, the dummy prefix included
    for word in text.replace(" ", SPACE).split(SPACE):  # a "▁" in the text counts as a space, as in SentencePiece
        run += 1
        if not word:
            continue
        joined, word_ids = words.get(word) or _encode_word(backend, words, word)
        if not (run == 1 and joined):  # most words: one space, joined to the word's first piece
            ids.extend(_space_run_ids(backend, run - joined))
        ids += word_ids
        run = 0
    if run:
        ids.extend(_space_run_ids(backend, run))
    return ids


def _encode_word(backend, words: dict, word: str) -> tuple[bool, Ids]:
    """Whether SentencePiece joins a space to `word`'s first piece, and the word's ids after it."""
    word_ids = ids_of(token.id for token in backend.model.tokenize(SPACE + word))
    joined = word_ids[0] != backend.token_to_id(SPACE)
    words[word] = (joined, word_ids if joined else word_ids[1:])
    if joined:
        words.joined[word] = word_ids.tobytes()
    return words[word]


class _Words(dict):
    """word -> (joined, ids after the space) memo; `joined` maps the words whose single space
    joins their first piece straight to their ids as int32 bytes, all the common case needs."""

    def __init__(self):
        super().__init__()
        self.joined: dict[str, bytes] = {}


def _space_run_ids(backend, length: int) -> list[int]:
    if length <= 1:
        return [backend.token_to_id(SPACE)] * length
    return [backend.token_to_id(SPACE * n) for n in _space_run_split(length, _space_piece_lengths(backend))]


def _space_piece_lengths(backend) -> frozenset[int]:
    lengths, n = set(), 1
    while n <= 64:
        if backend.token_to_id(SPACE * n) is not None:
            lengths.add(n)
        n += 1
    return frozenset(lengths)


@lru_cache(maxsize=4096)
def _space_run_split(length: int, piece_lengths: frozenset[int]) -> tuple[int, ...]:
    """Piece lengths SentencePiece's BPE makes of `length` spaces: all such pieces score the same,
    so it repeatedly merges the leftmost adjacent pair whose join is a piece."""
    pieces = [1] * length
    while True:
        for i in range(len(pieces) - 1):
            if pieces[i] + pieces[i + 1] in piece_lengths:
                pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
                break
        else:
            return tuple(pieces)


# ---------------------------------------------------------------- seed text format

_TURN = re.compile(r"\s*(<s>)?\s*\[INST\](.*?)\[/INST\](.*?)</s>", re.S)


def _parse_turns(text: str) -> list[tuple[str | None, str, str]] | None:
    """(bos, question, answer) per turn, or None when the text is not all such turns."""
    turns, pos = [], 0
    while match := _TURN.match(text, pos):
        if "<s>" in match.group(2) + match.group(3):
            return None
        turns.append(match.groups())
        pos = match.end()
    return turns if turns and not text[pos:].strip() else None


def _plain_text_segments(text: str, tokenizer) -> list[Segment]:
    """Any text: <s>/</s> become BOS/EOS, the rest is text; one BOS at the start, never two."""
    body = text.strip()
    body = body[len("<s>") :] if body.startswith("<s>") else body  # the BOS below stands for it
    markers = {"<s>": _vocabulary(tokenizer).bos, "</s>": _vocabulary(tokenizer).eos}
    ids = ids_of([_vocabulary(tokenizer).bos])
    for piece in re.split(r"(<s>|</s>)", body):
        if piece in markers:
            ids.append(markers[piece])
        elif piece.strip():
            ids += _text_ids(tokenizer, piece.strip())
    return [(ids, True)]


# ---------------------------------------------------------------- Jinja chat templates


def _jinja(template: str, tokenizer) -> str | None:
    """The chat template to render with: None = the tokenizer's own, else the recipe's Jinja text."""
    if template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the tokenizer has no chat_template",
                key="data.template",
                fix="use template: mistral, or write a Jinja chat template in data.template",
            )
        return None
    if not is_jinja(template):
        raise UserError(
            f"unknown template {template!r}",
            key="data.template",
            fix="use mistral, tokenizer, or a Jinja chat template",
        )
    return template


def _render(tokenizer, messages: list[dict], chat_template: str | None, *, generation_prompt: bool) -> str:
    import jinja2

    bound_chat_templates()
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except jinja2.exceptions.SecurityError as err:
        raise UserError(f"the chat template ({_template_key(chat_template)}) did something Jinja's sandbox forbids: "
                        f"{err}", fix="templates may read the messages, not Python attributes, and make nothing huge"
                        ) from None
    except (jinja2.TemplateError, TypeError, ArithmeticError) as err:  # raise_exception(...), {{ 1 / 0 }}, ...
        raise UserError(f"the chat template ({_template_key(chat_template)}) failed on this conversation: {err}",
                        fix="fix the template, or use template: mistral") from None
    except (RecursionError, MemoryError) as err:  # a macro that calls itself; what the sandbox's bounds let by
        why = "calls itself without end" if isinstance(err, RecursionError) else "ran out of memory"
        raise UserError(f"the chat template ({_template_key(chat_template)}) {why} on this conversation",
                        fix="fix the template, or use template: mistral") from None


def _template_key(chat_template: str | None) -> str:
    return "the tokenizer's own" if chat_template is None else "data.template"


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids  # templates write their own BOS


def _chat_template_segments(
    messages: list[dict], tokenizer, chat_template: str | None, *, find_answers: bool
) -> list[Segment]:
    """Render, tokenize once, and find each answer by rendering the conversation up to it.

    A Jinja template is opaque: the only way to know which characters belong to an answer is to
    render the conversation before it (with the generation prompt) and up to it, and compare.
    This needs a template that renders earlier turns the same whatever follows; one that moves
    text around (e.g. a system prompt into the last user turn) cannot be masked this way.
    """
    full = _render(tokenizer, messages, chat_template, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not find_answers:
            continue
        before = _render(tokenizer, messages[:i], chat_template, generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], chat_template, generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise UserError(
                "the chat template renders earlier turns differently as the conversation grows,"
                " so the answers cannot be told apart from the prompts",
                key="data.template",
                fix="use template: mistral, or set data.train_on: all",
            )
        spans.append((len(before), len(upto)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    segments = []
    for token_id, (start, _) in zip(encoding.input_ids, encoding.offset_mapping):
        segments.append((ids_of([token_id]), any(a <= start < b for a, b in spans)))
    return segments


# ---------------------------------------------------------------- labels


def _ids_and_labels(segments: list[Segment], train_on: str) -> tuple[list[int], list[int]]:
    input_ids, labels = [], []
    for ids, trained in segments:
        input_ids.extend(ids)
        labels.extend(ids if trained or (train_on == "all" and trained is not NEVER) else [IGNORE_INDEX] * len(ids))
    return input_ids, labels
