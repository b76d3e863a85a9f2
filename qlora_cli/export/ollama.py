"""`qlora export --to ollama`: the GGUF and a Modelfile (FROM, TEMPLATE, stop parameters, SYSTEM).

Ollama's TEMPLATE is a Go template, not Jinja; it is written here from the same per-version facts
as `data/chat_template.py` (where the system prompt goes, v1's text markers, v2+'s control tokens
with a space before each text on SentencePiece vocabularies as Ollama's own Mistral templates
write it, none on tekken ones). Ollama adds BOS itself. What Ollama's tokenizer makes of the
rendered text cannot be checked without Ollama: the docs say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.data.templates import SPACE, UNKNOWN_TEKKEN, _mistral_flavour

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe


def write_modelfile(recipe: Recipe, folder: Path, gguf_name: str, projector: str | None = None) -> Path:
    """`folder/Modelfile` for the GGUF `gguf_name` beside it, and a vision model's `projector`
    GGUF as a second FROM (Ollama files a clip-architecture GGUF as the model's projector)."""
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    tokenizer = load_recipe_tokenizer(recipe)
    lines = [f"FROM ./{gguf_name}", *([f"FROM ./{projector}"] if projector else []), f'TEMPLATE """{ollama_template(tokenizer)}"""',
             *(f'PARAMETER stop "{stop}"' for stop in stop_words(tokenizer))]
    system = recipe.generate.options.system_prompt
    if system:
        lines.append(f'SYSTEM """{system}"""')
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stop_words(tokenizer) -> list[str]:
    """EOS, and the next user turn's marker should the model run on into it."""
    return [tokenizer.eos_token, "[INST]"]


def ollama_template(tokenizer) -> str:
    """The Mistral format of this tokenizer's version as an Ollama (Go) TEMPLATE."""
    flavour = _mistral_flavour(tokenizer)
    space = " " if tokenizer.backend_tokenizer.token_to_id(SPACE) is not None else ""
    eos = tokenizer.eos_token
    if flavour == "v1":  # the system prompt joins the first user message; markers are text
        return ('{{- $first := true }}{{- range .Messages }}{{- if eq .Role "user" }} [INST] '
                '{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }} [/INST]{{ $first = false }}'
                '{{- else if eq .Role "assistant" }} {{ .Content }}' + eos + '{{ end }}{{- end }}')
    system_first = ""
    if flavour == "v7":
        system_first = "{{- if .System }}[SYSTEM_PROMPT]" + space + "{{ .System }}[/SYSTEM_PROMPT]{{ end }}"
    last_user = "" if flavour in ("v7", UNKNOWN_TEKKEN) else \
        '{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}'
    return (system_first + '{{- range $i, $m := .Messages }}{{- if eq .Role "user" }}[INST]' + space + last_user
            + '{{ .Content }}[/INST]{{- else if eq .Role "assistant" }}' + space + '{{ .Content }}' + eos
            + '{{ end }}{{- end }}')
