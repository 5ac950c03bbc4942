// When to run a loop on several threads.
//
// Waking the OpenMP team costs ~10 us, far more on a loaded host where the
// team's barrier waits for descheduled threads, so a region with little work
// runs inline on the calling thread. Only the partition changes with the grain,
// never a result: every kernel's task owns its outputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/ns.h"

ATTNKERNELS_COMMON_BEGIN

// Grain for at::parallel_for over tasks of about `work_per_task` units each, such
// that a chunk holds at least `min_work` units (the unit is the caller's: flops
// for the softmax kernels, multiply-adds for the linear ones).
inline int64_t grain_for(double work_per_task, double min_work) {
  return std::max<int64_t>(1, int64_t(std::ceil(min_work / std::max(work_per_task, 1.0))));
}

ATTNKERNELS_COMMON_END
