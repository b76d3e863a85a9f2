"""Jinja's sandbox with bounds, for the chat templates qlora renders (a recipe's or a tokenizer's).

transformers renders chat templates in Jinja's ImmutableSandboxedEnvironment, which forbids
Python attributes but bounds nothing else: `{{ 'a' * 10**12 }}` asks for a terabyte, a macro that
calls itself ends in a RecursionError, and a read of `__class__` renders as empty text instead of
failing. transformers builds that environment inside the function that compiles a template and
offers no hook, so `bound_chat_templates` hands it this subclass in its place (and forgets the
templates it compiled before). What is bounded, each refused with a SecurityError that names it:

- a string or list made by `*` or `+`, read from a namespace, or passed to a call or a filter:
  at most MAX_ITEMS items; an int power: at most MAX_POWER_BITS bits; a width or count passed to
  a filter or a string method (`center`, `ljust`, ...): at most MAX_ITEMS;
- calls (macros included) per render: at most MAX_CALLS; recursion: Python's own limit, whose
  RecursionError the caller turns into the user's error;
- a read of an attribute the sandbox forbids raises instead of rendering as nothing.

Loops are bounded by Jinja's own `range` limit (100,000 items), not by time.
"""

from __future__ import annotations

import functools

from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_ITEMS = 1 << 25  # 33.5M characters or list items: far above any conversation, far below a memory bomb
MAX_POWER_BITS = 1 << 16
MAX_CALLS = 100_000


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with the bounds of the module's docstring."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filters = {name: _bounded_filter(name, function) for name, function in self.filters.items()}

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            _check_power(left, right)
        elif operator == "*":
            for sized, count in ((left, right), (right, left)):
                if _is_sized(sized) and isinstance(count, int) and len(sized) * count > MAX_ITEMS:
                    raise SecurityError(f"{_kind(sized)} of {len(sized):,} repeated {count:,} times is longer than "
                                        f"a chat template may make ({MAX_ITEMS:,})")
        elif _is_sized(left) and _is_sized(right) and len(left) + len(right) > MAX_ITEMS:
            raise SecurityError(f"joining two values of {len(left):,} and {len(right):,} items is longer than a chat "
                                f"template may make ({MAX_ITEMS:,})")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        calls = getattr(__context, "_qlora_calls", 0) + 1
        if calls > MAX_CALLS:
            raise SecurityError(f"the template made more than {MAX_CALLS:,} calls in one render (a macro that "
                                "calls itself?)")
        __context._qlora_calls = calls
        _check_arguments(getattr(__obj, "__name__", "a call"), args, kwargs,
                         widths=isinstance(getattr(__obj, "__self__", None), str))
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        value = super().getattr(obj, attribute)
        if isinstance(obj, Namespace) and _is_sized(value) and len(value) > MAX_ITEMS:
            raise SecurityError(f"`{attribute}` holds {len(value):,} items, more than a chat template may make "
                                f"({MAX_ITEMS:,})")
        return value

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")


def bound_chat_templates() -> None:
    """Make transformers compile every chat template in a BoundedSandbox from now on."""
    from transformers.utils import chat_template_utils

    if chat_template_utils.ImmutableSandboxedEnvironment is not BoundedSandbox:
        chat_template_utils.ImmutableSandboxedEnvironment = BoundedSandbox
        chat_template_utils._compile_jinja_template.cache_clear()  # compiled before, unbounded


def _is_sized(value) -> bool:
    return isinstance(value, (str, list, tuple))


def _kind(value) -> str:
    return "a string" if isinstance(value, str) else "a list"


def _check_power(base, exponent) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0 \
            and exponent * abs(base).bit_length() > MAX_POWER_BITS:
        raise SecurityError(f"{base} ** {exponent} has more than {MAX_POWER_BITS:,} bits")


def _check_arguments(name: str, args, kwargs, *, widths: bool) -> None:
    for value in (*args, *kwargs.values()):
        if _is_sized(value) and len(value) > MAX_ITEMS:
            raise SecurityError(f"{name} was given {len(value):,} items, more than a chat template may make "
                                f"({MAX_ITEMS:,})")
        if widths and isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ITEMS:
            raise SecurityError(f"{name} was given {value:,}, wider than a chat template may make ({MAX_ITEMS:,})")


def _bounded_filter(name: str, function):
    passed = 2 if hasattr(function, "jinja_pass_arg") else 1  # the context or environment, then the value

    @functools.wraps(function)  # keeps Jinja's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        _check_arguments(f"the {name} filter", args[:passed], {}, widths=False)
        _check_arguments(f"the {name} filter", args[passed:], kwargs, widths=True)
        return function(*args, **kwargs)

    return bounded
