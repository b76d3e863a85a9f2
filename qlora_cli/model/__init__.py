"""The model stage: the 4-bit base model (its mixture-of-experts tensors quantized as they load)
with LoRA from peft, or a trained adapter on its base; which modules and tensors get LoRA, decided
in one place (`lora_targets`) for the loader and for `qlora plan`'s weightless skeleton alike; and
the loss computed in chunks so that the full logits never exist at once."""
