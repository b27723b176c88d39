// Rotary embedding of q [N, H, D] and k [N, Hkv, D] with cos / sin [N, 1, D] (one row per token), with the
// roundings of the decoder's torch code: out = T(T(x * cos) + T(rotate_half(x) * sin)), rotate_half(x) =
// (-x[D/2:], x[:D/2]); every product and the sum computed in fp32 and rounded to T as torch's elementwise
// ops do, so the result is bit-identical to the torch path, in one call for both tensors.
#include "ops.h"
#include "spin_pool.h"

namespace {

template <typename T>
void rotate_rows(const T* x, int64_t x_row, int64_t x_head, int64_t heads, const T* cos, const T* sin,
                 int64_t cs_row, T* out, int64_t tokens, int64_t dim) {
  const int64_t half = dim / 2;
  spin_parallel(tokens * heads, [&](int64_t begin, int64_t end) {   // inline up to 64 Ki values
    for (int64_t th = begin; th < end; ++th) {
      const int64_t t = th / heads, h = th % heads;
      const T* xv = x + t * x_row + h * x_head;
      const T* c = cos + t * cs_row;
      const T* s = sin + t * cs_row;
      T* o = out + th * dim;
      for (int64_t d = 0; d < dim; ++d) {
        const float rot = d < half ? -static_cast<float>(xv[d + half]) : static_cast<float>(xv[d - half]);
        const T a = static_cast<T>(static_cast<float>(xv[d]) * static_cast<float>(c[d]));
        const T b = static_cast<T>(static_cast<float>(static_cast<T>(rot)) * static_cast<float>(s[d]));
        o[d] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
      }
    }
  }, spin_min_items(tokens * heads, tokens * heads * dim));
}

}  // namespace

std::vector<at::Tensor> rotary(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin) {
  for (const auto* t : {&q, &k, &cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->dim() == 3 && t->stride(2) == 1,
                "rotary: 3-D CPU tensors of one dtype with contiguous last dimensions");
  const int64_t n = q.size(0), dim = q.size(2);
  TORCH_CHECK(k.size(0) == n && k.size(2) == dim && dim % 2 == 0 && cos.sizes() == sin.sizes() &&
              cos.size(0) == n && cos.size(1) == 1 && cos.size(2) == dim && cos.strides() == sin.strides(),
              "rotary: shapes do not fit");
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary", [&] {
    rotate_rows<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), q.size(1), cos.data_ptr<scalar_t>(),
                          sin.data_ptr<scalar_t>(), cos.stride(0), q_out.data_ptr<scalar_t>(), n, dim);
    rotate_rows<scalar_t>(k.data_ptr<scalar_t>(), k.stride(0), k.stride(1), k.size(1), cos.data_ptr<scalar_t>(),
                          sin.data_ptr<scalar_t>(), cos.stride(0), k_out.data_ptr<scalar_t>(), n, dim);
  });
  return {q_out, k_out};
}
