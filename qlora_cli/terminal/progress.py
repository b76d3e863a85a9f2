"""What the user sees while training (and while `qlora eval` works through its stages): a live rich
display on a terminal, plain lines otherwise.

Only rank 0 shows anything.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

from rich.console import Console
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


class TrainingProgress(TrainerCallback):
    """Step of total, epoch, loss, learning rate, tokens/s, elapsed and remaining; eval results."""

    def __init__(self, console: Console, tokens_seen: Callable[[], int]):
        self.console = console
        self.tokens_seen = tokens_seen
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.latest: dict = {}
        self.started = time.monotonic()
        self.tokens_at_start = 0
        # Each rank counts its own tokens; run.json has the sum over all of them.
        self.per_rank = " on rank 0" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.started, self.tokens_at_start = time.monotonic(), self.tokens_seen()
        if self.live:
            # Bar, steps and times never shrink (on 80 columns the times were cut to "…"); the line of
            # loss, rate and speed after them wraps instead.
            whole = {"table_column": Column(no_wrap=True)}
            self.progress = Progress(
                TextColumn("[bold]train[/]", **whole), BarColumn(bar_width=None if self.console.width >= 120 else 16),
                MofNCompleteColumn(**whole), TimeElapsedColumn(**whole), TextColumn("<", **whole),
                TimeRemainingColumn(**whole), TextColumn("{task.fields[info]}"), console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def tokens_per_second(self) -> float:
        return (self.tokens_seen() - self.tokens_at_start) / max(time.monotonic() - self.started, 1e-9)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs or "learning_rate" in logs:
            self.latest.update(logs)
        if any(key.startswith("eval_") for key in logs):
            self._print_eval(state, logs)
        elif not self.live and "loss" in logs:
            self.console.print(f"step {state.global_step}/{state.max_steps} {self._info(state)}", highlight=False)

    def _info(self, state) -> str:
        parts = [f"epoch {state.epoch or 0:.2f}"]
        if "loss" in self.latest:
            parts.append(f"loss {self.latest['loss']:.4f}")
        if "learning_rate" in self.latest:
            parts.append(f"lr {self.latest['learning_rate']:.2e}")
        if "rewards/margins" in self.latest:  # DPO / KTO
            parts.append(f"margin {self.latest['rewards/margins']:.3f}")
        if "rewards/accuracies" in self.latest:
            parts.append(f"reward acc {self.latest['rewards/accuracies']:.2f}")
        if self.latest.get("reward") is not None:  # GRPO: the weighted sum, then each reward's mean
            parts.append(f"reward {self.latest['reward']:.3f}{_each_reward(self.latest, '')}")
        parts.append(f"{self.tokens_per_second():,.0f} tok/s{self.per_rank}")
        return "  ".join(parts)

    def _print_eval(self, state, logs: dict) -> None:
        loss = logs.get("eval_loss")
        perplexity = f"  perplexity {math.exp(loss):.3f}" if loss is not None and loss < 50 else ""
        if "eval_rewards/margins" in logs:  # a preference loss has no perplexity
            accuracy = logs.get("eval_rewards/accuracies")
            perplexity = f"  reward margin {logs['eval_rewards/margins']:.3f}" + (
                f"  reward accuracy {accuracy:.3f}" if accuracy is not None else "")
        if logs.get("eval_reward") is not None:  # GRPO: its loss says nothing of how good the answers are
            text = f"eval at step {state.global_step}: reward {logs['eval_reward']:.3f}{_each_reward(logs, 'eval_')}"
        else:
            text = f"eval at step {state.global_step}: loss {loss:.4f}{perplexity}" if loss is not None else str(logs)
        (self.progress.console if self.progress else self.console).print(text, highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info(state))
            self.progress.stop()
            self.progress = None


def _each_reward(logs: dict, prefix: str) -> str:
    """` (name mean, ...)` of a GRPO log with more than one reward function; empty otherwise."""
    means = {key.split("/")[1]: value for key, value in logs.items()
             if key.startswith(f"{prefix}rewards/") and key.endswith("/mean") and value is not None}
    return " (" + ", ".join(f"{name} {value:.3f}" for name, value in means.items()) + ")" if len(means) > 1 else ""


class TrainReporter:
    """What `qlora train` tells the user at the start; rank 0 only."""

    def __init__(self, console: Console):
        self.console = console
        self.main = int(os.environ.get("RANK", "0")) == 0

    def plan_ready(self, plan) -> None:
        if self.main:
            for line in plan.short_lines():
                self.console.print(line, highlight=False, markup=False)

    def note(self, text: str) -> None:
        if self.main:
            self.console.print(f"note: {text}", style="yellow", highlight=False, markup=False)

    def data_ready(self, prepared) -> None:
        from qlora_cli.terminal import render

        if self.main:
            render.prepare_summary(self.console, prepared)

    def model_ready(self, summary, run) -> None:
        if self.main:
            for line in summary.lines():
                self.console.print(line, highlight=False)
            self.console.print(f"run folder: {run.root}", highlight=False)

    def distributed(self, line: str) -> None:
        if self.main:
            self.console.print(line, highlight=False, markup=False)

    def training_callback(self, tokens_seen: Callable[[], int]) -> TrainerCallback:
        return TrainingProgress(self.console, tokens_seen)


class StageBars:
    """`progress(description, total) -> advance(n)` (evaluate.Progress): a rich bar per stage on a
    terminal, one line per stage on `console` otherwise (a log still shows where a long eval is)."""

    def __init__(self, console: Console):
        self.console = console

    def __enter__(self):
        self.bars = Progress(console=self.console, disable=not self.console.is_terminal)
        self.bars.__enter__()
        return self.stage

    def stage(self, description: str, total: int):
        if not self.console.is_terminal:
            self.console.print(description + (f" ({total})" if total else ""), highlight=False, markup=False)
        task = self.bars.add_task(description, total=total or None)
        return lambda n: self.bars.advance(task, n)

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)
