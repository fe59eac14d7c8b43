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


def build_tiny_aesthetic(folder: Path, hq_probability: float | None = None, labels=("hq", "lq")) -> Path:
    """A randomly initialised tiny ViT image classifier (transformers format, safetensors) in `folder`.

    The architecture and files of `shadowlilac/aesthetic-shadow-v2` at a toy size (32x32 input,
    one layer). With `hq_probability`, the classifier head ignores the image and gives that
    probability to the first label, so a test knows which aesthetic band every image lands in.
    """
    import math

    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    model = ViTForImageClassification(config).eval()
    if hq_probability is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
            model.classifier.bias[0] = math.log(hq_probability / (1 - hq_probability))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
