"""The `qlora` command: parse arguments, call one function, render its result or its error.

Heavy libraries (torch, transformers) are imported inside the commands, so `qlora --help`
answers at once.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import typer
from rich.console import Console
from rich.markup import escape

from qlora_cli.errors import UserError, locating
from qlora_cli.training.launch import STATUS_VARIABLE, launch_processes, run_rank

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

class _FlagsWithoutType:
    """A flag takes no value: no `<bool>` after `--help` or `--install-completion` (typer adds those)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_FlagsWithoutType, typer.core.TyperCommand):
    pass


class Group(_FlagsWithoutType, typer.core.TyperGroup):
    pass


app = typer.Typer(
    name="qlora", cls=Group,
    help="Fine-tune Mistral-family models with QLoRA, driven by layered YAML recipes.\n\n"
         "Example: qlora train recipes/tiny-mistral.yaml training.learning_rate=1e-4",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show, explain or validate a resolved recipe.", no_args_is_help=True, cls=Group)
app.add_typer(config_app, name="config")

# soft_wrap: long lines (paths, the commands we print to copy) are never broken by rich.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}

RECIPE_ARGS = typer.Argument(
    ..., metavar="RECIPE... [KEY=VALUE...]",
    help="Recipe files or names (merged in order), then overrides like lora.r=8 or ~training.seed.",
)


def split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """Recipes and overrides: an argument with `=` (or a `~key` deletion) is an override; `~/x.yaml`
    (quoted, so the shell left it) is a recipe in the home folder."""
    overrides = [a for a in args if "=" in a or (a.startswith("~") and not a.startswith("~/"))]
    return [a for a in args if a not in overrides], overrides


def user_command(func: Callable) -> Callable:
    """Render a UserError as a short message with exit code 2, anything else as a bug (exit 1)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            if os.environ.get("RANK", "0") == "0":  # every rank finds the same mistake: say it once
                err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False,
                                  soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as err:  # a bug in qlora or a library: keep the traceback for --debug
            if _state["debug"]:
                traceback.print_exc()
            else:
                err_console.print(f"[bold red]internal error:[/] {type(err).__name__}: {escape(str(err))}\n"
                                  "rerun with `qlora --debug ...` for the traceback", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", metavar="", help="Show tracebacks of internal errors.")) -> None:
    """Fine-tune Mistral-family models with QLoRA, driven by layered YAML recipes."""
    _state["debug"] = debug
    # Our own displays replace the libraries' progress bars; peft calls a transformers alias
    # that transformers itself deprecates, which no user can act on.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (qlora called from Python): tell it directly
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@config_app.command("show", cls=Command)
@user_command
def config_show(args: list[str] = RECIPE_ARGS) -> None:
    """Print the resolved recipe as YAML (a valid recipe again).

    Example: qlora config show tiny-mistral lora.r=8 > my-recipe.yaml
    """
    from qlora_cli.recipe.load import load_recipe

    recipes, overrides = split_arguments(args)
    text = load_recipe(recipes, overrides).to_yaml()
    if sys.stdout.isatty():
        from rich.syntax import Syntax

        console.print(Syntax(text, "yaml", background_color="default"))
    else:
        sys.stdout.write(text)


@config_app.command("explain", cls=Command)
@user_command
def config_explain(args: list[str] = RECIPE_ARGS) -> None:
    """Print every setting with its value and where it comes from (file:line, override, default).

    Example: qlora config explain recipes/mistral7b.yaml training.learning_rate=1e-4
    """
    from rich.table import Column, Table

    from qlora_cli.recipe.explain import explain_recipe
    from qlora_cli.recipe.load import load_recipe

    recipes, overrides = split_arguments(args)
    # On a narrow terminal a long key, value or file:line wraps: cut to "…", the line number is lost.
    table = Table(*(Column(name, overflow="fold") for name in ("key", "value", "origin")), box=None, pad_edge=False)
    for key, value, origin in explain_recipe(load_recipe(recipes, overrides)):
        style = "dim" if origin.startswith("default") else None
        table.add_row(key, repr(value) if isinstance(value, str) and not value else str(value), origin, style=style)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@config_app.command("validate", cls=Command)
@user_command
def config_validate(args: list[str] = RECIPE_ARGS) -> None:
    """Check a recipe (keys, types, library objections) without loading anything; exit 0 or 2.

    Example: qlora config validate recipes/mistral7b.yaml lora.r=64
    """
    from qlora_cli.recipe.load import load_recipe

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    from qlora_cli.recipe.load import display_path

    files = " + ".join(display_path(f) for f in recipe.files)
    console.print(f"[green]ok[/]: {escape(files)} is a valid recipe", highlight=False, soft_wrap=True)


@app.command("prepare", cls=Command)
@user_command
def prepare(
    args: list[str] = RECIPE_ARGS,
    show: int = typer.Option(0, "--show", metavar="N", min=0, help="Print N prepared examples, trained tokens bright."),
    force: bool = typer.Option(False, "--force", metavar="", help="Prepare again even when a cached result matches."),
) -> None:
    """Tokenize, mask, pack and cache the recipe's data exactly as training will see it.

    Example: qlora prepare recipes/tiny-mistral.yaml data.max_length=512 --show 2
    """
    from qlora_cli.terminal import render
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.data.prepare import prepare_dataset
    from qlora_cli.recipe.load import load_recipe

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    with locating(recipe.origins):
        tokenizer = load_recipe_tokenizer(recipe)
        prepared = prepare_dataset(recipe, tokenizer, force=force)
        render.prepare_summary(console, prepared)
        if show:
            render.show_examples(console, prepared.dataset["train"], tokenizer, show)


@app.command("plan", cls=Command)
@user_command
def plan(
    args: list[str] = RECIPE_ARGS,
    gpu_memory: float = typer.Option(None, "--gpu-memory", metavar="GiB", min=0.1, max=1e6,
                                     help="Memory of one GPU, for planning on a machine without it."),
    gpus: int = typer.Option(1, "--gpus", metavar="N", min=1,
                             help="GPUs: in data parallel each holds the whole model; FSDP recipes shard it."),
) -> None:
    """Will the run fit, how long will it take, is the data sound? Reads configs, tokenizer and data, no weights.

    Exit 0 when the run should work, 2 when it will not (with the reasons and what to change).

    Example: qlora plan recipes/mistral7b.yaml --gpu-memory 24
    """
    from qlora_cli.terminal import render
    from qlora_cli.plan.estimate import plan_recipe
    from qlora_cli.recipe.load import load_recipe

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    with locating(recipe.origins):
        result = plan_recipe(recipe, gpu_memory=gpu_memory, gpus=gpus)
    render.plan_report(console, result)
    if not result.ok:
        raise typer.Exit(2)


@app.command("train", cls=Command)
@user_command
def train(
    args: list[str] = RECIPE_ARGS,
    resume: bool = typer.Option(False, "--resume", metavar="",
                                help="Continue the run folder from its last complete checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Start over in an existing run folder: "
                                   "remove what qlora wrote there (checkpoints, adapter, logs), keep anything else."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train on N local processes (DDP through torchrun), e.g. one per GPU."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Machines in the job; run the same command on each."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This machine's place in the job, 0 to nnodes-1."),
    rdzv: str = typer.Option(None, "--rdzv", metavar="HOST:PORT", help="Node 0's address and a free port on it."),
    force: bool = typer.Option(False, "--force", metavar="",
                               help="Train even when `qlora plan` says the run will not fit in GPU memory or on disk."),
) -> None:
    """Train a LoRA adapter on a 4-bit base model as the recipe says.

    Example: qlora train recipes/tiny-mistral.yaml training.learning_rate=1e-3
    """
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.terminal.progress import TrainReporter
    from qlora_cli.training.run import plan_for_processes, train as train_run

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    with locating(recipe.origins):  # every mistake about a key, at the file:line that set it
        # The evaluation that follows a completed run is checked now, not after an hour of training.
        evaluation = None
        if recipe.eval.after_training and evaluates_here():
            from qlora_cli.eval.evaluate import plan_evaluation

            evaluation = plan_evaluation(recipe, after_training=True)
            _warn(evaluation.warnings)
        flags = [flag for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("--force", force)) if on]
        reporter = TrainReporter(console)
        if (nproc > 1 or nnodes > 1) and "LOCAL_RANK" not in os.environ:
            nodes = job_nodes(nnodes, node_rank, rdzv)
            prepared = plan_for_processes(recipe, resume=resume, overwrite=overwrite, force=force,
                                          gpus=nproc * nnodes, reporter=reporter)
            code = launch_processes(nproc, ["train", *args, *flags], prepared, _debug_flag(), nodes)
            if code == 0 and evaluation is not None and node_rank == 0:
                code = _call_qlora(["eval", *args])
            raise typer.Exit(code)

        result = train_run(recipe, resume=resume, overwrite=overwrite, force=force, reporter=reporter)
        if not reporter.main:
            raise typer.Exit(result.exit_code)
        run = result.run
        if result.stopped_by:
            again = shlex.join(["qlora", "train", *args, "--resume", *_job_flags()])
            console.print(f"[yellow]stopped[/] at a checkpoint in {run.checkpoints}; loss plot: {run.plot}\n"
                          f"resume with: {again}", highlight=False)
            raise typer.Exit(result.exit_code)
        # four significant digits: a saturated preference loss (KTO's 2.5e-05) is not rounded to 0.0
        shown = {k: float(f"{v:.4g}") for k, v in result.metrics.items()
                 if k in ("final_train_loss", "eval_loss", "eval_perplexity", "eval_rewards/accuracies",
                          "eval_rewards/margins")}
        console.print(f"[green]done[/]: {shown}\n"
                      f"adapter:   {run.adapter}\nloss plot: {run.plot}\nrun record: {run.run_json}\n"
                      f"next:      qlora merge {run.recipe}\n"
                      f"           qlora generate {run.recipe} --prompt \"...\"", highlight=False)
        if evaluation is not None:  # the tokenizer and prepared data the run loaded, not loaded again
            _evaluate_run(recipe, evaluation, tokenizer=result.tokenizer, prepared=result.prepared)


def _job_flags() -> list[str]:
    """The `--nproc` (and, over several machines, node) flags that start this job again."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    flags = [f"--nproc={local}"] if local > 1 else []
    if world > local:  # this machine's rank; each machine runs it with its own
        flags += [f"--nnodes={world // local}", f"--node-rank={os.environ.get('GROUP_RANK', '0')}",
                  f"--rdzv={os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"]
    return flags


def job_nodes(nnodes: int, node_rank: int, rdzv: str | None):
    """`--nnodes/--node-rank/--rdzv` checked: None for one machine, else (nnodes, node_rank, host, port)."""
    if nnodes == 1 and rdzv is None and node_rank == 0:
        return None
    host, _, port = (rdzv or "").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--rdzv {rdzv or '(missing)'} is not HOST:PORT", where="--rdzv",
                        fix="give node 0's address and a free port on it, the same on every node: --rdzv 10.0.0.1:29500")
    if node_rank >= nnodes:
        raise UserError(f"--node-rank {node_rank} is not below --nnodes {nnodes}", where="--node-rank",
                        fix=f"number the machines 0 to {nnodes - 1}")
    return nnodes, node_rank, host, int(port)


def evaluates_here() -> bool:
    """Whether this process runs `eval.after_training`: the `--nproc` launcher (it evaluates once its
    workers are done) or global rank 0 of a job torchrun/accelerate started; never another rank,
    never a `--nproc` worker."""
    return not os.environ.get(STATUS_VARIABLE) and os.environ.get("RANK", "0") == "0"


@app.command("merge", cls=Command)
@user_command
def merge(
    args: list[str] = RECIPE_ARGS,
    overwrite: bool = typer.Option(False, "--overwrite", metavar="",
                                   help="Replace an existing merged folder that qlora wrote (never another folder)."),
) -> None:
    """Merge the run's LoRA adapter into its base model and write a standalone model, verified.

    Example: qlora merge runs/tiny-mistral merge.dtype=float32
    """
    from qlora_cli.export.merge import MergeVerificationFailed, merge as merge_run
    from qlora_cli.recipe.load import load_recipe

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    try:
        with locating(recipe.origins):
            result = merge_run(recipe, overwrite=overwrite)
    except MergeVerificationFailed as err:
        err_console.print(f"[bold red]merge failed verification:[/] {err}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"merged into {result.base}; {_logits_check(result)}", highlight=False)
    for difference in result.lora_differences:
        err_console.print(f"[yellow]warning:[/] {escape(difference)}: merged as the adapter was trained (its "
                          "adapter_config.json)", highlight=False)
    if result.adapter_within_rounding:
        err_console.print(f"[yellow]warning:[/] the adapter moves the probe's logits by at most "
                          f"{result.adapter_effect.max:.3g}, within what rounding allows ({result.tolerance:.3g}): "
                          "this check cannot tell whether the adapter survived the merge; merge.dtype=float32 can",
                          highlight=False)
    again = shlex.join(["qlora", "generate", *args, "--model", str(result.output), "--prompt", "..."])
    console.print(f"[green]done[/]: {result.output}\nnext: {again}", highlight=False)


def _logits_check(result) -> str:
    """The merge's verification in one phrase: against base + adapter unmerged and, for a 4-bit
    run, against the 4-bit model as trained (merged into the dequantized base, the two agree)."""
    unmerged, trained = str(result.merged_vs_unmerged), result.merged_vs_quantized
    if trained is None:
        return f"logits vs base + adapter: {unmerged}"
    if str(trained) == unmerged:
        return f"logits vs base + adapter (as trained in 4 bits): {unmerged}"
    return f"logits vs base + adapter: {unmerged}; as trained in 4 bits: {trained}"


@app.command("generate", cls=Command)
@user_command
def generate(
    args: list[str] = RECIPE_ARGS,
    prompt: str = typer.Option(None, "--prompt", help="One user message; the answer is streamed."),
    input: Path = typer.Option(None, "--input", help="JSONL of {prompt} or {messages} records to answer."),
    output: Path = typer.Option(None, "--output", help="JSONL to write: each input record (or the --prompt) plus `response`."),
    interactive: bool = typer.Option(False, "--interactive", help="Chat in the terminal (/reset, /exit).", metavar=""),
    model: str = typer.Option(None, "--model", help="A merged folder or any model path / hub id instead of the run's adapter."),
    resume: bool = typer.Option(False, "--resume", metavar="", help="With --output: skip the records already answered."),
    image: list[Path] = typer.Option(None, "--image", help="An image the --prompt asks about (repeat for several)."),
) -> None:
    """Answer prompts with the trained adapter (or --model), formatted exactly as in training.

    Example: qlora generate runs/tiny-mistral/recipe.yaml --prompt "What is the capital of France?"
    """
    from qlora_cli.atomic import lock_output_file, release_folder
    from qlora_cli.export.generate import choose_answering, default_length_warning, load_generator, prompt_messages
    from qlora_cli.recipe.load import load_recipe

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    with locating(recipe.origins):
        # `--model=~/merged` reaches us unexpanded (the shell expands `~` only at a word's start).
        input, output = (path.expanduser() if path else None for path in (input, output))
        model = os.path.expanduser(model) if model else None
        answering = choose_answering(recipe, prompt=prompt, input=input, output=output, interactive=interactive,
                                     resume=resume, model_path=model, images=[p.expanduser() for p in image or []])
        _warn([default_length_warning(recipe)])
        # Two commands appending to one answers file would interleave (and double) its lines.
        lock = lock_output_file(answering.output, "generate") if answering.output else None
        try:
            generator = load_generator(recipe, model)
            if answering.records is not None:
                _answer_file(generator, answering.records, answering.output, recipe, resume)
            elif answering.prompt is not None:
                _print_answers(generator, prompt_messages(answering.prompt, answering.images))
            else:
                _chat(generator)
        finally:
            if lock:
                release_folder(lock)


@app.command("export", cls=Command)
@user_command
def export(
    args: list[str] = RECIPE_ARGS,
    to: str = typer.Option(..., "--to", help="gguf (llama.cpp, LM Studio), ollama (GGUF + Modelfile) or adapter "
                                             "(the LoRA alone, for vLLM / TGI / LoRAX)."),
    quant: str = typer.Option(None, "--quant", help="GGUF types, comma-separated: f16 (the default), bf16, q8_0, "
                                                     "q4_k_m, q5_k_m, q6_k, ... (an unknown one lists them all)."),
    llama_cpp: str = typer.Option(None, "--llama-cpp", help="A llama.cpp checkout whose converter to run "
                                                             "(default: $QLORA_LLAMA_CPP, else the installed one's)."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace an existing <run>/export."),
) -> None:
    """Write what an engine serves into <run>/export/, checked in that engine where it runs here.

    Example: qlora export runs/tiny-mistral --to gguf --quant q8_0,q4_k_m
    """
    from qlora_cli.recipe.load import load_recipe

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    targets = ("gguf", "ollama", "adapter")
    if to not in targets:
        raise UserError(f"unknown export target {to!r}", key="--to", fix=f"use one of {', '.join(targets)}")
    with locating(recipe.origins):
        if to == "adapter":
            from qlora_cli.export.adapter import export_adapter

            for flag, value in (("--quant", quant), ("--llama-cpp", llama_cpp)):
                if value is not None:
                    raise UserError(f"{flag} is for GGUF files; --to adapter copies the LoRA weights as trained",
                                    key=flag, fix=f"leave out {flag}, or export with --to gguf or --to ollama")

            result = export_adapter(recipe, overwrite=overwrite)
            for line in result.notes:
                console.print(line, highlight=False)
            console.print(f"[green]done[/]: {result.folder}", highlight=False)
            return
        from qlora_cli.export.gguf import export_gguf
        from qlora_cli.export.llama_cpp import ConversionFailed

        try:
            result = export_gguf(recipe, (quant or "f16").split(","), ollama=to == "ollama", llama_cpp_dir=llama_cpp,
                                 overwrite=overwrite)
        except ConversionFailed as err:
            err_console.print(f"[bold red]export failed:[/] {escape(str(err))}", highlight=False)
            raise typer.Exit(1) from None
    _print_export(result)


def _print_export(result) -> None:
    from rich.table import Table

    if result.merged_now:
        console.print("merged the adapter first (the run had no merged model of this adapter)", highlight=False)
    close = max((t.kl_vs_transformers or 0.0 for t in result.report.types), default=0.0)
    console.print(f"engine check passed in llama.cpp on {len(result.report.probes)} prompts from the run's data: "
                  "tokens of the GGUF's chat template = the trained ids; 16-bit answers within "
                  f"{close:.1e} nats/token of transformers'", highlight=False)
    table = Table("type", "same greedy tokens as f16", "mean KL vs f16 (nats/token)", box=None, pad_edge=False)
    for row in result.report.types:
        same = "reference" if row.same_tokens is None else f"{row.same_tokens:.0%}"
        table.add_row(row.name, same, "" if row.mean_kl is None else f"{row.mean_kl:.2e}")
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    for path in result.files:
        console.print(f"  {path}", highlight=False)
    console.print(f"[green]done[/]: {result.folder}", highlight=False)


@app.command("eval", cls=Command)
@user_command
def eval_command(
    args: list[str] = RECIPE_ARGS,
    input: Path = typer.Option(None, "--input", help="JSONL of {prompt} or {messages} records with a `reference` answer."),
    model: str = typer.Option(None, "--model", help="A merged folder or any model path to score as `merged` (default: <run>/merged when it exists)."),
    tasks: str = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks, comma-separated: names, task YAML files or folders."),
    limit: int = typer.Option(None, "--limit", min=1, metavar="N", help="Only the first N records and N examples per task: a quick look."),
) -> None:
    """Score the base model, the run's adapter and the merged model side by side: your own data
    (exact match, token F1, chrF), validation loss, and lm-eval tasks. Results go to <run>/eval/.
    The recipe's `eval` section gives what a flag does not.

    Example: qlora eval runs/tiny-mistral --input qa.jsonl --tasks arc_easy --limit 50
    """
    from qlora_cli.eval.evaluate import plan_evaluation
    from qlora_cli.recipe.load import load_recipe

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    with locating(recipe.origins):
        task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
        plan = plan_evaluation(recipe, input=input.expanduser() if input else None,
                               model_path=os.path.expanduser(model) if model else None, tasks=task_list, limit=limit)
        _warn(plan.warnings)
        _evaluate_run(recipe, plan)


def _evaluate_run(recipe: Recipe, plan, **loaded) -> None:
    from qlora_cli.terminal import render
    from qlora_cli.eval.evaluate import evaluate
    from qlora_cli.terminal.progress import StageBars

    with StageBars(err_console) as progress:
        result = evaluate(recipe, plan, progress=progress, **loaded)
    render.eval_table(console, result.scores)
    console.print(f"results: {result.folder / 'results.json'}", highlight=False, soft_wrap=True)


def _warn(warnings: list[str | None]) -> None:
    for warning in filter(None, warnings):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


def _print_answers(generator, messages: list[dict]) -> str:
    """Stream the answer when generation allows it; else print each answer when all are done."""
    if generator.streams:
        return _stream_answer(generator, messages)
    answers = generator.answer_batch([messages])[0]
    for number, answer in enumerate(answers, start=1):
        label = f"[bold]answer {number}:[/] " if len(answers) > 1 else ""
        console.print(label + escape(answer), highlight=False, soft_wrap=True)
    return answers[0]


def _stream_answer(generator, messages: list[dict]) -> str:
    pieces = []
    for piece in generator.stream(messages):
        pieces.append(piece)
        console.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
    console.print()
    return "".join(pieces).strip()


def _answer_file(generator, records, output: Path, recipe: Recipe, resume: bool) -> None:
    from qlora_cli.export.generate import answer_file
    from qlora_cli.terminal.progress import StageBars

    with StageBars(err_console) as stage:
        count = answer_file(generator, records, output, recipe.generate.options.batch_size, resume,
                            on_batch=stage("generate", len(records)))
    console.print(f"[green]done[/]: {count} answers written to {output}", highlight=False)


def _chat(generator) -> None:
    console.print("chat with the model; /reset starts over, /exit leaves", style="dim")
    messages: list[dict] = []
    while True:
        try:
            text = console.input("[bold]you>[/] ")
        except EOFError:
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            messages = []
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        console.print("[bold]model>[/] ", end="")
        messages.append({"role": "assistant", "content": _print_answers(generator, messages) or "..."})


def _call_qlora(command: list[str]) -> int:
    import subprocess

    return subprocess.call([sys.executable, "-m", "qlora_cli", *_debug_flag(), *command])


def _debug_flag() -> list[str]:
    return ["--debug"] if _state["debug"] else []


def run() -> None:
    """Console-script entry point (and `python -m qlora_cli`, as torchrun starts each worker)."""
    if os.environ.get(STATUS_VARIABLE) and "LOCAL_RANK" in os.environ:
        run_rank(app)  # a worker of `--nproc`: the launcher reports its exit code
    else:
        app()
