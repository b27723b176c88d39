"""Log lines that user input cannot forge: `escape_control` and `install()`.

Adapter names, config keys, model names and paths come from users and end up in log messages and in
warnings. A newline inside one would start what looks like a new log
line, a carriage return or an ANSI escape could hide text on a terminal, and a lone surrogate cannot even be
written as UTF-8. `install()` wraps the process's log-record factory so that every record's message, once its
arguments are formatted, has those characters escaped (`\\n`, `\\x1b`, `\\ud800`...); a traceback attached to a
record keeps its own lines, and so does uvicorn's record of a failed start-up, whose message is the traceback
(each line still escaped). Warnings are printed to stderr as before, one line each with the message escaped
(`logging.captureWarnings` would send them to a logger that drops them unless the root logger has a handler,
which uvicorn does not give it). It is idempotent and called by `create_app`.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

# C0 controls, DEL, C1 controls, Unicode line / paragraph separators, lone surrogates
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return {10: "\\n", 13: "\\r", 9: "\\t"}.get(code) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_control(text: str) -> str:
    """`text` with every control character, line separator and lone surrogate written as an escape."""
    return _CONTROL.sub(_escape, text)


_TRACEBACK = "Traceback (most recent call last):\n"


class _SafeRecord(logging.LogRecord):
    def getMessage(self) -> str:
        message = super().getMessage().rstrip("\n")
        if self.name == "uvicorn.error" and message.startswith(_TRACEBACK):
            # a failed start-up's traceback, which Starlette hands uvicorn as the message text: it keeps its
            # lines, as a traceback attached to a record does (each line still escaped)
            return "\n".join(escape_control(line) for line in message.split("\n"))
        return escape_control(message)


def install() -> None:
    """Escape control characters in every log message and warning of the process."""
    if logging.getLogRecordFactory() is not _factory:
        global _previous
        _previous = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_factory)
    warnings.showwarning = _showwarning


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` on one line: "file:line: Category: message", the message escaped."""
    try:
        (file or sys.stderr).write(f"{filename}:{lineno}: {category.__name__}: {escape_control(str(message))}\n")
    except (OSError, AttributeError):       # no stderr (a daemon), or it was closed
        pass


_previous = logging.getLogRecordFactory()


def _factory(*args, **kwargs) -> logging.LogRecord:
    record = _previous(*args, **kwargs)
    record.__class__ = _SafeRecord if type(record) is logging.LogRecord else record.__class__
    return record
