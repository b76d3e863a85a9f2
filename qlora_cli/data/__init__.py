"""The data stage: data files become conversations (text and image parts), conversations become
the exact ids mistral-common's reference encoder gives (labels masked to what is trained, image
tokens never), rows are packed with their attention spans and their images' file bytes, and the
result is cached under a fingerprint (`qlora prepare`). Batches for the Trainer are collated here
too, images becoming mistral-common's pixels."""
