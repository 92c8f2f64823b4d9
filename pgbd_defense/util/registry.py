"""A name -> object registry, so models, data sets and attacks are looked up (and
tested) by the names BackdoorBench uses instead of through if/elif chains."""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Generic, Iterator, TypeVar

from ..errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, ValueError):
    """A name that no registry entry answers to; the message lists the valid ones."""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                warnings.warn(f"{self.kind} {name!r} registered twice; the later one wins")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
