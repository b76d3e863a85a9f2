"""The Hugging Face Trainer, with what a QLoRA run needs on top of it.

- checkpoints are written to a staging folder and renamed into place when complete, so a
  kill -9 at any moment leaves the previous checkpoint loadable;
- SIGINT/SIGTERM finish the current step, save a checkpoint and stop (every rank at the same step);
- real (non-pad) tokens are counted, for tokens per second;
- the loss is computed in chunks of tokens, without full-vocabulary logits (`model.chunked_loss`);
- with `training.activation_offloading`, what a step saves for its backward outside the checkpointed
  layers (each layer's input) waits in CPU memory (`offload_activations`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import rotate_checkpoints

from qlora_cli.atomic import disk_full, folder_size, share_files
from qlora_cli.data.collate import PackedCollator
from qlora_cli.model.loss import loss_in_chunks
from qlora_cli.training.distributed import shard_on_cpu

TOKENS_KEY = "num_real_tokens"


class RunTrainer:
    """What every qlora trainer adds to its Trainer class (the Hugging Face one, or TRL's DPO/KTO
    trainers): atomic checkpoints and a count of the real tokens it trained on."""

    def __init__(self, *args, from_environment: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_tokens_seen = 0
        # Recipe keys whose values came from `${oc.env:...}`: kept as written in what is saved.
        self.from_environment = from_environment or {}
        for callback in list(self.callback_handler.callbacks):
            if type(callback) is TensorBoardCallback:  # it writes every argument into the event file
                self.remove_callback(callback)
                self.add_callback(RedactedTensorBoard(lambda args: redacted_arguments(args, self.from_environment)))

    offloading = None  # `offload_activations`: the context each training step runs in

    def offload_activations(self) -> None:
        """From the next step on, keep the tensors autograd saves in CPU memory (see `offloading_context`)."""
        self.offloading = offloading_context(self.model)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        shard_on_cpu(self)  # the FSDP a recipe asks for, on CPU processes as well

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.real_tokens_seen += int(inputs.pop(TOKENS_KEY, 0))
        with self.offloading or contextlib.nullcontext():
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(TOKENS_KEY, None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # No public hook wraps the whole checkpoint write: `on_save` runs once checkpoint-N is written
    # in place and rotated, `save_model` writes only the weights (the optimizer, scheduler, RNG and
    # state files come from private helpers), and a failed write reaches no callback.
    def _save_checkpoint(self, model, trial):  # private: no public hook serves (see above)
        # Let the Trainer write the whole checkpoint into a staging folder, then rename it into
        # place: `checkpoints/checkpoint-N` exists only once it is complete.
        final_parent = Path(self.args.output_dir)
        step = self.state.global_step
        staging_parent = final_parent / f".staging-{step}"
        self.args.output_dir = str(staging_parent)
        try:
            super()._save_checkpoint(model, trial)  # the whole checkpoint; no public method writes it
        except Exception as err:
            staged = folder_size(staging_parent)
            shutil.rmtree(staging_parent, ignore_errors=True)  # the previous checkpoint stays as it was
            previous = max((folder_size(p) for p in final_parent.glob("checkpoint-*")), default=0)
            raise disk_full(err, final_parent / f"checkpoint-{step}", max(staged, previous),
                            key="training.output_dir") or err
        finally:
            self.args.output_dir = str(final_parent)
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        best = self.state.best_global_step
        if best:
            self.state.best_model_checkpoint = str(final_parent / f"checkpoint-{best}")
        if self.args.should_save:
            staged = staging_parent / f"checkpoint-{step}"
            self.state.save_to_json(str(staged / "trainer_state.json"))  # with the final paths
            if self.from_environment and (staged / TRAINING_ARGS_NAME).is_file():
                torch.save(redacted_arguments(self.args, self.from_environment), staged / TRAINING_ARGS_NAME)
            share_files(staged)  # safetensors writes owner-only files; a team reads checkpoints too
            target = final_parent / f"checkpoint-{step}"
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)
            shutil.rmtree(staging_parent, ignore_errors=True)
            rotate_checkpoints(output_dir=str(final_parent), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


class QloraTrainer(RunTrainer, Trainer):
    """The SFT Trainer: atomic checkpoints, token counts, and the loss in chunks."""

    def __init__(self, *args, chunked_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunked_loss = chunked_loss  # `model.chunked_loss`: see model/loss.py

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with loss_in_chunks(model, enabled=self.chunked_loss):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def offloading_context(model):
    """The context that moves what autograd saves during a forward pass to CPU memory and brings it
    back for the backward (`training.activation_offloading`).

    Under activation checkpointing a checkpointed layer saves only its input (torch's checkpoint
    keeps the rest to recompute): so what moves is one hidden state per layer per token, the final
    norm's input and the chunked loss's hidden-state gradient. On a GPU: TRL's `OffloadActivations`
    (torchtune's), which copies to pinned memory on a side stream overlapped with compute and
    prefetches in the backward; it leaves the lm_head's input and tensors under 1 KiB on the GPU.
    Without a GPU the activations are in CPU memory already: torch's own `save_on_cpu` hooks, the
    same path through autograd with nothing to move.
    """
    import torch

    if any(p.is_cuda for p in model.parameters()):
        from trl.models.activation_offloading import get_act_offloading_ctx_manager

        return get_act_offloading_ctx_manager(model, warn_if_no_head=False)
    return torch.autograd.graph.save_on_cpu(pin_memory=False)


def redacted_arguments(args, from_environment: dict[str, str]):
    """A copy of the TrainingArguments whose fields that came from the environment hold their
    `${oc.env:NAME}` as written instead (the Trainer itself keeps the values: it may need them)."""
    import copy

    redacted = copy.copy(args)
    for key, text in from_environment.items():
        section, _, path = key.partition(".")
        name, *inner = path.split(".")
        if section != "training" or not hasattr(redacted, name):
            continue
        if not inner:
            setattr(redacted, name, text)
        elif isinstance(getattr(redacted, name), dict):  # e.g. training.fsdp_config.x
            value = copy.deepcopy(getattr(redacted, name))
            _set_inner(value, inner, text)
            setattr(redacted, name, value)
    return redacted


def _set_inner(node, path: list[str], text: str) -> None:
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and path[-1] in node:
        node[path[-1]] = text


class RedactedTensorBoard(TensorBoardCallback):
    """TensorBoard logging that records the arguments with the environment's values redacted."""

    def __init__(self, redact):
        super().__init__()
        self.redact = redact

    def on_train_begin(self, args, state, control, **kwargs):
        return super().on_train_begin(self.redact(args), state, control, **kwargs)


class CountingCollator(PackedCollator):
    """PackedCollator that also reports how many real tokens the batch holds."""

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        batch[TOKENS_KEY] = sum(len(row["input_ids"]) for row in rows)
        return batch


class OnTrainBegin(TrainerCallback):
    """Calls `action` on the main process once the Trainer has loaded what it resumes from
    (weights, optimizer, scheduler), before the first step."""

    def __init__(self, action):
        self.action = action
        self.called = False  # on every rank: whether the Trainer got this far

    def on_train_begin(self, args, state, control, **kwargs):
        self.called = True
        if state.is_world_process_zero:
            self.action()


class StopOnSignal(TrainerCallback):
    """On SIGINT/SIGTERM: finish the step, save a checkpoint, stop training.

    In a multi-process run the flag is reduced over all ranks at each step, so every rank
    stops after the same step even when the signal reached them at different moments.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame) -> None:
        if number == signal.SIGINT and self.signal_number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        # A SIGTERM after a Ctrl-C (torchrun passes one on) changes nothing: already stopping.
        self.signal_number = self.signal_number or number

    def on_step_end(self, args, state, control, **kwargs):
        number = reduce_over_ranks(self.signal_number or 0, op="max")
        if number:
            self.signal_number = number
            control.should_save = True
            control.should_training_stop = True
        return control


def reduce_over_ranks(value: int, op: str = "sum") -> int:
    """`value` summed (or its max) over all ranks of a multi-process run; itself otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    import torch

    tensor = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return int(tensor.item())
