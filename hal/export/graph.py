"""A small builder for ONNX graphs: unique value names, initializers from torch tensors, node
helpers that return their output names. It knows nothing about models."""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
              torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN, torch.bool: TensorProto.BOOL}


def tensor_proto(t: torch.Tensor, name: str) -> TensorProto:
    """A TensorProto named ``name`` holding ``t``'s values in its own dtype (float8 and bfloat16
    kept bit for bit through their raw bytes)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.float8_e4m3fn, torch.bfloat16):
        raw = t.view(torch.uint8 if t.dtype == torch.float8_e4m3fn else torch.int16).numpy().tobytes()
        return helper.make_tensor(name, ONNX_DTYPE[t.dtype], list(t.shape), raw, raw=True)
    return numpy_helper.from_array(t.numpy(), name)


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self):
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        """A value name not used before: ``hint``, then ``hint_1``, ``hint_2``..."""
        n = self._names.get(hint, 0)
        self._names[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def weight(self, t: torch.Tensor, hint: str) -> str:
        """Add ``t`` as an initializer; returns its name."""
        name = self.name(hint)
        self.initializers.append(tensor_proto(t, name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant initializer (shared between uses of equal values)."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.name("const")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs, hint: str | None = None, *, outputs: int = 1, domain: str = "",
           doc: str | None = None, **attrs):
        """Append one node; returns its output name (a tuple of names when ``outputs`` > 1)."""
        names = [self.name(f"{hint or op_type.lower()}") for _ in range(outputs)]
        node = helper.make_node(op_type, list(inputs), names, name=self.name(f"node_{hint or op_type}"),
                                domain=domain or None, **attrs)
        if doc:
            node.doc_string = doc
        self.nodes.append(node)
        return names[0] if outputs == 1 else tuple(names)

    def add_input(self, name: str, elem_type: int, shape) -> str:
        """Declare a graph input (its name is then taken: no node output gets it)."""
        if name in self._names:
            raise ValueError(f"graph input {name!r}: the name is already used")
        self._names[name] = 1
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, value: str, name: str, elem_type: int, shape) -> str:
        """Expose ``value`` as the graph output ``name`` (an Identity when the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self.name(f"node_out_{name}")))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def graph(self, name: str):
        return helper.make_graph(self.nodes, name, self.inputs, self.outputs, initializer=self.initializers)
