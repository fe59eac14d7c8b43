"""A tiny ONNX model with the WD v3 taggers' input/output contract, for offline tagger tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TAGGER_SIDE = 32  # input side of the tiny tagger


def build_tiny_tagger(folder: Path, labels: list[tuple], *, sigmoid: bool = True) -> Path:
    """A WD v3-shaped ONNX tagger (NHWC 32x32 float input, one output per label) in `folder`.

    `labels` are (name, WD category, weights on the (B, G, R) channel means in [0, 1], bias).
    Outputs are linear in the per-channel means (through a sigmoid unless
    `sigmoid=False`), so a test can compute the expected outputs of a known image by hand while
    the real onnxruntime path runs.
    """
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    side = TAGGER_SIDE
    weights = np.array([w for _, _, w, _ in labels], dtype=np.float32).T  # (3, n_tags)
    bias = np.array([b for *_, b in labels], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["means"], axes=[1, 2], keepdims=0),  # (N, 3)
        helper.make_node("Div", ["means", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weights"], ["logits"]),
        helper.make_node("Add", ["logits", "bias"], ["z" if sigmoid else "output"]),
    ]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["output"]))  # (N, n_tags)
    graph = helper.make_graph(
        nodes,
        "tiny_wd",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(labels)])],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0]),
            helper.make_tensor("weights", TensorProto.FLOAT, weights.shape, weights.flatten().tolist()),
            helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},100" for i, (n, c, _, _) in enumerate(labels)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder
