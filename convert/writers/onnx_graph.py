"""A small ONNX graph builder: nodes by name, constants inline, weights through ExternalData."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto, helper

from convert.writers.onnx_external import ExternalData

OPSET = 24  # TensorScatter (the in-place KV write) is opset 24; Attention exists since 23
# the portable decoder's ops are all older. ONNX Runtime matches a node to a kernel registered for that op's own
# version, so DirectML's ScatterElements (registered for version 16, none for 18) needs an opset of 16 or 17;
# docs/onnx-decoder.md lists which providers register which of the graph's ops
PORTABLE_OPSET = 17
MS_DOMAIN = "com.microsoft"


class Graph:
    def __init__(self, data: ExternalData) -> None:
        self.data = data
        self.nodes: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._count = 0
        self._consts: dict[tuple[str, bytes], str] = {}

    def name(self, hint: str) -> str:
        """A fresh value name."""
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], *, n_out: int = 1, outputs: list[str] | None = None,
           domain: str = "", label: str | None = None, **attrs: Any) -> Any:
        """Append one node; returns its output name (or names when n_out > 1)."""
        base = label or op_type
        outs = outputs or [self.name(base) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(base + "_node"), domain=domain,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared between nodes that use the same value."""
        array = np.asarray(value, dtype=dtype)
        key = (str(array.dtype) + str(array.shape), array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.data.add(self.name("const"), array)
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray) -> str:
        return self.data.add(name, array)

    def input(self, name: str, elem: int, shape: list[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list[Any]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def model(self, graph_name: str, doc: str, opset: int = OPSET) -> ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, initializer=self.data.tensors)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="medgemma-edge", doc_string=doc)
        model.ir_version = 10  # what onnxruntime 1.2x reads; opset 24 needs IR >= 10
        return model


FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
