// pipefold's steady-state walk of a split backward's graph (`pipefold.runtime.native`).
//
// `graph_shape` (pipefold/runtime/backward_plan.py) walks a stage's autograd graph in Python
// every micro-batch to key its cached plan; a third of that walk is creating the Python objects
// of nodes that only the key reads. This walk follows the same breadth-first order over
// `Node::next_edges()` without any Python object, encodes the graph as a flat signature at least
// as strict as the Python key (equal signatures imply equal keys), and compares it with the
// signature `record` stored from the last graph the Python walk planned. On a match it hands
// back the Python objects of only the nodes the plan indexes; on anything else, None, and the
// caller runs the Python walk.
//
// Signature: the number of roots, per root (walk index of its node, output number), then per
// walked node its kind (the address of its C++ type_info, or for a custom Function's PyNode
// its Python class, held by the signature so that no other class reuses the address) and
// either, for a leaf (AccumulateGrad), the entry of the tensor it holds, or its number of
// children and each child's entry: a walk index (>= 0), kMissing, or a parameter's position.

#include <Python.h>

#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/python_cpp_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <typeinfo>
#include <utility>
#include <vector>

namespace {

using torch::autograd::AccumulateGrad;
using torch::autograd::Edge;
using torch::autograd::Node;

// A pointer -> entry table, open addressing: a stage's walk meets a few dozen nodes, where
// std::unordered_map's allocation per insert cost as much as the rest of the walk.
class PointerTable {
 public:
  PointerTable() { slots_.resize(64); }

  // The value under `key`, or nullptr.
  const int64_t* find(const void* key) const {
    for (size_t i = slot_of(key);; i = (i + 1) & (slots_.size() - 1)) {
      const Slot& slot = slots_[i];
      if (slot.key == key) return &slot.value;
      if (slot.key == nullptr) return nullptr;
    }
  }

  // Set `key` (not null) to `value`.
  void set(const void* key, int64_t value) {
    if (2 * (used_.size() + 1) > slots_.size()) grow();
    size_t i = slot_of(key);
    while (slots_[i].key != nullptr && slots_[i].key != key) i = (i + 1) & (slots_.size() - 1);
    if (slots_[i].key == nullptr) used_.push_back(i);
    slots_[i] = {key, value};
  }

  void clear() {  // only the slots in use: the table keeps its size
    for (size_t i : used_) slots_[i] = {};
    used_.clear();
  }

 private:
  struct Slot {
    const void* key = nullptr;
    int64_t value = 0;
  };

  size_t slot_of(const void* key) const {
    uint64_t hashed = (reinterpret_cast<uintptr_t>(key) >> 4) * 0x9E3779B97F4A7C15ull;
    return static_cast<size_t>(hashed >> 32) & (slots_.size() - 1);
  }

  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.size() * 2, Slot{});
    used_.clear();
    for (const Slot& slot : old) {
      if (slot.key != nullptr) set(slot.key, slot.value);
    }
  }

  std::vector<Slot> slots_;
  std::vector<size_t> used_;
};

using ParamAt = PointerTable;

// Entries of children and leaves (the Python key's -1, "other", None, ("param", i), ("input", i)).
constexpr int64_t kMissing = -1;
constexpr int64_t kOther = -2;
constexpr int64_t kNoVariable = -3;
int64_t param_entry(int64_t i) { return -16 - 2 * i; }
int64_t input_entry(int64_t i) { return -17 - 2 * i; }

const char* const kCapsule = "pipefold.graph_walk.Signature";

struct Signature {
  std::vector<int64_t> code;
  std::vector<PyObject*> classes;  // strong: the PyNode classes whose addresses `code` holds
  PyObject* params = nullptr;      // strong: the tuple the parameter positions index
  ParamAt param_at;                // its tensors by TensorImpl, the last position of each
  std::vector<int64_t> wanted;     // walk indices of the nodes `match` returns
  ~Signature() {
    Py_XDECREF(params);
    for (PyObject* cls : classes) Py_DECREF(cls);
  }
};

// One walk's scratch, reused (the GIL is held throughout, and the walk calls no Python).
struct Walk {
  std::vector<int64_t> code;
  std::vector<const c10::intrusive_ptr<Node>*> nodes;  // into the graph's edges or `roots`
  std::vector<Edge> roots;
  PointerTable entry;
  std::vector<PyObject*> classes;  // borrowed
  std::vector<const c10::TensorImpl*> inputs;
};

bool is_leaf(const Node* node) { return typeid(*node) == typeid(AccumulateGrad); }

// torch._C._FunctionBase, the class of a custom Function's node object (set at import).
PyTypeObject* function_base = nullptr;

// Whether `type` is torch's PyNode (a custom Function's node in C++), by its mangled name: its
// type_info is not exported from libtorch_python, so no dynamic_cast. The answers are kept per
// type, in a list searched by address (a stage's graph has a dozen node types).
bool is_py_node_type(const std::type_info& type) {
  static std::vector<std::pair<const std::type_info*, bool>> known;
  for (const auto& [seen, py_node] : known) {
    if (seen == &type) return py_node;
  }
  bool py_node = std::strcmp(type.name(), "N5torch8autograd6PyNodeE") == 0;  // Itanium ABI
  known.emplace_back(&type, py_node);
  return py_node;
}

// A node's kind; 0 where it cannot be told (the walk then gives up). A custom Function's node
// is a PyNode for every Function class: its kind is its Python object's class.
int64_t kind_of(const Node* node, Walk& w) {
  PyObject* obj = node->pyobj_slot()->load_pyobj();
  if (obj != nullptr && PyObject_TypeCheck(obj, function_base)) {
    PyObject* cls = reinterpret_cast<PyObject*>(Py_TYPE(obj));
    w.classes.push_back(cls);
    return reinterpret_cast<int64_t>(cls);
  }
  const std::type_info& type = typeid(*node);
  if (is_py_node_type(type)) return 0;  // a PyNode without its Python object: not expected
  return reinterpret_cast<int64_t>(&type);
}

// The entry of a walked leaf: the parameter or (last) input it holds, else kOther.
int64_t leaf_entry(const AccumulateGrad* leaf, const Walk& w, const ParamAt& param_at) {
  const at::Tensor& variable = leaf->variable;
  if (!variable.defined()) return kNoVariable;
  const c10::TensorImpl* impl = variable.unsafeGetTensorImpl();
  if (const int64_t* param = param_at.find(impl)) return param_entry(*param);
  for (int64_t i = static_cast<int64_t>(w.inputs.size()) - 1; i >= 0; --i) {
    if (w.inputs[i] == impl) return input_entry(i);
  }
  return kOther;
}

// Walk the graph from `roots` as `graph_shape` does, filling `w`; false where an argument is
// not what the walk handles (the caller then falls back to Python).
bool walk(Walk& w, PyObject* roots, PyObject* inputs, const ParamAt& param_at) {
  w.code.clear();
  w.nodes.clear();
  w.roots.clear();
  w.entry.clear();
  w.classes.clear();
  w.inputs.clear();
  if (!PyList_Check(inputs) && !PyTuple_Check(inputs)) return false;
  if (!PyList_Check(roots) && !PyTuple_Check(roots)) return false;
  Py_ssize_t num_inputs = PySequence_Fast_GET_SIZE(inputs);
  for (Py_ssize_t i = 0; i < num_inputs; ++i) {
    PyObject* input = PySequence_Fast_GET_ITEM(inputs, i);
    if (!THPVariable_Check(input)) return false;
    w.inputs.push_back(THPVariable_Unpack(input).unsafeGetTensorImpl());
  }
  Py_ssize_t num_roots = PySequence_Fast_GET_SIZE(roots);
  w.roots.reserve(num_roots);  // `nodes` points into it: no reallocation below
  w.code.push_back(num_roots);
  for (Py_ssize_t i = 0; i < num_roots; ++i) {
    PyObject* root = PySequence_Fast_GET_ITEM(roots, i);
    if (!THPVariable_Check(root)) return false;
    // `get_gradient_edge`: the grad_fn, or a leaf's AccumulateGrad (made if needed).
    w.roots.push_back(torch::autograd::impl::gradient_edge(THPVariable_Unpack(root)));
    const Edge& edge = w.roots.back();
    if (!edge.is_valid()) return false;
    const int64_t* found = w.entry.find(edge.function.get());
    int64_t at;
    if (found != nullptr) {
      at = *found;
    } else {  // a root's node is walked, even a parameter's leaf
      at = static_cast<int64_t>(w.nodes.size());
      w.entry.set(edge.function.get(), at);
      w.nodes.push_back(&edge.function);
    }
    w.code.push_back(at);
    w.code.push_back(edge.input_nr);
  }
  for (size_t k = 0; k < w.nodes.size(); ++k) {  // grows while it is walked: breadth first
    const Node* node = w.nodes[k]->get();
    int64_t kind = kind_of(node, w);
    if (kind == 0) return false;
    w.code.push_back(kind);
    if (is_leaf(node)) {  // no children
      w.code.push_back(leaf_entry(static_cast<const AccumulateGrad*>(node), w, param_at));
      continue;
    }
    const auto& edges = node->next_edges();
    w.code.push_back(static_cast<int64_t>(edges.size()));
    for (const Edge& edge : edges) {
      const Node* child = edge.function.get();
      if (child == nullptr) {
        w.code.push_back(kMissing);
        continue;
      }
      if (const int64_t* found = w.entry.find(child)) {
        w.code.push_back(*found);
        continue;
      }
      if (is_leaf(child)) {  // a parameter's leaf: its position, not walked
        const at::Tensor& variable = static_cast<const AccumulateGrad*>(child)->variable;
        if (variable.defined()) {
          if (const int64_t* param = param_at.find(variable.unsafeGetTensorImpl())) {
            int64_t held = param_entry(*param);
            w.entry.set(child, held);
            w.code.push_back(held);
            continue;
          }
        }
      }
      int64_t at = static_cast<int64_t>(w.nodes.size());
      w.entry.set(child, at);
      w.nodes.push_back(&edge.function);
      w.code.push_back(at);
    }
  }
  return true;
}

Walk& scratch() {
  static Walk w;
  return w;
}

// Drops the walk's references to the graph when a call ends: held until the next call, the
// root edges would free the previous micro-batch's graph inside it.
struct Release {
  Walk& w;
  ~Release() {
    w.nodes.clear();
    w.roots.clear();
  }
};

void destroy(PyObject* capsule) {
  delete static_cast<Signature*>(PyCapsule_GetPointer(capsule, kCapsule));
}

// record(roots, inputs, params: tuple, wanted: tuple[int, ...]) -> Signature capsule | None
PyObject* record(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyTuple_Check(args[2]) || !PyTuple_Check(args[3])) Py_RETURN_NONE;
  try {
    auto sig = std::make_unique<Signature>();
    PyObject* params = args[2];
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(params); ++i) {
      PyObject* param = PyTuple_GET_ITEM(params, i);
      if (!THPVariable_Check(param)) Py_RETURN_NONE;
      sig->param_at.set(THPVariable_Unpack(param).unsafeGetTensorImpl(), i);  // the last wins
    }
    Walk& w = scratch();
    Release release{w};
    if (!walk(w, args[0], args[1], sig->param_at)) Py_RETURN_NONE;
    PyObject* wanted = args[3];
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(wanted); ++i) {
      int64_t index = PyLong_AsLongLong(PyTuple_GET_ITEM(wanted, i));
      if (index < 0 || index >= static_cast<int64_t>(w.nodes.size())) {
        PyErr_Clear();
        Py_RETURN_NONE;
      }
      sig->wanted.push_back(index);
    }
    sig->code = w.code;
    for (PyObject* cls : w.classes) {
      Py_INCREF(cls);
      sig->classes.push_back(cls);
    }
    Py_INCREF(params);
    sig->params = params;
    PyObject* capsule = PyCapsule_New(sig.get(), kCapsule, destroy);
    if (capsule != nullptr) sig.release();
    return capsule;
  } catch (...) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
}

// match(signature, roots, inputs, params) -> list of the wanted nodes | None
PyObject* match(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) Py_RETURN_NONE;
  auto* sig = static_cast<Signature*>(PyCapsule_GetPointer(args[0], kCapsule));
  if (sig == nullptr) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  if (args[3] != sig->params) Py_RETURN_NONE;  // positions name the recorded tuple's tensors
  try {
    Walk& w = scratch();
    Release release{w};
    if (!walk(w, args[1], args[2], sig->param_at) || w.code != sig->code) Py_RETURN_NONE;
    // The wanted nodes held before any Python object is made (which may run a collection).
    std::vector<c10::intrusive_ptr<Node>> wanted;
    wanted.reserve(sig->wanted.size());
    for (int64_t index : sig->wanted) wanted.push_back(*w.nodes[index]);
    PyObject* result = PyList_New(static_cast<Py_ssize_t>(wanted.size()));
    if (result == nullptr) return nullptr;
    for (size_t i = 0; i < wanted.size(); ++i) {
      PyObject* obj = torch::autograd::functionToPyObject(wanted[i]);
      if (obj == nullptr) {
        Py_DECREF(result);
        PyErr_Clear();
        Py_RETURN_NONE;
      }
      PyList_SET_ITEM(result, static_cast<Py_ssize_t>(i), obj);
    }
    return result;
  } catch (...) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
}

PyMethodDef methods[] = {
    {"record", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(record)), METH_FASTCALL,
     "record(roots, inputs, params, wanted): the graph's signature, or None"},
    {"match", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(match)), METH_FASTCALL,
     "match(signature, roots, inputs, params): the wanted nodes where the graph matches, else None"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "pipefold_graph_walk", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_pipefold_graph_walk() {
  PyObject* torch_c = PyImport_ImportModule("torch._C");
  if (torch_c == nullptr) return nullptr;
  PyObject* base = PyObject_GetAttrString(torch_c, "_FunctionBase");
  Py_DECREF(torch_c);
  if (base == nullptr) return nullptr;
  if (!PyType_Check(base)) {
    Py_DECREF(base);
    PyErr_SetString(PyExc_ImportError, "torch._C._FunctionBase is not a class");
    return nullptr;
  }
  function_base = reinterpret_cast<PyTypeObject*>(base);  // held for the process's life
  return PyModule_Create(&module);
}
