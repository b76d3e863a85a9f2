"""The export stage: a trained adapter becomes something that answers: a merged standalone model
(verified by its logits), and answers to prompts (`qlora merge`, `qlora generate`)."""
