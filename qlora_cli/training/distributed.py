"""How a run's model is spread over its processes: FSDP2 on CPU processes too, the adapter gathered
from its shards, and a record of what was sharded for the progress header and run.json.

accelerate hands its FSDP plugin to accelerator devices only: on CPU processes (gloo) a recipe with
`training.fsdp` trained as DDP without a word. torch's `fully_shard` itself runs on gloo, so qlora
gives accelerate the plugin it set aside (`shard_on_cpu`) and the run is the one the recipe asks for.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback


def shard_on_cpu(trainer) -> None:
    """Make a Trainer on CPU processes shard as its `training.fsdp` says (FSDP2; `check_parallelism`
    refused FSDP1 there before the model loaded)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if not trainer.args.fsdp or state.distributed_type != DistributedType.MULTI_CPU:
        return
    # Both singletons: each later `AcceleratorState()` copies the process state's type over its own.
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def gathered_trainable_weights(trainer) -> dict | None:
    """Under FSDP, every trainable weight whole (a collective: every rank calls it; only the LoRA
    weights travel, never the 4-bit base); None when the model is not sharded."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    from torch.distributed.tensor import DTensor

    return {name: (param.full_tensor() if isinstance(param, DTensor) else param).detach().cpu()
            for name, param in trainer.model.named_parameters() if param.requires_grad}


def nodes() -> int:
    """Machines in this torchrun / accelerate job (each runs LOCAL_WORLD_SIZE processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(world // int(os.environ.get("LOCAL_WORLD_SIZE", world) or world), 1)


def describe_distribution(trainer) -> dict:
    """What the Trainer made of the model once it prepared it: strategy, version, processes, nodes,
    and under FSDP which modules became shard units and how many parameters each rank holds a
    shard of rather than the whole."""
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    processes = state.num_processes
    record = {"strategy": "none", "processes": processes, "nodes": nodes()}
    if processes > 1:
        record["backend"] = state.backend
    kind = state.distributed_type
    if kind == DistributedType.FSDP:
        record |= {"strategy": "FSDP", "version": state.fsdp_plugin.fsdp_version} | _sharded(trainer.model_wrapped)
    elif kind == DistributedType.DEEPSPEED:
        record |= {"strategy": "DeepSpeed", "zero_stage": state.deepspeed_plugin.zero_stage}
    elif processes > 1:
        record["strategy"] = "DDP"
    return record


def _sharded(model) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            name = type(module).__name__.removeprefix("FSDP")
            units[name] = units.get(name, 0) + 1
    counts = {"sharded_trainable": 0, "sharded_frozen": 0, "whole_trainable": 0, "whole_frozen": 0}
    for param in model.parameters():
        where = "sharded" if isinstance(param, DTensor) else "whole"
        counts[f"{where}_{'trainable' if param.requires_grad else 'frozen'}"] += param.numel()
    # Elements as stored: a float32 word of a 4-bit weight holds 8 of them, a uint8 expert code 2.
    return {"units": units, "parameter_elements": counts}


def distribution_line(record: dict) -> str:
    """One line for the progress header."""
    where = f"{record['processes']} process{'es' if record['processes'] > 1 else ''}, " \
            f"{record['nodes']} node{'s' if record['nodes'] > 1 else ''}"
    backend = f" ({record['backend']})" if record.get("backend") else ""
    strategy = record["strategy"]
    if strategy == "none":
        return f"distributed: no (one process{backend})"
    if strategy == "DDP":
        return f"distributed: DDP over {where}{backend}: every rank holds the whole model"
    if strategy == "DeepSpeed":
        return f"distributed: DeepSpeed ZeRO-{record['zero_stage']} over {where}{backend}"
    counts = record["parameter_elements"]
    units = ", ".join(f"{name} x{count}" for name, count in record["units"].items())
    whole = counts["whole_trainable"] + counts["whole_frozen"]
    return (f"distributed: FSDP{record['version']} over {where}{backend}: shard units {units}; "
            f"sharded {counts['sharded_frozen']:,} frozen and {counts['sharded_trainable']:,} trainable "
            f"parameter elements, {whole:,} held whole on every rank")


class RecordDistribution(TrainerCallback):
    """Describes the prepared model at the start of training (after the Trainer wrapped or sharded
    it), for run.json; rank 0 shows it through `show`."""

    def __init__(self, trainer, show=None):
        self.trainer = trainer
        self.show = show
        self.record: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.record = describe_distribution(self.trainer)
        if self.show and state.is_world_process_zero:
            self.show(distribution_line(self.record))
