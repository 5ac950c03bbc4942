// Per-thread scratch reused across calls, shared by the kernel families.
//
// A kernel task's scratch above glibc's mmap threshold, allocated per call, is mapped and
// faulted in page by page every time: measured a quarter of a bf16 window forward in the
// softmax kernel, and a third of a loop of causal linear backward calls (fp32 B1 H8 N1024
// D64, 1 thread: its ~1.3 MB of pass-1 chunks kept for pass 2).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/ns.h"

ATTNKERNELS_COMMON_BEGIN

// Slot kSlot's per-thread storage (one per element type and slot; the slots in use: softmax.cpp
// 0-5, linear.cpp 8).
template <typename X, int kSlot>
std::vector<X>& thread_vector() {
  thread_local std::vector<X> buf;
  return buf;
}

// A per-thread buffer of at least n elements, reused across calls (contents unspecified).
// 64-byte aligned: the tiles' rows are read and written in 64-byte vectors (a 16-byte aligned
// heap block splits every one of them across two cache lines).
template <typename X, int kSlot>
X* thread_buffer(size_t n) {
  constexpr size_t kAlign = 64 / sizeof(X);
  std::vector<X>& buf = thread_vector<X, kSlot>();
  if (buf.size() < n + kAlign) buf.resize(n + kAlign);
  const uintptr_t at = (reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63);
  return reinterpret_cast<X*>(at);
}

// A buffer sized by the sequence (a task's packed key band: the whole of Nk without a window)
// is kept for the next call only while small: at Nk = 128 K, D = 128 in bf16 it would keep
// 32 MB per thread for the life of the process.
constexpr size_t kKeptBufferBytes = size_t(16) << 20;

template <typename X, int kSlot>
void trim_thread_buffer() {
  std::vector<X>& buf = thread_vector<X, kSlot>();
  if (buf.capacity() * sizeof(X) > kKeptBufferBytes) std::vector<X>().swap(buf);
}

ATTNKERNELS_COMMON_END
