// The cnnops._C extension module. Its import registers the `cnnops::` operator library: this
// file opens it, and each csrc/ops/<op>.cpp adds its schemas with TORCH_LIBRARY_FRAGMENT.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(cnnops, m) {}

namespace {

PyObject* has_cuda_kernels(PyObject*, PyObject*) {
#ifdef CNNOPS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"has_cuda_kernels", has_cuda_kernels, METH_NOARGS,
     "Whether this build of cnnops._C contains the CUDA C++ kernels."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "cnnops C++/CUDA operators", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
