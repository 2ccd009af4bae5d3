"""Name -> component registries.

A registry is a plain dict behind a decorator (the shape of timm's ``_registry.py``)::

    from metaadamw import FEATURES

    @FEATURES.register("my_features")
    class MyFeatures(FeatureExtractor):
        ...

    FEATURES.list()            # ['basic', 'basic_plus', ..., 'my_features']
    FEATURES.list("norm_*")    # wildcard filter
    FEATURES.get("my_feats")   # UnknownComponentError naming every registered feature extractor

Registering a name that is taken is an error (pass ``override=True`` to replace on purpose), except
for the same definition made again - the same module and qualified name, as a notebook cell run
again or a plugin module imported again makes it -, which replaces the first.

Third-party packages contribute components through package entry points: an entry point in
the registry's group (for instance ``metaadamw.features``) names either a module, whose import
registers its components, or an object, registered under the entry point's name::

    [project.entry-points."metaadamw.features"]
    my_pkg = "my_pkg.features"              # a module that uses @FEATURES.register
    spectral = "my_pkg.features:Spectral"   # an object, registered as "spectral"

Entry points are loaded lazily, the first time a registry is queried, so a Ray worker that has
the package installed finds the components without any import in user code.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib.metadata
import os
import sys
import types
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued by the caller of this function that points at the
    first frame outside metaadamw: the user's line that built the optimizer, added a param group,
    loaded a checkpoint or made the lookup that loaded the entry points (a fixed level pointed
    into metaadamw's own code: ``MetaAdamW.__init__`` or ``list_features``, whichever made the
    first lookup; ``load_state_dict``, which calls the method that warns)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def suggestion(name: Any, options: Iterable[str], cutoff: float = 0.6) -> str:
    """The options a misspelt ``name`` most likely meant, quoted and joined for a "did you mean"
    hint (``"'etth1' or 'etth2'"``), or ``""`` for none. An option equal to ``name`` but for case
    is the one meant, alone ("ETTh1": 'etth1', not 'ettm1' beside it); else the options closest to
    it by spelling (difflib's ratio, ignoring case, at least ``cutoff``), every one as close as the
    closest, in sorted order ("etth": 'etth1' or 'etth2', not one of them picked by its spelling).
    One rule for :meth:`Registry.get` and ``ablate``'s messages, so that the same misspelt name
    gets the same suggestions from both."""
    key = str(name).lower()
    names = sorted({str(o) for o in options})
    close = [o for o in names if o.lower() == key]
    if not close:
        matcher = difflib.SequenceMatcher()
        matcher.set_seq2(key)
        scores = {}
        for option in names:
            matcher.set_seq1(option.lower())
            # (ratio() <= quick_ratio(): an option that cannot reach the cutoff is not scored; each task's
            # registration checks its every key against the trial keys, at every start-up)
            if matcher.quick_ratio() >= cutoff:
                scores[option] = matcher.ratio()
        best = max(scores.values(), default=0.0)
        close = [o for o in names if scores.get(o) == best] if best >= cutoff else []
    quoted = [repr(o) for o in close]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}" if quoted else ""


class UnknownComponentError(KeyError):
    """Raised when a name is not registered. A KeyError, so ``except KeyError`` keeps working."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would print the repr with quotes
        return self.message


class Registry:
    """A named collection of components of one kind.

    Args:
        kind: what is registered, in words ("feature extractor"); used in error messages.
        entry_point_group: the package entry-point group scanned for third-party components.
        export_name: the name users import the registry by (used in error messages).
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, export_name: str | None = None,
                 validate: Callable[[Any], str | None] | None = None):
        self.kind = kind
        self.export_name = export_name or kind.upper().replace(" ", "_") + "S"
        self.entry_point_group = entry_point_group
        #: ``validate(obj)``: why an object cannot be registered (None: it can); checked for every
        #: registration, entry points included
        self.validate = validate
        #: how to register one, in the unknown-name error (``{name}`` is filled in); default
        #: ``@EXPORT_NAME.register("{name}")``
        self.register_hint: str | None = None
        self._items: dict[str, Any] = {}
        self._entry_points_loaded = entry_point_group is None
        #: entry point name -> (why it contributed nothing, whether it failed to load - else its object
        #: was refused), for the unknown-name error: the name *is* exposed through an entry point, which is broken
        self._entry_point_problems: dict[str, tuple[str, bool]] = {}

    # -- registration -----------------------------------------------------------------------
    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[T], T]:
        """Decorator registering a class or factory under ``name`` (default: its ``__name__``)."""

        def decorator(obj: T) -> T:
            self.add(obj.__name__ if name is None else name, obj, override=override)  # ("" is refused by add)
            return obj

        if callable(name) and not isinstance(name, str):  # used as a bare @register
            obj, name = name, None
            return decorator(obj)  # type: ignore[return-value]
        return decorator

    def add(self, name: str, obj: Any, *, override: bool = False) -> None:
        self.add_all([(name, obj)], override=override)

    def add_all(self, items: Sequence[tuple[str, Any]], *, override: bool = False) -> None:
        """Register each ``(name, obj)``, all or none: every one is checked before any is added (a
        name that is taken leaves none of the others registered, as a task and its aliases)."""
        for name, obj in items:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
            problem = self.validate(obj) if self.validate is not None else None
            if problem:
                raise TypeError(f"cannot register {name!r} as a {self.kind}: {problem}")
            existing = self._items.get(name)
            if existing is not None and not override and existing is not obj and not _same_definition(existing, obj):
                raise ValueError(
                    f"a {self.kind} named {name!r} is already registered ({_describe(existing)}); "
                    f"choose another name or pass override=True"
                )
        self._items.update(items)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (mainly for tests)."""
        self._items.pop(name, None)

    # -- lookup -----------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        self._load_entry_points()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            pass
        # (a name that differs only in case, "ETTh1" for "etth1", alone; else the closest spellings, "fine_graned")
        close = suggestion(name, self._items) if isinstance(name, str) else ""
        problem = self.entry_point_problem(name) if name is not None else None  # (None: every broken one's)
        if problem:  # exposed through an entry point that is broken: say so, not how to expose it
            raise UnknownComponentError(
                f"unknown {self.kind} {name!r}: {problem}. Registered: {', '.join(self.list()) or '(none)'}.")
        hint = f" Did you mean {close}?" if close else ""
        # a likely misspelling: the registration example does not suggest registering the misspelt name
        example = self._decorator_name("<name>" if close or not isinstance(name, str) or not name else name)
        broken = self.entry_point_problem(None)
        raise UnknownComponentError(
            f"unknown {self.kind} {name!r}. Registered: {', '.join(self.list()) or '(none)'}.{hint} "
            f"To add {'a new one' if close else 'one'}, decorate it with {example} in a module you import "
            f"(or expose it through the {self.entry_point_group!r} entry-point group)."
            + (f" Not loaded (a module that would have registered it?): {broken}." if broken else "")
        )

    def entry_point_problem(self, name: Any) -> str | None:
        """Why the entry point ``name`` of this registry's group contributed nothing (it failed to
        load, or its object was refused), while ``name`` is not registered; None when there is no such
        entry point. ``name=None``: every entry point that failed to load, in one line (None if none)."""
        self._load_entry_points()
        if name is None:
            return "; ".join(why for why, failed in self._entry_point_problems.values() if failed) or None
        if not isinstance(name, str) or name in self._items or name not in self._entry_point_problems:
            return None
        return self._entry_point_problems[name][0]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Look ``name`` up and call it with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def list(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by a shell-style wildcard pattern."""
        self._load_entry_points()
        names = sorted(self._items)
        if pattern:
            names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        return names

    def items(self) -> list[tuple[str, Any]]:
        return [(n, self._items[n]) for n in self.list()]

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"

    # -- entry points -----------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            before = self._items.get(ep.name)
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not hide every other component
                self._entry_point_problems[ep.name] = (
                    f"the entry point {ep.name!r} ({ep.value}) of group {self.entry_point_group!r} could not be "
                    f"loaded: {type(exc).__name__}: {exc}", True)
                warnings.warn(
                    f"could not load {self.kind} entry point {ep.name!r} ({ep.value}) from group "
                    f"{self.entry_point_group!r}: {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=_caller_stacklevel(),
                )
                continue
            if isinstance(obj, types.ModuleType):  # a module registers itself on import
                continue
            existing = self._items.get(ep.name)
            if existing is not None and (before is None or getattr(existing, "factory", None) is obj):
                continue  # its module registered it on import (a decorated object, e.g. ablate's @register_task)
            owner = None if existing is not None else next(
                (v for v in self._items.values() if getattr(v, "factory", None) is obj), None)
            if owner is not None:  # ... under its decorator's name: the entry point's name is one more
                self.add(ep.name, _renamed(owner, ep.name))
                continue
            problem = self.validate(obj) if self.validate is not None else None
            if problem:
                self._entry_point_problems[ep.name] = (
                    f"the entry point {ep.name!r} ({ep.value}) of group {self.entry_point_group!r} is ignored: "
                    f"{problem}", False)
                warnings.warn(f"{self.kind} entry point {ep.name!r} ({ep.value}, group {self.entry_point_group!r}) is "
                              f"ignored: {problem}", RuntimeWarning, stacklevel=_caller_stacklevel())
                continue
            if existing is not None and existing is not obj:  # names are unique: the first registration stays
                warnings.warn(
                    f"{self.kind} entry point {ep.name!r} ({ep.value}, group {self.entry_point_group!r}) is "
                    f"ignored: that name is already registered to {_describe(existing)}. Rename one of them.",
                    RuntimeWarning,
                    stacklevel=_caller_stacklevel(),
                )
                continue
            self.add(ep.name, obj)

    def _decorator_name(self, name: str) -> str:
        if self.register_hint is not None:
            return self.register_hint.format(name=name)
        return f"@{self.export_name}.register(\"{name}\")"


def _renamed(record: Any, name: str) -> Any:
    """A registered record under another name (a dataclass with a ``name``, such as a task's spec:
    a copy that carries the new name; anything else: itself, as a class registered twice)."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type) and hasattr(record, "name"):
        return dataclasses.replace(record, name=name)
    return record


def _definition(obj: Any) -> Any:
    """What defines a registered object: itself, or a registered record's ``factory`` (a task)."""
    return obj.factory if not callable(obj) and callable(getattr(obj, "factory", None)) else obj


def _same_definition(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one definition made twice: the same module and qualified name (a
    plugin module imported again after an import that failed half-way, a notebook cell run again),
    which replaces the first instead of being refused as a clash of names."""
    key = _definition_key(a)
    return None not in key and key == _definition_key(b)


def _definition_key(obj: Any) -> tuple[str | None, str | None]:
    """(module, qualified name) of what defines ``obj``; for an instance (an objective registered as
    an object), its class's - unless that is a general-purpose one (``functools.partial``, ...)."""
    obj = _definition(obj)
    if not hasattr(obj, "__qualname__"):
        if type(obj).__module__ in ("builtins", "functools"):
            return None, None
        obj = type(obj)
    return getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)


def _describe(obj: Any) -> str:
    obj = _definition(obj)
    module = getattr(obj, "__module__", "?")
    return f"{module}.{getattr(obj, '__qualname__', type(obj).__name__)}"
