"""The eval stage: the base model, the adapter and the merged model scored side by side, on answers
against references (exact match, chrF), held-out loss and lm-evaluation-harness tasks (`qlora eval`)."""
