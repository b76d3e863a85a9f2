"""`python -m qlora_cli ...` (what accelerate launch and torchrun start)."""

from qlora_cli.cli import run

run()
