"""Third-party task types: a registry of functions keyed by symbol.

Invariants:
- An extension function has the signature ``fn(config: bytes, inputs: list) -> data
  object`` (a ``loomctl.worker.data`` object); it may raise ``TaskError``.
- Symbols under ``loom/`` are reserved for built-ins and cannot be registered; a symbol
  is registered at most once per process (registering the same function again is a
  no-op, a different function is an error).
- Extensions reach the registry by import: a module passed to ``load_extensions`` or an
  entry point of group ``loomctl.tasks`` calls ``register`` when it is imported (an entry
  point that resolves to a callable rather than a module is called with no arguments
  and is expected to register). Loading never half-fails silently: a module that cannot
  be imported raises ``ExtensionError`` naming it.
- ``supported_symbols()`` is what a worker announces: executable built-ins plus every
  registered symbol.
"""

from __future__ import annotations

import importlib
import threading
import types
from importlib import metadata
from typing import Callable

from graphfmt import symbols as S

ENTRY_POINT_GROUP = "loomctl.tasks"

# Built-ins a worker can execute itself. dslice/dget are expanded by the server;
# client/future and client/input are references, not tasks.
EXECUTABLE_BUILTINS = frozenset(S.BUILTINS - {S.DSLICE, S.DGET, S.FUTURE, S.TASK_INPUT})

TaskFunction = Callable[[bytes, list], object]

_registry: dict[str, TaskFunction] = {}
_lock = threading.Lock()


class ExtensionError(Exception):
    """An extension could not be loaded or registered; the message names it."""


def register(symbol: str) -> Callable[[TaskFunction], TaskFunction]:
    """Decorator: ``@register("my/count")`` makes the function execute tasks of that
    type on this worker."""
    if not isinstance(symbol, str) or not symbol or symbol.startswith("loom/"):
        raise ExtensionError(f"cannot register task type {symbol!r}: "
                             "symbols under 'loom/' are reserved for built-ins")

    def decorator(fn: TaskFunction) -> TaskFunction:
        if not callable(fn):
            raise ExtensionError(f"task type {symbol!r}: {fn!r} is not callable")
        with _lock:
            existing = _registry.get(symbol)
            if existing is not None and existing is not fn:
                raise ExtensionError(f"task type {symbol!r} is already registered by "
                                     f"{_describe(existing)}")
            _registry[symbol] = fn
        return fn
    return decorator


def unregister(symbol: str) -> None:
    """Forget a registered symbol (for tests and reloads)."""
    with _lock:
        _registry.pop(symbol, None)


def lookup(symbol: str) -> TaskFunction | None:
    return _registry.get(symbol)


def registered_symbols() -> frozenset[str]:
    with _lock:
        return frozenset(_registry)


def supported_symbols() -> frozenset[str]:
    return EXECUTABLE_BUILTINS | registered_symbols()


def load_extensions(module_names) -> list[str]:
    """Import each module (which registers its task types); returns the symbols that
    became registered."""
    before = registered_symbols()
    for name in module_names:
        try:
            importlib.import_module(name)
        except ExtensionError:
            raise
        except Exception as e:
            raise ExtensionError(f"cannot load extension module {name!r}: "
                                 f"{type(e).__name__}: {e}") from None
    return sorted(registered_symbols() - before)


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every installed entry point of ``group``; returns the newly registered
    symbols."""
    before = registered_symbols()
    for ep in metadata.entry_points(group=group):
        try:
            target = ep.load()
            if callable(target) and not isinstance(target, types.ModuleType):
                target()
        except ExtensionError:
            raise
        except Exception as e:
            raise ExtensionError(f"cannot load extension entry point {ep.name!r} "
                                 f"({ep.value}): {type(e).__name__}: {e}") from None
    return sorted(registered_symbols() - before)


def _describe(fn) -> str:
    module = getattr(fn, "__module__", "?")
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"
