"""The training stage: the story of a run (`run.py`), the Hugging Face Trainer for SFT and TRL's for
DPO/KTO/GRPO, stop and resume, and `--nproc` processes. Takes a recipe, gives a run folder with the
adapter, checkpoints, logs and a loss plot."""
