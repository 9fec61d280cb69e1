"""Export HAL models to other runtimes (``hal export``). Today: ONNX (:mod:`hal.export.onnx`),
written by :mod:`hal.export.save` and certified against the reference by :mod:`hal.export.check`.
The modules import onnx / onnxruntime, the ``[conformance]`` extra; docs/export.md."""
