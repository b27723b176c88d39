"""The API tests' `LiveServer` (real uvicorn in a thread) and `free_port`, for the reliability tests: pytest's
rootdir import mode puts only each test's own folder on sys.path, so the API tests' folder is added here."""
from __future__ import annotations

import sys
from pathlib import Path

_API_TESTS = str(Path(__file__).resolve().parents[1] / "service" / "api")
if _API_TESTS not in sys.path:
    sys.path.append(_API_TESTS)

from _server import LiveServer, free_port  # noqa: E402

__all__ = ["LiveServer", "free_port"]
