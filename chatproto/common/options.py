"""
The one ini file + command line merge: read a section of an ini file into
raw values, and merge them under the command line (command line wins, then
the file, then the built-in default).
"""

from __future__ import annotations

import configparser
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class OptionsError(ValueError):
    """
    The file or a value in it could not be used; the message says which.
    """


def readSection(
    path: str,
    section: str,
    known: Iterable[str],
    lists: Iterable[str] = (),
) -> dict[str, Any]:
    """
    Read C{[section]} of the ini file at C{path}.  Keys are returned with
    dashes (C{check_interval} and C{check-interval} are the same key);
    values are stripped strings, or lists of non-empty lines for the keys
    in C{lists}.

    @raise OptionsError: the file cannot be read, is not UTF-8, is not an
        ini file, has no C{[section]}, or holds a key not in C{known}.
    """
    known = set(known)
    lists = set(lists)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except UnicodeDecodeError as e:
        raise OptionsError(
            f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} "
            f"at offset {e.start})"
        ) from None
    except OSError as e:
        raise OptionsError(f"cannot read {path}: {e.strerror or e}") from None
    except configparser.Error as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OptionsError(f"{path}: not a valid ini file: {first}") from None
    if not parser.has_section(section):
        raise OptionsError(f"{path} has no [{section}] section")
    raw: dict[str, Any] = {}
    for key, value in parser.items(section):
        name = key.replace("_", "-")
        if name in lists:
            raw[name] = [v.strip() for v in value.splitlines() if v.strip()]
        elif name in known:
            raw[name] = value.strip()
        else:
            raise OptionsError(f"{path}: unknown option {key!r} in [{section}]")
    return raw


def mergeOptions(
    cmdline: Mapping[str, Any],
    fileValues: Mapping[str, Any] | None,
    scalars: Mapping[str, tuple[Any, Callable[[Any], Any] | None]],
    lists: Mapping[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """
    Merge raw values: C{cmdline} over C{fileValues} over the defaults.

    @param scalars: option name -> C{(default, converter)}; the converter
        (if any) is applied to given values, not to defaults.  A C{None}
        or empty value counts as not given.
    @param lists: repeatable option name -> default list; an empty list
        counts as not given, and a given list replaces (not extends) the
        file's.
    @raise OptionsError: a converter failed; the message names the option
        and the value.
    """
    fileValues = fileValues or {}
    merged: dict[str, Any] = {}
    for name, (default, convert) in scalars.items():
        value = cmdline.get(name)
        if value is None or value == "":
            value = fileValues.get(name)
        if value is None or value == "":
            merged[name] = default
            continue
        if convert is None:
            merged[name] = value
            continue
        try:
            merged[name] = convert(value)
        except (ValueError, TypeError, OverflowError) as e:
            reason = str(e)
            if len(reason) > 120:
                reason = reason[:117] + "..."
            shown = repr(value) if len(str(value)) <= 60 else repr(str(value)[:60] + "...")
            raise OptionsError(
                f"bad value for --{name}: {shown}" + (f" ({reason})" if reason else "")
            ) from None
    for name, default in (lists or {}).items():
        value = cmdline.get(name) or fileValues.get(name) or default
        merged[name] = list(value)
    return merged
