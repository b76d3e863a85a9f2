"""The one error type for a user's mistakes, rendered once at the CLI edge (exit code 2)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: a recipe key, a data row, an argument, a missing file.

    `where` names the place (``recipe.yaml:12``, ``data.jsonl:7``, ``lora.r``) and `fix` says
    what to do about it; the CLI prints both and exits 2 without a traceback.
    """

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.fix = fix

    @property
    def errors(self) -> list["UserError"]:
        """The single mistakes this error stands for (itself, or those a `UserErrors` gathers)."""
        return [self]

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text}\n  fix: {self.fix}" if self.fix else text


class UserErrors(UserError):
    """Several user mistakes found in one pass, reported together so they are fixed in one round."""

    def __init__(self, errors: list[UserError]):
        self._errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    @property
    def errors(self) -> list[UserError]:
        return self._errors

    def __str__(self) -> str:
        return "\n".join(f"- {e}" for e in self.errors)


def combined(errors: list[UserError]) -> UserError:
    """One error to raise for a non-empty list: the only one, or all of them together."""
    return errors[0] if len(errors) == 1 else UserErrors(errors)


# The origins of the recipe the running command loaded: load_recipe remembers them, the CLI edge
# forgets them when a command starts and reads them when it shows an error, so that an error raised
# deep in a stage with a bare key (`where="merge.output_dir"`) names the file:line that set it.
_recipe_origins: dict[str, str] = {}


def remember_origins(origins: dict[str, str]) -> None:
    _recipe_origins.clear()
    _recipe_origins.update(origins)


def forget_origins() -> None:
    _recipe_origins.clear()


def located(err: UserError) -> UserError:
    """`err` with each bare recipe key it names as its place (`lora.r`) shown as
    `recipe.yaml:12: lora.r` (or `override: lora.r`), where the loaded recipe set that key."""
    for error in err.errors:
        if error.where in _recipe_origins:
            error.where = f"{_recipe_origins[error.where]}: {error.where}"
    return err


def where_of(origins: dict[str, str], key: str, default: str | None = None) -> str | None:
    """Where a recipe set `key`: its file and line, or the override that did; else `default`
    (a parent key, or where a neighbour was set), by default the key itself."""
    return origins.get(key, key if default is None else default)


def did_you_mean(name: str, valid) -> str:
    """` (did you mean `x`?)` for the nearest of `valid`, or nothing."""
    import difflib

    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
