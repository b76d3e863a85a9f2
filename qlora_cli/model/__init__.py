"""The model stage: the 4-bit base model (its mixture-of-experts tensors quantized as they load, an
FP8 checkpoint dequantized into it as it loads) with LoRA from peft, or a trained adapter on its
base; which modules and tensors get LoRA, decided in one place (`lora_targets`) for the loader and
for `qlora plan`'s weightless skeleton alike; and the loss computed in chunks so that the full
logits never exist at once."""
