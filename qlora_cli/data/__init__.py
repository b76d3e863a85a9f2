"""The data stage: data files become conversations, conversations become the exact ids
mistral-common's reference encoder gives (labels masked to what is trained), rows are packed with
their attention spans, and the result is cached under a fingerprint (`qlora prepare`). Batches for
the Trainer are collated here too."""
