"""`method: grpo`'s rewards: the functions a recipe's `rewards` section names, each with its weight.

Every reward has TRL's signature, `(completions, **columns) -> list[float | None]`: one value per
completion (None: this reward does not judge it), called with the completions, the row's columns
(`answer`, ...) and TRL's own arguments (`prompts`, `completion_ids`, `trainer_state`, ...) by name.

    rewards:
      - function: exact_match       # 1 when the answer equals the row's `column` (default `answer`)
        pattern: '\\boxed\\{(.*?)\\}'  # optional: the answer is this group of the last match
      - function: regex             # 1 when the whole completion matches `pattern` (a format)
        pattern: '<think>.*</think>.*'
      - function: length            # 0 up to max_tokens - buffer, then down to -1 at max_tokens
        max_tokens: 64              # default: training.max_completion_length
        buffer: 16                  # default: max_tokens (every token costs: fewer is better)
      - function: my_rewards.py:score   # a user's: the file is found beside the recipe that names it
        weight: 0.5                 # every reward's weight defaults to 1 (-> GRPOConfig.reward_weights)

A user's file is imported once per process, when the recipe is validated; its function must take
`completions` and `**kwargs`. During training a reward that raises, or returns the wrong number of
values, stops the run with exit 2, naming the function and the prompt it failed on.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from qlora_cli.errors import UserError, did_you_mean

BUILT_INS = ("exact_match", "regex", "length")
DEFAULT_COLUMN = "answer"


@dataclass
class RewardSection:
    """One entry of the recipe's `rewards` list."""

    function: str  # a built-in name, or path/to/file.py:function_name
    weight: float = 1.0
    column: str | None = None  # exact_match: the row's column holding the right answer
    pattern: str | None = None  # regex: the whole completion's format; exact_match: where the answer is
    max_tokens: int | None = None  # length: where the penalty reaches -1
    buffer: int | None = None  # length: how many tokens before max_tokens the penalty starts


# ---------------------------------------------------------------- checks at load


def check_rewards(rewards: list[RewardSection], method: str) -> list[UserError]:
    """Every problem of the `rewards` section at once: a reward file that does not import, a missing
    function, a wrong signature, a built-in's options."""
    if method != "grpo":
        return [UserError(f"`rewards` is read by `method: grpo` only, and this recipe's method is {method}",
                          key="rewards", fix="remove the section, or set method: grpo")] if rewards else []
    if not rewards:
        return [UserError("`method: grpo` needs a `rewards` section: what makes one completion better than another",
                          key="rewards", fix="add rewards: [{function: exact_match, column: answer}] or a "
                                              "function of your own (file.py:function)")]
    errors = []
    for index, reward in enumerate(rewards):
        try:
            _check_options(reward, f"rewards.{index}")
            if reward.function not in BUILT_INS:
                load_function(reward.function, f"rewards.{index}.function")
        except UserError as err:
            errors += err.errors
    return errors


def _check_options(reward: RewardSection, key: str) -> None:
    allowed = {"exact_match": {"column", "pattern"}, "regex": {"pattern"}, "length": {"max_tokens", "buffer"}}
    given = {name for name in ("column", "pattern", "max_tokens", "buffer") if getattr(reward, name) is not None}
    extra = sorted(given - allowed.get(reward.function, set()))
    if extra:
        what = f"the built-in `{reward.function}`" if reward.function in BUILT_INS else "a function of your own"
        raise UserError(f"`{key}.{extra[0]}` means nothing to {what}", key=f"{key}.{extra[0]}",
                        fix="remove it (exact_match takes column and pattern, regex pattern, length max_tokens and buffer)")
    if reward.function == "regex" and reward.pattern is None:
        raise UserError("the `regex` reward needs a `pattern` that a well-formed completion matches whole",
                        key=key, fix="add pattern: '<think>.*</think>.*' (or your format)")
    if reward.pattern is not None:
        try:
            re.compile(reward.pattern)
        except re.error as err:
            raise UserError(f"`{key}.pattern` is no regular expression: {err}", key=f"{key}.pattern") from None
    for name in ("max_tokens", "buffer"):
        value = getattr(reward, name)
        if value is not None and value < 1:
            raise UserError(f"`{key}.{name}` must be at least 1, got {value}", key=f"{key}.{name}")


def load_function(spec: str, key: str):
    """The function `path/to/file.py:function_name` names (the path as load_recipe resolved it)."""
    path_text, colon, name = spec.rpartition(":")
    if not colon or not path_text.endswith(".py") or not name.isidentifier():
        raise UserError(f"`{spec}` is neither a built-in reward ({', '.join(BUILT_INS)}) nor path/to/file.py:function",
                        key=key, fix=f"use one of {', '.join(BUILT_INS)}, or name a Python file and its function"
                                     + did_you_mean(spec, BUILT_INS))
    try:
        module = _import_file(Path(path_text).resolve())
    except UserError as err:  # the file knows what is wrong, the recipe knows which reward needs it
        raise UserError(f"reward `{spec}`: {err.message}", where=err.where, key=key, fix=err.fix) from None
    function = getattr(module, name, None)
    if not callable(function):
        names = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
        raise UserError(f"`{path_text}` has no function `{name}`", key=key,
                        fix=f"define it there, or name one it has: {', '.join(names) or 'none'}" + did_you_mean(name, names))
    _check_signature(function, f"{path_text}:{name}", key)
    return function


@functools.cache
def _import_file(path: Path):
    """The module in `path`, imported once per process under a name of its own."""
    if not path.is_file():
        raise UserError(f"the file `{path}` does not exist",
                        fix="give its path relative to the recipe that names it, or an absolute path")
    name = f"qlora_rewards_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise UserError(f"the file does not parse: {err.msg}", where=f"{path}:{err.lineno}") from None
    except Exception as err:  # the user's code failed as it imported: theirs to fix
        raise UserError(f"the file fails to import: {type(err).__name__}: {err}", where=str(path)) from None
    sys.modules[name] = module  # pickling (dataloader workers) finds it by name
    return module


def _check_signature(function, label: str, key: str) -> None:
    """TRL calls a reward with keywords only: the completions, each column of the row, and its own."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C function: its call will tell
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters)
    positional_only = [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if not takes_kwargs or positional_only:
        raise UserError(f"reward `{label}` has the signature {inspect.signature(function)}, and TRL calls it as "
                        "f(completions=..., prompts=..., <each column of the row>=..., ...)", key=key,
                        fix=f"define it as def {getattr(function, '__name__', 'reward')}(completions, **kwargs) "
                            "returning one float (or None) per completion")


# ---------------------------------------------------------------- the functions TRL calls


def reward_functions(rewards: list[RewardSection], max_completion_length: int | None) -> list:
    """The callables for GRPOTrainer(reward_funcs=...), in the recipe's order, each named as TRL logs
    it (`rewards/<name>/mean`) and each failing with a UserError that names it and the prompt."""
    functions, names = [], []
    for index, reward in enumerate(rewards):
        key = f"rewards.{index}.function"
        function = (load_function(reward.function, key) if reward.function not in BUILT_INS
                    else _built_in(reward, max_completion_length))
        name = reward.function.rpartition(":")[2]
        name = name if name not in names else f"{name}_{index}"  # two regex rewards log apart
        names.append(name)
        functions.append(_guarded(function, name, reward.function, key))
    return functions


def _built_in(reward: RewardSection, max_completion_length: int | None):
    if reward.function == "exact_match":
        return functools.partial(exact_match, column=reward.column or DEFAULT_COLUMN, pattern=reward.pattern)
    if reward.function == "regex":
        return functools.partial(regex, pattern=reward.pattern)
    max_tokens = reward.max_tokens or max_completion_length or 256  # GRPOConfig's default length
    return functools.partial(length, max_tokens=max_tokens, buffer=reward.buffer or max_tokens)


def _guarded(function, name: str, label: str, key: str):
    def reward(completions, **kwargs):
        try:
            values = list(function(completions=completions, **kwargs))
        except UserError:
            raise
        except Exception as err:
            raise _failure(function, label, key, completions, kwargs, err) from None
        if len(values) != len(completions):
            raise UserError(f"reward `{label}` returned {len(values)} values for {len(completions)} completions "
                            f"(prompt: {_shown(kwargs.get('prompts', [None])[0])})", key=key,
                            fix="return one float (or None) per completion, in their order")
        bad = next((v for v in values if v is not None and not _is_number(v)), "none")
        if bad != "none":
            raise UserError(f"reward `{label}` returned {bad!r}, which is no number", key=key,
                            fix="return one float (or None) per completion")
        return [None if v is None else float(v) for v in values]

    reward.__name__ = name  # TRL's name for it in the logs
    return reward


def _failure(function, label: str, key: str, completions, kwargs, err: Exception) -> UserError:
    """The error of a reward that raised, naming the first prompt whose completion makes it raise."""
    prompts = kwargs.get("prompts") or [None] * len(completions)
    for index in range(len(completions)):
        one = {name: value[index:index + 1] if isinstance(value, list) and len(value) == len(completions) else value
               for name, value in kwargs.items()}
        try:
            function(completions=completions[index:index + 1], **one)
        except Exception as single:
            err, prompt = single, prompts[index]
            break
    else:
        prompt = prompts[0]
    return UserError(f"reward `{label}` raised {type(err).__name__}: {err} (prompt: {_shown(prompt)})", key=key,
                     fix="fix the function; it is called with completions=[...] and each column of the row by name")


def _shown(prompt) -> str:
    text = prompt if isinstance(prompt, str) or prompt is None else prompt[-1].get("content", "")
    text = repr(text)
    return text if len(text) <= 80 else text[:77] + "...'"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real)  # numpy's floats too; a tensor or text is not


def completion_text(completion) -> str:
    """A completion's text: TRL gives text for text prompts, assistant messages for conversations."""
    return completion if isinstance(completion, str) else "".join(m.get("content") or "" for m in completion)


def exact_match(completions, *, column: str, pattern: str | None, **row) -> list[float]:
    """1.0 where the completion's answer (the last match of `pattern`'s first group, or the whole
    completion) equals the row's `column`, stripped; else 0.0."""
    if column not in row:
        raise KeyError(f"the row has no column `{column}` to compare the answers with")
    rights = row[column]
    scores = []
    for completion, right in zip(completions, rights):
        text = completion_text(completion)
        if pattern is not None:
            found = re.findall(pattern, text, re.DOTALL)
            text = found[-1] if found else None
            text = text[0] if isinstance(text, tuple) else text
        scores.append(float(text is not None and text.strip() == str(right).strip()))
    return scores


def regex(completions, *, pattern: str, **_) -> list[float]:
    """1.0 where the whole completion matches `pattern` (a required format), else 0.0."""
    return [float(re.fullmatch(pattern, completion_text(c), re.DOTALL) is not None) for c in completions]


def length(completions, *, max_tokens: int, buffer: int, completion_ids=None, **_) -> list[float]:
    """0 for a completion up to `max_tokens - buffer` tokens, falling linearly to -1 at `max_tokens`
    and staying there (DAPO's and Magistral's soft overlong penalty; buffer = max_tokens: each
    token costs the same)."""
    sizes = [len(ids) for ids in completion_ids] if completion_ids is not None else [
        len(completion_text(c).split()) for c in completions]
    free = max_tokens - buffer
    return [-min(max(size - free, 0) / buffer, 1.0) for size in sizes]
