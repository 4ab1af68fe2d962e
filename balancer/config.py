"""
Balancer configuration: nginx-style C{server} lines, durations, the ini
file, and merging of built-in defaults, the ini file and the command line
(command line wins).
"""

from __future__ import annotations

import codecs
import configparser
import re
from dataclasses import dataclass, field
from typing import Any

from balancer.selection import ALGORITHMS


class ConfigError(ValueError):
    """
    A configuration value could not be understood.
    """


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(text: str | float | int) -> float:
    """
    Parse nginx-style durations: C{"10s"}, C{"500ms"}, C{"1m"}, or plain
    seconds (C{"2"}, C{"0.05"}).
    """
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"not a duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_bytes(text: str | None) -> bytes | None:
    """
    Parse a check string with C-style escapes (C{"PING\\n"}).
    """
    if text is None or text == "":
        return None
    try:
        return codecs.escape_decode(text.encode("utf-8"))[0]
    except ValueError as e:
        raise ConfigError(f"bad escape in {text!r}: {e}") from None


@dataclass(frozen=True)
class BackendSpec:
    """
    One configured backend, the words of an nginx C{server} line.
    """

    address: str
    weight: int = 1
    max_fails: int = 1
    fail_timeout: float = 10.0
    backup: bool = False
    down: bool = False
    name: str = ""

    @property
    def key(self) -> str:
        return self.address


def parse_backend(line: str) -> BackendSpec:
    """
    Parse C{"HOST:PORT weight=N max_fails=N fail_timeout=10s [backup]
    [down]"}.  The address may also be a client endpoint string
    (C{tls:host:port}, C{tcp:host=h:port=p}).
    """
    words = line.split()
    if not words:
        raise ConfigError("empty backend line")
    address, args = words[0], words[1:]
    normalize_address(address)
    values: dict[str, Any] = {}
    for word in args:
        if word in ("backup", "down"):
            values[word] = True
            continue
        key, sep, value = word.partition("=")
        if not sep:
            raise ConfigError(f"unknown backend parameter {word!r} in {line!r}")
        try:
            if key == "weight":
                values["weight"] = int(value)
                if values["weight"] < 1:
                    raise ValueError(value)
            elif key == "max_fails":
                values["max_fails"] = int(value)
                if values["max_fails"] < 0:
                    raise ValueError(value)
            elif key == "fail_timeout":
                values["fail_timeout"] = parse_duration(value)
            elif key == "name":
                values["name"] = value
            else:
                raise ConfigError(f"unknown backend parameter {key!r} in {line!r}")
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"bad value for {key} in {line!r}") from None
    if values.get("backup") and values.get("down"):
        pass  # nginx allows both; down wins
    return BackendSpec(address=address, **values)


def normalize_address(address: str) -> tuple[str, int] | None:
    """
    Return C{(host, port)} for a plain TCP address (C{host:port},
    C{[v6]:port}, C{tcp:host=h:port=p}, C{tcp:h:p}), or C{None} for another
    client endpoint string (C{tls:...}, C{unix:...}).
    """
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", address)
    if m:
        return m.group(1), _port(m.group(2), address)
    if ":" not in address:
        raise ConfigError(f"backend address needs a port: {address!r}")
    head, _, rest = address.partition(":")
    if head in ("tls", "ssl", "unix", "tor", "haproxy") or "\\:" in address:
        return None
    if head == "tcp":
        parts: dict[str, str] = {}
        positional: list[str] = []
        for piece in rest.split(":"):
            k, eq, v = piece.partition("=")
            if eq:
                parts[k] = v
            else:
                positional.append(piece)
        host = parts.get("host") or (positional[0] if positional else "")
        port = parts.get("port") or (positional[1] if len(positional) > 1 else "")
        if not host or not port:
            raise ConfigError(f"bad tcp endpoint {address!r}")
        if set(parts) - {"host", "port"}:
            return None  # timeout=, bindAddress=: let the endpoint parser do it
        return host, _port(port, address)
    if rest.count(":"):
        # an endpoint type we do not know by name; leave it to the parser
        return None
    return head, _port(rest, address)


def _port(text: str, address: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"bad port in {address!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"bad port in {address!r}")
    return port


# option name -> (built-in default, converter)
SCALARS: dict[str, tuple[Any, Any]] = {
    "algorithm": ("round-robin", str),
    "connect-timeout": (1.0, parse_duration),
    "tries": (None, int),
    "check-interval": (2.0, parse_duration),
    "check-timeout": (1.0, parse_duration),
    "rise": (2, int),
    "fall": (3, int),
    "check-send": (None, parse_bytes),
    "check-expect": (None, parse_bytes),
    "redis": (None, str),
    "redis-prefix": ("chat:", str),
    "discovery-interval": (1.0, parse_duration),
    "proxy-protocol": (None, str),
    "status": (None, str),
    "drain-timeout": (0.0, parse_duration),
    "workers": (1, int),
    "backlog": (1024, int),
}
LISTS: dict[str, list[str]] = {"listen": ["tcp:8000"], "backend": []}


@dataclass
class BalancerConfig:
    listen: list[str] = field(default_factory=lambda: ["tcp:8000"])
    backends: list[BackendSpec] = field(default_factory=list)
    algorithm: str = "round-robin"
    connect_timeout: float = 1.0
    tries: int | None = None
    check_interval: float = 2.0
    check_timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    check_send: bytes | None = None
    check_expect: bytes | None = None
    redis: str | None = None
    redis_prefix: str = "chat:"
    discovery_interval: float = 1.0
    proxy_protocol: str | None = None
    status: str | None = None
    drain_timeout: float = 0.0
    workers: int = 1
    backlog: int = 1024
    config_file: str | None = None


def read_ini(path: str) -> dict[str, Any]:
    """
    Read the C{[balancer]} section of an ini file into raw option values
    (strings, or lists of strings for C{listen}/C{backend}).
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not parser.has_section("balancer"):
        raise ConfigError(f"{path} has no [balancer] section")
    raw: dict[str, Any] = {}
    for key, value in parser.items("balancer"):
        name = key.replace("_", "-")
        if name in LISTS:
            raw[name] = [v.strip() for v in value.splitlines() if v.strip()]
        elif name in SCALARS:
            raw[name] = value.strip()
        else:
            raise ConfigError(f"{path}: unknown option {key!r}")
    return raw


def build_config(
    cmdline: dict[str, Any], file_values: dict[str, Any] | None = None
) -> BalancerConfig:
    """
    Merge raw option values: C{cmdline} over C{file_values} over built-in
    defaults.  Values that are C{None} (scalars) or empty (lists) in
    C{cmdline} count as not given.
    """
    file_values = file_values or {}
    merged: dict[str, Any] = {}
    for name, (default, convert) in SCALARS.items():
        value = cmdline.get(name)
        if value is None:
            value = file_values.get(name)
        if value is None or value == "":
            merged[name] = default
        else:
            try:
                merged[name] = convert(value)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"bad value for --{name}: {value!r} ({e})") from None
    for name, default in LISTS.items():
        value = cmdline.get(name) or file_values.get(name) or default
        merged[name] = list(value)
    cfg = BalancerConfig(
        listen=merged["listen"],
        backends=[parse_backend(line) for line in merged["backend"]],
        **{k.replace("-", "_"): merged[k] for k in SCALARS},
    )
    validate(cfg)
    return cfg


def validate(cfg: BalancerConfig) -> None:
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(
            f"--algorithm must be one of {', '.join(ALGORITHMS)}, not {cfg.algorithm!r}"
        )
    if cfg.proxy_protocol not in (None, "v1", "v2"):
        raise ConfigError("--proxy-protocol must be v1 or v2")
    for name in ("rise", "fall", "workers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1")
    if cfg.tries is not None and cfg.tries < 1:
        raise ConfigError("--tries must be at least 1")
    if cfg.check_interval < 0:
        raise ConfigError("--check-interval must be positive (0 turns checks off)")
    for name in ("connect_timeout", "check_timeout", "discovery_interval"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if cfg.check_expect is not None and cfg.check_send is None:
        pass  # allowed: a banner check (expect what the server says first)
    keys = [b.key for b in cfg.backends]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise ConfigError(f"backend listed twice: {', '.join(sorted(dupes))}")
    if not cfg.backends and not cfg.redis:
        raise ConfigError("no backends: give --backend or --redis")
    if cfg.redis and not re.match(r"^rediss?://", cfg.redis):
        raise ConfigError("--redis must be a redis:// or rediss:// URL")


def load(cmdline: dict[str, Any], path: str | None) -> BalancerConfig:
    """
    Build the configuration from the command line and the ini file at
    C{path} (re-read on every call, which is what SIGHUP does).
    """
    cfg = build_config(cmdline, read_ini(path) if path else None)
    cfg.config_file = path
    return cfg
