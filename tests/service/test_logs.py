"""Log lines user input cannot forge (`service.logs.install`): a message's newlines and escapes are written
out, except in uvicorn's record of a failed start-up, whose message is a traceback and keeps its lines."""
import logging

from service import logs


def _formatted(name: str, message: str) -> str:
    logs.install()
    record = logging.getLogRecordFactory()(name, logging.ERROR, __file__, 1, message, None, None)
    return record.getMessage()


def test_a_message_is_one_line_and_a_start_up_traceback_keeps_its_lines():
    assert _formatted("service.registry", "evil\nFORGED\x1b[2J") == "evil\\nFORGED\\x1b[2J"
    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad\x1b[2J\n'
    assert _formatted("uvicorn.error", traceback) == ('Traceback (most recent call last):\n  File "x.py", line 1\n'
                                                      "ValueError: bad\\x1b[2J")
    assert _formatted("service.registry", traceback).count("\n") == 0      # only uvicorn's start-up record
