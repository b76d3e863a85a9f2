"""The `qlora` command: parse arguments, call one function, render its result or its error.

Heavy libraries (torch, transformers) are imported inside the commands, so `qlora --help`
answers at once.
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Callable

import typer
from rich.console import Console

from qlora_cli.errors import UserError

app = typer.Typer(
    name="qlora",
    help="Fine-tune Mistral-family models with QLoRA, driven by layered YAML recipes.\n\n"
         "Example: qlora train recipes/tiny-mistral.yaml training.learning_rate=1e-4",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show, explain or validate a resolved recipe.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

RECIPE_ARGS = typer.Argument(
    ..., metavar="RECIPE... [KEY=VALUE...]",
    help="Recipe files or names (merged in order), then overrides like lora.r=8 or ~training.seed.",
)


def split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """Recipes and overrides: an argument with `=` (or starting with `~`) is an override."""
    overrides = [a for a in args if "=" in a or a.startswith("~")]
    return [a for a in args if a not in overrides], overrides


def user_command(func: Callable) -> Callable:
    """Render a UserError as a short message with exit code 2, anything else as a bug (exit 1)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as err:  # a bug in qlora or a library: keep the traceback for --debug
            if _state["debug"]:
                traceback.print_exc()
            else:
                err_console.print(f"[bold red]internal error:[/] {type(err).__name__}: {err}\n"
                                  "rerun with `qlora --debug ...` for the traceback", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of internal errors.")) -> None:
    """Fine-tune Mistral-family models with QLoRA, driven by layered YAML recipes."""
    _state["debug"] = debug


@config_app.command("show")
@user_command
def config_show(args: list[str] = RECIPE_ARGS) -> None:
    """Print the resolved recipe as YAML (a valid recipe again).

    Example: qlora config show tiny-mistral lora.r=8 > my-recipe.yaml
    """
    from qlora_cli.recipe import load_recipe

    recipes, overrides = split_arguments(args)
    text = load_recipe(recipes, overrides).to_yaml()
    if sys.stdout.isatty():
        from rich.syntax import Syntax

        console.print(Syntax(text, "yaml", background_color="default"))
    else:
        sys.stdout.write(text)


@config_app.command("explain")
@user_command
def config_explain(args: list[str] = RECIPE_ARGS) -> None:
    """Print every setting with its value and where it comes from (file:line, override, default).

    Example: qlora config explain recipes/mistral7b.yaml training.learning_rate=1e-4
    """
    from rich.table import Table

    from qlora_cli.explain import explain_recipe
    from qlora_cli.recipe import load_recipe

    recipes, overrides = split_arguments(args)
    table = Table("key", "value", "origin", box=None, pad_edge=False)
    for key, value, origin in explain_recipe(load_recipe(recipes, overrides)):
        style = "dim" if origin.startswith("default") else None
        table.add_row(key, repr(value) if isinstance(value, str) and not value else str(value), origin, style=style)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@config_app.command("validate")
@user_command
def config_validate(args: list[str] = RECIPE_ARGS) -> None:
    """Check a recipe (keys, types, library objections) without loading anything; exit 0 or 2.

    Example: qlora config validate recipes/mistral7b.yaml lora.r=64
    """
    from qlora_cli.recipe import load_recipe

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    console.print(f"[green]ok[/]: {' + '.join(str(f) for f in recipe.files)} is a valid recipe", highlight=False)


@app.command("prepare")
@user_command
def prepare(
    args: list[str] = RECIPE_ARGS,
    show: int = typer.Option(0, "--show", metavar="N", help="Print N prepared examples, trained tokens bright."),
    force: bool = typer.Option(False, "--force", help="Prepare again even when a cached result matches."),
) -> None:
    """Tokenize, mask, pack and cache the recipe's data exactly as training will see it.

    Example: qlora prepare recipes/tiny-mistral.yaml data.max_length=512 --show 2
    """
    from qlora_cli import render
    from qlora_cli.model import load_recipe_tokenizer
    from qlora_cli.prepare import prepare_dataset
    from qlora_cli.recipe import load_recipe

    recipes, overrides = split_arguments(args)
    recipe = load_recipe(recipes, overrides)
    tokenizer = load_recipe_tokenizer(recipe)
    prepared = prepare_dataset(recipe, tokenizer, force=force)
    render.prepare_summary(console, prepared)
    if show:
        render.show_examples(console, prepared.dataset["train"], tokenizer, show)


def run() -> None:
    """Console-script entry point."""
    app()
