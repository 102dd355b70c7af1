"""One small registry type for every name a recipe uses: objectives, alpha schedules, rewards, backends.

A :class:`Registry` maps a name to an object, or to a ``"module:attribute"`` string that is imported
only when the name is looked up, so choosing the CPU backend never imports the GPU one. Built-ins
are added with :meth:`Registry.add` (or the :meth:`Registry.register` decorator); third-party
packages add theirs through an entry-point group, which is read on the first lookup and lands in
the same table by the same :meth:`add`::

    # a third-party pyproject.toml
    [project.entry-points."apo.backends"]
    mybackend = "my_pkg.backend:MyBackend"

A name that is not there is a :class:`UnknownName` (a ``KeyError`` and a ``ValueError``) whose
message lists the valid names and the closest one. A third-party entry that cannot be imported
fails only when it is chosen, with its own one-line error; the built-ins never depend on it.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "UnknownName", "load_target"]


class UnknownName(KeyError, ValueError):
    """A name the registry does not hold; ``str()`` is the one-line message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def load_target(target: str) -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted) and return the attribute."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ImportError(f"{target!r} is not of the form 'module:attribute'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


class Registry(Generic[T]):
    """Names of one kind (``what``: "objective", "backend", ...), built-in and from ``group``."""

    def __init__(self, what: str, group: str | None = None):
        self.what = what
        self.group = group
        self._entries: dict[str, T | str] = {}
        self._loaded: dict[str, T] = {}
        self._from_group: list[str] = []  # names found in the entry-point group, in scan order
        self._scanned = group is None

    # -- adding -----------------------------------------------------------------------------------

    def add(self, name: str, obj: T | str, *, replace: bool = False) -> None:
        """Register ``obj`` (or a lazy ``"module:attribute"``) under ``name``."""
        if not replace and name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = obj
        self._loaded.pop(name, None)
        if name in self._from_group:  # now added in code: no longer the plugin's
            self._from_group.remove(name)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def _scan(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        from importlib.metadata import entry_points

        try:
            eps = list(entry_points(group=self.group))
        except Exception:  # noqa: BLE001 - a broken distribution must not break the built-ins
            return
        for ep in eps:
            if ep.name not in self._entries:  # a built-in of the same name stays the built-in
                self._entries[ep.name] = ep.value
                self._from_group.append(ep.name)

    def reset(self) -> None:
        """Forget what the entry-point group gave; the next lookup reads the group again.

        For tests and long-lived processes that install a plugin: the built-ins stay.
        """
        for name in self._from_group:
            self._entries.pop(name, None)
            self._loaded.pop(name, None)
        self._from_group = []
        self._scanned = self.group is None

    # -- looking up -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        self._scan()
        return sorted(self._entries)

    def ordered(self) -> list[str]:
        """The names in the order they were added: the built-ins, then the entry points as found."""
        self._scan()
        return list(self._entries)

    def builtins(self) -> list[str]:
        """The names added in code (not from the entry-point group), in the order they were added.

        What generated docs describe: they must not depend on the plugins installed where they run.
        Reads no entry points.
        """
        return [n for n in self._entries if n not in self._from_group]

    def __contains__(self, name: object) -> bool:
        self._scan()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def unknown(self, name: str) -> UnknownName:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return UnknownName(f"unknown {self.what} {name!r}{hint}; valid names: {', '.join(names)}")

    def get(self, name: str) -> T:
        """The object registered as ``name``, imported on first use."""
        if name in self._loaded:
            return self._loaded[name]
        self._scan()
        if name not in self._entries:
            raise self.unknown(name)
        entry = self._entries[name]
        obj = load_target(entry) if isinstance(entry, str) else entry
        self._loaded[name] = obj
        return obj

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def items(self) -> list[tuple[str, T]]:
        """Every entry, imported (for schemas and docs, which describe them all)."""
        return [(n, self.get(n)) for n in self.names()]
