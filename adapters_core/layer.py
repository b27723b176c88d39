"""AdapterLayer: one wrapper around a targeted Linear / Conv1D / Embedding that can hold adapters of every kind.

The original module becomes `base_layer`. LoRA adapters live in PEFT's containers (`lora_A`, `lora_B`,
`lora_embedding_A/B`, `lora_magnitude_vector`), IA3 vectors in `ia3_l`, AdaLoRA triplets in `adalora_A/E/B`
(renamed from PEFT's `lora_A/E/B` because a LoRA and an AdaLoRA adapter may share a layer here; the
state-dict functions translate). Forward follows PEFT's math exactly: IA3 scales the base layer's input
(feed-forward) or output, then each active LoRA / AdaLoRA adapter adds its delta. When a mixed batch is
active on the model, forward switches to the stacked per-row / per-token path in `stack.py`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedFeatureError
from .held_linear import linear_holding
from .matching import is_conv1d
from .stack import stacked_forward
from .watched import Watched, bump

LORA_KINDS = ("LORA", "ADALORA")


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense float tensor: a quantized layer (one that stores its weight in blocks
    and offers `dequantize()`, like PEFT's bitsandbytes layers) is dequantised; others give `.weight`."""
    weight = base_layer.weight
    if weight.dtype.is_floating_point:
        return weight
    dequantize = getattr(base_layer, "dequantize", None)
    if dequantize is None:
        raise UnsupportedFeatureError(f"{type(base_layer).__name__} stores a {weight.dtype} weight and has no "
                                      "dequantize()")
    return dequantize()


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


# Every adapter without dropout shares this one stateless module: an adapter load then builds two modules per
# layer instead of three (a module costs ~2 KB and ~20 us to construct).
_NO_DROPOUT = nn.Identity()


# The per-adapter containers of an AdapterLayer (its child modules): what `remove_adapter` empties of a name.
_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout",
               "adalora_A", "adalora_E", "adalora_B", "ia3_l")


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's delta scale: alpha / r, or rsLoRA's alpha / sqrt(r)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _meta_linear(in_features: int, out_features: int, bias: bool, device: torch.device,
                 dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear with uninitialised parameters on the meta device (the state dict brings the values)."""
    return linear_holding(torch.empty(out_features, in_features, device=device, dtype=dtype),
                          torch.empty(out_features, device=device, dtype=dtype) if bias else None)


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude vector `m` as `.weight`, so its key is `lora_magnitude_vector.<name>.weight`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class AdapterLayer(Watched, nn.Module):
    """Wraps `base_layer`; holds any number of LoRA, AdaLoRA and IA3 adapters by name. Its changes are counted
    (`watched.Watched`): the service's direct step keeps its plan of the layers while none happens."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.fan_in_fan_out = is_conv1d(base_layer)
        weight = base_layer.weight
        if self.is_embedding:
            self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.adalora_A = nn.ParameterDict()
        self.adalora_E = nn.ParameterDict()
        self.adalora_B = nn.ParameterDict()
        self.ia3_l = nn.ParameterDict()
        self.kind: dict[str, str] = {}          # adapter -> "LORA" | "ADALORA" | "IA3"
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}     # AdaLoRA divisor, never saved
        self.ia3_feedforward: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []
        self._dora_norms: dict[str, torch.Tensor] = {}   # per merged DoRA adapter, for unmerging
        self.slot_table = None                  # set by injection; carries the mixed-batch mapping
        self.stack = None                       # stacked copies for mixed batches (stack.LayerStack)

    # ----- creation -------------------------------------------------------------------------------------
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        w = self.base_layer.weight
        dtype = w.dtype if (w.dtype.is_floating_point or w.dtype.is_complex) else torch.float32
        return w.device, dtype

    def register_lora(self, name: str, r: int, scaling: float, dropout: float) -> None:
        """A LoRA adapter's entries beside its factors: kind, rank, scaling and dropout module."""
        self.kind[name] = "LORA"
        self.r[name] = r
        self.scaling[name] = scaling
        self.lora_dropout[name] = nn.Dropout(dropout).train(self.training) if dropout > 0 else _NO_DROPOUT

    def register_lora_entries(self, name: str, r: int, scaling: float, dropout: float, lora_a: nn.Module,
                              lora_b: nn.Module) -> None:
        """`register_lora` and the factors' modules, written straight into the ModuleDicts' `_modules`, where
        their `__setitem__` ends, for a name the caller checked `add_module` takes (`prepared._plain_entry`)."""
        modules = self._modules
        self.kind[name], self.r[name], self.scaling[name] = "LORA", r, scaling
        modules["lora_dropout"]._modules[name] = (nn.Dropout(dropout).train(self.training) if dropout > 0
                                                  else _NO_DROPOUT)
        modules["lora_A"]._modules[name] = lora_a
        modules["lora_B"]._modules[name] = lora_b

    def add_lora(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool,
                 lora_bias: bool, init, meta: bool) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        device, dtype = self._device_dtype()
        create = torch.device("meta") if meta else device
        self.register_lora(name, r, lora_scaling(alpha, r, use_rslora), dropout)
        if self.is_embedding:
            a = torch.empty(r, self.in_features, device=create, dtype=dtype)
            b = torch.empty(self.out_features, r, device=create, dtype=dtype)
            if not meta:
                if init is False:
                    nn.init.normal_(a)
                    nn.init.normal_(b)
                else:
                    nn.init.zeros_(a)
                    nn.init.normal_(b)
                if init == "mica":            # B: the minor left singular vectors of the table's transpose
                    with torch.no_grad():
                        u, _, _ = torch.linalg.svd(dense_weight(self.base_layer).to(torch.float32).T,
                                                   full_matrices=False)
                        b.copy_(u[:, -r:].to(b.dtype))
            self.lora_embedding_A[name] = nn.Parameter(a)
            self.lora_embedding_B[name] = nn.Parameter(b)
        else:
            make = _meta_linear if meta else nn.Linear
            lin_a = make(self.in_features, r, bias=False, device=create, dtype=dtype)
            lin_b = make(r, self.out_features, bias=lora_bias, device=create, dtype=dtype)
            if not meta and init is not False:
                if init == "gaussian":
                    nn.init.normal_(lin_a.weight, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(lin_a.weight, a=math.sqrt(5))
                nn.init.zeros_(lin_b.weight)
                if lora_bias:
                    nn.init.zeros_(lin_b.bias)
                if init in ("orthogonal", "mica"):
                    self._init_from_base(init, r, lin_a.weight, lin_b.weight)
            self.lora_A[name] = lin_a
            self.lora_B[name] = lin_b
        if use_dora:
            if meta:
                norm = torch.empty(self.out_features, device=create, dtype=dtype)
            else:
                norm = self._weight_norm(self.get_delta_weight(name).to(dtype))
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)

    @torch.no_grad()
    def _init_from_base(self, init: str, r: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """PEFT's "orthogonal" init (A and B from two halves of a random orthogonal matrix, B @ A = 0; r even)
        and "mica" (B the base weight's r minor left singular vectors, A zero): the base weights unchanged."""
        if init == "orthogonal":
            if r % 2:
                raise ValueError(f"orthogonal initialization needs an even LoRA rank, got {r}")
            q, _ = torch.linalg.qr(torch.randn(r, r))
            a.copy_((torch.randn(self.in_features, r // 2).mm(q[0::2, :]).T / 10.0).to(a.dtype))
            b.copy_((torch.randn(r // 2, self.out_features).T.mm(q[1::2, :]) / 10.0).to(b.dtype))
            return
        weight = transpose(dense_weight(self.base_layer).to(torch.float32), self.fan_in_fan_out)   # [out, in]
        if r > min(weight.shape):
            raise ValueError(f"MiCA needs r <= min(in_features, out_features); got r={r} for {tuple(weight.shape)}")
        u, _, _ = torch.linalg.svd(weight, full_matrices=False)
        b.copy_(u[:, -r:].to(b.dtype))
        a.zero_()

    def add_adalora(self, name: str, r: int, init_r: int, alpha: float, dropout: float, init, meta: bool) -> None:
        device, dtype = self._device_dtype()
        create = torch.device("meta") if meta else device
        self.kind[name] = "ADALORA"
        self.r[name] = r
        self.scaling[name] = alpha if alpha > 0 else float(r)
        self.ranknum[name] = float(init_r) if r > 0 else 0.0
        self.lora_dropout[name] = nn.Dropout(dropout).train(self.training) if dropout > 0 else _NO_DROPOUT
        a = torch.empty(r, self.in_features, device=create, dtype=dtype)
        e = torch.empty(r, 1, device=create, dtype=dtype)
        b = torch.empty(self.out_features, r, device=create, dtype=dtype)
        if not meta:
            if init is False:
                for t in (a, e, b):
                    nn.init.normal_(t)
            else:
                nn.init.zeros_(e)
                nn.init.normal_(a, mean=0.0, std=0.02)
                nn.init.normal_(b, mean=0.0, std=0.02)
        self.adalora_A[name] = nn.Parameter(a)
        self.adalora_E[name] = nn.Parameter(e)
        self.adalora_B[name] = nn.Parameter(b)

    def add_ia3(self, name: str, feedforward: bool, init: bool, meta: bool) -> None:
        if self.is_embedding:
            raise ValueError("IA3 does not support Embedding layers")
        device, dtype = self._device_dtype()
        create = torch.device("meta") if meta else device
        self.kind[name] = "IA3"
        self.ia3_feedforward[name] = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        vec = torch.empty(shape, device=create, dtype=dtype)
        if not meta:
            nn.init.ones_(vec) if init else nn.init.normal_(vec)
        self.ia3_l[name] = nn.Parameter(vec)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's tensors keyed by the suffix PEFT writes on disk (after the module path)."""
        kind = self.kind[name]
        out: dict[str, nn.Parameter] = {}
        if kind == "IA3":
            out["ia3_l"] = self.ia3_l[name]
        elif kind == "ADALORA":
            out.update(lora_A=self.adalora_A[name], lora_E=self.adalora_E[name], lora_B=self.adalora_B[name])
        elif self.is_embedding:
            out.update(lora_embedding_A=self.lora_embedding_A[name], lora_embedding_B=self.lora_embedding_B[name])
        else:
            out["lora_A.weight"] = self.lora_A[name].weight
            out["lora_B.weight"] = self.lora_B[name].weight
            if self.lora_B[name].bias is not None:
                out["lora_B.bias"] = self.lora_B[name].bias
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return out

    def parameter_owner(self, name: str, suffix: str) -> tuple[nn.Module, str]:
        """(module, attribute) that holds the tensor `adapter_parameters(name)[suffix]`."""
        table = {
            "ia3_l": (self.ia3_l, name), "lora_E": (self.adalora_E, name),
            "lora_embedding_A": (self.lora_embedding_A, name), "lora_embedding_B": (self.lora_embedding_B, name),
        }
        if suffix in table:
            return table[suffix]
        if self.kind[name] == "ADALORA":
            return {"lora_A": (self.adalora_A, name), "lora_B": (self.adalora_B, name)}[suffix]
        if suffix == "lora_magnitude_vector":
            return self.lora_magnitude_vector[name], "weight"
        module, attr = suffix.split(".")
        return getattr(self, module)[name], attr

    def remove_adapter(self, name: str) -> None:
        # (the containers straight from `_modules`, and `active_adapters` set only when it changes: a server
        # removes every evicted adapter from each of its layers, and Module's attribute hooks were most of it)
        modules = self._modules
        for attr in _CONTAINERS:
            container = modules[attr]
            if name in container:
                del container[name]
        for d in (self.kind, self.r, self.scaling, self.ranknum, self.ia3_feedforward):
            d.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters = [a for a in self.active_adapters if a != name]
        if self.stack is not None:
            self.stack.forget(name)

    # ----- math -----------------------------------------------------------------------------------------
    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r], per-rank scale [r]) with delta = B @ diag(scale) @ A, for LoRA and AdaLoRA."""
        if self.kind[name] == "ADALORA":
            a, b = self.adalora_A[name], self.adalora_B[name]
            scale = self.adalora_E[name].reshape(-1) * (self.scaling[name] / (self.ranknum[name] + 1e-5))
            return a, b, scale
        if self.is_embedding:
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        else:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return a, b, torch.full((a.shape[0],), self.scaling[name], dtype=a.dtype, device=a.device)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """Weight delta in the base weight's layout ([out, in], Conv1D [in, out], Embedding [V, d])."""
        kind = self.kind[name]
        if kind == "IA3":
            raise ValueError("IA3 adapters scale weights; they have no additive delta")
        if kind == "ADALORA":
            a, e, b = self.adalora_A[name], self.adalora_E[name], self.adalora_B[name]
            delta = transpose(b @ (a * e), self.fan_in_fan_out) * self.scaling[name] / (self.ranknum[name] + 1e-5)
            return delta
        a, b, _ = self.lora_factors(name)
        dtype = b.dtype
        upcast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if upcast:
            a, b = a.float(), b.float()
        if self.is_embedding:
            delta = (b @ a).T * self.scaling[name]
        else:
            delta = transpose(b @ a, self.fan_in_fan_out) * self.scaling[name]
        return delta.to(dtype) if upcast else delta

    def _weight_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Norm of W + delta per output feature (DoRA's denominator); `delta` is in the base weight's layout."""
        total = dense_weight(self.base_layer).to(delta.dtype) + delta
        if self.is_embedding or self.fan_in_fan_out:
            total = total.T
        return torch.linalg.norm(total, dim=1).to(total.dtype)

    def dora_scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """m / ||W + s·BA||: DoRA's per-output-feature factor (detached), computed in `dtype`."""
        norm = self._weight_norm(self.get_delta_weight(name).detach().to(dtype)).detach()
        return self.lora_magnitude_vector[name].weight / norm

    # ----- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        table = self.slot_table
        if table is not None and table.mapping is not None:          # a mixed batch: the stacked path
            if self.merged_adapters:
                raise ValueError("mixed batches cannot run while adapters are merged; unmerge first")
            return stacked_forward(self, x, table.mapping, *args, **kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self.is_embedding:
            return self._embedding_forward(x, *args, **kwargs)
        result = self._ia3_base_forward(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            kind = self.kind.get(name)
            if kind == "LORA":
                lin_a, lin_b = self.lora_A[name], self.lora_B[name]
                x = x.to(lin_a.weight.dtype)
                if name in self.lora_magnitude_vector:
                    result = result + self._dora_delta(name, x, result)
                else:
                    result = result + lin_b(lin_a(self.lora_dropout[name](x))) * self.scaling[name]
            elif kind == "ADALORA":
                a, e, b = self.adalora_A[name], self.adalora_E[name], self.adalora_B[name]
                x = x.to(a.dtype)
                ranknum = self.ranknum[name] + 1e-5
                result += (self.lora_dropout[name](x) @ (a * e).T @ b.T) * self.scaling[name] / ranknum
        return result.to(result_dtype)

    def _ia3_base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = [n for n in self.active_adapters if self.kind.get(n) == "IA3"]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        scale_in, scale_out = None, None
        for n in names:
            vec = self.ia3_l[n].flatten()
            if self.ia3_feedforward[n]:
                scale_in = vec if scale_in is None else scale_in * vec
            else:
                scale_out = vec if scale_out is None else scale_out * vec
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(previous_dtype)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result.to(scale_out.dtype) * scale_out).to(previous_dtype)
        return result

    def _dora_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lin_a, lin_b = self.lora_A[name], self.lora_B[name]
        scaling = self.scaling[name]
        g = self.dora_scale(name, x.dtype).view(1, -1)
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result
            bias = self.base_layer.bias
            if bias is not None:
                base_result = base_result - bias
        else:
            x = dropout(x)
            base_result = F.linear(x, transpose(dense_weight(self.base_layer).to(x.dtype), self.fan_in_fan_out))
        return (g - 1) * base_result + g * lin_b(lin_a(x)) * scaling

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def embed_scale(self) -> Optional[torch.Tensor]:
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        if isinstance(scale, (int, float)):
            return torch.tensor(scale)
        return None

    def _embedding_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        embed_scale = self.embed_scale()
        for name in self.active_adapters:
            if self.kind.get(name) != "LORA":
                continue
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            after_a = self._embed(x, a.T)
            if name in self.lora_magnitude_vector:
                g = self.dora_scale(name, result.dtype)
                out = g * (after_a @ b.T) * self.scaling[name]
                result = result * g + out
                continue
            out = (after_a @ b.T) * self.scaling[name]
            if embed_scale is not None:
                out = out * embed_scale.to(out.dtype)
            result = result + out
        return result.to(result_dtype)

    # ----- merge ----------------------------------------------------------------------------------------
    # Base weights change in place (add_, copy_), never through `.data`, so their version counters move
    # and caches keyed on them (stacked DoRA factors, prepacked base weights) see the change.
    def merge(self, names: Optional[list[str]] = None) -> None:
        names = [n for n in (names if names is not None else self.active_adapters) if n in self.kind]
        weight = self.base_layer.weight
        if names and not weight.dtype.is_floating_point:
            kind = type(self.base_layer).__name__
            raise UnsupportedFeatureError(f"merging adapters into a quantized base layer ({kind}, {weight.dtype} "
                                          "storage) is not supported; serve them unmerged")
        for name in names:
            if name in self.merged_adapters:
                continue
            kind = self.kind[name]
            with torch.no_grad():
                if kind == "IA3":
                    vec = self.ia3_l[name].data
                    bias = getattr(self.base_layer, "bias", None)
                    if not self.ia3_feedforward[name] and bias is not None:
                        bias.copy_(torch.mul(bias, vec.view(bias.shape)))
                    weight.copy_(torch.mul(weight, transpose(vec, self.fan_in_fan_out)))
                elif name in self.lora_magnitude_vector:
                    delta = self.get_delta_weight(name)
                    norm = self._weight_norm(delta).detach()
                    self._dora_norms[name] = norm          # unmerging needs the norm of the unmerged weight
                    weight.copy_(self._dora_factor(name, norm) * (weight + delta))
                else:
                    weight.add_(self.get_delta_weight(name))
                    if kind == "LORA" and not self.is_embedding and self.lora_B[name].bias is not None:
                        self.base_layer.bias.add_(self.lora_B[name].bias * self.scaling[name])
            self.merged_adapters.append(name)
            bump()                                      # merged_adapters changed in place

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """m / norm shaped to scale the base weight's output-feature axis (rows, or columns for Conv1D and
        Embedding, whose weights are stored transposed)."""
        factor = self.lora_magnitude_vector[name].weight / norm
        return factor.view(1, -1) if (self.fan_in_fan_out or self.is_embedding) else factor.view(-1, 1)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            bump()
            kind = self.kind[name]
            with torch.no_grad():
                if kind == "IA3":
                    vec = self.ia3_l[name].data
                    factor = transpose(vec, self.fan_in_fan_out) + 1e-8
                    weight.copy_(torch.div(weight, factor))
                    bias = getattr(self.base_layer, "bias", None)
                    if not self.ia3_feedforward[name] and bias is not None:
                        bias.copy_(torch.div(bias, vec.view(bias.shape) + 1e-8))
                elif name in self.lora_magnitude_vector:
                    factor = self._dora_factor(name, self._dora_norms.pop(name))
                    weight.copy_(weight / factor - self.get_delta_weight(name))
                else:
                    weight.sub_(self.get_delta_weight(name))
                    if kind == "LORA" and not self.is_embedding and self.lora_B[name].bias is not None:
                        self.base_layer.bias.sub_(self.lora_B[name].bias * self.scaling[name])

    def extra_repr(self) -> str:
        return f"adapters={dict(self.kind)}, active={self.active_adapters}"
