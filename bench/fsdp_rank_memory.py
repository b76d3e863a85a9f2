"""Each rank's memory in an FSDP (or DDP) run on CPU processes, to hold against `qlora plan --gpus N`.

    torchrun --standalone --nproc_per_node 2 bench/fsdp_rank_memory.py OUT_DIR RECIPE [KEY=VALUE...]

runs `qlora train` as its workers run it, with each rank's memory measured at its second training
step; rank R writes OUT_DIR/rank-R.json: the bytes and the step's [rows, tokens], at which
`qlora plan`'s arithmetic gives the figure to hold it against (tests/test_distributed.py does;
bench/RESULTS.md has the figures and the command).

A CPU has no allocator statistics, so this counts tensor storages, as tests/test_plan.py does for
one process: what exists when the step begins (this rank's shards of the weights and LoRA, the
quantization state, buffers, optimizer state), plus the peak of the storages the step's aten ops
make. FSDP frees a gathered layer by shrinking its storage to 0 bytes, not by dropping it, so a
storage counts at its current size, read at every op."""

from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from quant_state import expert_quant_state_tensors, quant_state_tensors  # noqa: E402  (tests/quant_state.py)


class StorageBytes(TorchDispatchMode):
    """The peak, over the aten ops run inside it, of the bytes the storages they made hold; and
    the (rows, tokens) of the step's input ids (the first embedding lookup's)."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing, self.live, self.peak, self.rows = existing, {}, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.embedding.default and self.rows is None:
            self.rows = list(args[1].shape)
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and not tensor.is_meta:
                storage = tensor.untyped_storage()
                key = _pointer(storage)
                known = self.live.get(key)
                if key and key not in self.existing and (known is None or _size(known()) == 0):
                    self.live[key] = weakref.ref(storage)  # a new storage, maybe where a freed one was
        current = sum(_size(ref()) for ref in self.live.values())
        self.peak = max(self.peak, current)
        return out


def _pointer(storage) -> int:
    try:
        return storage.data_ptr() if storage.nbytes() else 0
    except RuntimeError:  # a storage FSDP has freed ("invalid python storage")
        return 0


def _size(storage) -> int:
    try:
        return storage.nbytes() if storage is not None else 0
    except RuntimeError:
        return 0


def local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class MeasureStep(TrainerCallback):
    def __init__(self, trainer, out: Path, step: int = 2):
        self.trainer, self.out, self.step, self.mode = trainer, out, step, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != self.step:
            return
        model, optimizer = self.trainer.model_wrapped, self.trainer.optimizer
        params = list(model.parameters())
        before = [*(local(p) for p in params), *model.buffers(),
                  *(t for p in params for t in quant_state_tensors(p)),
                  *(t for m in model.modules() for t in quant_state_tensors(m)),  # a sharded Linear4bit keeps it
                  *expert_quant_state_tensors(model),
                  *(local(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
        storages = {_pointer(t.untyped_storage()): _size(t.untyped_storage()) for t in before if t is not None}
        storages.pop(0, None)  # storages FSDP has freed (an unsharded parameter between steps)
        self.static = sum(storages.values())
        self.mode = StorageBytes(set(storages))
        self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode is None:
            return
        self.mode.__exit__(None, None, None)
        rank = int(os.environ.get("RANK", "0"))
        record = {"static": self.static, "step_peak": self.mode.peak, "total": self.static + self.mode.peak,
                  "input_ids": self.mode.rows}
        (self.out / f"rank-{rank}.json").write_text(json.dumps(record))
        self.mode = None


def main() -> None:
    out, arguments = Path(sys.argv[1]), sys.argv[2:]
    import qlora_cli.training.run as run

    build = run.build_trainer

    def build_and_measure(*args, **kwargs):
        trainer, stopper, distribution = build(*args, **kwargs)
        trainer.add_callback(MeasureStep(trainer, out))
        return trainer, stopper, distribution

    run.build_trainer = build_and_measure
    from qlora_cli.cli import app

    sys.argv = ["qlora", "train", *arguments]
    app(prog_name="qlora")


if __name__ == "__main__":
    main()
