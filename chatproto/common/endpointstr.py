"""
The arguments of a Twisted endpoint string, read with public means only.

C{tcp:6000:interface=\\:\\:1} -> C{(["6000"], {"interface": "::1"})}: the
string after its type, split on unescaped colons, each piece a keyword
argument when it holds C{=}, else a positional one, with C{\\:} read as
C{:}.  This is how C{twisted.internet.endpoints} reads them (its private
C{_parse}, which L{chatproto._twisted.endpointArgs} prefers when present);
the balancer's backend addresses (C{tcp:HOST:PORT}, C{tcp:host=H:port=P})
are the same strings.
"""

from __future__ import annotations

import re

_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def splitEndpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """The positional and keyword arguments of C{description} after its
    type (the part before the first colon)."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in _UNESCAPED_COLON.split(description)[1:]:
        part = part.replace("\\:", ":")
        key, sep, value = part.partition("=")
        if sep:
            kwargs[key] = value
        else:
            args.append(part)
    return args, kwargs


#: endpoint types that take a C{backlog=} argument
BACKLOG_TYPES = ("tcp", "tcp6", "ssl")


def withBacklog(description: str, backlog: int | None) -> str:
    """C{description} with C{backlog=BACKLOG} added when its type (after an
    optional C{haproxy:}) takes one and it names none: Twisted's default is
    50, which a reconnect storm overflows."""
    inner = description[len("haproxy:") :] if description.startswith("haproxy:") else description
    if backlog is None or inner.split(":", 1)[0] not in BACKLOG_TYPES or "backlog" in splitEndpoint(inner)[1]:
        return description
    return f"{description}:backlog={backlog}"
