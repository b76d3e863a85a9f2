"""The plan stage: before any weight loads, what is checked (machine, prepared data, what can be
trained, and the inputs and outputs of `qlora merge`, `qlora generate` and `qlora eval`: preflight.py)
and what is estimated from configs and prepared data alone: memory, time, disk, and whether the
data is sound (`qlora plan`, and the first step of `qlora train`)."""
