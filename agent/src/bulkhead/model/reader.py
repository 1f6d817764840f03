"""A small walker over decoded YAML that tracks the field path for error messages.

Every `Reader` knows the resource it belongs to (kind and name) and where it is inside it,
so a check deep in a rule raises `GlobalNetworkPolicy x: spec.ingress[0].protocol: ...`.
`done()` rejects fields nobody asked for, as Calico's strict decoding does.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from bulkhead.model.errors import ValidationError

T = TypeVar("T")


SHOWN = 64   # characters of a value an error message repeats; the rest is counted


def show(value: Any) -> str:
    """A value as it appears in an error message: at most about SHOWN characters of it,
    whatever its size (a hostile manifest's megabyte string is not sent back whole)."""
    if isinstance(value, str):
        if len(value) <= SHOWN:
            return '"' + value + '"'
        return f'"{value[:SHOWN]}..." ({len(value):,} characters)'
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        if value.bit_length() > 14_000:   # str() refuses past 4,300 digits
            return f"an integer of {value.bit_length():,} bits"
        return f"an integer of {len(str(abs(value))):,} digits"
    text = repr(value) if not isinstance(value, (int, float)) else str(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text):,} characters)"


class Reader:
    __slots__ = ("_field", "_parent", "_path", "_seen", "data", "kind", "name")

    def __init__(self, kind: str, name: str, path: str, data: Any) -> None:
        self.kind = kind
        self.name = name
        self._path: str | None = path
        self._parent: Reader | None = None
        self._field: str | int | None = None
        self.data = data
        self._seen: set[str] = set()

    @property
    def path(self) -> str:
        """Where the data is in the resource (`spec.ingress[0].source`), written when
        first asked (mostly for an error): a policy's rules make dozens of readers."""
        if self._path is None:
            assert self._parent is not None
            self._path = self._parent.sub_path(self._field)
        return self._path

    # -- errors ---------------------------------------------------------------------
    def fail(self, problem: str, field: str | None = None) -> ValidationError:
        return ValidationError(self.kind, self.name, self.sub_path(field), problem)

    def sub_path(self, field: str | int | None) -> str:
        if field is None:
            return self.path
        if isinstance(field, int):
            return f"{self.path}[{field}]"
        return f"{self.path}.{field}" if self.path else field

    def child(self, field: str | int, data: Any) -> Reader:
        node = Reader(self.kind, self.name, "", data)
        node._path, node._parent, node._field = None, self, field
        return node

    # -- mappings -------------------------------------------------------------------
    def mapping(self) -> dict[str, Any]:
        if type(self.data) is dict:
            return self.data
        if self.data is None:
            return {}
        if not isinstance(self.data, dict):
            raise self.fail(f"must be a mapping, not {type(self.data).__name__}")
        return self.data

    def has(self, field: str) -> bool:
        return self.mapping().get(field) is not None

    def get(self, field: str) -> Any:
        self._seen.add(field)
        data = self.data
        return data.get(field) if type(data) is dict else self.mapping().get(field)

    def field(self, field: str) -> Reader:
        return self.child(field, self.get(field))

    def done(self, hint: dict[str, str] | None = None) -> None:
        """Reject any field that was not read."""
        for key in self.mapping():
            if key not in self._seen:
                extra = (hint or {}).get(str(key), "")
                raise self.fail("unknown field" + (f" ({extra})" if extra else ""), str(key))

    # -- scalars --------------------------------------------------------------------
    def string(self, field: str, required: bool = False,
            check: Callable[[Reader, str], None] | None = None) -> str | None:
        value = self.get(field)
        if value is None:
            if required:
                raise self.fail("is required", field)
            return None
        if not isinstance(value, str):
            raise self.fail(f"must be a string, not {show(value)}", field)
        if check:
            check(self.child(field, value), value)
        return value

    def flag(self, field: str) -> bool | None:
        value = self.get(field)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.fail(f"must be true or false, not {show(value)}", field)
        return value

    def number(self, field: str) -> float | None:
        value = self.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"must be a number, not {show(value)}", field)
        try:
            number = float(value)
        except OverflowError:   # an integer beyond a float's range (about 1.8e308)
            raise self.fail(f"must be a finite number, not {show(value)}", field) from None
        if not math.isfinite(number):
            raise self.fail("must be a finite number", field)
        return number

    def integer(self, field: str, lo: int, hi: int) -> int | None:
        value = self.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"must be an integer, not {show(value)}", field)
        if not lo <= value <= hi:
            raise self.fail(f"{show(value)} is out of range {lo}-{hi}", field)
        return value

    def items(self, field: str) -> Iterator[Reader]:
        """Readers for each element of a list field (absent = empty)."""
        value = self.get(field)
        if value is None:
            return iter(())
        if not isinstance(value, list):
            raise self.fail(f"must be a list, not {show(value)}", field)
        node = self.child(field, value)
        return (node.child(i, v) for i, v in enumerate(value))

    def str_list(self, field: str,
                 check: Callable[[Reader, str], T] | None = None) -> tuple[Any, ...]:
        out: list[Any] = []
        for item in self.items(field):
            if not isinstance(item.data, str):
                raise item.fail(f"must be a string, not {show(item.data)}")
            converted = check(item, item.data) if check else None
            out.append(item.data if converted is None else converted)
        return tuple(out)

    def str_map(self, field: str) -> dict[str, str]:
        value = self.get(field)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"must be a mapping of strings, not {show(value)}", field)
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise self.fail(f"{show(k)}: {show(v)}: keys and values must be strings", field)
        # Interned: 10,000 endpoints labelled app=web share two strings, not 20,000.
        return {sys.intern(k): sys.intern(v) for k, v in value.items()}
