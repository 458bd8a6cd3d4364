"""A name -> function registry. Variants of the algorithm (advantages, losses, selection rules,
engines, verifiers) register here and are chosen by name from config; an unknown name raises a
``ValueError`` that lists the valid ones."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

Item = TypeVar("Item")  # what a registry holds (T means tokens elsewhere)


def closest(name: str, valid) -> str | None:
    """The valid name nearest ``name`` (a likely typo's fix), or None if none is near."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return close[0] if close else None


class Registry(Generic[Item]):
    """A named table of interchangeable implementations of one concept."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Item] = {}

    def register(self, name: str) -> Callable[[Item], Item]:
        def deco(obj: Item) -> Item:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Item:
        if name not in self._items:
            close = closest(name, self._items)
            hint = f" Did you mean {close!r}?" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
