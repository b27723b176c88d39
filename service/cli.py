"""`adapter-serve` (also `python -m service`): start uvicorn with the app; flags override `ADAPTER_SERVE_*`.
SIGTERM drains gracefully (see `service/server.py`) and the process exits 0."""

from __future__ import annotations

import argparse

from service.settings import Settings


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
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    from service.app import create_app
    from service.kernels import build_all, uncached
    from service.server import GracefulServer
    if settings.device in ("auto", "cpu") and uncached():
        print(f"adapter-serve: building CPU kernels (once): {', '.join(uncached())}", flush=True)
        build_all(lambda line: print(f"adapter-serve:   {line}", flush=True))
    print(f"adapter-serve: loading {settings.model or 'the embedded SmolLM2-135M-Instruct'}", flush=True)
    GracefulServer(create_app(settings), settings.shutdown_delay, settings.shutdown_timeout,
                   host=settings.host, port=settings.port, log_level="info",
                   announce=f"adapter-serve: listening on http://{settings.host}:{settings.port}").run()


if __name__ == "__main__":
    main()
