"""Our block quantizer against ONNX Runtime's own (bit for bit), and the packed layout as MatMulNBits and
GatherBlockQuantized read it (real ONNX Runtime sessions on one-node graphs)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from convert.writers.onnx_blockquant import bf16_to_f32, dequantize_blocks, quantize_blocks, quantized_bytes

pytestmark = pytest.mark.unit


def _session(nodes: list, inputs: list, outputs: list, initializers: list):
    import onnxruntime as ort

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _weights(n: int, k: int) -> np.ndarray:
    w = np.random.default_rng(n + k).standard_normal((n, k)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block: scale 0, every code at the zero point
    w[1, 5] = 40.0  # an outlier dominating its block
    return w


@pytest.mark.parametrize("bits", [4, 8])
def test_same_bits_as_onnxruntimes_quantizer(bits: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    n, k = 48, 96
    w = _weights(n, k)
    # ORT quantizes a MatMul's B [K, N]; ours is the checkpoint's [N, K] (B transposed)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              initializer=[numpy_helper.from_array(np.ascontiguousarray(w.T), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True)
    quantizer.process()
    inits = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    theirs_b = next(v for name, v in inits.items() if v.dtype == np.uint8)
    theirs_s = next(v for name, v in inits.items() if v.dtype == np.float32)
    ours_b, ours_s = quantize_blocks(w, bits)
    np.testing.assert_array_equal(ours_b, theirs_b.reshape(ours_b.shape))
    np.testing.assert_array_equal(ours_s, theirs_s.reshape(ours_s.shape))


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_and_gather_read_our_layout(bits: int) -> None:
    n, k = 64, 128
    w = _weights(n, k)
    codes, scales = quantize_blocks(w, bits)
    deq = dequantize_blocks(codes, scales, bits)
    assert np.abs(deq - w).max() <= np.abs(w).max() / (1 << (bits - 1))  # within one step of the worst block
    assert (deq[0, :32] == 0).all()
    inits = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "S"),
             numpy_helper.from_array(np.array([n, k * bits // 8], np.int64), "flat")]
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                              block_size=32, accuracy_level=0),
             helper.make_node("Reshape", ["B", "flat"], ["B2"]),
             helper.make_node("GatherBlockQuantized", ["B2", "ids", "S"], ["rows"], domain="com.microsoft", bits=bits,
                              block_size=32, gather_axis=0, quantize_axis=1)]
    session = _session(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k]),
                               helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)], inits)
    x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    ids = np.array([1, 0, 63])
    y, rows = session.run(None, {"x": x, "ids": ids})
    np.testing.assert_allclose(y, x @ deq.T, atol=1e-4)
    np.testing.assert_array_equal(rows, deq[ids])


def test_bf16_and_sizes() -> None:
    values = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    assert (bf16_to_f32((values.view(np.uint32) >> 16).astype(np.uint16)) == values).all()
    assert quantized_bytes(262208, 2560, 4) == 262208 * 2560 // 2 + 262208 * 80 * 4
    assert quantized_bytes(10, 64, None) == 10 * 64 * 4
    with pytest.raises(ValueError, match="multiple of the block"):
        quantize_blocks(np.zeros((2, 40), np.float32), 4)
