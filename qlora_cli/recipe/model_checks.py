"""What transformers would refuse of the `model` section only when it loads, asked before: the
attention implementation (its registry), and the model `init_from_config` describes (built on
the meta device: no memory, no weights)."""

from __future__ import annotations

from qlora_cli.errors import UserError, first_line
from qlora_cli.recipe.probes import blamed_key, quiet_transformers


def check_model_objects(model, lora: dict | None = None) -> list[UserError]:
    """What transformers would refuse of the `model` section when it loads: the attention
    implementation, and the model `init_from_config` describes; and a LoRA rank (`lora`: the
    section as written) wider than every layer of that model."""
    errors = check_attn_implementation(model.attn_implementation)
    if model.init_from_config is not None and model.init_from_config.get("model_type") is not None:
        errors += check_init_model(model.init_from_config) or check_rank(model.init_from_config, lora or {})
    return errors


def check_rank(init_from_config: dict, lora: dict) -> list[UserError]:
    """A rank above the widest side of every layer: the update B @ A can have no rank above that, and
    the matrices would only take memory (an r of 100,000,000 asks for 100 GB per layer)."""
    widths = [init_from_config.get(name) for name in ("hidden_size", "intermediate_size", "vocab_size")]
    widest = max((width for width in widths if isinstance(width, int)), default=None)
    rank = lora.get("r")
    if widest is None or not isinstance(rank, int) or isinstance(rank, bool) or rank <= widest:
        return []
    return [UserError(f"`lora.r` is {rank:,}, above the widest side of any layer of this model ({widest:,}): "
                      "the update can have no higher rank, and its matrices would fill memory", key="lora.r",
                      fix=f"use a rank such as 8-64, at most {widest:,}")]


def check_init_model(init_from_config: dict) -> list[UserError]:
    """Ask transformers to build the model `init_from_config` describes, on the meta device (no
    memory, no weights): its config class and its layers reject what they cannot hold."""
    with quiet_transformers():  # its warnings about the config (a vocabulary of 0) come again when it loads
        return _init_model_errors(init_from_config)


def _init_model_errors(init_from_config: dict) -> list[UserError]:
    from qlora_cli.families import build_init_config, family_of

    written = {k: v for k, v in init_from_config.items() if k not in ("seed", "model_type")}
    errors = size_errors(written, "model.init_from_config")  # before the config class divides by them
    if errors:
        return errors
    try:
        config = build_init_config(init_from_config)
        errors = unknown_key_errors(config, written, "model.init_from_config")
        if errors or family_of(config.model_type).is_vision_language:
            return errors  # a vision-language model's towers are built by another auto class, which judges them
    except UserError:
        return []  # an unsupported model_type, which sections reports
    except Exception as err:  # noqa: BLE001 - every value is the user's, and the config class judges them
        return [UserError(f"transformers cannot build a config from `model.init_from_config`: {first_line(err)}",
                          key="model.init_from_config")]
    heads, kv_heads = (getattr(config, name, None) for name in ("num_attention_heads", "num_key_value_heads"))
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        # grouped-query attention shares each key/value head among a group of heads: such a model
        # builds, and only its first forward pass fails
        key = "model.init_from_config.num_key_value_heads"
        return [UserError(f"`{key}` is {kv_heads}; `num_attention_heads` ({heads}) must be a multiple of it", key=key)]
    message = _init_model_objection(config)
    if message is None:
        return []

    def objection(values: dict) -> str | None:
        return _init_model_objection(build_init_config({**values, "model_type": init_from_config["model_type"]}))

    named = blamed_key(message, {k: v for k, v in init_from_config.items() if k != "model_type"}, objection)
    key = f"model.init_from_config.{named}" if named else "model.init_from_config"
    return [UserError(f"transformers cannot build a {config.model_type} model from `{key}`: {message}", key=key)]


def size_errors(written: dict, prefix: str) -> list[UserError]:
    """Counts and sizes below 1 in `written` (nested dicts for sub-configs): no layers, a vocabulary
    of 0, no heads. Such a model builds, or the config class divides by zero; none can train."""
    errors = []
    for name, value in written.items():
        key = f"{prefix}.{name}"
        if isinstance(value, dict):
            errors += size_errors(value, key)
        elif _is_size(name) and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            errors.append(UserError(f"`{key}` is {value}; a model needs at least 1", key=key))
    return errors


def unknown_key_errors(config, written: dict, prefix: str) -> list[UserError]:
    """The keys of `written` (what the recipe set, nested dicts for sub-configs) that `config`'s class
    has no field for: transformers keeps them as loose attributes, which no layer reads."""
    import dataclasses

    from qlora_cli.recipe.sections import suggest

    if not dataclasses.is_dataclass(config):
        return []
    fields = {field.name for field in dataclasses.fields(config)}
    fields |= {name for name in vars(type(config)()) if not name.startswith("_")}  # what the class derives (head_dim)
    errors = []
    for name, value in written.items():
        key = f"{prefix}.{name}"
        if name == "model_type":
            continue
        if name not in fields and name in vars(config):
            errors.append(UserError(f"`{key}` is not a setting of {type(config).__name__}, and would be ignored"
                                    f"{suggest(name, fields) or _sub_config_hint(config, name)}", key=key,
                                    fix="write a field of the model's config (its config.json's keys)"))
        elif isinstance(value, dict) and dataclasses.is_dataclass(getattr(config, name, None)):
            errors += unknown_key_errors(getattr(config, name), value, key)
    return errors


def _is_size(name: str) -> bool:
    """A count or size of which a model needs at least one (layers, heads, a vocabulary, positions)."""
    return name.startswith("num_") or name.endswith(("_size", "_dim")) or name == "max_position_embeddings"


def _sub_config_hint(config, name: str) -> str:
    import dataclasses

    holders = [field.name for field in dataclasses.fields(config)
               if dataclasses.is_dataclass(sub := getattr(config, field.name, None))
               and name in {inner.name for inner in dataclasses.fields(sub)}]
    holders.sort(key=lambda holder: "text" not in holder)  # the language model's first: what a user trains
    return f" (did you mean `{holders[0]}.{name}`?)" if holders else ""


def _init_model_objection(config) -> str | None:
    import copy

    import torch

    from qlora_cli.families import auto_model_class, family_of

    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > 2:  # every layer is built alike: two show what one cannot hold
        config = copy.deepcopy(config)
        config.num_hidden_layers = 2
    try:
        with torch.device("meta"):
            # the family's own auto class (mistral4 is a text model transformers files under
            # image-text-to-text); vision-language families are not asked
            auto_model_class(family_of(config.model_type)).from_config(config)
    except (ValueError, RuntimeError, TypeError, ArithmeticError) as err:  # hidden_size 0: a division by zero
        return first_line(err)
    return None


def check_attn_implementation(value: str | None) -> list[UserError]:
    """`model.attn_implementation` against transformers' own registry of attention functions (a
    kernel from the Hub, `org/name`, is judged when it loads: it may need a package or a GPU)."""
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if value is None or value in known or is_kernel(value):
        return []
    return [UserError(f"`model.attn_implementation` is {value!r}, which transformers does not know",
                      key="model.attn_implementation",
                      fix=f"use one of {', '.join(known)}, or a Hub kernel like kernels-community/flash-attn")]
