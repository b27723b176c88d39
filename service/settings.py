"""Service settings: `ADAPTER_SERVE_*` environment variables (and the matching `adapter-serve` flags).

Every limit a user may need to change is here with the default a vLLM / LoRAX user would expect;
`get_settings()` is cached so the app and its dependencies share one instance.
"""

from __future__ import annotations

import functools
import json
import socket
from typing import Annotated, Any, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

KEYS_FORMS = "one key, a comma-separated list or a JSON list of keys"
ADAPTER_DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_keys(value: Any) -> list[str]:
    """API keys as `ADAPTER_SERVE_API_KEYS` or `--api-key` give them: one key, a comma-separated list or a JSON
    list. ValueError (one line) if malformed: bad JSON, a key that is empty or holds whitespace or control
    characters (it could never match an `Authorization: Bearer` header)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not a valid JSON list ({exc}); expected {KEYS_FORMS}") from None
        else:
            value = [part.strip() for part in text.split(",")]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected {KEYS_FORMS}")
    keys = []
    for i, key in enumerate(value, 1):
        if not isinstance(key, str):
            raise ValueError(f"key {i} is not a string ({type(key).__name__}); expected {KEYS_FORMS}")
        if not key.strip():
            raise ValueError(f"key {i} is empty; expected {KEYS_FORMS}")
        if any(c.isspace() or not c.isprintable() for c in key.strip()):
            raise ValueError(f"key {i} contains whitespace or control characters")
        keys.append(key.strip())
    return keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTER_SERVE_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    model: Optional[str] = Field(None, description="GGUF file, HF folder or hub repo id; default: embedded SmolLM2")
    served_model_name: Optional[str] = Field(None, description="the base model's id in the API")
    device: str = "auto"                       # auto | cpu | cuda
    dtype: str = "auto"                        # auto | float32 | bfloat16 | float16 (weight_format dense)
    # auto | dense | fp32 | bf16 | int8 | gguf: how the base weights are served (service/model/weight_format.py)
    weight_format: str = "auto"
    # on the CPU, the base weights' pages are collapsed into transparent huge pages once at load (Linux >= 6.1's
    # MADV_COLLAPSE; an F32 one-stream step 4-5 % faster: service/model/huge_pages.py); false leaves them as
    # allocated
    weight_huge_pages: bool = True

    # shutdown (SIGTERM): /ready turns 503 at once, the listener closes after shutdown_delay, running
    # requests may finish until shutdown_timeout after the signal (Kubernetes' default grace period)
    shutdown_delay: float = Field(0.0, ge=0)
    shutdown_timeout: float = Field(30.0, ge=0)

    # engine
    max_batch_size: int = 16                   # running requests (KV cache slots)
    max_seq_len: int = 2048                    # prompt + generated tokens per request
    max_batch_tokens: int = 512
    prefill_chunk: int = 256
    # prompt tokens per step while requests decode (stall-free batching; 0: half as many as requests decode, >= 32)
    prefill_while_decoding: int = Field(0, ge=0)
    max_waiting: int = 64                      # queued requests before 429
    cuda_graphs: bool = True                   # on a GPU: decode steps replay captured CUDA graphs
    # after a step, the most milliseconds the engine waits for the event loop to hand that step's tokens to
    # their streams before it steps again (service/engine/engine_thread.py); unset: 10 on a CPU, 0 on a GPU
    handoff_wait_ms: Optional[float] = Field(None, ge=0, le=1000)

    # request limits
    max_prompt_tokens: int = 1536
    max_tokens_limit: int = 1024               # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_body_bytes: int = 64 * 2**20           # adapter uploads (POST /admin/adapters)
    # every other request body (JSON): a prompt within max_prompt_tokens is far smaller, and a JSON body of
    # tens of MB takes seconds of the event loop just to parse
    max_request_bytes: int = 2 * 2**20
    # seconds a request body may take to arrive in full (a slow-loris body gets 408 and the connection closes)
    body_timeout: float = Field(60.0, gt=0)

    # adapters
    adapter_dir: str = "./adapter-store"
    # the device tier: at most this many adapters (vLLM's max_loras, LoRAX's max_active_adapters) and at most
    # adapter_memory_budget bytes of their stored weights (0: no byte limit); on the CPU the cpu tier is
    # the same memory, so an adapter in the device tier is not also kept in it
    max_device_adapters: int = Field(128, ge=1)
    adapter_memory_budget: int = Field(2 * 2**30, ge=0)
    # seconds a request waits for a device slot while every slot holds an adapter in use (then 429), as vLLM's
    # and LoRAX's schedulers hold such requests; at most max_waiting requests wait so (registry/slot_wait.py)
    adapter_wait_seconds: float = Field(30.0, ge=0)
    # a request that waited this long for a device slot makes the adapter on the device with the fewest requests
    # in flight yield its slot to it (as LoRAX's adapter_cycle_time_s), so popular adapters do not starve rare
    # ones; 0: off (registry/turns.py)
    adapter_turn_seconds: float = Field(2.0, ge=0)
    max_cpu_adapters: int = 128
    max_merged_adapters: int = Field(8, ge=1)      # LoRAX merged_adapters kept at once (registry/merged.py)
    # the dtype LoRA / AdaLoRA factors are held and served in (vLLM's --lora-dtype), cast once at load; auto:
    # the checkpoint's (a dense base model's own dtype, as PEFT); the stored files never change
    adapter_dtype: str = "auto"
    # added to the nice value (Linux, per thread) of the threads that read, prepare and evict adapters, for a
    # host whose other work should come first; 0 (measured best here: nice 10 left tokens/s the same and made
    # loads wait longer) keeps them at the process's priority
    loader_nice: int = Field(0, ge=0, le=19)
    # CPU serving: after an adapter's first load, its tensors as held (cast, LoRA B transposed) are written
    # beside its files in the store (`served.<adapter_dtype>.safetensors`, about the size of its weights in
    # adapter_dtype) and later loads map that file instead of reading and converting the PEFT file; false:
    # every load reads the PEFT file (a store on a read-only volume needs nothing: the write is skipped)
    adapter_served_files: bool = True
    # Python's full garbage collections run beside a step's C++ loop when one is due (survivors frozen, all
    # collected once a minute) instead of mid-step in whichever thread allocates
    # (service/engine/full_collector.py); false leaves them to Python
    gc_beside_step: bool = True
    max_lora_rank: int = 64
    max_adapter_bytes: int = 512 * 2**20
    max_archive_bytes: int = 1024 * 2**20
    preload_adapters: list[str] = Field(default_factory=list)
    # seconds a hub lookup (PUT /admin/adapters/{name} with source "hub") may take before it answers 503
    hub_timeout: float = Field(10.0, gt=0)
    # replicas sharing one store: re-read it every N seconds (0 = only at start-up and POST /admin/rescan)
    store_rescan_seconds: float = Field(0.0, ge=0)
    # the `X-Replica` response header (printable ASCII); empty: this host's name (a pod's name in Kubernetes)
    replica_name: str = Field("", pattern=r"^[\x21-\x7e]{0,128}$")

    # security
    # inference keys: one key, a comma-separated list or a JSON list (`--api-key`, as vLLM's)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_key: Optional[str] = None
    key_adapters: dict[str, list[str]] = Field(default_factory=dict)   # key -> adapters it may use

    # `/metrics` needs `Authorization: Bearer <metrics_key>` when set (the admin key works too); without it,
    # /metrics is open when no keys are configured and needs the admin key when they are
    metrics_key: Optional[str] = None
    docs: bool = True                          # /docs, /redoc, /openapi.json (false: 404)
    console: bool = True                       # the operator console at /console (false: 404)

    # metrics
    metrics_max_adapter_labels: int = 20       # busiest N adapters get their own label; the rest are "other"
    # `/metrics/gateway` (the vllm:* gauges the Gateway API Inference Extension's endpoint picker scrapes, and
    # it sends no key) needs no key; false: it needs what /metrics needs
    gateway_metrics_open: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: Any) -> list[str]:
        return parse_keys(value)

    @field_validator("adapter_dtype")
    @classmethod
    def _adapter_dtype(cls, value: str) -> str:
        if value not in ADAPTER_DTYPES:
            raise ValueError(f"must be one of {', '.join(ADAPTER_DTYPES)}; got {value!r}")
        return value

    @property
    def replica(self) -> str:
        return self.replica_name or socket.gethostname()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_key)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
