"""`qlora eval`: the base model, the run's adapter and the merged model, scored side by side.

One 4-bit base + adapter is loaded, as `qlora generate` loads it; the base is that same model
with the adapter disabled, so no second copy is made. Each model answers the user's own
questions (formatted with the recipe's template, generated with its `generate` settings),
is scored against the references, measured on the recipe's validation split (loss and
perplexity) and, with `--tasks`, on lm-evaluation-harness tasks. Results go to `<run>/eval/`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from qlora_cli.atomic import atomic_folder
from qlora_cli.errors import UserError
from qlora_cli.export.generate import PromptRecord, read_prompts
from qlora_cli.plan.preflight import check_before_eval, existing_merged_model, has_held_out_loss
from qlora_cli.run_folder import RunFolder
from qlora_cli.eval.scoring import exact_match, score_answers, token_f1

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

# progress(description, total) -> advance(n): how the CLI shows work as it is done.
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass
class EvalRecord:
    """One line of the user's evaluation file: the conversation to answer and its reference."""

    prompt: PromptRecord
    reference: str


@dataclass
class Measured:
    """What one model scored, and the answers and lm-eval output behind the scores."""

    scores: dict[str, float] = field(default_factory=dict)
    answers: list[dict] | None = None
    lm_eval: dict | None = None


@dataclass
class EvalPlan:
    """What an evaluation will measure, checked before any weights load."""

    records: list[EvalRecord] | None
    suite: object | None  # eval.tasks.TaskSuite
    limit: int | None = None
    model_path: str | None = None  # --model: scored as `merged`
    warnings: list[str] = field(default_factory=list)  # for the user, before the models load


@dataclass
class EvalResult:
    folder: Path
    scores: dict[str, dict[str, float]]  # model (base, adapter, merged) -> metric -> value


def plan_evaluation(recipe: Recipe, *, input: Path | None = None, model_path: str | None = None,
                    tasks: list[str] | None = None, limit: int | None = None,
                    after_training: bool = False) -> EvalPlan:
    """What `qlora eval` and the `eval.after_training` step of `qlora train` measure: the flags
    given, else the recipe's `eval` section. Reads the records, finds the tasks, and runs eval's
    pre-flight: every mistake found before weights load (and, `after_training`, before training
    starts: the adapter it will make is not looked for)."""
    from qlora_cli.export.generate import default_length_warning

    input = input or (Path(recipe.eval.input) if recipe.eval.input else None)
    tasks = recipe.eval.tasks if tasks is None else tasks
    limit = limit or recipe.eval.limit
    records = read_eval_records(input)[:limit] if input else None
    suite = _load_tasks(list(tasks))
    check_before_eval(recipe, model_path=model_path, measures=records is not None or suite is not None,
                      adapter_trained=not after_training)
    warning = default_length_warning(recipe) if records is not None else None
    return EvalPlan(records, suite, limit, model_path, [warning] if warning else [])


def evaluate(recipe: Recipe, plan: EvalPlan, progress: Progress | None = None, *, tokenizer=None,
             prepared=None) -> EvalResult:
    """Score base, adapter and (when there is one) merged model; write `<run>/eval/` whole.

    `tokenizer` and `prepared` (data): what `qlora train` loaded, reused after training. The
    adapter is loaded again, from its folder: eval scores what merge and generate will load
    (4-bit, or as `generate.quantized` says), not the model as it trained (its checkpointing, its
    upcast norms)."""
    from qlora_cli.export.generate import load_generator

    merged = plan.model_path or existing_merged_model(recipe)
    progress = progress or _no_progress
    generator = load_generator(recipe, tokenizer=tokenizer)  # the 4-bit base + adapter, as trained
    validation = validation_rows(recipe, generator.tokenizer, prepared)
    measure = _measurer(recipe, plan, validation, progress)
    results = {"base": measure("base", generator, without_adapter=True), "adapter": measure("adapter", generator)}
    if merged:
        del generator  # one model in memory at a time
        results["merged"] = measure("merged", load_generator(recipe, merged, tokenizer=tokenizer))
    folder = RunFolder(recipe.run_dir).root / "eval"
    write_results(folder, results)
    return EvalResult(folder, {name: m.scores for name, m in results.items()})


def _load_tasks(tasks: list[str]):
    if not tasks:
        return None
    from qlora_cli.eval.tasks import load_tasks

    return load_tasks(tasks)


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


# ---------------------------------------------------------------- before anything loads


def read_eval_records(path: Path) -> list[EvalRecord]:
    """Lines of `prompt` or `messages` (as `qlora generate --input` takes) with a `reference` answer."""
    records = []
    for prompt in read_prompts(Path(path).expanduser()):
        reference = prompt.record.get("reference")
        if not isinstance(reference, str):
            found = "it is not text" if "reference" in prompt.record else \
                f"the line has: {', '.join(prompt.record)}"
            raise UserError(f"each line needs `reference`, the answer to score against; {found}",
                            where=prompt.where, fix='add "reference": "<the expected answer>" to each line')
        records.append(EvalRecord(prompt, reference))
    return records


# ---------------------------------------------------------------- measuring one model


def _measurer(recipe: Recipe, plan: EvalPlan, validation, progress: Progress):
    records, suite = plan.records, plan.suite
    batch_size = recipe.generate.options.batch_size

    def measure(name: str, generator, without_adapter: bool = False) -> Measured:
        measured = Measured()
        with generator.model.disable_adapter() if without_adapter else contextlib.nullcontext():
            if records is not None:
                measured.answers = answer_records(generator, records, batch_size, progress(f"{name}: answers", len(records)))
                measured.scores |= score_answers([a["response"] for a in measured.answers], [r.reference for r in records])
            if validation is not None:
                advance = progress(f"{name}: validation loss", len(validation))
                measured.scores |= held_out_loss(generator, validation, recipe, advance)
            if suite is not None:
                from qlora_cli.eval.tasks import run_tasks, wrap_model

                progress(f"{name}: lm-eval {', '.join(suite.names)}", 0)
                lm = wrap_model(generator.model, generator.tokenizer, batch_size)  # a wrapper, not a copy
                metrics, measured.lm_eval = run_tasks(lm, suite, plan.limit)
                measured.scores |= metrics
        return measured

    return measure


def answer_records(generator, records: list[EvalRecord], batch_size: int, advance) -> list[dict]:
    """Each record's line plus the model's `response` (its first answer) and that answer's scores."""
    lines = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        answers = generator.answer_batch([r.prompt.messages for r in batch])
        for record, (answer, *_) in zip(batch, answers, strict=True):
            lines.append({**record.prompt.record, "response": answer,
                          "exact_match": exact_match(answer, record.reference),
                          "token_f1": token_f1(answer, record.reference)})
        advance(len(batch))
    return lines


def validation_rows(recipe: Recipe, tokenizer, prepared=None):
    """The recipe's validation split, prepared exactly as training saw it (`prepared`, or the
    cache), or None."""
    if not has_held_out_loss(recipe):
        return None
    if prepared is None:
        from qlora_cli.data.prepare import prepare_dataset

        prepared = prepare_dataset(recipe, tokenizer)
    return prepared.dataset.get("validation")


def held_out_loss(generator, rows, recipe: Recipe, advance) -> dict[str, float]:
    """Mean cross-entropy per labelled token over the validation rows, and its perplexity."""
    import torch

    from qlora_cli.data.collate import PackedCollator
    from qlora_cli.data.templates import IGNORE_INDEX

    model = generator.model
    collate = PackedCollator(generator.tokenizer.pad_token_id, recipe.model.attn_implementation,
                             image_settings=generator.image_settings)
    batch_size = recipe.training.per_device_eval_batch_size
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        # The model's loss is the mean over the tokens that predict a label (labels shifted by one).
        count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        with torch.no_grad():
            loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
        total, tokens = total + float(loss) * count, tokens + count
        advance(batch["input_ids"].shape[0])
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}


# ---------------------------------------------------------------- results


MODELS = ("base", "adapter", "merged")
# What write_results may write in <run>/eval/, and so all it may remove there
RESULT_FILES = ("results.json", *(f"answers-{m}.jsonl" for m in MODELS), *(f"lm-eval-{m}.json" for m in MODELS))


def write_results(folder: Path, results: dict[str, Measured]) -> None:
    """results.json, answers-<model>.jsonl and lm-eval-<model>.json, each file whole (written
    beside, renamed in; results.json last), and the previous eval's files of those names that this
    one does not write removed. Nothing else in the folder is touched: it may hold the user's files."""
    staging = folder.with_name(f".{folder.name}.new")
    with atomic_folder(staging, replace=True) as tmp:
        _write_result_files(tmp, results)
    folder.mkdir(parents=True, exist_ok=True)
    written = sorted(staging.iterdir(), key=lambda path: path.name == "results.json")
    for path in written:
        os.replace(path, folder / path.name)
    shutil.rmtree(staging, ignore_errors=True)
    names = {path.name for path in written}
    for name in RESULT_FILES:
        if name not in names:
            (folder / name).unlink(missing_ok=True)


def _write_result_files(tmp: Path, results: dict[str, Measured]) -> None:
    for name, measured in results.items():
        if measured.answers is not None:
            (tmp / f"answers-{name}.jsonl").write_text(
                "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in measured.answers), encoding="utf-8")
        if measured.lm_eval is not None:
            (tmp / f"lm-eval-{name}.json").write_text(json.dumps(measured.lm_eval, indent=2, default=str))
    scores = {name: measured.scores for name, measured in results.items()}
    (tmp / "results.json").write_text(json.dumps(scores, indent=2) + "\n")
