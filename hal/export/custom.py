"""``hal.*`` custom-domain nodes: contract ops that neither standard ONNX nor onnxruntime's
contrib ops express (DSA's indexer and sparse attention, FP8 linear layers and FP8 experts).

Each node is named after its contract op, lives in the ``hal`` domain and carries the op's
signature and full contract docstring as its ``doc_string``, so the graph says what the node
computes. onnxruntime runs such a node only with a custom-op library that registers the ``hal``
domain; HAL ships none, so a graph holding one is exported as *not runnable in onnxruntime*.
"""
from __future__ import annotations

from onnx import helper

DOMAIN = "hal"
DOMAIN_VERSION = 1

# why onnxruntime has no kernel for each op exported as a hal.* node
WHY_CUSTOM = {
    "lightning_indexer": "DSA's lightning indexer (ReLU-scored top-k key selection) has no ONNX or onnxruntime "
                         "contrib equivalent",
    "sparse_attention": "attention over per-query selected keys (DSA) has no ONNX or onnxruntime contrib equivalent",
    "fp8_linear": "128x128 block-scaled FP8 weights with 1x128 FP8 activation quantization have no onnxruntime CPU "
                  "kernel (DequantizeLinear would give a different, dequantized model)",
    "moe_forward": "onnxruntime's com.microsoft.MoE takes float weights only; FP8 block-scaled experts need "
                   "hal.moe_forward",
}


def contract_doc(op: str) -> str:
    """The doc_string of a ``hal.<op>`` node: the contract version, signature and docstring."""
    import hal
    spec = hal.CONTRACT[op]
    return (f"HAL contract {hal.CONTRACT_VERSION} op {spec.signature_str()}\n\n{spec.doc}".rstrip()
            + f"\n\nCustom domain '{DOMAIN}': onnxruntime needs a custom-op library registering it "
            "(HAL ships none). docs/export.md")


def hal_node(g, op: str, inputs, *, outputs: int = 1, **attrs):
    """Append a ``hal.<op>`` node to GraphBuilder ``g``: tensor ``inputs`` in the contract's
    positional/keyword order (None = an omitted optional input), the op's scalar keywords as
    attributes (None values left out, bools as ints). Returns the output name(s)."""
    names = ["" if i is None else i for i in inputs]
    while names and names[-1] == "":
        names.pop()
    clean = {k: (int(v) if isinstance(v, bool) else v) for k, v in attrs.items() if v is not None}
    return g.op(op, names, f"hal_{op}", outputs=outputs, domain=DOMAIN, doc=contract_doc(op), **clean)


def opset_import():
    return helper.make_opsetid(DOMAIN, DOMAIN_VERSION)
