// The namespace every shared helper lives in.
//
// csrc/ is compiled once per CPU capability (setup.py), each build with its own
// ISA flags and its own ATTNKERNELS_NS. The helpers in common/ are inline
// templates, so without a per-build namespace the AVX-512 and the portable
// instantiation of, say, row_max<float> would share one mangled name, and a
// process that loads two builds could bind one build's calls to the other's
// code. Nesting them in ATTNKERNELS_NS keeps every build's symbols its own.
#pragma once

#ifndef ATTNKERNELS_NS
#define ATTNKERNELS_NS attnkernels_cpu_dev
#endif

#define ATTNKERNELS_COMMON_BEGIN \
  namespace ATTNKERNELS_NS {     \
  namespace common {
#define ATTNKERNELS_COMMON_END \
  }                            \
  }
