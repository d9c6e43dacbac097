"""Bias correction for a static int8 QDQ model (ONNX Runtime has none).

Rounding weights to int8 shifts each output channel's mean by ``(W_int8 - W) · E[x]``; over many
layers the shifts add up (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction"). :func:`correct_biases` measures ``E[x]`` -- the per-channel mean of every
quantized Conv/Gemm input in the fp32 model over the calibration batches -- and subtracts the
shift from the layer's int32 bias in the QDQ model, in place. Spatial means ignore zero padding,
so border pixels are corrected approximately. Layers without a bias are left alone.

>>> import numpy as np
>>> _shift(np.ones((2, 1, 1, 1)) * 0.5, np.array([2.0]), groups=1).tolist()   # (W_q - W) · E[x]
[1.0, 1.0]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from finetune.export.sidecar import INPUT_NAME

__all__ = ["correct_biases"]


def _shift(weight_error: np.ndarray, mean: np.ndarray, groups: int) -> np.ndarray:
    """Per-output-channel mean shift of a conv (O, C/g, kh, kw) or Gemm (O, C) from its input mean (C,)."""
    error = weight_error.reshape(weight_error.shape[0], weight_error.shape[1], -1).sum(2)  # (O, C/g)
    out, per_group = error.shape
    out_per_group = out // groups
    shift = np.empty(out)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        shift[rows] = error[rows] @ mean[g * per_group:(g + 1) * per_group]
    return shift


def correct_biases(fp32_path: str | os.PathLike, qdq_path: str | os.PathLike,
                   batches: Sequence[np.ndarray]) -> dict[str, float]:
    """Correct the int32 biases of ``qdq_path`` (rewritten in place) with input means measured in
    ``fp32_path`` on ``batches``; returns ``{node name: max |shift| removed}``."""
    import onnx
    from onnx import numpy_helper

    from finetune.export.ortbench import session

    qdq = onnx.load(str(qdq_path))
    fp32 = onnx.load(str(fp32_path))
    inits = {t.name: t for t in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    fp32_inits = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}

    def dequant(name: str) -> tuple[np.ndarray, np.ndarray, onnx.NodeProto] | None:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            return None
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        zero = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        shape = (-1,) + (1,) * (q.ndim - 1) if scale.size > 1 else ()
        return (q - zero.reshape(shape)) * scale.reshape(shape), scale, node

    todo = []
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.name not in fp32_nodes:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (not attrs.get("transB", 0) or attrs.get("transA", 0)):
            continue
        weight, bias = dequant(node.input[1]), producer.get(node.input[2])
        original = fp32_nodes[node.name]
        if weight is None or bias is None or bias.op_type != "DequantizeLinear" or original.input[1] not in fp32_inits:
            continue
        todo.append((node, original.input[0], weight[0] - fp32_inits[original.input[1]].astype(np.float64),
                     int(attrs.get("group", 1)), bias))
    if not todo:
        return {}

    names = sorted({x for _, x, _, _, _ in todo})
    known = {o.name for o in fp32.graph.output}
    fp32.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                             for n in names if n not in known)
    tmp = Path(qdq_path).with_suffix(".means.onnx")
    onnx.save(fp32, str(tmp))
    try:
        sess = session(tmp)
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for batch in batches:
            for name, value in zip(names, sess.run(names, {INPUT_NAME: batch})):
                axes = (0,) + tuple(range(2, value.ndim))
                sums[name] = sums.get(name, 0) + value.astype(np.float64).sum(axis=axes)
                counts[name] = counts.get(name, 0) + int(np.prod([value.shape[a] for a in axes]))
        del sess
    finally:
        tmp.unlink(missing_ok=True)

    removed = {}
    for node, x, error, groups, bias_dq in todo:
        shift = _shift(error, sums[x] / counts[x], groups)
        tensor = inits[bias_dq.input[0]]
        q = numpy_helper.to_array(tensor).astype(np.float64)
        scale = numpy_helper.to_array(inits[bias_dq.input[1]]).astype(np.float64)
        corrected = np.clip(np.round((q * scale - shift) / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        tensor.CopyFrom(numpy_helper.from_array(corrected.reshape(q.shape), tensor.name))
        removed[node.name] = float(np.abs(shift).max())
    onnx.save(qdq, str(qdq_path))
    return removed
