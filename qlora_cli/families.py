"""The one place that knows Mistral model families: how each loads, which modules are its
language model, what stays in 16 bits.

A family is keyed by the `model_type` of a transformers config. Everything else reads this
table: the loader (which auto class), `init_from_config` (the defaults a real checkpoint has),
LoRA's `all-linear` and the 4-bit quantization (only the language model's Linear layers),
merge, generate and `qlora plan`. Adding a family is adding an entry here and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_cli.errors import UserError, did_you_mean


MISTRAL_COMMON_PREFIX = "mistral-common:"  # `model.tokenizer: mistral-common:v1`
# The SentencePiece files that mistral-common ships in mistral_common/data/, by the name a recipe uses.
MISTRAL_COMMON_FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    # tekken (tiktoken-style BPE, 131k vocabulary): Mistral Nemo's, and its 2409 successor's.
    "tekken_240718": "tekken_240718.json",
    "tekken_240911": "tekken_240911.json",
}

CAUSAL_LM = "AutoModelForCausalLM"
IMAGE_TEXT_TO_TEXT = "AutoModelForImageTextToText"
# The language-model types a vision-language config may nest under its text_config.
TEXT_MODEL_TYPES = ("mistral", "ministral", "ministral3")


@dataclass(frozen=True)
class Family:
    """How qlora loads and fine-tunes the checkpoints of one `model_type`."""

    model_type: str
    checkpoints: str  # the published models of this type, for messages and docs
    auto_class: str = CAUSAL_LM
    # Module-name prefixes outside the language model: kept in 16 bits (never quantized) and
    # given no LoRA unless the recipe names them. The output head stays 16-bit in every family.
    outside_language_model: tuple[str, ...] = ()
    # The config holds the language model's config under this key (vision-language models).
    text_config_key: str | None = None
    # Values a real checkpoint's config.json has where the transformers class has none or another.
    defaults: dict = field(default_factory=dict)
    # Module-name suffixes of the modules that hold fused 3-D expert tensors (experts x out x in):
    # quantized to 4 bits after loading and given LoRA through peft's target_parameters
    # (see qlora_cli.model.experts). The router and shared experts are ordinary modules.
    expert_modules: tuple[str, ...] = ()
    # The model types its text_config may have (vision-language models); TEXT_MODEL_TYPES if unset.
    text_model_types: tuple[str, ...] = ()
    # The model types its vision_config may have (vision-language models): Mistral's Pixtral tower.
    vision_model_types: tuple[str, ...] = ()

    @property
    def is_vision_language(self) -> bool:
        return self.text_config_key is not None


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in [
        Family("mistral", "Mistral 7B v0.1-v0.3, Mistral Nemo 12B, Codestral 22B, Devstral, Magistral (text)"),
        # MinistralConfig leaves head_dim unset and its attention then fails (None ** -0.5);
        # Ministral-8B-Instruct-2410 has hidden_size / num_attention_heads (4096 / 32 = 128).
        Family("ministral", "Ministral 8B (2410)", defaults={"head_dim": None}),
        Family("ministral3", "Ministral 3 3B / 8B / 14B (text only)"),
        # Mistral3Config ties lm_head to the embeddings by default; the 24B checkpoints (Mistral
        # Small 3.1 / 3.2, Magistral Small, Devstral Small) do not (init_from_config may set it).
        # Mistral Small 4 with its vision tower is a mistral3 whose text model is a mistral4 (MoE).
        Family("mistral3", "Mistral Small 3.1 / 3.2 24B, Magistral Small 2509, Devstral Small, Ministral 3 "
               "3B / 8B / 14B, Mistral Small 4 (vision-language)", auto_class=IMAGE_TEXT_TO_TEXT,
               outside_language_model=("model.vision_tower", "model.multi_modal_projector"),
               text_config_key="text_config", defaults={"tie_word_embeddings": False},
               expert_modules=("mlp.experts",), text_model_types=(*TEXT_MODEL_TYPES, "mistral4"),
               vision_model_types=("pixtral",)),
        # Pixtral 12B as transformers converts it (mistral-community/pixtral-12b): a Llava with a
        # Pixtral vision tower and a Mistral Nemo text model. A Llava of another vision tower
        # (CLIP, SigLIP) is not a Mistral model.
        Family("llava", "Pixtral 12B (2409, vision-language)", auto_class=IMAGE_TEXT_TO_TEXT,
               outside_language_model=("model.vision_tower", "model.multi_modal_projector"),
               text_config_key="text_config",
               # [IMG] is 10 in tekken; Pixtral has no CLS token for Llava's "default" strategy to drop
               defaults={"tie_word_embeddings": False, "image_token_index": 10, "vision_feature_select_strategy": "full"},
               text_model_types=("mistral",), vision_model_types=("pixtral",)),
        Family("mixtral", "Mixtral 8x7B / 8x22B", expert_modules=("mlp.experts",)),
        # transformers lists Mistral Small 4 as image-text-to-text; that auto class gives its
        # causal LM (MLA attention, 128 routed experts + a shared expert per layer).
        Family("mistral4", "Mistral Small 4 (119B, 128 experts)", auto_class=IMAGE_TEXT_TO_TEXT,
               expert_modules=("mlp.experts",)),
        Family("mistral_large4", "Mistral Large 4 (vision-language)", auto_class=IMAGE_TEXT_TO_TEXT,
               outside_language_model=("model.vision_tower", "model.multi_modal_projector"),
               text_config_key="text_config", expert_modules=("mlp.experts",),
               text_model_types=("mistral_large4_text",), vision_model_types=("pixtral",)),
    ]
}


def text_types(family: Family) -> tuple[str, ...]:
    """The model types a vision-language family's text_config may have."""
    return family.text_model_types or TEXT_MODEL_TYPES


def supported_types() -> str:
    return ", ".join(FAMILIES)


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Whether module (or tensor) `name` is one of `skip` or inside one (`llm_int8_skip_modules`)."""
    return any(name == m or name.endswith(f".{m}") or f".{m}." in f".{name}." for m in skip)


def family_of(model_type: str | None, *, key: str = "model_type", where: str | None = None,
              named: str | None = None) -> Family:
    """The family of a `model_type`; exit 2 for a type qlora does not support, naming it as `named`
    (default: `key`), placed at `where` or else where the recipe set `key`."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UserError(f"`{named or key}` is {model_type!r}{did_you_mean(str(model_type), FAMILIES)}, a model type qlora "
                        f"does not support (supported: {supported_types()})", where=where, key=key,
                        fix="fine-tune a Mistral checkpoint of one of those types, or give init_from_config one "
                            "of those model_type values")
    return family


def init_config_errors(init_config: dict) -> list[UserError]:
    """What `init_from_config` would fail on, found before anything loads: an unsupported
    model_type, a vision-language config without the text_config of its language model."""
    key = "model.init_from_config"
    model_type = init_config.get("model_type")
    if model_type is None:
        return []  # sections reports the missing model_type
    try:
        family = family_of(model_type, key=f"{key}.model_type")
    except UserError as err:
        return [err]
    if not family.is_vision_language:
        return []
    text_key = f"{key}.{family.text_config_key}"
    text = init_config.get(family.text_config_key)
    if not isinstance(text, dict):
        return [UserError(f"a `{model_type}` model needs `{text_key}`: the config of its language model",
                          key=key,
                          fix=f"add {family.text_config_key}: {{model_type: mistral, hidden_size: ..., "
                              "num_hidden_layers: ...} (and vision_config: {model_type: pixtral, ...})")]
    allowed = text_types(family)
    text_type = text.get("model_type", allowed[0])
    if text_type not in allowed:
        return [UserError(f"`{text_key}.model_type` is {text_type!r}{did_you_mean(str(text_type), allowed)}, "
                          f"not a language model qlora supports in `{model_type}` ({', '.join(allowed)})",
                          key=f"{text_key}.model_type",
                          fix=f"use one of {', '.join(allowed)}")]
    vision = init_config.get("vision_config")
    vision_type = vision.get("model_type") if isinstance(vision, dict) else None  # None: Pixtral (build_init_config)
    if vision_type is not None and family.vision_model_types and vision_type not in family.vision_model_types:
        return [UserError(f"`{key}.vision_config.model_type` is {vision_type!r}, not a vision tower of Mistral's "
                          f"(`{model_type}` takes {', '.join(family.vision_model_types)})",
                          key=f"{key}.vision_config.model_type", fix="use model_type: pixtral")]
    return []


def build_init_config(init_config: dict, tokenizer=None):
    """The transformers config `init_from_config` describes, with the defaults a real
    checkpoint of its family has and the tokenizer's vocabulary size and special ids (without a
    tokenizer, to validate a recipe: the config class's own)."""
    from transformers import AutoConfig

    values = {k: v for k, v in init_config.items() if k not in ("seed", "model_type")}
    family = family_of(init_config.get("model_type"), key="model.init_from_config.model_type")
    ids = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                        "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    if family.vision_model_types:  # LlavaConfig's own default is a CLIP tower
        values["vision_config"] = {"model_type": family.vision_model_types[0], **(values.get("vision_config") or {})}
    if family.is_vision_language:
        text = dict(values.get(family.text_config_key) or {})
        text_type = text.setdefault("model_type", text_types(family)[0])
        text_family = FAMILIES.get(text_type, Family(text_type, "the language model of " + family.checkpoints))
        values[family.text_config_key] = {**ids, **_with_defaults(text_family, text)}
    else:
        values = {**ids, **values}
    values = _with_defaults(family, values)
    try:
        return AutoConfig.for_model(family.model_type, **values)
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot build a config from `model.init_from_config`: {err}",
                        key="model.init_from_config") from None


def _with_defaults(family: Family, values: dict) -> dict:
    values = {**family.defaults, **values}
    if "head_dim" in family.defaults and values.get("head_dim") is None:
        heads = values.get("num_attention_heads") or _class_default(family.model_type, "num_attention_heads")
        values["head_dim"] = (values.get("hidden_size") or _class_default(family.model_type, "hidden_size")) // heads
    return values


def _class_default(model_type: str, name: str):
    from transformers import AutoConfig

    return getattr(AutoConfig.for_model(model_type), name)


def checkpoint_family(config, *, trust_remote_code: bool = False, where: str | None = None) -> Family:
    """The family of a checkpoint's config. A model that ships its own code, which the recipe
    trusts (`model.trust_remote_code`), loads as the causal LM its code defines."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES and trust_remote_code and getattr(config, "auto_map", None):
        return Family(str(model_type), "a model with its own code")
    family = family_of(model_type, key="model.name_or_path", where=where, named="model_type in its config.json")
    vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
    if family.vision_model_types and vision_type not in family.vision_model_types:
        raise UserError(f"the checkpoint is a `{model_type}` with a `{vision_type}` vision tower, not Mistral's "
                        f"({', '.join(family.vision_model_types)}): not a Mistral model", where=where,
                        key="model.name_or_path", fix="fine-tune a Mistral checkpoint (Pixtral 12B is a llava with a "
                                                      "pixtral vision_config)")
    return family


def auto_model_class(family: Family):
    """The transformers auto class that loads this family's checkpoints."""
    import transformers

    return getattr(transformers, family.auto_class)


def kept_16bit(family: Family, quantization: dict | None) -> dict | None:
    """The quantization section with the modules outside the language model kept in 16 bits.

    transformers quantizes every Linear but the output head; a vision tower and its projector
    stay as trained unless the recipe lists `llm_int8_skip_modules` itself (its list replaces
    transformers' defaults, lm_head included)."""
    if not quantization or not family.outside_language_model or quantization.get("llm_int8_skip_modules"):
        return quantization
    return {**quantization, "llm_int8_skip_modules": [*family.outside_language_model, "lm_head"]}
