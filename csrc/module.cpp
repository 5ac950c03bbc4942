// Python module entry point. The kernels register themselves as torch ops with
// TORCH_LIBRARY_FRAGMENT(ATTNKERNELS_NS, ...) in their own files; importing this
// module is only what makes the dynamic loader run those registrations.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("namespace") = py::str(C10_STRINGIZE(ATTNKERNELS_NS));
}
