"""`method: dpo | kto`: TRL's DPOTrainer / KTOTrainer, fed the ids `qlora prepare` made.

TRL would tokenize the raw text itself with the tokenizer's chat template; qlora has already
encoded every pair with the recipe's template (mistral-common's ids, token for token), so the
trainers here skip TRL's dataset preparation and take a collator that reads our answer masks.

The answers' log-probabilities come from qlora's own pass over the frozen lm_head
(`install_log_prob_head`, on `model.chunked_loss`), in place of TRL's fused head: only the
labelled positions are projected on every device (TRL projects every position where Triton is
missing, e.g. on a CPU), and each token's gradient is computed in the forward pass, so the
backward does not project the tokens again. For DPO each pair runs as one row holding its
prompt once (`share_prompts`), where the attention takes a 4-D mask.

The reference model is never a second copy of the base. A fresh LoRA starts as the identity, so
the reference is the 4-bit base with the adapter switched off. A run that starts from an adapter
(`model.adapter`, e.g. an SFT run's) keeps TRL's frozen copy of that adapter's small LoRA weights
("ref"), so the SFT adapter is both the starting point and the reference.
"""

from __future__ import annotations

import functools
import types
from contextlib import contextmanager
from dataclasses import dataclass

from trl import DPOTrainer, KTOTrainer

from qlora_cli.model.loss import chunked_log_probs, head_passes_hidden, library_ignore_index, output_head
from qlora_cli.training.trainer import TOKENS_KEY, RunTrainer

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of a starting adapter
# The columns TRL's precompute_ref_log_probs adds (DPO: per pair; KTO: per example and its KL twin).
REFERENCE_LOG_PROBS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_KL_logps")


@contextmanager
def lora_as_peft_made_it(model, from_adapter: bool):
    """Around a TRL trainer's construction: TRL casts a quantized model's LoRA weights to bf16 (the
    QLoRA paper's choice); qlora keeps them as peft made them, as SFT does, so a DPO/KTO/GRPO run
    computes like an SFT run of the recipe. From a fresh LoRA the reference is the base with the
    adapter off, so TRL's copy of the adapter for it goes."""
    kept = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
    yield
    for name, param in model.named_parameters():
        if name in kept:
            param.data = kept[name]
    if not from_adapter and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
        model.set_adapter("default")


@dataclass
class PreferenceCollator:
    """Prompt + answer sequences padded to the longest of the batch, with TRL's `completion_mask`
    taken from our answer masks (DPO: chosen rows first, then rejected; KTO: with its KL rows), and
    the reference log-probs TRL precomputed, where it did."""

    pad_token_id: int
    answers: tuple[str, ...]  # ("chosen", "rejected") or ("completion",) [+ "KL_completion"]

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if self.answers[0] == "chosen":
            batch = self._sequences(rows, ("chosen", "rejected"), "")
        else:
            batch = self._sequences(rows, ("completion",), "")
            if "KL_completion_ids" in rows[0]:
                batch |= self._sequences(rows, ("KL_completion",), "KL_")
            batch["label"] = torch.tensor([bool(row["label"]) for row in rows])
        for key in REFERENCE_LOG_PROBS:  # `training.precompute_ref_log_probs`: TRL added them to the rows
            if key in rows[0]:
                batch[key] = torch.tensor([row[key] for row in rows])
        batch[TOKENS_KEY] = int(batch["attention_mask"].sum())
        return batch

    def _sequences(self, rows: list[dict], names: tuple[str, ...], prefix: str) -> dict:
        import torch

        sequences = [(row["prompt_ids"] + row[f"{name}_ids"], [0] * len(row["prompt_ids"]) + row[f"{name}_mask"])
                     for name in names for row in rows]
        width = max(len(ids) for ids, _ in sequences)

        def padded(values, fill):
            return torch.tensor([list(v) + [fill] * (width - len(v)) for v in values], dtype=torch.long)

        return {
            f"{prefix}input_ids": padded([ids for ids, _ in sequences], self.pad_token_id),
            f"{prefix}attention_mask": padded([[1] * len(ids) for ids, _ in sequences], 0),
            f"{prefix}completion_mask": padded([mask for _, mask in sequences], 0),
        }


def install_log_prob_head(model, statistics: tuple[str, ...], share_prompts: bool = False) -> bool:
    """Make `model(..., labels=..., fused_lm_head=True)` (how TRL's trainers ask for per-token
    log-probs) run the backbone and `chunked_log_probs` on the labelled positions, returning TRL's
    `FusedCausalLMOutput` with `statistics`. Every other call goes to the forward it had. False,
    and nothing changed, where the head is not a frozen plain Linear (TRL's head then stays).

    `share_prompts` (DPO: chosen rows, then rejected rows): each pair runs as one row holding its
    common prefix once (collate.shared_prefix_rows), where that holds fewer tokens than the batch
    as it came; the log-probs are those of the batch as it came. Needs attention that takes a 4-D
    mask (sdpa, eager); not with router logits, whose aux loss reads a 2-D mask."""
    from trl.trainer.utils import FusedCausalLMOutput  # what TRL's public `add_fused_lm_head` documents

    from qlora_cli.data.collate import shared_prefix_rows

    inner, head = output_head(model)
    if head is None or head.weight.requires_grad:
        return False
    previous = inner.forward  # TRL's fused forward, an instance attribute
    ignore_index = library_ignore_index()
    attention = inner.config._attn_implementation  # a property with no public name (TRL reads it too)
    share_prompts = (share_prompts and attention in ("sdpa", "eager")
                     and not getattr(inner.config.get_text_config(), "output_router_logits", False))

    @functools.wraps(type(inner).forward)  # `generate` validates its kwargs against the signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                            **kwargs)
        kwargs["use_cache"] = False
        index = None  # where each token of the batch as it came sits in the shared rows
        layout = share_prompts and _shareable(args, kwargs) and shared_prefix_rows(
            kwargs["input_ids"], kwargs["attention_mask"], attention == "eager")
        if layout:
            shared, index = layout
            kwargs |= shared
        with head_passes_hidden(head):
            outputs = type(self).forward(self, *args, **kwargs)  # no labels: no loss
        hidden = outputs.logits
        if shift_labels is None:  # tokens < n predict token n, as the library loss shifts
            shift_labels = labels[:, 1:]
            hidden, index = (hidden[:, :-1], None) if index is None else (hidden, index[:, :-1])
        mask = shift_labels != ignore_index
        # a shared prefix token's state serves both rows of its pair
        tokens = hidden[mask] if index is None else hidden.reshape(-1, hidden.shape[-1])[index[mask]]
        log_probs, values = chunked_log_probs(tokens, head.weight, shift_labels[mask], statistics)
        # masked_scatter keeps an all-padding batch connected to the model (a zero with a gradient)
        per_token = {name: value.new_zeros(mask.shape).masked_scatter(mask, value)
                     for name, value in {"log_probs": log_probs, **values}.items()}
        loss = -per_token["log_probs"].sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None
                                                else num_items_in_batch)
        aux_loss = getattr(outputs, "aux_loss", None)  # MoE: the model's own load-balancing loss
        if aux_loss is not None:
            loss = loss + getattr(self.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **per_token)

    inner.forward = types.MethodType(forward, inner)
    return True


def _shareable(args, kwargs) -> bool:
    """A DPO batch as our collator makes it: ids and a 2-D padding mask, no router logits (their
    aux loss reads that mask) and no positions of its own."""
    mask = kwargs.get("attention_mask")
    return (not args and kwargs.get("input_ids") is not None and mask is not None and mask.dim() == 2
            and not kwargs.get("output_router_logits") and kwargs.get("position_ids") is None)


class _PreferenceTrainer(RunTrainer):
    """What both TRL trainers need here: our ids as they are, and the adapter kept as qlora made it."""

    statistics: tuple[str, ...] = ()  # what the TRL trainer reads of its fused head besides log-probs
    share_prompts = False  # DPO: each pair's prompt runs once (install_log_prob_head)

    def __init__(self, *args, model, from_adapter: bool, chunked_loss: bool = True, **kwargs):
        with lora_as_peft_made_it(model, from_adapter):
            super().__init__(*args, model=model, **kwargs)
        if chunked_loss:
            install_log_prob_head(model, self.statistics, self.share_prompts)

    # TRL's only switch past its tokenization is a vision dataset; no public option takes ids as they are
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # private: see above
        return dataset  # already tokenized by `qlora prepare`, with the recipe's template


class QloraDPOTrainer(_PreferenceTrainer, DPOTrainer):
    """DPOTrainer on prepared pairs."""

    share_prompts = True

    def __init__(self, *args, **kwargs):
        # its `entropy`, `logits/*` and `mean_token_accuracy` metrics; WPO's weights (`use_weighting`)
        self.statistics = ("entropy", "mean_logits", "is_top1") + (
            ("log_sum_sq_probs",) if kwargs["args"].use_weighting else ())
        super().__init__(*args, **kwargs)


class QloraKTOTrainer(_PreferenceTrainer, KTOTrainer):
    """KTOTrainer on prepared signed examples; adds the mismatched completions its KL term needs."""

    statistics = ("entropy", "mean_logits")  # its `entropy` and `logits/*` metrics

    def __init__(self, *args, **kwargs):
        self.eval_accuracies: list[float] = []  # per validation batch, until the next log
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # private: see _PreferenceTrainer
        if not self.calculate_KL:
            return dataset
        # TRL's estimate: each completion is paired with the previous example's prompt in batches
        # of the training batch size (x_1, y_n), (x_2, y_1), ...
        def rotated(batch):
            return {f"KL_completion_{key}": batch[f"completion_{key}"][-1:] + batch[f"completion_{key}"][:-1]
                    for key in ("ids", "mask")}

        return dataset.map(rotated, batched=True, batch_size=args.per_device_train_batch_size,
                           desc=f"KL completions of {dataset_name}")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.model.training:  # validation: TRL's KTO reports no accuracy, so qlora adds its own
            self.eval_accuracies.append(self._signed_accuracy(model, inputs))
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # the mean over the batches since the last log, as TRL averages its own metrics
        if self.eval_accuracies and not self.model.training:
            logs["eval_rewards/accuracies"] = sum(self.eval_accuracies) / len(self.eval_accuracies)
            self.eval_accuracies.clear()
        super().log(logs, start_time)

    def _signed_accuracy(self, model, inputs) -> float:
        """Share of examples whose implied reward (log-ratio to the reference) has the sign of its label."""
        import torch

        if "ref_logps" in inputs:  # training.precompute_ref_log_probs: TRL scored the reference once, before training
            reference = inputs["ref_logps"]
        else:
            reference, _ = self.compute_ref_log_probs(model, inputs)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        with torch.no_grad():
            per_token = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                              fused_lm_head=True).log_probs
        policy = per_token[:, -(inputs["input_ids"].size(1) - 1):].sum(-1)
        correct = ((policy - reference) > 0) == inputs["label"].bool()
        return self.accelerator.gather_for_metrics(correct.float()).mean().item()


def build_preference_trainer(method: str, *, model, args, dataset, tokenizer, callbacks, from_adapter: bool,
                             chunked_loss: bool = True, from_environment: dict[str, str] | None = None):
    """The TRL trainer for `method` on the prepared dataset."""
    cls, answers = (QloraDPOTrainer, ("chosen", "rejected")) if method == "dpo" else (QloraKTOTrainer, ("completion",))
    return cls(
        model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset.get("validation"),
        data_collator=PreferenceCollator(tokenizer.pad_token_id, answers), processing_class=tokenizer,
        callbacks=callbacks, from_adapter=from_adapter, chunked_loss=chunked_loss, from_environment=from_environment,
    )
