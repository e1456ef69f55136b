"""Record: the base of dirsync's plain data classes.

Why not dataclasses: building a dataclass runs generated code through exec() at import, about
1 ms per class (plus `inspect`), which is ~40 ms of every process's start (the agent's too)
for the 40-odd classes here, against a no-op run of ~0.3 s. A Record subclass writes its own
__init__ (compiled once into the .pyc; the hot classes are built once per file) and gets
equality, hashing, repr, replace() and asdict() from the field list it names.

A subclass sets `_fields` (every field, in __init__ order, inherited ones included), and
`__slots__ = _fields` when it has no other attributes; `_compare` names the fields equality
and hashing use when not all of them do (by default: the base's compared fields and every
field the subclass adds). Records are not frozen: the ones documented as immutable are
treated so by convention (use replace()).
"""

from __future__ import annotations

from operator import attrgetter

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Any


def _key_getter(names: tuple[str, ...]):
    if not names:
        return lambda _obj: ()
    if len(names) == 1:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return attrgetter(*names)


class Record:
    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _compare: tuple[str, ...] = ()
    _key = staticmethod(_key_getter(()))

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "_compare" not in cls.__dict__:  # the base's compared fields and every field added here
            base = cls.__mro__[1]
            added = tuple(f for f in cls._fields if f not in base._fields)  # type: ignore[attr-defined]
            cls._compare = base._compare + added  # type: ignore[attr-defined]
        cls._key = staticmethod(_key_getter(cls._compare))

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key(self) == self._key(other)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key(self))

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self._fields)})"

    def replace(self, **changes: Any) -> Any:
        """A copy with `changes` applied (through __init__, so its checks and defaults hold)."""
        for f in self._fields:
            if f not in changes:
                changes[f] = getattr(self, f)
        return type(self)(**changes)

    def asdict(self) -> dict[str, Any]:
        """The fields as a dict (shallow)."""
        return {f: getattr(self, f) for f in self._fields}
