"""Write an ONNX model atomically: a reader of the destination sees the old file or the new one,
never a part (:mod:`hal.atomic`). Models over protobuf's 2 GiB limit keep their large
initializers in ``NAME.data`` next to the model (ONNX external data), written first, also atomically."""
from __future__ import annotations

from pathlib import Path

from onnx import TensorProto

from hal import atomic

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_MIN_BYTES = 1024           # initializers at least this big go to the data file


def _externalize(proto, data_path: Path) -> int:
    """Move every large initializer's bytes into ``data_path`` (atomically); the tensors then
    point at it by its file name. Returns the bytes written."""
    location = data_path.name
    offset = 0
    with atomic.replacing(data_path) as f:
        for t in proto.graph.initializer:
            if not t.HasField("raw_data") or len(t.raw_data) < EXTERNAL_MIN_BYTES:
                continue
            raw = t.raw_data
            f.write(raw)
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = TensorProto.EXTERNAL
            t.ClearField("raw_data")
            offset += len(raw)
    return offset


def save_model(proto, out, *, external_over: int = PROTOBUF_LIMIT) -> dict:
    """Write ``proto`` (an onnx.ModelProto) to ``out``. When its serialized size exceeds
    ``external_over`` bytes, large initializers move to ``out + '.data'`` first (``proto`` is
    modified in place). Returns {"path", "bytes", "external_data", "external_bytes"}. Raises
    OSError (missing or unwritable folder, disk full) with nothing left behind but, for an
    external-data model whose model file failed, a complete unreferenced data file."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(21, "is a folder", str(out))
    external, ext_bytes = None, 0
    if proto.ByteSize() > external_over:
        external = out.with_name(out.name + ".data")
        ext_bytes = _externalize(proto, external)
    atomic.write_bytes(out, proto.SerializeToString())
    return {"path": str(out), "bytes": out.stat().st_size, "external_data": None if external is None else str(external),
            "external_bytes": ext_bytes}
