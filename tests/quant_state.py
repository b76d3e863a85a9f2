"""The tensors a 4-bit weight keeps beside its codes (absmax, code book, nested state), counted
when memory is measured: by tests/test_plan.py in one process and bench/fsdp_rank_memory.py per rank."""

from __future__ import annotations

import torch


def quant_state_tensors(holder) -> list:
    """The tensors of a 4-bit weight's quantization state (on its Params4bit, or on its Linear4bit
    once FSDP has made the weight a shard)."""
    state = getattr(holder, "quant_state", None)
    if state is None:
        return []
    nested = getattr(state, "state2", None)
    found = [getattr(state, "absmax", None), getattr(state, "code", None), getattr(state, "offset", None)]
    found += [nested.absmax, nested.code] if nested is not None else []
    return [t for t in found if isinstance(t, torch.Tensor)]


def expert_quant_state_tensors(model) -> list:
    """The quantization state of every 4-bit expert tensor (qlora_cli.model.experts keeps it on the parametrization)."""
    from qlora_cli.model.experts import is_quantized, quantized_tensors

    return [t for m in model.modules() for p in getattr(m, "parametrizations", {}) if is_quantized(m, p)
            for t in quantized_tensors(m, p)]
