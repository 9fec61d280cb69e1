"""torch tensors <-> ONNX TensorProto (bf16 and float8_e4m3fn as raw bytes: BFLOAT16, FLOAT8E4M3FN)."""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, numpy_helper

TO_ONNX = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE, torch.float16: TensorProto.FLOAT16,
           torch.bfloat16: TensorProto.BFLOAT16, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
           torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL,
           torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8}
FROM_ONNX = {v: k for k, v in TO_ONNX.items()}
_RAW_VIEW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}


def to_proto(t: torch.Tensor, name: str) -> TensorProto:
    t = t.detach().cpu().contiguous()
    if t.dtype in _RAW_VIEW:
        p = TensorProto(name=name, data_type=TO_ONNX[t.dtype], dims=list(t.shape))
        p.raw_data = t.view(_RAW_VIEW[t.dtype]).numpy().tobytes()
        return p
    if t.dtype not in TO_ONNX:
        raise TypeError(f"cannot store dtype {t.dtype} as a TensorProto")
    return numpy_helper.from_array(t.numpy(), name=name)


def from_proto(p: TensorProto) -> torch.Tensor:
    """Raises ValueError when the proto's data does not match its declared type and shape."""
    if p.data_type not in FROM_ONNX:
        raise ValueError(f"unsupported TensorProto data_type {p.data_type}")
    dtype = FROM_ONNX[p.data_type]
    shape = tuple(p.dims)
    if dtype in _RAW_VIEW:
        n = int(np.prod(shape)) if shape else 1
        width = torch.tensor([], dtype=dtype).element_size()
        if len(p.raw_data) != n * width:
            raise ValueError(f"{p.name}: {len(p.raw_data)} bytes for {n} elements of {dtype}")
        buf = bytearray(p.raw_data) or bytearray(0)
        flat = torch.frombuffer(buf, dtype=_RAW_VIEW[dtype]) if n else torch.empty(0, dtype=_RAW_VIEW[dtype])
        return flat.view(dtype).reshape(shape).clone()
    arr = numpy_helper.to_array(p)
    if tuple(arr.shape) != shape:
        raise ValueError(f"{p.name}: data shape {arr.shape} != declared {shape}")
    return torch.from_numpy(np.array(arr, copy=True))


def save(t: torch.Tensor, path, name: str) -> None:
    """Write ``t`` as a serialized TensorProto named ``name`` (atomically; no fsync: the golden
    manifest, written last and durably, holds every file's checksum)."""
    from hal import atomic
    atomic.write_bytes(path, to_proto(t, name).SerializeToString(), durable=False, parents=True)


def load(path) -> torch.Tensor:
    p = TensorProto()
    with open(path, "rb") as f:
        p.ParseFromString(f.read())
    return from_proto(p)
