"""The one error type for a user's mistakes, rendered once at the CLI edge (exit code 2)."""

from __future__ import annotations

import contextlib
import re


class UserError(Exception):
    """A mistake the user can fix: a recipe key, a data row, an argument, a missing file.

    `where` names the place (``recipe.yaml:12``, ``data.jsonl:7``) and `fix` says what to do
    about it; the CLI prints both and exits 2 without a traceback. A mistake in a recipe value names
    its `key` (``lora.r``) instead of a place: the recipe that set it knows where (`locating`).
    """

    def __init__(self, message: str, *, where: str | None = None, key: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.key = key
        self.fix = fix

    @property
    def errors(self) -> list["UserError"]:
        """The single mistakes this error stands for (itself, or those a `UserErrors` gathers)."""
        return [self]

    def __str__(self) -> str:
        place = self.where or self.key
        text = f"{place}: {self.message}" if place else self.message
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


def locate(err: UserError, origins: dict[str, str]) -> UserError:
    """`err` with each mistake that names a recipe `key` placed where the recipe set it (its
    file:line, or `override`), or else the nearest key around it that the recipe set; the key is
    shown beside the place unless the message names it already."""
    for error in err.errors:
        if error.key is None or error.where is not None:
            continue
        origin = _origin(error.key, origins)
        if origin is None:
            error.where = error.key
        else:
            error.where = origin if _names(error.message, error.key) else f"{origin}: {error.key}"
    return err


def _names(message: str, key: str) -> bool:
    """Whether the message quotes the key (`lora.r` or `lora.r: 0`), so the place need not."""
    return re.search(rf"`{re.escape(key)}(?![\w.])", message) is not None


def _origin(key: str, origins: dict[str, str]) -> str | None:
    while key and key not in origins:
        key = key.rpartition(".")[0]
    return origins.get(key)


@contextlib.contextmanager
def locating(origins: dict[str, str]):
    """Place the mistakes raised inside that name a recipe key (`UserError(..., key="lora.r")`)
    where that recipe (`origins`: the recipe's `Recipe.origins`) set the key."""
    try:
        yield
    except UserError as err:
        locate(err, origins)
        raise


def did_you_mean(name: str, valid) -> str:
    """` (did you mean `x`?)` for the nearest of `valid`, or nothing."""
    import difflib

    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def first_line(err: BaseException, named: bool = False) -> str:
    """The start of a library's error, its first two lines; `named`: after its type, and saying how
    many lines it leaves out (torch lists every mismatched weight of a state dict)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not named:
        return " ".join(lines[:2]) if lines else type(err).__name__
    more = f" (and {len(lines) - 2} more lines)" if len(lines) > 2 else ""
    return f"{type(err).__name__}: {' '.join(lines[:2])}{more}"
