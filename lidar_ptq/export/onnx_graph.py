"""Small queries and clean-ups of an ONNX graph shared by the Q/DQ export and its rewrites."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def constant_values(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initialisers and Constant-node outputs by tensor name."""
    values = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The node writing each tensor."""
    return {out: node for node in proto.graph.node for out in node.output}


def consumers(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def prune_unused(proto: onnx.ModelProto) -> None:
    """Drop Constant nodes and initialisers no node or graph output reads."""
    while True:
        used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
        dead = [n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] not in used]
        for node in dead:
            proto.graph.node.remove(node)
        unused = [i for i in proto.graph.initializer if i.name not in used]
        for init in unused:
            proto.graph.initializer.remove(init)
        if not dead and not unused:
            return
