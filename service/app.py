"""`create_app(settings)`: the composition root. The lifespan loads the base model, builds the engine (its
step thread running), the adapter registry (store scanned, preloads loaded) and the text generator, and
stops the engine on shutdown. Routes live in `api/`; they reach these objects through `api.deps`."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from contextlib import asynccontextmanager
from typing import Optional

import torch
from fastapi import FastAPI

from service import logs
from service.api import admin, console, errors, health, native, openai, responses, stats, tokens
from service.api.body_limit import BodyLimit
from service.api.deps import State
from service.api.request_id import RequestContext
from service.api.warm_up import warm_up
from service.engine import Engine, EngineConfig, Grammars
from service.engine.full_collector import FullCollector
from service.generation import TextGenerator
from service.kernels import native_kernels
from service.metrics import Metrics
from service.model import LoadedModel, load_model
from service.model.chat_template import check_template
from service.model.decoder import Decoder
from service.model.device import resolve_device
from service.model.dtype import parse_dtype
from service.model.finite_check import check_finite_dense, check_finite_stored
from service.model.huge_pages import weights_on_huge_pages
from service.model.loader import is_gguf
from service.model.weight_format import describe, resolve_weight_format, store_weights, weights_summary
from service.registry import AdapterRegistry
from service.settings import Settings, get_settings

log = logging.getLogger("adapter_serve")


def handoff_wait_s(setting_ms: Optional[float], device: torch.device) -> float:
    """`EngineConfig.handoff_wait_s` from the setting: unset, 10 ms on a CPU (the loop's work per token runs on
    the cores the step's threads use) and none on a GPU (whose step would otherwise wait idle for the loop)."""
    if setting_ms is None:
        setting_ms = 10.0 if device.type == "cpu" else 0.0
    return setting_ms / 1e3


def build_state(settings: Settings, loaded: Optional[LoadedModel] = None) -> State:
    device = resolve_device(settings.device)
    if device.type == "cpu":
        for kernel in native_kernels():     # load (or, if `make install` did not, build) them now,
            kernel.module()                 # not inside the first engine step
    fmt = resolve_weight_format(settings.weight_format, loaded.stored != {} if loaded else is_gguf(settings.model),
                                device)
    loaded = loaded or load_model(settings.model, keep_stored=fmt == "gguf")
    if fmt == "dense" and loaded.stored:
        raise ValueError("weight_format dense needs a model loaded without stored weights")
    check_finite_dense(loaded, settings.model or "the embedded model")
    store_weights(loaded, fmt)
    dtype = parse_dtype(settings.dtype, device) if fmt == "dense" else torch.float32
    broken = check_template(loaded.chat_template)
    if broken:                                  # completions still work; chat answers 500 saying this
        print(f"adapter-serve: warning: {broken}; chat requests will fail until the template is fixed",
              file=sys.stderr, flush=True)
    weights = weights_summary(loaded, fmt, dtype)
    # printed as the cli prints its start-up lines (this process's own loggers print warnings only)
    print(f"adapter-serve: serving the base weights as {describe(weights)} on {device}", flush=True)
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=dtype, device=device,
                                    max_positions=settings.max_seq_len, stored=loaded.stored)
    check_finite_stored(loaded, model, settings.model or "the embedded model")
    if device.type == "cpu" and settings.weight_huge_pages:
        weights_on_huge_pages(model)
    engine = Engine(model, EngineConfig(max_batch_size=settings.max_batch_size, max_seq_len=settings.max_seq_len,
                                        max_batch_tokens=settings.max_batch_tokens,
                                        prefill_chunk=settings.prefill_chunk, max_waiting=settings.max_waiting,
                                        prefill_while_decoding=settings.prefill_while_decoding,
                                        cuda_graphs=settings.cuda_graphs,
                                        handoff_wait_s=handoff_wait_s(settings.handoff_wait_ms, device)),
                    eos_token_ids=loaded.tokenizer.eos_token_ids,
                    grammars=Grammars(loaded.tokenizer, loaded.config.vocab_size, loaded.tokenizer.eos_token_ids))
    metrics = Metrics(settings.metrics_max_adapter_labels)
    engine.step_listeners.append(lambda stats: metrics.engine_step(
        stats.sequences, stats.tokens, engine.num_running, engine.num_waiting,
        1 - engine.cache.free_slots / engine.cache.num_slots, stats.seconds))
    model_id = settings.served_model_name or loaded.name
    registry = AdapterRegistry(model, engine.call_between_steps, settings.adapter_dir,
                               max_device_adapters=settings.max_device_adapters,
                               max_cpu_adapters=settings.max_cpu_adapters, max_lora_rank=settings.max_lora_rank,
                               max_adapter_bytes=settings.max_adapter_bytes,
                               max_archive_bytes=settings.max_archive_bytes, preload=settings.preload_adapters,
                               events=metrics, reserved_names=(model_id,),
                               hub_timeout=settings.hub_timeout, max_merged_adapters=settings.max_merged_adapters,
                               memory_budget=settings.adapter_memory_budget, adapter_dtype=settings.adapter_dtype,
                               step_gate=engine.gate, loader_nice=settings.loader_nice,
                               served_files=settings.adapter_served_files,
                               slot_wait_seconds=settings.adapter_wait_seconds, max_slot_waiters=settings.max_waiting,
                               slot_turn_seconds=settings.adapter_turn_seconds)
    metrics.watch_adapters(registry.max_device_adapters, registry.list)
    metrics.watch_slot_waiters(lambda: registry.slot_waiters, registry.slot_waiting_adapters)
    generator = TextGenerator(engine, loaded.tokenizer, registry, metrics, settings.max_prompt_tokens)
    metrics.model_served(model_id, weights["weight_format"], str(dtype).removeprefix("torch."), device.type)
    state = State(settings, loaded, engine, registry, generator, metrics, model_id)
    state.weights = weights
    return state


async def _rescan_every(registry: AdapterRegistry, seconds: float) -> None:
    """Follow a store shared with other replicas: what they upload, replace, deactivate or delete takes
    effect here within `seconds` (a failed pass is logged and retried at the next one)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await registry.rescan()
        except Exception:  # a bad folder or a full disk must not end the loop
            log.exception("adapter store rescan failed")


def create_app(settings: Optional[Settings] = None, loaded: Optional[LoadedModel] = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.auth_enabled:
            log.warning("No API keys configured: every route is open. Set ADAPTER_SERVE_API_KEYS and "
                        "ADAPTER_SERVE_ADMIN_KEY before exposing the service beyond this machine.")
        state = build_state(settings, loaded)
        app.state.serving = state
        state.engine.start()
        # What start-up made (model, tokenizer, loader garbage) is collected once and then left out of
        # every later collection; later full collections run beside a step's C++ loop when one is due, not
        # mid-step (full_collector.py). Frozen before the scan too: a scan's checks make garbage cycles, and
        # each full collection they set off walked the whole model (1,000 hand-copied adapters on the 2-core
        # Zen 5: 160 of them, ~0.3 s each; the first start 74 -> 60 s).
        await warm_up(app)          # before the freeze: what it builds is kept for the server's life
        gc.collect()
        gc.freeze()
        await state.registry.scan()
        gc.collect()
        gc.freeze()
        unwatch_gc = state.metrics.watch_gc()
        collector = FullCollector(state.engine.gate) if settings.gc_beside_step else None
        if collector is not None:
            collector.start()
        state.ready = True
        rescans = (asyncio.create_task(_rescan_every(state.registry, settings.store_rescan_seconds))
                   if settings.store_rescan_seconds > 0 else None)
        try:
            yield
        finally:
            state.ready = False
            if collector is not None:
                collector.stop()
            unwatch_gc()
            if rescans is not None:
                rescans.cancel()
            state.engine.stop()
            await state.registry.drain()
            state.registry.close()

    logs.install()
    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="adapter-serving", version="0.1.0", lifespan=lifespan, **docs)

    app.add_middleware(BodyLimit, settings=settings)
    # added last: outermost, so every response carries the request id and the replica's name
    app.add_middleware(RequestContext, replica=settings.replica)
    errors.install(app)
    for module in (openai, responses, tokens, native, admin, health, stats, console):
        app.include_router(module.router)
    return app
