"""Give freed memory back to the system between the stages of an export.

An export holds several weight-sized things in turn (the torch model, the traced graph's
folded weights, the ONNX protobuf, ONNX Runtime sessions for validation). Python frees each
when its last reference goes, but glibc keeps freed heap pages for reuse, so the process's
resident memory only grows: measured for Qwen2.5-0.5B, 3.4 GB resident after the export
function had returned. :func:`release_memory` runs the garbage collector and asks glibc to
return what it can (``malloc_trim``), so the next stage's peak starts from what is really in
use. No-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc = None


def release_memory() -> None:
    """``gc.collect()``, then glibc's ``malloc_trim(0)`` where available."""
    global _libc
    gc.collect()
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018  (raises AttributeError off glibc)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


#: peak resident memory of each export stage over the model's fp32 weight bytes (parameters
#: x 4), measured on Qwen2.5 0.5B (docs/benchmarks/scale.md); an export's estimate is the
#: largest stage it runs
STAGE_FACTORS: dict[str, float] = {
    # trace with the frozen weights as inputs (exporters/weight_attach.py), then the ONNX
    # Runtime session next to the torch model for validation
    "loss graph and its validation": 2.6,
    # exporters/decode.py traces the decoding graph with the weights as parameters
    "decoding graph (its own trace)": 3.6,
    # exporters/precision.py quantize_int8_smooth with its calibration session
    "int8 quantisation": 8.7,
    # exporters/quantize.py MatMulNBits quantiser on the loaded fp32 graph
    "int4 quantisation": 4.2,
}


def export_stages(precision: str | None, decoder: bool) -> list[str]:
    """The stages of :data:`STAGE_FACTORS` an export of ``precision`` runs."""
    stages = ["loss graph and its validation"]
    if decoder:
        stages.append("decoding graph (its own trace)")
    if precision and precision.startswith("int8"):
        stages.append("int8 quantisation")
    elif precision == "int4":
        stages.append("int4 quantisation")
    return stages


def export_memory_estimate(
    parameters: int, precision: str | None, decoder: bool
) -> tuple[int, str, float]:
    """(bytes, stage, factor) of the largest stage of an export of a model of ``parameters``
    fp32 weights: the figure an export is refused by before it reads a weight."""
    stage = max(export_stages(precision, decoder), key=STAGE_FACTORS.__getitem__)
    factor = STAGE_FACTORS[stage]
    return int(parameters * 4 * factor), stage, factor
