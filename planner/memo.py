"""Per-instance memoisation keyed by exactly the arguments a method takes.

A memoised method's cache key is its positional arguments and nothing else, so a result can only
depend on what is in the key: a method that needs another figure must take it as an argument.
Arguments must be hashable (numbers, strings, tuples, frozen dataclasses). Keyword arguments are
refused, so that one call cannot be cached under two keys.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def memo_method(method: F) -> F:
    """Cache `method(self, *args)` per instance in a dict held on the instance."""
    attr = f"_memo_{method.__name__}"

    @functools.wraps(method)
    def wrapper(self, *args):
        try:
            cache = self.__dict__[attr]
        except KeyError:
            cache = self.__dict__[attr] = {}
        try:
            return cache[args]
        except KeyError:
            value = cache[args] = method(self, *args)
            return value

    return wrapper  # type: ignore[return-value]
