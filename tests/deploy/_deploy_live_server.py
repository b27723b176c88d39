"""The API tests' LiveServer (real uvicorn in a thread on a free loopback port) for tests/deploy: pytest's
rootdir import mode puts only each test's own folder on sys.path, so the API tests' folder is added here."""
from __future__ import annotations

import sys
from pathlib import Path

_API_TESTS = str(Path(__file__).resolve().parents[1] / "service" / "api")
if _API_TESTS not in sys.path:
    sys.path.append(_API_TESTS)

from _server import LiveServer  # noqa: E402

__all__ = ["LiveServer"]
