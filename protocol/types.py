"""Column type names: the seed's short names and Arrow's own type strings, both ways."""

from __future__ import annotations

import re

import pyarrow as pa

from .errors import InvalidArgument

__all__ = ["format_type", "parse_type", "types_compatible"]

_SIMPLE: dict[str, pa.DataType] = {
    # the seed's names
    "int": pa.int64(),
    "integer": pa.int64(),
    "str": pa.string(),
    "text": pa.string(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "bytes": pa.binary(),
    # Arrow's names, as str(pa.DataType) prints them
    "null": pa.null(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "halffloat": pa.float16(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "double": pa.float64(),
    "float64": pa.float64(),
    "string": pa.string(),
    "utf8": pa.string(),
    "large_string": pa.large_string(),
    "large_utf8": pa.large_string(),
    "string_view": pa.string_view(),
    "binary": pa.binary(),
    "large_binary": pa.large_binary(),
    "binary_view": pa.binary_view(),
    "date32": pa.date32(),
    "date32[day]": pa.date32(),
    "date64": pa.date64(),
    "date64[ms]": pa.date64(),
}

_EXAMPLES = "int, str, float, bool, bytes, int32, float32, string, list<float32>, timestamp[us]"


class _Parser:
    """A small recursive-descent parser over ``str(pa.DataType)`` output."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self) -> InvalidArgument:
        return InvalidArgument(f"unknown column type {self.text!r}; examples: {_EXAMPLES}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def expect(self, token: str) -> None:
        self.skip()
        if not self.text.startswith(token, self.pos):
            raise self.fail()
        self.pos += len(token)

    def word(self) -> str:
        self.skip()
        match = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(self.text, self.pos)
        if match is None:
            raise self.fail()
        self.pos = match.end()
        return match.group()

    def number(self) -> int:
        self.skip()
        match = re.compile(r"\d+").match(self.text, self.pos)
        if match is None:
            raise self.fail()
        self.pos = match.end()
        return int(match.group())

    def peek(self, token: str) -> bool:
        self.skip()
        return self.text.startswith(token, self.pos)

    def field_type(self) -> pa.DataType:
        """``item: T`` or ``T`` inside list brackets."""
        start = self.pos
        name = self.word()
        if self.peek(":"):
            self.expect(":")
            return self.type_()
        self.pos = start
        del name
        return self.type_()

    def bracket_args(self) -> list[str]:
        self.expect("[")
        end = self.text.index("]", self.pos)
        args = [part.strip() for part in self.text[self.pos : end].split(",")]
        self.pos = end + 1
        return args

    def type_(self) -> pa.DataType:
        name = self.word()
        if name in ("list", "large_list", "list_view", "large_list_view"):
            self.expect("<")
            value = self.field_type()
            self.expect(">")
            if self.peek("["):  # fixed_size_list prints as list<item: T>[n]
                self.expect("[")
                size = self.number()
                self.expect("]")
                return pa.list_(value, size)
            return {
                "list": pa.list_,
                "large_list": pa.large_list,
                "list_view": pa.list_view,
                "large_list_view": pa.large_list_view,
            }[name](value)
        if name == "fixed_size_list":
            self.expect("<")
            value = self.field_type()
            self.expect(">")
            self.expect("[")
            size = self.number()
            self.expect("]")
            return pa.list_(value, size)
        if name == "struct":
            self.expect("<")
            fields = []
            while not self.peek(">"):
                field_name = self.word()
                self.expect(":")
                fields.append(pa.field(field_name, self.type_()))
                if self.peek(","):
                    self.expect(",")
            self.expect(">")
            return pa.struct(fields)
        if name == "map":
            self.expect("<")
            key = self.type_()
            self.expect(",")
            item = self.type_()
            self.expect(">")
            return pa.map_(key, item)
        if name in ("timestamp", "time32", "time64", "duration"):
            args = self.bracket_args()
            unit = args[0]
            if name == "timestamp":
                tz = None
                for extra in args[1:]:
                    if extra.startswith("tz="):
                        tz = extra[3:]
                return pa.timestamp(unit, tz=tz)
            return {"time32": pa.time32, "time64": pa.time64, "duration": pa.duration}[name](unit)
        if name in ("decimal128", "decimal256", "decimal"):
            self.expect("(")
            precision = self.number()
            self.expect(",")
            scale = self.number()
            self.expect(")")
            return (pa.decimal256 if name == "decimal256" else pa.decimal128)(precision, scale)
        if name == "fixed_size_binary":
            self.expect("[")
            size = self.number()
            self.expect("]")
            return pa.binary(size)
        if name in ("date32", "date64") and self.peek("["):
            self.bracket_args()
        if name in _SIMPLE:
            return _SIMPLE[name]
        raise self.fail()


def parse_type(text: str | pa.DataType) -> pa.DataType:
    """Return the Arrow type named by ``text``: ``"int"``, ``"list<float32>"``, ``str(type)``."""
    if isinstance(text, pa.DataType):
        return text
    parser = _Parser(text.strip())
    try:
        result = parser.type_()
    except (ValueError, KeyError, IndexError, TypeError, pa.ArrowException) as exc:
        if isinstance(exc, InvalidArgument):
            raise
        raise parser.fail() from exc
    parser.skip()
    if parser.pos != len(parser.text):
        raise parser.fail()
    return result


_FLOAT_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64"}


def format_type(data_type: pa.DataType) -> str:
    """Return the canonical string of an Arrow type (what the catalog stores).

    Like ``str(data_type)`` except that floats carry their width (Arrow prints float32 as
    ``float``, which the seed's short names read as float64), so the string parses back
    to the same type.
    """
    if pa.types.is_floating(data_type):
        return _FLOAT_NAMES[str(data_type)]
    if pa.types.is_fixed_size_list(data_type):
        return f"fixed_size_list<item: {format_type(data_type.value_type)}>[{data_type.list_size}]"
    for kind, name in (
        (pa.types.is_list, "list"),
        (pa.types.is_large_list, "large_list"),
        (pa.types.is_list_view, "list_view"),
        (pa.types.is_large_list_view, "large_list_view"),
    ):
        if kind(data_type):
            return f"{name}<item: {format_type(data_type.value_type)}>"
    if pa.types.is_struct(data_type):
        fields = ", ".join(
            f"{data_type.field(i).name}: {format_type(data_type.field(i).type)}"
            for i in range(data_type.num_fields)
        )
        return f"struct<{fields}>"
    if pa.types.is_map(data_type):
        return f"map<{format_type(data_type.key_type)}, {format_type(data_type.item_type)}>"
    if pa.types.is_dictionary(data_type):
        return format_type(data_type.value_type)
    return str(data_type)


def _family(data_type: pa.DataType) -> str:
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "string"
    if pa.types.is_string_view(data_type):
        return "string"
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return "binary"
    if pa.types.is_binary_view(data_type):
        return "binary"
    if pa.types.is_dictionary(data_type):
        return _family(data_type.value_type)
    return str(data_type)


def types_compatible(declared: pa.DataType, found: pa.DataType) -> bool:
    """True when a shard column of type ``found`` can be read as ``declared`` without loss.

    Offsets width (string vs large_string), dictionary encoding and list item names differ
    between writers of the same data; those read back as the declared type.
    """
    if declared.equals(found) or pa.types.is_null(found):
        return True
    if _family(declared) == _family(found):
        return True
    for kind in (pa.types.is_list, pa.types.is_large_list):
        if kind(declared) and (pa.types.is_list(found) or pa.types.is_large_list(found)):
            return types_compatible(declared.value_type, found.value_type)
    if pa.types.is_fixed_size_list(declared) and pa.types.is_fixed_size_list(found):
        return declared.list_size == found.list_size and types_compatible(
            declared.value_type, found.value_type
        )
    return False
