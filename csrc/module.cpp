// The Python module sparsekern._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations of every
// kernel linked into it; the module itself only reports how it was built.
#include <Python.h>

#include "sparsekern/cpu_features.h"

// Build facts arrive as bare tokens (no quotes or semicolons survive the ninja command line safely).
#define SPARSEKERN_STR2(x) #x
#define SPARSEKERN_STR(x) SPARSEKERN_STR2(x)

namespace {

// The instruction set the CPU kernels run now ("avx512", "avx2" or "baseline"); ValueError when SPARSEKERN_CPU_ISA
// asks for one this CPU lacks.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(sparsekern::cpu_isa_name(sparsekern::cpu_isa()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// The widest instruction set this CPU supports.
PyObject* cpu_isa_supported(PyObject*, PyObject*) {
  return PyUnicode_FromString(sparsekern::cpu_isa_name(sparsekern::cpu_isa_supported()));
}

// set_cpu_isa(name): forces name ("avx512", "avx2", "baseline"; "" for the widest) for later calls.
PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  PyObject* utf8 = PyUnicode_AsUTF8String(arg);  // the limited API's way to a char*
  if (utf8 == nullptr) return nullptr;
  try {
    sparsekern::set_cpu_isa(PyBytes_AsString(utf8));
  } catch (const c10::Error& e) {
    Py_DECREF(utf8);
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_DECREF(utf8);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set the CPU kernels run now."},
    {"cpu_isa_supported", cpu_isa_supported, METH_NOARGS, "Widest instruction set this CPU supports."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Forces an instruction set (avx512, avx2, baseline; '' for the widest)."},
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
