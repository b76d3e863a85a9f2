"""Which modules and tensors of a model get LoRA: the one place that decides, for `qlora plan` (on
the model's skeleton on the meta device, before any weight loads) and for the loader alike.

peft decides what its rules cover, by adding LoRA to the model itself: `all-linear` (every Linear
but the output head), names and regexes, `exclude_modules`, `modules_to_save`,
`layers_to_transform`, and the names transformers 5 gave a v4 model's experts and router (under
`all-linear`, Mixtral's router and its w1/w3 as the fused gate_up_proj, at twice the rank). qlora
adds two rules of its own to the LoraConfig before peft sees it:

- LoRA stays on the language model: a vision tower and its projector
  (`Family.outside_language_model`) get none unless the recipe names them, through peft's
  `exclude_modules`; naming one (`vision_tower`, `multi_modal_projector`) in a list of
  `target_modules` means every Linear layer inside it, and the list's other names still mean the
  language model's layers only (peft alone would refuse the container module, or put `q_proj`'s
  LoRA in the vision tower's attention too);
- fused expert tensors are named in full in `target_parameters` (peft matches a 4-bit,
  parametrized tensor only by its full name), and a name that matches none is the user's
  mistake (peft would only warn): exit 2 at its line.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qlora_cli.errors import UserError
from qlora_cli.families import Family, skipped
from qlora_cli.model.experts import expert_parameters, tensor_shape

if TYPE_CHECKING:
    from peft import LoraConfig

    from qlora_cli.recipe.load import Recipe


@dataclass
class LoraTargets:
    """What LoRA reaches in a model, as `qlora plan` counts it."""

    modules: list[str] = field(default_factory=list)  # the Linear layers peft wraps, by name
    # the tensors outside a Linear (fused experts, a router's weight): (name, experts, out, in, rank)
    tensors: list[tuple[str, int, int, int, int]] = field(default_factory=list)


def lora_config(recipe: Recipe, model, family: Family) -> LoraConfig | None:
    """peft's LoraConfig for `model` (loaded, or a meta-device skeleton): the recipe's `lora`
    section with qlora's two rules; None without one."""
    if recipe.lora is None:
        return None
    # a copy: peft writes what it resolves (all-linear's names, v4 expert names) into the config it is given
    config = kept_to_language_model(named_parts_expanded(copy.deepcopy(recipe.lora), model, family), family)
    names = [f"{name}.{param}" for name, _, param in expert_parameters(model, family.expert_modules)]
    tensors = expert_targets(config, names)
    return dataclasses.replace(config, target_parameters=tensors) if tensors else config


def named_parts_expanded(config: LoraConfig, model, family: Family) -> LoraConfig:
    """`config` with a list of `target_modules` that names a part outside the language model
    (`vision_tower`, `multi_modal_projector`) turned into the full names of the Linear layers
    that LoRA gets: every one inside the named parts, and the language model's that the list's
    other names match (as peft matches a name: the module itself, or ending in `.name`)."""
    import torch

    targets = config.target_modules
    parts = {prefix.rsplit(".", 1)[-1]: prefix for prefix in family.outside_language_model}
    if config.exclude_modules or isinstance(targets, str) or not set(targets or ()) & parts.keys():
        return config
    named = [parts[name] for name in targets if name in parts]
    others = [name for name in targets if name not in parts]
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    chosen = [name for name in linear if skipped(name, tuple(named)) or (
        not skipped(name, family.outside_language_model)
        and any(name == other or name.endswith(f".{other}") for other in others))]
    return dataclasses.replace(config, target_modules=chosen)


def kept_to_language_model(config: LoraConfig, family: Family) -> LoraConfig:
    """`config` with LoRA kept to the language model: `all-linear` and names such as q_proj match
    only its layers, unless the recipe names a module outside it, gives a regex, or sets
    exclude_modules itself."""
    if not family.outside_language_model or config.exclude_modules:
        return config
    targets = config.target_modules
    if isinstance(targets, str) and not _all_linear(config):
        return config  # a regex says exactly what it matches
    outside = [prefix.rsplit(".", 1)[-1] for prefix in family.outside_language_model]
    names = [] if isinstance(targets, str) else list(targets or [])
    if any(part in str(name) for name in names for part in outside):
        return config
    pattern = "|".join(prefix.replace(".", r"\.") for prefix in family.outside_language_model)
    return dataclasses.replace(config, exclude_modules=rf"(?:{pattern})(?:\..*)?")


def expert_targets(config: LoraConfig, names: list[str]) -> list[str]:
    """The expert tensors (of `names`, full names) that LoRA reaches: every one under
    `target_modules: all-linear` without `target_parameters`, else those whose name (or a dotted
    part of it: `experts`, `gate_up_proj`, `mlp.experts.down_proj`) the recipe gives. A name that
    matches none exits 2 at its line."""
    asked = config.target_parameters
    if asked is None:
        return list(names) if _all_linear(config) else []
    matched, unmatched = [], []
    for wanted in asked:
        hits = [n for n in names if skipped(n, (wanted,))]
        matched += [n for n in hits if n not in matched]
        unmatched += [] if hits else [wanted]
    if unmatched:
        have = sorted({n.split(".")[-1] for n in names})
        raise UserError(f"`lora.target_parameters` {unmatched} match no expert tensor of this model "
                        f"({'its experts: ' + ', '.join(have) if have else 'it has no fused experts'}): "
                        "that LoRA would train nothing", key="lora.target_parameters",
                        fix="name experts, gate_up_proj or down_proj, or drop lora.target_parameters")
    return matched


def _all_linear(config: LoraConfig) -> bool:
    from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND

    targets = config.target_modules
    return isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


@contextmanager
def refused_by_peft(config: LoraConfig):
    """Around peft adding LoRA: what it refuses in the recipe's `lora` section exits 2 at its key,
    and its warnings pass on, but for its false one about `config`'s expert tensors."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught, _refusals_as_user_errors():
            warnings.simplefilter("always")
            yield
    finally:
        for warning in caught:  # outside the catching, so that the usual filters apply again
            if not _false_pattern_warning(str(warning.message), config):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _false_pattern_warning(message: str, config: LoraConfig) -> bool:
    """peft warns that a rank/alpha pattern matched no targeted module when it matches a targeted
    tensor (its own `.*\\.gate_up_proj` for fused experts, at twice the rank): those did apply."""
    found = re.match(r"The following (?:rank|alpha)_pattern keys did not match any targeted module "
                     r"and were ignored: (\[.*\])", message)
    if found is None:
        return False
    keys = ast.literal_eval(found[1])
    return all(any(re.match(rf"(.*\.)?({key})$", name) for name in config.target_parameters or ()) for key in keys)


@contextmanager
def _refusals_as_user_errors():
    try:
        yield
    except ValueError as err:
        if "lora_dropout" in str(err):  # peft's LoRA on a tensor cannot drop out its input
            raise UserError(f"LoRA on the experts needs `lora.lora_dropout: 0`: {err}",
                            key="lora.lora_dropout",
                            fix="set lora.lora_dropout=0, or keep LoRA off the experts (target_modules: "
                                "[q_proj, k_proj, v_proj, o_proj])") from None
        if "target" not in str(err).lower():
            raise
        raise UserError(f"`lora.target_modules` does not fit this model: {err}",
                        key="lora.target_modules",
                        fix="name layers the model has, e.g. lora.target_modules=all-linear or [q_proj,v_proj]") from None


def planned_targets(recipe: Recipe, skeleton, family: Family) -> LoraTargets:
    """What LoRA reaches in `skeleton`, a model on the meta device, as peft decides: it adds the
    recipe's LoRA to it (allocating nothing) and this reads off what it wrapped."""
    import torch
    from peft import inject_adapter_in_model

    config = lora_config(recipe, skeleton, family)
    if config is None:
        return LoraTargets()
    # low_cpu_mem_usage still makes a Linear layer's LoRA matrices on the default device: a rank of
    # 100,000,000 asked for 100 GB
    with refused_by_peft(config), torch.device("meta"):
        inject_adapter_in_model(config, skeleton, low_cpu_mem_usage=True)
    targets = wrapped_targets(skeleton)
    check_ranks([(name, module.r["default"], module.in_features, module.out_features)
                 for name, module in _lora_linears(skeleton)], config.r)
    return targets


def _lora_linears(model):
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper)]


def check_ranks(layers: list[tuple[str, int, int, int]], rank: int) -> None:
    """A LoRA rank above the narrower side of a Linear layer it reaches (`layers`: name, rank, in,
    out): B @ A can have no higher rank there, so the extra rank only takes memory. Tensors outside
    a Linear are left alone: a router is as narrow as its count of experts (Mixtral's 8) and
    all-linear gives it the recipe's rank, as peft decides."""
    over = sorted((min(into, out), name, r, f"{out:,} x {into:,}") for name, r, into, out in layers
                  if r > min(into, out))
    if not over:
        return
    width, name, r, shape = over[0]
    key = "lora.r" if r == rank else "lora.rank_pattern"
    raise UserError(f"`{key}` gives {name} rank {r:,}, above its narrower side ({width:,}: it is {shape}); "
                    f"{len(over)} of the {len(layers)} layers LoRA reaches are narrower than the rank",
                    key=key, fix=f"use a rank of at most {width:,} (8-64 is usual), or leave the narrow layers out "
                                 "of lora.target_modules")


def wrapped_targets(model, adapter: str = "default") -> LoraTargets:
    """The Linear layers and tensors peft has wrapped with LoRA in `model`."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    found = LoraTargets()
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):  # nested, one per tensor of a module: peel peft's names
            shape = tuple(tensor_shape(module.get_base_layer(), module.parameter_name))
            experts, out, into = shape if len(shape) == 3 else (1, *shape)
            found.tensors.append((f"{name.replace('.base_layer', '')}.{module.parameter_name}", experts, out, into,
                                  module.r[adapter]))
        elif isinstance(module, LoraLayer):
            found.modules.append(name)
    return found
