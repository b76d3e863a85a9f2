"""Load the tokenizer a recipe names: a local folder, a hub id, or one shipped with mistral-common."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.atomic import atomic_folder, cache_root
from qlora_cli.errors import UserError
from qlora_cli.families import MISTRAL_COMMON_FILES, MISTRAL_COMMON_PREFIX
from qlora_cli.hub import is_hub_id, unreachable

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

# Where a tekken tokenizer's mistral-common version is kept: in its init kwargs, which
# save_pretrained writes to tokenizer_config.json, so the tokenizer saved with an adapter or a
# merged model (without the model's tekken.json beside it) still formats chats the same way.
VERSION_KEY = "mistral_common_version"
# And its image settings (tekken.json's `image` section), kept the same way; data/images.py reads them.
IMAGE_KEY = "mistral_common_image"
TEKKEN_FILE = "tekken.json"

def load_tokenizer(spec: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Return the fast (tokenizers-backed) tokenizer that `spec` names, with a pad token set."""
    from transformers import AutoTokenizer

    if spec.startswith(MISTRAL_COMMON_PREFIX):
        folder = _converted_mistral_common(spec[len(MISTRAL_COMMON_PREFIX) :])
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif _local_tekken_only(spec):
        tokenizer = AutoTokenizer.from_pretrained(_converted_tekken(Path(spec).expanduser() / TEKKEN_FILE))
    else:
        _check_local_path(spec)
        offline = unreachable() if is_hub_id(spec) else None  # fail at once, not after a minute of retries
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:  # a hub typo offline, a folder without tokenizer files
            if offline:
                raise UserError(f"cannot load tokenizer `{spec}`: the hub is unreachable ({offline}) and it is not "
                                "in the local cache", key="model.tokenizer",
                                fix=f"connect once to download it, or give a folder with its files, or one of "
                                    f"{', '.join(_valid_names())}") from None
            raise UserError(f"cannot load tokenizer `{spec}`: {err}", key="model.tokenizer",
                            fix="give a folder with tokenizer files, a hub id (needs network), or one of "
                                f"{', '.join(_valid_names())}") from None
        if not getattr(tokenizer, "is_fast", False):
            tokenizer = _tekken_instead(tokenizer, spec, revision)
        _record_tekken_version(tokenizer, spec, revision)
    set_pad_token(tokenizer)
    return tokenizer


def tokenizer_spec(model_section) -> str:
    """The tokenizer a recipe names: `model.tokenizer`, else the model's own.

    Never None: load_recipe refuses an `init_from_config` model without `model.tokenizer`."""
    return model_section.tokenizer or model_section.name_or_path


def load_recipe_tokenizer(recipe: Recipe):
    """The recipe's tokenizer, padding set (`set_pad_token`)."""
    model = recipe.model
    return load_tokenizer(tokenizer_spec(model), revision=model.revision, trust_remote_code=model.trust_remote_code)


def _record_tekken_version(tokenizer, spec: str, revision: str | None) -> None:
    """Keep the version the model's tekken.json declares, which is how mistral-common tells it.

    A tekken vocabulary looks the same in every version (they all list [SYSTEM_PROMPT]), and
    the HF tokenizer converted from it carries no version; only tekken.json says whether a
    system prompt goes into the last user message (v3) or between [SYSTEM_PROMPT] tokens (v7).
    """
    if tokenizer.init_kwargs.get(VERSION_KEY):
        return
    from transformers.utils import cached_file

    path = cached_file(spec, TEKKEN_FILE, revision=revision, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        version = raw["config"]["version"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read the version of {path}: {type(err).__name__}: {err}", key="model.tokenizer",
                        fix=f"restore the model's original {TEKKEN_FILE}, or remove it") from None
    tokenizer.init_kwargs[VERSION_KEY] = version
    if image := _image_section(raw):
        tokenizer.init_kwargs[IMAGE_KEY] = image


def _image_section(raw: dict) -> dict | None:
    """tekken.json's image settings (`multimodal` in older files), as mistral-common reads them."""
    return raw.get("image") or raw.get("multimodal") or None


def _local_tekken_only(spec: str) -> bool:
    folder = Path(spec).expanduser()
    return (folder / TEKKEN_FILE).is_file() and not (folder / "tokenizer.json").is_file()


def _tekken_instead(tokenizer, spec: str, revision: str | None):
    """The HF fast tokenizer converted from the model's tekken.json, where transformers gave its
    mistral-common backend (a folder with tekken.json and no tokenizer.json, as Mistral publishes
    its 2025-2026 models): templates need the token-level tokenizer to reproduce mistral-common."""
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    path = cached_file(spec, TEKKEN_FILE, revision=revision, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return tokenizer  # not a Mistral one: the templates say what they cannot do with it
    return AutoTokenizer.from_pretrained(_converted_tekken(Path(path)))


def set_pad_token(tokenizer) -> None:
    """Pad with `<unk>` when the vocab has it, else EOS; keep any other pad token the tokenizer has.

    Mistral tokenizers have no pad token, and fine-tunes often ship pad = EOS. But
    DataCollatorForLanguageModeling masks every pad id in the labels, so padding with EOS would
    mask every EOS and the model would never learn to stop; `<unk>` never occurs in real text.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    unk = tokenizer.unk_token
    tokenizer.pad_token = unk if unk is not None and unk in tokenizer.get_vocab() else tokenizer.eos_token


def describe_padding(tokenizer) -> str:
    """Say which pad token the tokenizer uses, e.g. ``pad token set to <unk> (id 0)``."""
    return f"pad token set to {tokenizer.pad_token} (id {tokenizer.pad_token_id})"


def _check_local_path(spec: str) -> None:
    # A hub id is "name" or "owner/name"; anything else must be an existing path, so a typo fails
    # here with the key to fix instead of as a hub 404 or a network timeout.
    if not is_hub_id(spec) and not Path(spec).expanduser().exists():
        raise UserError(
            f"tokenizer path {spec!r} does not exist",
            key="model.tokenizer",
            fix=f"give an existing folder, a hub id, or one of {', '.join(_valid_names())}",
        )


def _valid_names() -> list[str]:
    return [MISTRAL_COMMON_PREFIX + name for name in MISTRAL_COMMON_FILES]


def _converted_mistral_common(name: str) -> Path:
    """Convert a shipped SentencePiece file to an HF tokenizer once, and return the cached folder."""
    if name not in MISTRAL_COMMON_FILES:
        raise UserError(
            f"unknown tokenizer {MISTRAL_COMMON_PREFIX}{name}",
            key="model.tokenizer",
            fix=f"use one of {', '.join(_valid_names())}",
        )
    if MISTRAL_COMMON_FILES[name].endswith(".json"):
        import mistral_common

        return _converted_tekken(Path(mistral_common.__file__).parent / "data" / MISTRAL_COMMON_FILES[name])
    target = cache_root() / "tokenizers" / f"mistral-common-{name}"
    if not (target / "tokenizer.json").exists():
        _convert_into(MISTRAL_COMMON_FILES[name], target)
    return target


def _convert_into(filename: str, target: Path) -> None:
    import mistral_common
    from transformers import LlamaTokenizer

    source = Path(mistral_common.__file__).parent / "data" / filename
    with atomic_folder(target) as work, tempfile.TemporaryDirectory() as src:
        shutil.copyfile(source, Path(src) / "tokenizer.model")
        # legacy=False: no spurious space after special tokens. add_bos_token: like the hub's
        # Mistral tokenizers, tokenizer("text") starts with <s>.
        LlamaTokenizer.from_pretrained(src, legacy=False, add_bos_token=True).save_pretrained(work)


def _converted_tekken(tekken: Path) -> Path:
    """A tekken.json converted once by transformers' own converter into an HF fast tokenizer,
    cached by its vocabulary (converting takes tens of seconds; versions share a vocabulary), with
    this file's mistral-common version in the tokenizer's config (see VERSION_KEY)."""
    raw = json.loads(tekken.read_text(encoding="utf-8"))
    version = raw["config"].pop("version", None)
    image = _image_section(raw)
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    converted = cache_root() / "tokenizers" / f"tekken-{digest}"
    if not (converted / "tokenizer.json").exists():
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

        with atomic_folder(converted) as work:
            convert_tekken_tokenizer(str(tekken)).save_pretrained(work)
    # "-image": folders converted before image settings were recorded lack them.
    target = cache_root() / "tokenizers" / f"tekken-{digest}-{version}{'-image' if image else ''}"
    if not (target / "tokenizer.json").exists():
        with atomic_folder(target) as work:
            for file in converted.iterdir():
                shutil.copyfile(file, Path(work) / file.name)
            config = json.loads((Path(work) / "tokenizer_config.json").read_text(encoding="utf-8"))
            recorded = {VERSION_KEY: version} | ({IMAGE_KEY: image} if image else {})
            (Path(work) / "tokenizer_config.json").write_text(json.dumps({**config, **recorded}, indent=2))
    return target
