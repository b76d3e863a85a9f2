"""`method: dpo | kto`: TRL's DPOTrainer / KTOTrainer, fed the ids `qlora prepare` made.

TRL would tokenize the raw text itself with the tokenizer's chat template; qlora has already
encoded every pair with the recipe's template (mistral-common's ids, token for token), so the
trainers here skip TRL's dataset preparation and take a collator that reads our answer masks.

The reference model is never a second copy of the base. A fresh LoRA starts as the identity, so
the reference is the 4-bit base with the adapter switched off. A run that starts from an adapter
(`model.adapter`, e.g. an SFT run's) keeps TRL's frozen copy of that adapter's small LoRA weights
("ref"), so the SFT adapter is both the starting point and the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOTrainer, KTOTrainer

from qlora_cli.trainer import TOKENS_KEY, RunTrainer

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of a starting adapter
# The columns TRL's precompute_ref_log_probs adds (DPO: per pair; KTO: per example and its KL twin).
REFERENCE_LOG_PROBS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_KL_logps")


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


class _PreferenceTrainer(RunTrainer):
    """What both TRL trainers need here: our ids as they are, and the adapter kept as qlora made it."""

    def __init__(self, *args, model, from_adapter: bool, **kwargs):
        # TRL casts a quantized model's LoRA weights to bf16 (the QLoRA paper's choice); qlora keeps
        # them as peft made them, as SFT does, so a DPO run computes like an SFT run of the recipe.
        kept = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, model=model, **kwargs)
        for name, param in model.named_parameters():
            if name in kept:
                param.data = kept[name]
        if not from_adapter and REFERENCE_ADAPTER in model.peft_config:
            model.delete_adapter(REFERENCE_ADAPTER)  # a fresh LoRA: the reference is the base, adapter off
            model.set_adapter("default")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already tokenized by `qlora prepare`, with the recipe's template


class QloraDPOTrainer(_PreferenceTrainer, DPOTrainer):
    """DPOTrainer on prepared pairs."""


class QloraKTOTrainer(_PreferenceTrainer, KTOTrainer):
    """KTOTrainer on prepared signed examples; adds the mismatched completions its KL term needs."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset
        # TRL's estimate: each completion is paired with the previous example's prompt in batches
        # of the training batch size (x_1, y_n), (x_2, y_1), ...
        def rotated(batch):
            return {f"KL_completion_{key}": batch[f"completion_{key}"][-1:] + batch[f"completion_{key}"][:-1]
                    for key in ("ids", "mask")}

        return dataset.map(rotated, batched=True, batch_size=args.per_device_train_batch_size,
                           desc=f"KL completions of {dataset_name}")

    def _compute_loss(self, model, inputs, return_outputs):
        result = super()._compute_loss(model, inputs, return_outputs)
        if not self.model.training:  # validation: TRL's KTO reports no accuracy, so qlora adds its own
            self._metrics["eval"]["rewards/accuracies"].append(self._signed_accuracy(model, inputs))
        return result

    def _signed_accuracy(self, model, inputs) -> float:
        """Share of examples whose implied reward (log-ratio to the reference) has the sign of its label."""
        import torch

        reference, _ = self.compute_ref_log_probs(model, inputs)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        with torch.no_grad():
            per_token = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                              fused_lm_head=True).log_probs
        policy = per_token[:, -(inputs["input_ids"].size(1) - 1):].sum(-1)
        correct = ((policy - reference) > 0) == inputs["label"].bool()
        return self.accelerator.gather_for_metrics(correct.float()).mean().item()


def build_preference_trainer(method: str, *, model, args, dataset, tokenizer, callbacks, from_adapter: bool,
                             from_environment: dict[str, str] | None = None):
    """The TRL trainer for `method` on the prepared dataset."""
    cls, answers = (QloraDPOTrainer, ("chosen", "rejected")) if method == "dpo" else (QloraKTOTrainer, ("completion",))
    return cls(
        model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset.get("validation"),
        data_collator=PreferenceCollator(tokenizer.pad_token_id, answers), processing_class=tokenizer,
        callbacks=callbacks, from_adapter=from_adapter, from_environment=from_environment,
    )
