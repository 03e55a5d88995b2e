"""Rewrites of a Q/DQ graph that keep its arithmetic exactly and let engines fuse more.

An engine fuses ``DQ -> Conv -> (Relu) -> Q`` into one INT8 kernel only when the
conv's output goes to exactly one Q. The tracer emits one Q per consuming layer, so

* a tensor read by several layers with the *same* scale gets several identical Q
  nodes: ``merge_duplicate_quantizers`` keeps one (Q is deterministic, so
  identical nodes give identical codes);
* a ``Concat`` (SECONDFPN's upsampled maps) sits between the convs and the Q of the
  next layer: ``quantize_concat_inputs`` puts the consumer's Q/DQ on every concat
  input. Quantization is elementwise, so Q(concat(a, b)) = concat(Q(a), Q(b)) and
  Q(DQ(Q(x))) = Q(x): the values do not change, but each producing conv now ends
  in a Q (fusable) and the concat runs on INT8 data.

Both follow TensorRT's Q/DQ placement advice and also make ONNX Runtime's
QLinearConv fusion apply. Quantizers reading one tensor with different scales
(possible after a per-quantizer range search) are left alone.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import constant_values, consumers, producers, prune_unused

ALIASES = "quantizers: "


def quantizer_names(node: onnx.NodeProto) -> list[str]:
    """The PyTorch quantizers a QuantizeLinear node stands for (several after merging)."""
    if node.doc_string.startswith(ALIASES):
        return node.doc_string[len(ALIASES):].split(",")
    name = node.name.split("/QuantizeLinear")[0]
    return [name] if "/QuantizeLinear" in node.name and not name.startswith("/") else []  # "/...": inserted


def _qparams(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> tuple | None:
    if any(name not in values for name in node.input[1:3]):
        return None
    scale, zero_point = values[node.input[1]], values[node.input[2]]
    axis = tuple((a.name, a.i) for a in node.attribute if a.name == "axis")
    return scale.dtype.str, scale.tobytes(), zero_point.dtype.str, zero_point.tobytes(), axis


def _rewire(proto: onnx.ModelProto, old: str, new: str) -> None:
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in proto.graph.output:
        if out.name == old:
            raise ValueError(f"cannot rewire graph output {old}")


def merge_duplicate_quantizers(proto: onnx.ModelProto) -> int:
    """Identical QuantizeLinear nodes on one tensor (and their identical DequantizeLinear) become one."""
    values = constant_values(proto)
    merged = 0
    for kind in ("QuantizeLinear", "DequantizeLinear"):
        first: dict[tuple, onnx.NodeProto] = {}
        remove = []
        for node in proto.graph.node:
            if node.op_type != kind:
                continue
            params = _qparams(node, values)
            if params is None or node.input[0] in values:
                continue
            key = (node.input[0], params)
            if key in first:
                _rewire(proto, node.output[0], first[key].output[0])
                remove.append(node)
                if kind == "QuantizeLinear":  # keep the merged quantizers' names for verification
                    names = quantizer_names(first[key]) + quantizer_names(node)
                    first[key].doc_string = ALIASES + ",".join(dict.fromkeys(names))
            else:
                first[key] = node
        for node in remove:
            proto.graph.node.remove(node)
        merged += len(remove) if kind == "QuantizeLinear" else 0
    return merged


def quantize_concat_inputs(proto: onnx.ModelProto) -> int:
    """Concat whose readers all quantize with one scale: the same Q/DQ on each of its inputs."""
    values = constant_values(proto)
    users = consumers(proto)
    producer = producers(proto)
    count = 0
    for concat in [n for n in proto.graph.node if n.op_type == "Concat"]:
        readers = users.get(concat.output[0], [])
        if not readers or any(r.op_type != "QuantizeLinear" for r in readers):
            continue
        params = {_qparams(r, values) for r in readers}
        if len(params) != 1 or None in params:
            continue
        quant = readers[0]
        # the consumer's scale/zero point may be Constant nodes emitted after the concat: copy them
        qparams = [f"{concat.name}/quant_{k}" for k in ("scale", "zero_point")]
        for new, old in zip(qparams, quant.input[1:3]):
            proto.graph.initializer.append(numpy_helper.from_array(values[old], new))
        for i, name in enumerate(list(concat.input)):
            source = producer.get(name)
            if source is not None and source.op_type == "DequantizeLinear" and \
                    _qparams(source, values) == _qparams(quant, values):
                continue  # already on this grid
            q_out, dq_out = f"{name}_concat_q", f"{name}_concat_dq"
            index = list(proto.graph.node).index(concat)
            proto.graph.node.insert(index, helper.make_node("DequantizeLinear", [q_out, *qparams], [dq_out],
                                                            name=f"{concat.name}/input{i}/DequantizeLinear"))
            proto.graph.node.insert(index, helper.make_node("QuantizeLinear", [name, *qparams], [q_out],
                                                            name=f"{concat.name}/input{i}/QuantizeLinear"))
            concat.input[i] = dq_out
            count += 1
    return count


def simplify_qdq(proto: onnx.ModelProto) -> dict[str, int]:
    """All rewrites above, in the order that lets each see the other's result."""
    merged = merge_duplicate_quantizers(proto)
    concat = quantize_concat_inputs(proto)
    merged += merge_duplicate_quantizers(proto)
    prune_unused(proto)
    return {"merged_quantizers": merged, "quantized_concat_inputs": concat}
