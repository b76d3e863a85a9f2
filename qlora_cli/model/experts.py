"""Mixture-of-experts weights in 4 bits, and LoRA on them.

transformers 5 stores the experts of a MoE layer as fused 3-D parameters (experts x out x in)
of one module, not as `nn.Linear` layers, so bitsandbytes' Linear replacement leaves them in
16/32 bits: nearly all of Mixtral's weights. Each of them is quantized here as it loads (see
`quantizing_experts_on_load`), with bitsandbytes' own primitive for parameters outside `nn.Linear`
(`bitsandbytes.nn.parametrize.replace_parameter_4bit`): the uint8 codes and their quantization
state replace the tensor, and a torch parametrization dequantizes it when the experts' own
forward reads it. LoRA reaches those tensors through peft's `target_parameters`.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch.nn.utils.parametrize as P
from torch import nn

from qlora_cli.errors import UserError
from qlora_cli.families import skipped

# bitsandbytes' 4-bit block: one absmax scale per 64 consecutive weights.
BLOCK = 64


def expert_parameters(model, expert_modules: tuple[str, ...]) -> list[tuple[str, object, str]]:
    """(module name, module, parameter name) of every fused 3-D expert tensor, in model order.

    `expert_modules` are the module-name suffixes the family keeps its experts under
    (`mlp.experts`). A peft model is looked through: its wrappers' names do not count."""
    found = []
    for name, module in model.named_modules():
        plain = name.replace(".base_layer", "")
        if not is_expert_module(plain, expert_modules):
            continue
        if type(module).__name__ == "ParamWrapper":
            continue  # peft's wrapper: the experts module is its base_layer
        for param_name in _parameter_names(module):
            if len(tensor_shape(module, param_name)) == 3:
                found.append((plain, module, param_name))
    return found


def is_expert_module(name: str, expert_modules: tuple[str, ...]) -> bool:
    """Whether the module called `name` is one the family keeps its experts under (a suffix)."""
    return any(name == suffix or name.endswith(f".{suffix}") for suffix in expert_modules)


def _parameter_names(module) -> list[str]:
    names = [n for n, _ in module.named_parameters(recurse=False)]
    names += list(getattr(module, "parametrizations", {}).keys())  # already quantized or LoRA-wrapped
    return sorted(set(names))


def tensor_shape(module, param_name: str):
    """The logical shape of a parameter, without dequantizing a 4-bit one."""
    if is_quantized(module, param_name):
        return module.parametrizations[param_name][0].quant_state.shape
    return getattr(module, param_name).shape


def is_quantized(module, param_name: str) -> bool:
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    parametrizations = getattr(module, "parametrizations", {})
    plist = parametrizations[param_name] if param_name in parametrizations else []
    return any(isinstance(p, Bnb4bitParametrization) for p in plist)


def quantize_experts(model, expert_modules: tuple[str, ...], quantization: dict | None) -> int:
    """Store every expert tensor of `model` in 4 bits as the recipe's `quantization` says
    (`bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`, BitsAndBytesConfig's defaults filled in:
    recipe.library_fields.quantization_values); expert modules under a name in
    `llm_int8_skip_modules` stay as loaded. Returns how many tensors were quantized.

    Per expert: a 4-bit block never spans two experts (each expert's matrix holds a whole
    number of 64-weight blocks), so every expert has its own scales, as a Linear layer would."""
    skip = _kept_as_loaded(quantization)
    if skip is None:
        return 0
    count = 0
    for name, module, param_name in expert_parameters(model, expert_modules):
        if is_quantized(module, param_name) or skipped(f"{name}.{param_name}", skip):
            continue
        shape = tensor_shape(module, param_name)
        if not _whole_blocks(shape):
            raise UserError(f"expert tensor `{name}.{param_name}` {tuple(shape)} does not split into "
                            f"{BLOCK}-weight blocks per expert", key="model",
                            fix=f"keep it 16-bit with quantization.llm_int8_skip_modules=[{name}]")
        _quantize(module, param_name, quantization)
        count += 1
    return count


def _kept_as_loaded(quantization: dict | None) -> tuple[str, ...] | None:
    """The module names whose experts stay as loaded (`llm_int8_skip_modules`); None when the
    recipe quantizes nothing to 4 bits."""
    if not quantization or not quantization.get("load_in_4bit"):
        return None
    return tuple(quantization.get("llm_int8_skip_modules") or ())


def _whole_blocks(shape) -> bool:
    """Whether each expert's matrix of an (experts, out, in) tensor holds whole 4-bit blocks."""
    return (shape[1] * shape[2]) % BLOCK == 0


def _quantize(module, param_name: str, quantization: dict) -> None:
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    replace_parameter_4bit(module, param_name, compress_statistics=bool(quantization[
        "bnb_4bit_use_double_quant"]), quant_type=quantization["bnb_4bit_quant_type"])


@contextmanager
def quantizing_experts_on_load(expert_modules: tuple[str, ...], quantization: dict | None):
    """While a `from_pretrained` runs inside it, store each expert tensor in 4 bits (as
    `quantize_experts` would) right after transformers sets it on its module, before the next
    tensor loads: the load peak holds the 4-bit weights and one expert tensor in model.dtype,
    not every expert (Mixtral-8x7B's 87 GiB of bf16 experts would not load on an 80 GB GPU).

    transformers 5.24 has no hook for this: its bitsandbytes quantizer quantizes only what it
    turned into `Linear4bit` (`param_needs_quantization`), and its quantize op makes `Params4bit`
    for a Linear layer, not the parametrization bitsandbytes gives a tensor outside one. So this
    wraps the one function its loading loop calls for every tensor it sets,
    `core_model_loading.set_param_for_module`, and only for the duration of the block. Tensors it
    leaves (skipped, not whole 64-weight blocks per expert, offloaded to disk) are left for
    `quantize_experts`, which runs after loading and skips what is already quantized, as it
    would all of them on a transformers without that function (tests/test_experts.py notices)."""
    import transformers.core_model_loading as loading

    skip = _kept_as_loaded(quantization)
    if skip is None or not hasattr(loading, "set_param_for_module"):
        yield
        return
    original = loading.set_param_for_module
    quantized: dict[nn.Module, list[str]] = {}

    def set_and_quantize(model, target_name, param_value, *args, **kwargs):
        original(model, target_name, param_value, *args, **kwargs)
        module_name, _, param_name = target_name.rpartition(".")
        if (param_value.ndim != 3 or skipped(target_name, skip) or not _whole_blocks(param_value.shape)
                or not is_expert_module(module_name, expert_modules)):
            return
        module = model.get_submodule(module_name)
        loaded = module._parameters.get(param_name)
        if loaded is None or loaded.shape != param_value.shape:  # not set: unexpected or mismatched
            return
        _quantize(module, param_name, quantization)
        quantized.setdefault(module, []).append(param_name)
        # the codes are loaded weights: transformers must not initialize the module as missing
        module.parametrizations[param_name].original._is_hf_initialized = True
        if all(getattr(t, "_is_hf_initialized", False) for t in [*module.parameters(recurse=False),
                                                                *module.buffers(recurse=False)]):
            module._is_hf_initialized = True

    loading.set_param_for_module = set_and_quantize
    try:
        yield
    finally:
        loading.set_param_for_module = original
    for module, names in quantized.items():
        _in_name_order(module, names)


def _in_name_order(module, names: list[str]) -> None:
    """Order `module`'s 4-bit tensors `names` as `quantize_experts` would have: by name.

    The checkpoint's order quantized gate_up_proj before down_proj. The order of
    `parametrizations` is the model's parameter order and how peft nests the experts' LoRA (an
    adapter's keys); the order of bitsandbytes' state-dict hooks (one per tensor) is the state
    dict's. Both are moved, same objects, so the model is the one `quantize_experts` makes."""
    for name in sorted(names):
        module.parametrizations._modules[name] = module.parametrizations._modules.pop(name)
    hooks = module._state_dict_hooks
    ours = {getattr(hook, "keywords", {}).get("param_name"): key for key, hook in hooks.items()}
    for name in sorted(names):
        if name in ours:
            hooks.move_to_end(ours[name])


def quantized_tensors(module, param_name: str) -> list:
    """The uint8 codes and every tensor of the quantization state of one 4-bit expert tensor."""
    plist = module.parametrizations[param_name]
    state = plist[0].quant_state
    found = [plist.original, state.absmax, state.code, getattr(state, "offset", None)]
    if state.state2 is not None:
        found += [state.state2.absmax, state.state2.code]
    return [t for t in found if t is not None and hasattr(t, "element_size")]


def packed_expert_numels(model) -> list[tuple[int, int]]:
    """(weights, uint8 elements that hold them) of every 4-bit expert tensor."""
    found = []
    for module in model.modules():
        for param_name in getattr(module, "parametrizations", {}):
            if is_quantized(module, param_name):
                plist = module.parametrizations[param_name]
                found.append((plist[0].quant_state.shape.numel(), plist.original.numel()))
    return found


def dequantized(module, param_name: str):
    """The value training computes with: the 4-bit expert tensor dequantized, without LoRA."""
    import bitsandbytes.functional as F

    plist = module.parametrizations[param_name]
    return F.dequantize_4bit(plist.original.data, plist[0].quant_state)


# ---------------------------------------------------------------- LoRA on the experts


def repair_expert_lora(model) -> None:
    """Make peft's LoRA on 4-bit expert tensors train and run more than once (peft 0.21).

    peft adds LoRA to a targeted tensor with a second parametrization during each forward.
    Over bitsandbytes' parametrization it goes wrong twice: (1) it reads the tensor, and
    registers its own parametrization, inside parametrize's cache, so the value without LoRA
    stays cached and the experts' second LoRA (down_proj, nested inside gate_up_proj's) never
    sees a gradient; (2) on exit it removes only its `_LoraParameterProxy`, not the
    `_LoraFactorsProxy` it uses for a single adapter, so parametrizations pile up and the next
    forward fails. Both are patched on each wrapper instance here, nothing global."""
    from peft.tuners.lora.layer import ParamWrapper

    for module in model.modules():
        if isinstance(module, ParamWrapper) and P.is_parametrized(module.get_base_layer(), module.parameter_name):
            module._activate_lora = types.MethodType(_activate_lora_uncached, module)
            module._remove_parametrizations = types.MethodType(_remove_lora_proxy, module)


@contextmanager
def _activate_lora_uncached(self, active_adapters):
    from peft.tuners.lora.layer import ParamWrapper

    with ParamWrapper._activate_lora(self, active_adapters):
        P._cache.pop((id(self.get_base_layer()), self.parameter_name), None)  # the value read before LoRA
        yield


def _remove_lora_proxy(self) -> None:
    from peft.tuners.lora.layer import _LoraFactorsProxy, _LoraParameterProxy

    plist = self.get_base_layer().parametrizations[self.parameter_name]
    for index in reversed(range(len(plist))):
        if isinstance(plist[index], (_LoraFactorsProxy, _LoraParameterProxy)):
            del plist[index]
            return


class _AsLoaded(nn.Module):
    """A parametrization that changes nothing (see `nest_expert_lora_as_trained`)."""

    def forward(self, tensor):
        return tensor


def nest_expert_lora_as_trained(model, expert_modules: tuple[str, ...]) -> None:
    """Give the 16-bit expert tensors of `model` the parametrization their 4-bit ones had in
    training, so peft nests an adapter's two expert LoRAs the same way.

    peft wraps a module's targeted tensors one inside the other, in parameter order for plain
    tensors (gate_up_proj inside down_proj) but in name order for parametrized ones (down_proj
    inside gate_up_proj); the adapter's keys follow that nesting, so an adapter trained on 4-bit
    experts loads into 16-bit experts only if they look parametrized too."""
    for _, module, param_name in expert_parameters(model, expert_modules):
        if not P.is_parametrized(module, param_name):
            P.register_parametrization(module, param_name, _AsLoaded())


def drop_unchanged_parametrizations(model) -> None:
    """Undo `nest_expert_lora_as_trained` once LoRA is merged: plain tensors, plain names on save."""
    for module in model.modules():
        for param_name in list(getattr(module, "parametrizations", {}) or {}):
            if all(isinstance(p, _AsLoaded) for p in module.parametrizations[param_name]):
                P.remove_parametrizations(module, param_name, leave_parametrized=True)
