// Cheap invariants at the C++ op boundary.
//
// The public Python API validates every user argument once, with messages for
// users (attnkernels/_checks.py and the call objects). The C++ entry points are
// also reachable directly (torch.ops.attnkernels_cpu_*.*), so they keep only
// what stops such a call from reading or writing out of bounds: ranks, sizes
// that must agree, dtypes, devices. Semantic checks (scale finite, window
// meaning, head-dim limits) are not repeated here.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/ns.h"

ATTNKERNELS_COMMON_BEGIN

inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", st);
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), one dtype, Hq % Hk == 0.
struct QKVShape {
  int64_t B = 0, Hq = 0, Hk = 0, Nq = 0, Nk = 0, D = 0, Dv = 0, group = 1;
};

// key_padding_mask bool (B, Nk) on the CPU, True = the key is ignored; returned contiguous.
inline at::Tensor check_key_padding_mask(const char* op, const at::Tensor& m, int64_t B, int64_t Nk) {
  TORCH_CHECK(m.device().is_cpu(), op, ": key_padding_mask must be a CPU tensor");
  TORCH_CHECK(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool (True = ignore), got ",
              m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == Nk, op, ": key_padding_mask must be (B, Nk) = (", B,
              ", ", Nk, "), got ", m.sizes());
  return m.contiguous();
}

// s.group = Hq / Hk (GQA), once Hq is checked to be a multiple of Hk.
inline void set_group(const char* op, QKVShape& s) {
  TORCH_CHECK(s.Hk > 0 && s.Hq % s.Hk == 0, op, ": the number of query heads (", s.Hq,
              ") must be a multiple of the number of key/value heads (", s.Hk, ")");
  s.group = s.Hq / s.Hk;
}

inline QKVShape check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_float_tensor(op, "q", q, 4);
  check_float_tensor(op, "k", k, 4);
  check_float_tensor(op, "v", v, 4);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  QKVShape s;
  s.B = q.size(0);
  s.Hq = q.size(1);
  s.Nq = q.size(2);
  s.D = q.size(3);
  s.Hk = k.size(1);
  s.Nk = k.size(2);
  s.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": k and v must have q's batch size ", s.B, ", got ",
              k.size(0), " and ", v.size(0));
  TORCH_CHECK(k.size(3) == s.D, op, ": k's head dim ", k.size(3), " must equal q's head dim ", s.D);
  TORCH_CHECK(v.size(1) == s.Hk && v.size(2) == s.Nk, op, ": v must be (B, Hk, Nk, Dv) with Hk=", s.Hk,
              ", Nk=", s.Nk, " like k, got ", v.sizes());
  set_group(op, s);
  return s;
}

// A window side is a key count or -1 (unbounded).
inline void check_window(const char* op, int64_t left, int64_t right) {
  TORCH_CHECK(left >= -1 && right >= -1, op, ": window sides must be >= -1 (-1 = unbounded), got (", left, ", ",
              right, ")");
}

ATTNKERNELS_COMMON_END
