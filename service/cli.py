"""`adapter-serve` (also `python -m service`): start uvicorn with the app; flags override `ADAPTER_SERVE_*`.
SIGTERM drains gracefully (see `service/server.py`) and the process exits 0. A malformed setting (a flag or
an `ADAPTER_SERVE_*` variable) stops start-up with one line naming it and exit status 2, not a traceback."""

from __future__ import annotations

import argparse
import re
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.settings import Settings, parse_keys


def _variable(field: str) -> str:
    return f"ADAPTER_SERVE_{field.upper()}"


def settings_problem(exc: Exception) -> str:
    """One line naming the setting that `Settings(...)` refused, and why."""
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "settings"
        message = error["msg"].removeprefix("Value error, ")
        return " ".join(f"{_variable(field)}: {message}".split())
    found = re.search(r'field "([^"]+)"', str(exc))
    cause = f" ({exc.__cause__})" if exc.__cause__ else ""
    return " ".join((f"{_variable(found.group(1))}: not valid JSON{cause}" if found else str(exc)).split())


def load_settings(overrides: dict) -> Settings:
    try:
        return Settings(**overrides)
    except (ValidationError, SettingsError) as exc:
        print(f"adapter-serve: {settings_problem(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="adapter-serve", description="Serve many adapters on one base model.")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--model", help="GGUF file, HF folder or hub repo id (default: embedded SmolLM2)")
    parser.add_argument("--adapter-dir")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--weight-format", choices=["auto", "dense", "fp32", "bf16", "int8", "gguf"],
                        help="how the base weights are served (auto: a GGUF as stored on the CPU)")
    parser.add_argument("--device")
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--max-device-adapters", type=int)
    parser.add_argument("--shutdown-timeout", type=float, help="seconds running requests get after SIGTERM")
    parser.add_argument("--api-key", dest="api_keys", action="extend", nargs="+", metavar="KEY",
                        help="inference key(s), as vLLM's --api-key (each value: one key or a comma-separated list)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    if args.api_keys is not None:
        try:
            overrides["api_keys"] = [key for value in args.api_keys for key in parse_keys(value)]
        except ValueError as exc:
            print(f"adapter-serve: --api-key: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    settings = load_settings(overrides)
    from service.app import create_app
    from service.kernels import build_all, uncached
    from service.model.device import resolve_device
    from service.server import GracefulServer
    try:
        device = resolve_device(settings.device)
    except ValueError as exc:
        print(f"adapter-serve: --device: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if device.type == "cpu" and uncached():         # on a GPU the CPU kernels are never called: no build
        print(f"adapter-serve: building CPU kernels (once): {', '.join(uncached())}", flush=True)
        build_all(lambda line: print(f"adapter-serve:   {line}", flush=True))
    print(f"adapter-serve: loading {settings.model or 'the embedded SmolLM2-135M-Instruct'}", flush=True)
    GracefulServer(create_app(settings), settings.shutdown_delay, settings.shutdown_timeout,
                   host=settings.host, port=settings.port, log_level="info",
                   announce=f"adapter-serve: listening on http://{settings.host}:{settings.port}").run()


if __name__ == "__main__":
    main()
