// The Python module sparsekern._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations of every
// kernel linked into it; the module itself only reports how it was built.
#include <Python.h>

#include "sparsekern/cpu_features.h"

// Build facts arrive as bare tokens (no quotes or semicolons survive the ninja command line safely).
#define SPARSEKERN_STR2(x) #x
#define SPARSEKERN_STR(x) SPARSEKERN_STR2(x)

namespace {

// The instruction set the CPU kernels' runtime dispatch selects on this machine.
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(sparsekern::cpu_isa_name()); }

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set chosen by the CPU kernels' runtime dispatch."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sparsekern compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#if defined(SPARSEKERN_WITH_CUDA)
  const bool with_cuda = true;
  // archs are joined by '_' at build time: "8.0_9.0a" -> "8.0;9.0a"
  const char* archs = SPARSEKERN_STR(SPARSEKERN_CUDA_ARCHS);
  const char* version = SPARSEKERN_STR(SPARSEKERN_CUDA_VERSION);
#else
  const bool with_cuda = false;
  const char* archs = "";
  const char* version = "";
#endif
  PyObject* flag = with_cuda ? Py_True : Py_False;
  Py_INCREF(flag);
  PyModule_AddObject(m, "with_cuda", flag);
  PyModule_AddObject(m, "cuda_archs", PyUnicode_FromString(archs));
  PyModule_AddObject(m, "cuda_version", PyUnicode_FromString(version));
  return m;
}
