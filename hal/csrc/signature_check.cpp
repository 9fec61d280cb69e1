// HAL's compiled call-signature check (hal/compiled_check.py builds and loads it).
//
// signature_guard(*tensors) records, for each tensor, its Python type (torch.Tensor or
// torch.nn.Parameter), dtype, device, requires_grad, sizes and strides as int64 words in a bytes
// object, and returns a builtin function bound to that bytes object. Calling that function with
// tensors answers, in one C call, whether they have exactly the recorded metadata; it never
// raises (anything unexpected is "no"). Tensors whose metadata cannot be read plainly (a tensor
// subclass, a non-strided layout, symbolic sizes, a Python-dispatch tensor) get no guard: None.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kTensor = 0;
constexpr int64_t kParameter = 1;

// The words of one tensor, or false when it has no plain metadata.
bool describe(PyObject* obj, std::vector<int64_t>& out) {
  if (!THPVariable_CheckExact(obj)) {
    return false;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->layout() != c10::kStrided || impl->has_symbolic_sizes_strides() || impl->is_python_dispatch()) {
    return false;
  }
  const c10::Device device = impl->device();
  out.push_back(Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(ParameterClass) ? kParameter : kTensor);
  out.push_back(static_cast<int64_t>(impl->dtype().toScalarType()));
  out.push_back(static_cast<int64_t>(device.type()));
  out.push_back(static_cast<int64_t>(device.index()));
  out.push_back(t.requires_grad() ? 1 : 0);
  out.push_back(impl->dim());
  for (int64_t s : impl->sizes()) out.push_back(s);
  for (int64_t s : impl->strides()) out.push_back(s);
  return true;
}

bool same(PyObject* signature, PyObject* const* args, Py_ssize_t nargs) {
  const auto* word = reinterpret_cast<const int64_t*>(PyBytes_AS_STRING(signature));
  const auto* end = word + PyBytes_GET_SIZE(signature) / static_cast<Py_ssize_t>(sizeof(int64_t));
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    PyObject* obj = args[i];
    if (end - word < 6 || !THPVariable_CheckExact(obj)) {
      return false;
    }
    const at::Tensor& t = THPVariable_Unpack(obj);
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    if (impl->layout() != c10::kStrided || impl->has_symbolic_sizes_strides() || impl->is_python_dispatch()) {
      return false;
    }
    const int64_t kind = Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(ParameterClass) ? kParameter : kTensor;
    const c10::Device device = impl->device();
    const int64_t ndim = impl->dim();
    if (word[0] != kind || word[1] != static_cast<int64_t>(impl->dtype().toScalarType()) ||
        word[2] != static_cast<int64_t>(device.type()) || word[3] != static_cast<int64_t>(device.index()) ||
        word[4] != (t.requires_grad() ? 1 : 0) || word[5] != ndim || end - word < 6 + 2 * ndim) {
      return false;
    }
    const auto sizes = impl->sizes();
    const auto strides = impl->strides();
    for (int64_t d = 0; d < ndim; ++d) {
      if (word[6 + d] != sizes[d] || word[6 + ndim + d] != strides[d]) {
        return false;
      }
    }
    word += 6 + 2 * ndim;
  }
  return word == end;
}

// METH_FASTCALL with ``self`` = the signature bytes: the guard's check.
PyObject* check(PyObject* signature, PyObject* const* args, Py_ssize_t nargs) {
  bool ok = false;
  try {
    ok = same(signature, args, nargs);
  } catch (...) {
    ok = false;
  }
  if (ok) {
    Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
}

PyMethodDef check_def = {"check", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(check)),
                         METH_FASTCALL,
                         "check(*tensors) -> bool: the tensors have exactly the recorded metadata."};

PyObject* signature_guard(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  std::vector<int64_t> words;
  try {
    for (Py_ssize_t i = 0; i < nargs; ++i) {
      if (!describe(args[i], words)) {
        Py_RETURN_NONE;
      }
    }
  } catch (...) {
    Py_RETURN_NONE;
  }
  PyObject* signature = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                                  static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
  if (signature == nullptr) {
    return nullptr;
  }
  PyObject* fn = PyCFunction_New(&check_def, signature);  // holds its own reference to the signature
  Py_DECREF(signature);
  return fn;
}

PyMethodDef module_methods[] = {
    {"signature_guard", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(signature_guard)),
     METH_FASTCALL,
     "signature_guard(*tensors) -> check function, or None when a tensor's metadata is not plain."},
    {nullptr, nullptr, 0, nullptr}};

#define HAL_STR2(x) #x
#define HAL_STR(x) HAL_STR2(x)
#define HAL_CONCAT2(a, b) a##b
#define HAL_CONCAT(a, b) HAL_CONCAT2(a, b)

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, HAL_STR(TORCH_EXTENSION_NAME),
                          "HAL's compiled call-signature check.", -1, module_methods};

}  // namespace

PyMODINIT_FUNC HAL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&module_def);
}
