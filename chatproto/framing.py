"""
Line framing shared by both dialects, free of I/O.

A message is one line ended by C{\\n}, C{\\r\\n} or a NUL byte (the
tutorial's C++ client ends each message with NUL and no newline).  Split and
merged reads never lose or merge messages.  A line longer than the maximum is
reported once and discarded up to its terminator; the lines after it are
kept.
"""

from __future__ import annotations

#: Marker yielded in place of a line that exceeded the maximum length.
TOO_LONG = object()

#: Bytes a blank line may consist of (it is skipped like an empty one).
_BLANK = frozenset(b" \t\r")


def _isBlank(line: bytes) -> bool:
    return line[0] in _BLANK and not line.strip(b" \t\r")


class LineFramer:
    """
    Incremental splitter of a byte stream into lines.

    @ivar maxLength: the longest line accepted, terminator excluded.
    """

    def __init__(self, maxLength: int = 65536) -> None:
        self.maxLength = maxLength
        self._buffer = b""
        self._discarding = False

    def feed(self, data: bytes) -> list:
        """
        Add C{data} and return the complete lines it finishes (bytes, without
        the terminator and without a trailing C{\\r}), with L{TOO_LONG} in
        the place of each line over the maximum.  Blank lines (empty, or
        only spaces and tabs) are skipped.
        """
        if b"\0" in data:
            data = data.replace(b"\0", b"\n")
        if self._discarding:
            end = data.find(b"\n")
            if end == -1:
                return []
            self._discarding = False
            data = data[end + 1 :]
        elif self._buffer:
            data = self._buffer + data
            self._buffer = b""
        lines = data.split(b"\n")
        rest = lines.pop()
        maxLength = self.maxLength
        out = []
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if len(line) > maxLength:
                out.append(TOO_LONG)
            elif line and not _isBlank(line):
                out.append(line)
        # One byte more is allowed for a "\r" before the terminator.
        if len(rest) > maxLength + 1:
            # Report the overlong line now; drop the rest of it as it comes.
            self._discarding = True
            out.append(TOO_LONG)
        else:
            self._buffer = rest
        return out

    def finish(self):
        """
        The input has ended: return the unterminated last line (or
        L{TOO_LONG}, or C{None} when there is none) and forget it.
        """
        rest, self._buffer = self._buffer, b""
        if self._discarding:
            self._discarding = False
            return None
        if rest[-1:] == b"\r":
            rest = rest[:-1]
        if len(rest) > self.maxLength:
            return TOO_LONG
        return rest if rest and not _isBlank(rest) else None

    @property
    def buffered(self) -> int:
        """The number of bytes held for an unfinished line."""
        return len(self._buffer)
