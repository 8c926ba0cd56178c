"""Dataclass sections filled from TOML and ``--section.key value`` pairs: the machinery shared by the trainer's
config and the data-preparation config. Problems raise ConfigError, whose one-line message names the key."""

from __future__ import annotations

import ast
import inspect
import sys
import typing
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem; str(e) is the one line shown to the user (exit status 2)."""


def load_toml(path: str | Path, key: str) -> dict:
    """Parse a TOML file; `key` names the option that gave the path (for the error message)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist; pass an existing TOML file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{key}: {path} is not valid TOML ({e}); fix the file") from None


def coerce(value, hint, key: str):
    """Convert a TOML value or a command-line string to the field's type, or raise ConfigError."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise ConfigError(
                f'{key}: expected a list, got {value!r}; write ["a", "b"] in TOML or a,b on the command line'
            )
        return [coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f'{key}: expected a string, got {value!r}; quote it ("...")')
    raise ConfigError(f"{key}: unsupported field type {hint}")


def set_dotted(sections: dict[str, object], dotted: str, value, source: str) -> None:
    """Set section.key (sections: name -> dataclass instance) from a TOML value or a command-line string."""
    if "." not in dotted:
        raise ConfigError(f"{source}: '{dotted}' is not of the form section.key; see --help")
    section_name, key = dotted.split(".", 1)
    if section_name not in sections:
        raise ConfigError(f"{source}: unknown section [{section_name}]; valid: {', '.join(sections)}")
    section = sections[section_name]
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(
            f"{source}: unknown key {section_name}.{key}; valid keys of [{section_name}]: {', '.join(hints)}"
        )
    setattr(section, key, coerce(value, hints[key], f"{section_name}.{key}"))


def apply_toml(sections: dict[str, object], data: dict, source: str) -> None:
    for section_name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: top-level key '{section_name}' must be a [section] table")
        for key, value in table.items():
            set_dotted(sections, f"{section_name}.{key}", value, source)


def split_cli(argv: list[str]) -> list[tuple[str, object]]:
    """['--a.b', '1', '--c.d=2', '--flag'] -> [('a.b', '1'), ('c.d', '2'), ('flag', True)]."""
    pairs, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"command line: unexpected '{tok}'; options look like --section.key value")
        name = tok[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = True  # a bare flag means true
            i += 1
        pairs.append((name, value))
    return pairs


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string right after a field) of a dataclass, read from its source."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = nxt.value.value.strip()
    return docs
