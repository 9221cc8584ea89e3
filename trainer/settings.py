"""Settings declared once: a dataclass field made with `param` carries its default, help text and limits; the
command lines (`python -m trainer`, `python -m study init`) generate their flags from it, and `check` validates a
value given in any form (a flag, a TOML file, a stored study) against it."""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, field
from typing import Any, Iterable, NoReturn

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def param(default, help: str, **kw):
    """A setting with its default and help text; optional metadata: choices, low / high (inclusive bounds), gt / lt
    (exclusive bounds), validate (a function that raises ValueError for a bad value of a well-typed setting, e.g. a
    list written as text), and scope="trial" for the trainer settings that a study sets per trial or per worker
    (never fixed by an experiment)."""
    return field(default=default, metadata={"help": help, **kw})


def bounds(f: Field) -> str:
    """The field's domain in words: " from 0 to 1", " in (0, 1]", " > 0", "" (unbounded)."""
    m = f.metadata
    lo = ("[", m["low"]) if m.get("low") is not None else ("(", m["gt"]) if m.get("gt") is not None else None
    hi = ("]", m["high"]) if m.get("high") is not None else (")", m["lt"]) if m.get("lt") is not None else None
    if lo and hi:
        return f" from {lo[1]} to {hi[1]}" if (lo[0], hi[0]) == ("[", "]") else f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return ""


def within(f: Field, value) -> bool:
    """Whether a number lies in the field's declared bounds."""
    m = f.metadata
    return not ((m.get("low") is not None and value < m["low"]) or (m.get("high") is not None and value > m["high"])
                or (m.get("gt") is not None and value <= m["gt"]) or (m.get("lt") is not None and value >= m["lt"]))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def kind(f: Field) -> tuple[type | None, bool]:
    """(the field's scalar type, whether None is allowed), read from its annotation ("int | None", "float", ...)."""
    if isinstance(f.type, type):  # a module without `from __future__ import annotations`
        return (f.type if f.type in _TYPES.values() else None), False
    parts = [p.strip() for p in str(f.type).split("|")]
    base = [_TYPES[p] for p in parts if p in _TYPES]
    return (base[0] if base else None), "None" in parts


def check(f: Field, value: Any, where: str = "") -> Any:
    """`value` as the field accepts it (an int where a float is declared becomes a float), or ValueError naming the
    setting, what it needs and the value given."""
    typ, optional = kind(f)
    name = where + f.name
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be set, got None")
    if typ is None:
        return value
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if typ is float and ok and not math.isfinite(value):
        ok = False
    what = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[typ]
    choices = f.metadata.get("choices")
    if ok and typ in (int, float) and not within(f, value):
        ok = False
    if ok and choices is not None and value not in choices:
        raise ValueError(f"unknown {name} {value!r} (choose from {', '.join(map(str, choices))})")
    if not ok:
        raise ValueError(f"{name} must be {what}{bounds(f)}{' or unset' if optional else ''}, got {value!r}")
    if "validate" in f.metadata:
        try:
            f.metadata["validate"](value)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return value


class Parser(argparse.ArgumentParser):
    """argparse's own refusals (an unknown flag, a word for a number, a missing argument) as every other bad value
    is refused: one line naming it, exit 2 — not the usage text. Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, fields: Iterable[Field],
              default_text: dict[str, str] | None = None) -> None:
    """One flag per field (its name with dashes for underscores), typed, its choices and help from the metadata.
    Every flag defaults to None (not given), so the dataclass's own default applies: the help says what it is."""
    for f in fields:
        typ, _ = kind(f)
        default = (default_text or {}).get(f.name)
        if default is None and f.default is not MISSING and f.default is not None:
            default = str(f.default)
        # choices are listed, not enforced by argparse: `check` refuses a bad one in one line, as every bad value
        choices = f" (choose from {', '.join(map(str, f.metadata['choices']))})" if "choices" in f.metadata else ""
        text = f.metadata["help"] + choices + (f" (default: {default})" if default else "")
        if typ is bool:
            parser.add_argument(flag(f.name), default=None, help=text, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag(f.name), default=None, help=text, type=typ or str,
                                metavar=f.name.upper() if not choices else "NAME")
