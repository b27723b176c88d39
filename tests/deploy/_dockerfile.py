"""A small reader for the project's Dockerfile: instructions with their continuation lines joined and
comments dropped, enough for tests/deploy to check what the image does without a Docker engine."""
from __future__ import annotations

from pathlib import Path


def instructions(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] in file order."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):           # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def env(path: Path) -> dict[str, str]:
    """ENV and ARG defaults in KEY=VALUE form (ARG without a default maps to '')."""
    values = {}
    for keyword, args in instructions(path):
        if keyword in ("ENV", "ARG"):
            for item in args.split():
                key, _, value = item.partition("=")
                values[key] = value.strip('"')
    return values
