"""`method: grpo`: TRL's GRPOTrainer, generating from the prompt ids `qlora prepare` made.

The model writes several answers to each prompt (`num_generations`), the recipe's rewards score
them, and the policy moves toward the answers that score above their group's mean. TRL would
tokenize each prompt itself, with the tokenizer's chat template; qlora has already encoded every
prompt with the recipe's template (mistral-common's ids, token for token), so the one method that
turns prompts into ids reads them from the prepared rows instead. Generation stops at `</s>` (the
tokenizer's EOS, which TRL always counts as an end).

The reference model (`beta > 0`) is never a second copy of the base: as for DPO, a fresh LoRA's
reference is the 4-bit base with the adapter switched off, and a run that starts from an adapter
(`model.adapter`) keeps TRL's frozen copy of that adapter's small LoRA weights. With `beta: 0` (TRL's
default, and Magistral's choice) there is no reference at all.
"""

from __future__ import annotations

import json

from trl import GRPOTrainer

from qlora_cli.data.prompts import IDS
from qlora_cli.training.preference_trainer import lora_as_peft_made_it
from qlora_cli.training.trainer import RunTrainer


def prompt_key(prompt) -> str:
    """A prompt as the rows give it (text, or messages), as a key to its ids."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


class QloraGRPOTrainer(RunTrainer, GRPOTrainer):
    """GRPOTrainer on prepared prompts, with the adapter kept as qlora made it."""

    def __init__(self, *args, model, from_adapter: bool, **kwargs):
        with lora_as_peft_made_it(model, from_adapter):
            super().__init__(*args, model=model, **kwargs)
        datasets = [self.train_dataset, *((self.eval_dataset or {}).values() if isinstance(self.eval_dataset, dict)
                                          else [self.eval_dataset])]
        self.prompt_ids = {prompt_key(prompt): ids for dataset in datasets if dataset is not None
                           for prompt, ids in zip(dataset["prompt"], dataset[IDS])}

    # The one method that turns prompts into ids (vLLM and transformers' generate both start from
    # what it returns); TRL offers no public way to pass ids, and would apply the tokenizer's template.
    def _tokenize_prompts(self, prompts: list):  # private: see above
        return [list(self.prompt_ids[prompt_key(prompt)]) for prompt in prompts], None, {}

    # RunTrainer counts the tokens our collators report; GRPO's batches are the rows themselves, and
    # TRL counts prompt and completion tokens as it generates (summed over ranks: this rank's share).
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super(RunTrainer, self).training_step(model, inputs, num_items_in_batch)
        self.real_tokens_seen = int(self.state.num_input_tokens_seen) // self.accelerator.num_processes
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return super(RunTrainer, self).prediction_step(model, inputs, prediction_loss_only, ignore_keys)


def build_grpo_trainer(*, model, args, dataset, tokenizer, rewards, callbacks, from_adapter: bool,
                       from_environment: dict[str, str] | None = None) -> QloraGRPOTrainer:
    """The GRPO trainer for the prepared prompts, scored by `rewards` (rewards.reward_functions)."""
    return QloraGRPOTrainer(
        model=model, reward_funcs=rewards, args=args, train_dataset=dataset["train"],
        eval_dataset=dataset.get("validation"), processing_class=tokenizer, callbacks=callbacks,
        from_adapter=from_adapter, from_environment=from_environment,
    )
