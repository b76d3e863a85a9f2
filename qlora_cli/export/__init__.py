"""The export stage: a trained adapter becomes something that answers: a merged standalone model
(verified by its logits), answers to prompts (`qlora merge`, `qlora generate`), and files an
engine serves, checked in that engine (`qlora export --to gguf|ollama|adapter`)."""
