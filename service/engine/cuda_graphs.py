"""CUDA graphs for the engine's decode steps: one step's hundreds of kernel launches replayed as one.

On a GPU a decode step of a 1B model is launch-bound: measured on an H200 (Llama-3.2-1B shape, bf16, 64 sequences)
the device was busy 0.31 s of a 1.33 s run, the rest Python and launches (~790 per step, ~220 more for the LoRA
shrink and expand of 16 layers x 7 projections); replayed as graphs, 16 sequences went from 902 to 2,948 tokens/s
on the base model and from 321 to 1,869 on 16 adapters (BENCHMARKS.md, "GPU"). `DecodeGraphs` captures
`Decoder.forward_step` for steps made only of decode tokens, once per batch-size bucket (1, 2, 4, 8, then
multiples of 8 up to the engine's `max_batch_size`, captured when first needed), over static input buffers: token
ids, positions, each token's adapter slot (a `BatchMapping.token_buffer` mapping, which only the Triton SGMV reads
as it runs), and the decode attention's cache rows and lengths. A step of n sequences fills rows 0..n-1; the
bucket's other rows are padding: token 0 at position 0 on the base model (slot 0, which the SGMV kernels skip),
writing its key and value into the cache's spare row that no request owns (`KVCache(spare_slots=1)`). A graph
holds the addresses of the adapters' padded stacks (`LayerStack.padded`), so it is keyed by every adapter layer's
stack and version and captured again after an adapter is loaded into or removed from a layer, once the adapters
have held still for a step (a step whose key differs from the last one's runs eagerly, so a churn of loads does
not capture a graph per step). It applies on CUDA with both Triton kernels (SGMV and decode attention) when every
adapter layer holds nothing or plain LoRA (no IA3, DoRA, LoRA bias, embedding adapters or modules_to_save):
anything else, prompt chunks, per-request adapter scales and a failed capture (logged once; graphs then stay off)
run the eager path. `EngineConfig.cuda_graphs` / the `CUDA_GRAPHS` setting turns them off.
"""

from __future__ import annotations

import contextlib
import logging
from bisect import bisect_left
from typing import Optional

import torch

from adapters_core import cuda_lora
from adapters_core.batch_mapping import BatchMapping
from adapters_core.layer import AdapterLayer
from adapters_core.model_tree import slot_table
from service.model import cuda_ops

log = logging.getLogger(__name__)
TOKENS, POSITIONS, ADAPTER_SLOTS, CACHE_SLOTS, LAST = range(5)      # rows of a graph's input buffer


def buckets(max_rows: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, 16, 24, ... up to max_rows (which is one)."""
    sizes = [s for s in (1, 2, 4) if s < max_rows] + list(range(8, max_rows, 8))
    return sizes + [max_rows]


class _StaticPlan:
    """What `forward_step` reads of a `StepPlan`, over a graph's buffers: `rows` decode tokens, no prompt."""

    def __init__(self, inputs: torch.Tensor):
        rows = inputs.shape[1]
        self.prefill, self.decode = [], list(range(rows))
        self.logit_index = torch.arange(rows, device=inputs.device)
        self._decode = (self.logit_index, inputs[CACHE_SLOTS], inputs[LAST], None)

    def decode_tensors(self, device: torch.device):
        return self._decode                  # (no key count: only the Triton attention serves a graph)


class _Graph:
    """A captured step: its replay, its input buffer [5, rows] and output [rows, d], the adapters' key, and the
    plan whose tensors the graph reads (kept alive: a graph holds addresses, not references)."""

    def __init__(self, replay, inputs: torch.Tensor, hidden: torch.Tensor, key: tuple, plan: _StaticPlan):
        self.replay, self.inputs, self.hidden, self.key, self.plan = replay, inputs, hidden, key, plan


class DecodeGraphs:
    """The engine's captured decode steps (see the module docstring); `run` replays one or returns None."""

    def __init__(self, model, cache, max_rows: int):
        if cache.spare is None:
            raise ValueError("CUDA graphs need a KV cache with a spare row (KVCache(spare_slots=1))")
        self.model, self.cache, self.sizes = model, cache, buckets(max_rows)
        self.device = model.model.norm.weight.device
        self._graphs: dict[int, _Graph] = {}
        self.captures = self.replays = 0
        self.failed: Optional[str] = None            # why capturing failed: graphs stay off
        self._seen: Optional[tuple] = None            # the previous step's key

    @staticmethod
    def applies_to(device: torch.device) -> bool:
        """CUDA with both Triton kernel modules importable (their switches not "0")."""
        return device.type == "cuda" and cuda_ops.kernels() is not None and cuda_lora.kernels() is not None

    def _key(self) -> Optional[tuple]:
        """Every adapter layer's stack and version, or None when a layer holds what a graph cannot serve."""
        if not getattr(self.model, "peft_config", None):
            return ()
        if cuda_lora.kernels() is None or cuda_ops.kernels() is None:         # switched off since (benchmarks)
            return None
        key = []
        for module in slot_table(self.model).modules:
            if type(module) is not AdapterLayer or module.is_embedding or module.disabled or module.merged_adapters:
                return None
            st = module.stack
            if st is None:
                key.append(None)
                continue
            if st.ia3_in is not None or st.ia3_out is not None or (st.lora and not st.plain_lora):
                return None
            key.append((id(st), st.version))
        return tuple(key)

    def run(self, plan, tokens: list[int], positions: list[int], adapter_slots: list[int]) -> Optional[torch.Tensor]:
        """The final hidden states `forward_step` returns for a step of decode tokens only, from a graph; None
        when no graph serves this step (the caller runs the eager path). Call inside the step's `token_batch`
        (it brings the batch's adapters into their stacks before the key is read)."""
        n = len(tokens)
        if self.failed is not None or plan.prefill or n == 0 or n > self.sizes[-1]:
            return None
        key = self._key()
        seen, self._seen = self._seen, key
        if key is None:
            return None
        rows = self.sizes[bisect_left(self.sizes, n)]
        graph = self._graphs.get(rows)
        if graph is None or graph.key != key:
            if key != seen:           # adapters changed since the last step: capture once they hold still
                return None
            # stale graphs (other adapters' stacks) and their memory go before the new capture
            self._graphs = {size: g for size, g in self._graphs.items() if g.key == key and size != rows}
            try:
                with self._on_device():
                    graph = self._graphs[rows] = self._capture(rows, key)
            except Exception as exc:        # e.g. an operation that cannot be captured: the eager path from now
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed; decode steps run without graphs: %s", self.failed)
                return None
        pad = rows - n
        seqs = plan.sequences
        staged = torch.tensor([tokens + [0] * pad, positions + [0] * pad, adapter_slots + [0] * pad,
                               [s.slot for s in seqs] + [self.cache.spare] * pad,
                               [s.start for s in seqs] + [0] * pad], dtype=torch.long)     # [5, rows]
        with self._on_device():
            graph.inputs.copy_(staged)
            graph.replay()
        self.replays += 1
        return graph.hidden.index_select(0, plan.logit_index)                # [outputs, d]

    def _capture(self, rows: int, key: tuple) -> _Graph:
        inputs = torch.zeros(5, rows, dtype=torch.long, device=self.device)          # [5, rows]
        inputs[CACHE_SLOTS] = self.cache.spare
        plan = _StaticPlan(inputs)
        table = slot_table(self.model) if key else None
        mapping = BatchMapping.token_buffer(inputs[ADAPTER_SLOTS]) if key else None

        def forward() -> torch.Tensor:
            if table is None:
                return self.model.forward_step(inputs[TOKENS], inputs[POSITIONS], plan, self.cache)
            previous, table.mapping = table.mapping, mapping
            try:
                return self.model.forward_step(inputs[TOKENS], inputs[POSITIONS], plan, self.cache)
            finally:
                table.mapping = previous

        replay, hidden = self._record(forward)                                      # [rows, d]
        self.captures += 1
        log.info("captured a CUDA graph of the decode step for %d rows", rows)
        return _Graph(replay, inputs, hidden, key, plan)

    def _record(self, forward):
        """(replay, output) of `forward` captured as a CUDA graph, after two warm-up runs on a side stream
        (Triton compiles and the padded stacks are built there, outside the graph)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local: the registry's loader thread may copy an adapter to the GPU meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            hidden = forward()
        return graph.replay, hidden

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
