// Python bindings of the decoder's CPU kernels (ops.h).
#include <torch/extension.h>

#include "ops.h"

// Each kernel releases the GIL while it runs, so the event loop thread (HTTP, streaming) runs beside a step.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention_", &decode_attention_, "write decode tokens' K/V into the cache and attend (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "RMSNorm as the decoder computes it, one pass per row (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm_", &add_rms_norm_, "x += residual in place, then rms_norm(x) (CPU; the decode loop's residuals)",
        py::call_guard<py::gil_scoped_release>());
  m.def("rotary", &rotary, "rotary embedding of q and k with the decoder's roundings (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_layers", &decode_layers, "every decoder layer of a step (decode rows and prompt chunks), LoRA deltas included (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("row_argmax", &row_argmax, "each row's argmax and whether it is all finite (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, "silu(gate) * up with the decoder's roundings (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
