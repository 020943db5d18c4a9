"""Registries: one named, small unit per kind (observable, systematic, objective), looked up by the
name a config or the CLI gives.

A :class:`Registry` maps a name to an entry and says what it knows when a name is unknown. Units
register themselves where they are defined (``@OBSERVABLES.register("ht")``); a user's own unit
registers the same way from their module, which a config names under ``plugins`` so it is
imported wherever the analysis runs (dask workers included).

>>> reg = Registry("colour")
>>> _ = reg.register("red")(lambda: "#f00")
>>> reg["red"]()
'#f00'
>>> reg["rde"]
Traceback (most recent call last):
...
jacana.stages.errors.ConfigError: unknown colour 'rde' (did you mean 'red'?); known: red
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from jacana.stages.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, with aliases; unknown names raise a :class:`ConfigError` naming the closest."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = (), replace: bool = False) -> Callable[[T], T]:
        """Decorator: register the entry under ``name`` (and ``aliases``).

        Registering a taken name is an error unless ``replace`` (a user's deliberate override).
        """
        def add(entry: T) -> T:
            for n in (name, *aliases):
                if not replace and (n in self._entries or n in self._aliases):
                    raise ValueError(f"{self.kind} {n!r} is already registered (pass replace=True to override)")
            self._entries[name] = entry
            for a in aliases:
                self._aliases[a] = name
            return entry
        return add

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (itself, or what the alias stands for)."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        close = difflib.get_close_matches(name, list(self._entries) + list(self._aliases), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}")

    def __getitem__(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        return sorted(self._entries)


def import_plugins(modules: list[str], base: Path | None = None) -> None:
    """Import the user modules a config names under ``plugins`` (they register their own units).

    A name is an importable module (``my_analysis.observables``) or a ``.py`` file, relative to
    ``base`` (the config's folder) when not absolute. Each is imported once per process.
    """
    for name in modules:
        path = Path(name)
        if name.endswith(".py"):
            if not path.is_absolute() and base is not None:
                path = base / path
            if not path.is_file():
                raise ConfigError(f"plugin {name!r}: no such file {str(path)!r}")
            mod_name = f"jacana_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
            if mod_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[mod_name]
                raise ConfigError(f"plugin {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ConfigError(f"plugin module {name!r} cannot be imported: {exc}") from exc
