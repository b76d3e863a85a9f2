"""The Jinja chat template that renders the ids qlora trains on, for the model folders it writes.

`templates.py` builds the ids piece by piece, as mistral-common does; an engine (transformers'
`apply_chat_template`, vLLM, TGI, llama.cpp, LM Studio) only has a Jinja template and its own
tokenizer. So the template written beside a model must render text that the engine's tokenizer
turns into those same ids. Two facts decide the text:

- SentencePiece vocabularies (v1, v2/v3, v7) encode every piece of text with a dummy prefix space
  ("▁word"). transformers' converted tokenizer adds it only at the start of the whole text, so the
  template writes the space itself after each control token; llama.cpp adds it after every
  special token by itself (its `add_space_prefix`), so its template must not. `ENGINES` names both.
- tekken vocabularies have no dummy prefix: the text follows the control tokens directly.

Where a message's text itself is not what SentencePiece would encode alone (runs of spaces, a
leading space, the text of a control token), the engines' tokenizers split it otherwise than
mistral-common; no template can change that, and qlora's own encoder stays the reference.
"""

from __future__ import annotations

from pathlib import Path

from qlora_cli.data.templates import SPACE, UNKNOWN_TEKKEN, _mistral_flavour
from qlora_cli.recipe.sections import is_jinja

# The engines whose tokenizers the template is written for: does it add SentencePiece's dummy
# prefix after a special token by itself?
ENGINES = {"transformers": False, "llama.cpp": True}


def chat_template(tokenizer, template: str = "mistral", *, engine: str = "transformers") -> str | None:
    """The Jinja chat template for `data.template` (None: the tokenizer has none of its own)."""
    if template == "tokenizer":
        return getattr(tokenizer, "chat_template", None)
    if is_jinja(template):
        return template  # the recipe's own: qlora trained on what apply_chat_template renders
    return mistral_chat_template(tokenizer, engine=engine)


def save_tokenizer(tokenizer, folder: Path | str, template: str = "mistral") -> None:
    """`tokenizer.save_pretrained(folder)` with the chat template it was trained with in
    tokenizer_config.json (where every engine looks; transformers alone reads chat_template.jinja)."""
    previous = tokenizer.chat_template
    tokenizer.chat_template = chat_template(tokenizer, template)
    try:
        tokenizer.save_pretrained(str(folder), save_jinja_files=False)
    finally:
        tokenizer.chat_template = previous


def mistral_chat_template(tokenizer, *, engine: str = "transformers") -> str:
    """mistral-common's chat format for this tokenizer's version, as one Jinja template."""
    flavour = _mistral_flavour(tokenizer)
    sentencepiece = tokenizer.backend_tokenizer.token_to_id(SPACE) is not None
    # The text that stands for the dummy prefix after a control token.
    space = " " if sentencepiece and not ENGINES[engine] else ""
    return "".join([
        _HEAD,
        "{%- set space = " + repr(space) + " %}",
        _SYSTEM_AT[flavour],
        "{{- bos_token }}",
        _SYSTEM_PROMPT if flavour == "v7" else "",
        "{%- for message in loop_messages %}",
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
        "{{- raise_exception('roles must alternate user, assistant, ... after an optional system message') }}",
        "{%- endif %}",
        "{%- if message['role'] == 'user' %}",
        "{%- set content = message['content'] %}",
        "{%- if system and loop.index0 == ns.system_at %}{%- set content = system + '\\n\\n' + content %}{%- endif %}",
        _USER_V1 if flavour == "v1" else _USER,
        "{%- else %}",
        _ASSISTANT_V1 if flavour == "v1" else _ASSISTANT,
        "{%- endif %}",
        "{%- endfor %}",
    ])


_HEAD = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set has_system = true %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system = '' %}{%- set has_system = false %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- set ns = namespace(first=-1, last=-1) %}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if ns.first < 0 %}{%- set ns.first = loop.index0 %}{%- endif %}{%- set ns.last = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
)

# Where a (non-empty) system prompt joins a user message: v1 the first, v2/v3 the last; v7 keeps
# it apart (-1). A tekken tokenizer of unknown version cannot tell v3 from v7.
_SYSTEM_AT = {
    "v1": "{%- set ns.system_at = ns.first %}",
    "v2": "{%- set ns.system_at = ns.last %}",
    "v7": "{%- set ns.system_at = -1 %}",
    UNKNOWN_TEKKEN: "{%- if has_system %}{{- raise_exception('this tokenizer does not say whether its system "
                    "prompt goes into the last user message (v3) or between [SYSTEM_PROMPT] tokens (v7)') }}"
                    "{%- endif %}{%- set ns.system_at = -1 %}",
}

# v7 keeps even an empty system prompt, between its control tokens.
_SYSTEM_PROMPT = ("{%- if has_system %}[SYSTEM_PROMPT]{%- if system %}{{- space + system }}{%- endif %}"
                  "[/SYSTEM_PROMPT]{%- endif %}")

# v1: [INST] and [/INST] are text, encoded with the message (dummy prefix first).
_USER_V1 = "{{- space + '[INST] ' + content + ' [/INST]' }}"
_ASSISTANT_V1 = "{{- ' ' + message['content'] + eos_token }}"  # text after text: its own prefix, always written

# v2 and later: control tokens around each text; answers lose their trailing spaces.
_USER = "{{- '[INST]' }}{%- if content %}{{- space + content }}{%- endif %}{{- '[/INST]' }}"
_ASSISTANT = ("{%- set answer = message['content'].rstrip(' ') %}"
              "{%- if answer %}{{- space + answer }}{%- endif %}{{- eos_token }}")
