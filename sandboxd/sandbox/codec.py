"""The fork server protocol's generic codec: a dataclass as JSON and back, read back by its type hints.

The one encoder (`to_wire`) walks a dataclass's fields; the one decoder (`from_wire`) is driven by
their type hints, so a message type is its dataclass and nothing else: no field list is written
twice. A decoded value has exactly the types its hints say (tuples for sequences, a nested
dataclass for a nested object, a Literal's values only), or decoding fails with ProtocolError.
Each hint's decoder is made once (`decoder`): the fork server decodes a plan per launch.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Literal, TypeVar, Union

# JSON as the wire carries it.
Wire = Union[None, bool, int, float, str, list["Wire"], dict[str, "Wire"]]
T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that is not what the protocol says (not JSON, an unknown type, a field's type)."""


def to_wire(value: object) -> Wire:
    """A dataclass as a JSON object of its fields, recursively; tuples and lists as arrays."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [to_wire(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _dataclass_wire(value)
    raise TypeError(f"{type(value).__name__} has no wire form")


def _dataclass_wire(value: object) -> Wire:
    cls: type = type(value)
    wire: dict[str, Wire] = {}
    for name in field_names(cls):
        item = getattr(value, name)
        # A scalar, or a tuple of scalars, goes as it is: no call per value.
        if type(item) in WIRE_SCALARS:
            wire[name] = item
        elif type(item) is tuple and all(type(v) in WIRE_SCALARS for v in item):
            wire[name] = list(item)
        else:
            wire[name] = to_wire(item)
    return wire


WIRE_SCALARS = frozenset((int, str, bool, float, type(None)))


@functools.cache
def field_names(cls: type) -> tuple[str, ...]:
    """The fields of dataclass `cls`, in order. The encoder needs no type hints: a value's own
    type says how it goes on the wire (evaluating a module's hints, typing.get_type_hints, cost
    the supervisor's first launch request some 0.6 ms)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def from_wire(cls: type[T], wire: Wire) -> T:
    """`wire` decoded as `cls` (a dataclass), each field as its type hint says."""
    hint: object = cls
    value = decoder(hint)(wire)
    assert isinstance(value, cls)
    return value


Decoder = Callable[[Wire], object]


@functools.cache
def decoder(hint: object) -> Decoder:
    """A decoder for values of type hint `hint`, made once per hint (the fork server decodes a
    plan per launch: no hint is looked at twice)."""
    if hint in _SCALARS:
        return _scalar(typing.cast(type, hint))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence(decoder(args[0]), _scalar_type(args[0]))
    if origin is tuple:
        return _fixed_tuple(tuple(decoder(a) for a in args), tuple(_scalar_type(a) for a in args))
    if origin is Literal:
        return _literal(args)
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _optional(decoder(next(a for a in args if a is not type(None))))
    raise TypeError(f"no wire form for {hint!r}")


_SCALARS = (int, str, bool, float, type(None))


def _scalar_type(hint: object) -> type | None:
    """The type a value of `hint` has on the wire exactly as decoded, if it is a scalar's: a
    decoder takes such a value as it is, without a call per value."""
    return typing.cast(type, hint) if hint in _SCALARS else None


def _scalar(cls: type) -> Decoder:
    def decode(wire: Wire) -> object:
        # bool is an int to Python, never to the protocol; a float may arrive as a whole number.
        if type(wire) is cls or (cls is float and type(wire) is int):
            return wire
        raise ProtocolError(f"expected {cls.__name__}, got {wire!r}")

    return decode


def _sequence(item: Decoder, scalar: type | None) -> Decoder:
    def decode(wire: Wire) -> object:
        if not isinstance(wire, list):
            raise ProtocolError(f"expected an array, got {wire!r}")
        return tuple(v if type(v) is scalar else item(v) for v in wire)

    return decode


def _fixed_tuple(items: tuple[Decoder, ...], scalars: tuple[type | None, ...]) -> Decoder:
    def decode(wire: Wire) -> object:
        if not isinstance(wire, list) or len(wire) != len(items):
            raise ProtocolError(f"expected an array of {len(items)}, got {wire!r}")
        return tuple(v if type(v) is scalar else item(v) for item, scalar, v in zip(items, scalars, wire))

    return decode


def _literal(values: tuple[object, ...]) -> Decoder:
    def decode(wire: Wire) -> object:
        if wire not in values or type(wire) is bool:
            raise ProtocolError(f"expected one of {values}, got {wire!r}")
        return wire

    return decode


def _optional(inner: Decoder) -> Decoder:
    def decode(wire: Wire) -> object:
        return None if wire is None else inner(wire)

    return decode


FieldDecoders = list[tuple[str, type | None, Decoder, bool]]


@functools.cache
def _field_decoders(cls: type) -> FieldDecoders:
    """Each field of dataclass `cls`: its name, its scalar type if any, its decoder, whether it is required."""
    hints = typing.get_type_hints(cls)
    return [
        (f.name, _scalar_type(hints[f.name]), decoder(hints[f.name]), f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
    ]


def _dataclass(cls: type) -> Decoder:
    fields = _field_decoders(cls)

    def decode(wire: Wire) -> object:
        return decode_fields(cls, wire, {})

    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or any(scalar is None and not _is_literal(cls, name) for name, scalar, _d, _r in fields):
        return decode
    # A frozen dataclass of scalars (a plan's MountOp: some forty in every plan, mostly the same
    # in every service's) is decoded once per value on the wire: equal objects are as good as
    # one another, and no field of one can change. The key holds each value's type, as the
    # decoder tells True from 1 and 1.0 from 1.
    kept: dict[tuple[object, ...], object] = {}

    def decode_kept(wire: Wire) -> object:
        if type(wire) is not dict:
            return decode(wire)
        key = (*wire.items(), *map(type, wire.values()))
        try:
            value = kept.get(key)
        except TypeError:  # an array or object where a scalar belongs: the decoder says so
            return decode(wire)
        if value is None:
            value = decode(wire)
            if len(kept) >= _KEPT_MAX:
                kept.clear()
            kept[key] = value
        return value

    return decode_kept


_KEPT_MAX = 4096


def _is_literal(cls: type, name: str) -> bool:
    return typing.get_origin(typing.get_type_hints(cls)[name]) is Literal


def decode_fields(cls: type, wire: Wire, given: dict[str, object]) -> object:
    """A `cls` of the fields in `wire`, and of those `given` decoded already (not in `wire`)."""
    if not isinstance(wire, dict):
        raise ProtocolError(f"expected an object for {cls.__name__}, got {wire!r}")
    values: dict[str, object] = dict(given)
    fields = _field_decoders(cls)
    for name, scalar, field_decoder, required in fields:
        if name in wire:
            value = wire[name]
            if type(value) is scalar:
                values[name] = value
                continue
            try:
                values[name] = field_decoder(value)
            except ProtocolError as e:
                raise ProtocolError(f"{cls.__name__}.{name}: {e}") from None
        elif required and name not in given:
            raise ProtocolError(f"{cls.__name__} lacks its field {name}")
    if len(values) != len(wire) + len(given):
        raise ProtocolError(f"{cls.__name__} has no field {sorted(set(wire) - {name for name, _, _, _ in fields})}")
    return cls(**values)
