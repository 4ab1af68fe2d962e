"""
Size limits of chatproto's code (issue 8): small modules with one job
each.  No class longer than about 250 lines, no module longer than about
450, and no module outside chatproto/_twisted.py naming a private attribute
of Twisted, txredisapi or adbapi.
"""

from __future__ import annotations

import ast
import pathlib
import re

from twisted.trial import unittest

import chatproto

PACKAGE = pathlib.Path(chatproto.__file__).parent
MAX_CLASS = 250
MAX_MODULE = 450

#: Private names of other libraries that chatproto/_twisted.py alone uses.
PRIVATE = re.compile(
    r"_tempDataLen|_writeDisconnect|_shouldShutdown|_closeWriteConnection|haproxy\._wrapper|endpoints import _parse"
    r"|endpoints\._parse|\._ready\b|\._connection\b|\._pool\b|\._factory\b|_raiseSynchronously|\.threadID\("
)


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.read_text(encoding="utf-8")


class SizeTests(unittest.TestCase):
    def test_modules(self) -> None:
        long = {p.name: n for p, text in modules() if (n := len(text.splitlines())) > MAX_MODULE}
        self.assertEqual(long, {})

    def test_classes(self) -> None:
        long = {}
        for path, text in modules():
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_CLASS:
                        long[f"{path.name}:{node.name}"] = n
        self.assertEqual(long, {})

    def test_privateInternalsOnlyInTheInternalsModule(self) -> None:
        found = {}
        for path, text in modules():
            if path.name == "_twisted.py":
                continue
            hits = PRIVATE.findall(text)
            if hits:
                found[path.name] = hits
        self.assertEqual(found, {})


class LayeringTests(unittest.TestCase):
    #: modules below the wire layer, and what they must not import
    BELOW_WIRE = ("rediscluster.py", "redispresence.py", "redisrelay.py", "redislink.py", "embedded.py")
    WIRE = ("chatproto.output", "chatproto.protocol", "chatproto.sessionoutput", "chatproto.service")

    def test_redisLayerBelowTheWire(self) -> None:
        found = {}
        for path, text in modules():
            if path.name not in self.BELOW_WIRE:
                continue
            for node in ast.walk(ast.parse(text)):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                bad = [n for n in names if n in self.WIRE]
                if bad:
                    found.setdefault(path.name, []).extend(bad)
        self.assertEqual(found, {})
