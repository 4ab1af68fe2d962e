"""
Balancer configuration: nginx-style C{server} lines, durations, the ini
file, and merging of built-in defaults, the ini file and the command line
(command line wins, see L{chatproto.common.options}).

Everything is validated here, before anything runs or is changed: every
listen and backend endpoint string is parsed (without connecting or
listening), numbers are range-checked, and every error is a
L{ConfigError} whose message names the option and the value.
"""

from __future__ import annotations

import codecs
import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementer
from twisted.internet.interfaces import IReactorPluggableNameResolver

from balancer.selection import ALGORITHMS
from chatproto.common.endpointstr import splitEndpoint
from chatproto.common.options import OptionsError, mergeOptions, readSection
from chatproto.common.redisurl import parseRedisURL


class ConfigError(ValueError):
    """
    A configuration value could not be understood.
    """


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*([0-9]{1,12}(?:\.[0-9]{1,9})?|\.[0-9]{1,9})\s*(ms|s|m|h|d)?\s*$")
#: the longest duration any option takes: 30 days
MAX_DURATION = 30 * 86400.0


def parseDuration(text: str | float | int) -> float:
    """
    Parse nginx-style durations: C{"10s"}, C{"500ms"}, C{"1m"}, or plain
    seconds (C{"2"}, C{"0.05"}), at most L{MAX_DURATION}.
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _DURATION.match(text)
        if not m:
            raise ConfigError("not a duration like 10s, 500ms, 1m or 0.5")
        value = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not math.isfinite(value) or value < 0 or value > MAX_DURATION:
        raise ConfigError("duration out of range (0 to 30d)")
    return value


def parseBytes(text: str | None) -> bytes | None:
    """
    Parse a check string with C-style escapes (C{"PING\\n"}).
    """
    if text is None or text == "":
        return None
    try:
        return codecs.escape_decode(text.encode("utf-8"))[0]
    except ValueError as e:
        raise ConfigError(f"bad escape in {text!r}: {e}") from None


def _boundedInt(low: int, high: int) -> Any:
    def convert(text: Any) -> int:
        if isinstance(text, bool):
            raise ConfigError(f"not a number: {text!r}")
        if isinstance(text, int):
            value = text
        else:
            s = str(text).strip()
            if not re.match(r"^[0-9]{1,10}$", s):
                raise ConfigError(f"not a whole number from {low} to {high}")
            value = int(s)
        if not low <= value <= high:
            raise ConfigError(f"must be from {low} to {high}")
        return value

    return convert


def _flag(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ConfigError("not yes/no, true/false, on/off or 1/0")


@dataclass(frozen=True)
class BackendSpec:
    """
    One configured backend, the words of an nginx C{server} line.
    """

    address: str
    weight: int = 1
    maxFails: int = 1
    failTimeout: float = 10.0
    backup: bool = False
    down: bool = False
    name: str = ""

    @property
    def key(self) -> str:
        return self.address


MAX_WEIGHT = 1_000_000


def parseBackend(line: str) -> BackendSpec:
    """
    Parse C{"HOST:PORT weight=N max_fails=N fail_timeout=10s [backup]
    [down]"}.  The address may also be a client endpoint string
    (C{tls:host:port}, C{tcp:host=h:port=p}); it is parsed now, so a
    malformed one is an error here rather than when it is first used.
    (C{backup} and C{down} together are allowed, as in nginx: down wins.)
    """
    words = line.split()
    if not words:
        raise ConfigError("empty backend line")
    address, args = words[0], words[1:]
    checkBackendAddress(address)
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
                values["weight"] = _boundedInt(1, MAX_WEIGHT)(value)
            elif key == "max_fails":
                values["maxFails"] = _boundedInt(0, MAX_WEIGHT)(value)
            elif key == "fail_timeout":
                values["failTimeout"] = parseDuration(value)
            elif key == "name":
                values["name"] = value
            else:
                raise ConfigError(f"unknown backend parameter {key!r} in {line!r}")
        except ValueError as e:
            if str(e).startswith("unknown backend parameter"):
                raise
            raise ConfigError(f"bad value for {key} in {line!r} ({e})") from None
    return BackendSpec(address=address, **values)


def normalizeAddress(address: str) -> tuple[str, int] | None:
    """
    Return C{(host, port)} for a plain TCP address (C{host:port},
    C{[v6]:port}, C{tcp:host=h:port=p}, C{tcp:h:p}), or C{None} for another
    client endpoint string (C{tls:...}, C{unix:...}).
    """
    if address.startswith("["):
        m = re.match(r"^\[([^\]]*)\]:([^:]*)$", address)
        if not m:
            raise ConfigError(f"bad address {address!r}: expected [IPv6]:PORT")
        host = m.group(1)
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ConfigError(f"bad IPv6 address in {address!r}") from None
        return host, _port(m.group(2), address)
    if ":" not in address:
        raise ConfigError(f"backend address needs a port: {address!r}")
    head, _, rest = address.partition(":")
    if head in ("tls", "ssl", "unix", "tor", "haproxy") or "\\:" in address:
        return None
    if head == "tcp":
        positional, parts = splitEndpoint(address)
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
    if not head:
        raise ConfigError(f"backend address needs a host: {address!r}")
    return head, _port(rest, address)


def _port(text: str, address: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        raise ConfigError(f"bad port in {address!r}")
    return int(text)


@implementer(IReactorPluggableNameResolver)
class _ParseOnlyReactor:
    """
    What endpoint parsers get when a string is only being checked: they
    store the reactor, never call it.
    """

    nameResolver = None

    def installNameResolver(self, resolver: Any) -> Any:  # pragma: no cover
        raise NotImplementedError


def _endpointError(e: BaseException) -> str:
    if isinstance(e, TypeError):
        return "missing or extra arguments"
    if type(e).__name__ == "UnlistableError":
        return "cannot read a directory it names (trustRoots?)"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text or type(e).__name__


def _checkServerEndpoint(description: str) -> None:
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(_ParseOnlyReactor(), description)
    except Exception as e:
        raise ConfigError(_endpointError(e)) from None


def checkBackendAddress(address: str) -> None:
    """
    Check a backend address completely: the plain forms by
    L{normalizeAddress}, the others by Twisted's client endpoint parser
    (which also reads C{trustRoots=} and certificate files).
    """
    if normalizeAddress(address) is not None:
        return
    from twisted.internet.endpoints import clientFromString

    try:
        clientFromString(_ParseOnlyReactor(), address)
    except Exception as e:
        raise ConfigError(f"bad backend address {address!r}: {_endpointError(e)}") from None


def normalizeListen(description: str, option: str = "--listen") -> str:
    """
    A server endpoint description: a bare port number means C{tcp:PORT};
    the string is parsed now (nothing listens yet).
    """
    description = description.strip()
    if description.isdigit():
        description = f"tcp:{description}"
    if not description:
        raise ConfigError(f"empty {option}")
    try:
        _checkServerEndpoint(description)
    except ConfigError as e:
        raise ConfigError(f"bad {option} {description!r}: {e}") from None
    return description


def _statusEndpoint(text: str) -> str:
    text = text.strip()
    if text.isdigit():
        text = f"tcp:{text}"
    _checkServerEndpoint(text)
    return text


def _proxyProtocol(text: str) -> str:
    if text not in ("v1", "v2"):
        raise ConfigError("must be v1 or v2")
    return text


def _algorithm(text: str) -> str:
    if text not in ALGORITHMS:
        raise ConfigError(f"must be one of {', '.join(ALGORITHMS)}")
    return text


def attributeName(option: str) -> str:
    """The L{BalancerConfig} field of an option: C{connect-timeout} -> C{connectTimeout}."""
    head, *rest = option.split("-")
    return head + "".join(word.capitalize() for word in rest)


def optionName(attribute: str) -> str:
    """The option of a L{BalancerConfig} field: C{connectTimeout} -> C{connect-timeout}."""
    return re.sub(r"([A-Z])", lambda m: "-" + m.group(1).lower(), attribute)


# option name -> (built-in default, converter)
SCALARS: dict[str, tuple[Any, Any]] = {
    "algorithm": ("round-robin", _algorithm),
    "connect-timeout": (1.0, parseDuration),
    "tries": (None, _boundedInt(1, 1000)),
    "check-interval": (2.0, parseDuration),
    "check-timeout": (1.0, parseDuration),
    "rise": (2, _boundedInt(1, 1000)),
    "fall": (3, _boundedInt(1, 1000)),
    "check-send": (None, parseBytes),
    "check-expect": (None, parseBytes),
    "redis": (None, None),  # checked in validate(): the value may hold a password
    "redis-prefix": ("chat:", str),
    "discovery-interval": (1.0, parseDuration),
    "proxy-protocol": (None, _proxyProtocol),
    "proxy-timeout": (600.0, parseDuration),
    "lean-dispatch": (True, _flag),
    "half-close": (True, _flag),
    "status": (None, _statusEndpoint),
    "drain-timeout": (0.0, parseDuration),
    "workers": (1, _boundedInt(1, 256)),
    "backlog": (1024, _boundedInt(1, 65535)),
}
LISTS: dict[str, list[str]] = {"listen": ["tcp:8000"], "backend": []}


@dataclass
class BalancerConfig:
    listen: list[str] = field(default_factory=lambda: ["tcp:8000"])
    backends: list[BackendSpec] = field(default_factory=list)
    algorithm: str = "round-robin"
    connectTimeout: float = 1.0
    tries: int | None = None
    checkInterval: float = 2.0
    checkTimeout: float = 1.0
    rise: int = 2
    fall: int = 3
    checkSend: bytes | None = None
    checkExpect: bytes | None = None
    redis: str | None = None
    redisPrefix: str = "chat:"
    discoveryInterval: float = 1.0
    proxyProtocol: str | None = None
    #: longest time a proxied connection may go without a byte in either
    #: direction (nginx's proxy_timeout); 0 turns it off
    proxyTimeout: float = 600.0
    #: install the lean epoll dispatch loop (balancer.fastpoll)
    leanDispatch: bool = True
    #: pass an EOF on as a half-close; False: an EOF from either side
    #: closes both connections (nginx's proxy_half_close off)
    halfClose: bool = True
    status: str | None = None
    drainTimeout: float = 0.0
    workers: int = 1
    backlog: int = 1024
    configFile: str | None = None


def readIni(path: str) -> dict[str, Any]:
    """
    Read the C{[balancer]} section of an ini file into raw option values
    (strings, or lists of strings for C{listen}/C{backend}).
    """
    try:
        return readSection(path, "balancer", SCALARS, LISTS)
    except OptionsError as e:
        raise ConfigError(str(e)) from None


def buildConfig(
    cmdline: dict[str, Any], fileValues: dict[str, Any] | None = None
) -> BalancerConfig:
    """
    Merge raw option values: C{cmdline} over C{fileValues} over built-in
    defaults.  Values that are C{None} (scalars) or empty (lists) in
    C{cmdline} count as not given.
    """
    try:
        merged = mergeOptions(cmdline, fileValues, SCALARS, LISTS)
    except OptionsError as e:
        raise ConfigError(str(e)) from None
    backends = []
    for line in merged["backend"]:
        try:
            backends.append(parseBackend(line))
        except ConfigError as e:
            raise ConfigError(f"--backend: {e}") from None
    cfg = BalancerConfig(
        listen=[normalizeListen(d) for d in merged["listen"]],
        backends=backends,
        **{attributeName(k): merged[k] for k in SCALARS},
    )
    validate(cfg)
    return cfg


def validate(cfg: BalancerConfig) -> None:
    _algorithm(cfg.algorithm)
    if cfg.proxyProtocol is not None:
        _proxyProtocol(cfg.proxyProtocol)
    for name in ("rise", "fall", "workers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1")
    if cfg.tries is not None and cfg.tries < 1:
        raise ConfigError("--tries must be at least 1")
    if cfg.checkInterval < 0:
        raise ConfigError("--check-interval must be positive (0 turns checks off)")
    if cfg.proxyTimeout < 0:
        raise ConfigError("--proxy-timeout must be positive (0 turns it off)")
    for name in ("connectTimeout", "checkTimeout", "discoveryInterval"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{optionName(name)} must be positive")
    keys = [b.key for b in cfg.backends]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise ConfigError(f"backend listed twice: {', '.join(sorted(dupes))}")
    if not cfg.backends and not cfg.redis:
        raise ConfigError("no backends: give --backend or --redis")
    if cfg.redis:
        try:
            parseRedisURL(cfg.redis)
        except ValueError as e:
            raise ConfigError(f"bad --redis URL: {e}") from None


def load(cmdline: dict[str, Any], path: str | None) -> BalancerConfig:
    """
    Build the configuration from the command line and the ini file at
    C{path} (re-read on every call, which is what SIGHUP does).
    """
    cfg = buildConfig(cmdline, readIni(path) if path else None)
    cfg.configFile = path
    return cfg

