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
#: x 4), measured on Qwen2.5 0.5B with ``tools/export_memory.py`` (docs/benchmarks/scale.md);
#: an export's estimate is the largest stage it runs
STAGE_FACTORS: dict[str, float] = {
    # traced with the frozen weights as inputs (exporters/weight_attach.py): the torch model
    # and one weight at a time (1.28x tied, 1.55x with a quantised export's untied head)
    "loss graph trace": 1.6,
    # the ONNX Runtime session next to the torch model, kept for the decoding graph (2.55x)
    "validation next to the torch model": 2.6,
    # the torch model's weights dropped before the session is made (1.56x)
    "validation": 1.6,
    # exporters/decode.py: the traced decoding graph with the weights as parameters (3.56x);
    # the fused one (exporters/decode_fused.py, Qwen2 among them) measured higher, 4.31x
    # (8,121 MiB: the torch model, the graph's weight copies and the check's session)
    "decoding graph": 4.4,
    # exporters/precision.py quantize_int8_smooth with its calibration session (8.7x, measured
    # while the torch model and the fp32 session were still alive: an upper bound)
    "int8 quantisation": 8.7,
    # exporters/quantize.py MatMulNBits quantiser on the loaded fp32 graph (2.16x)
    "int4 quantisation": 2.2,
}


def export_stages(precision: str | None, decoder: bool) -> list[str]:
    """The stages of :data:`STAGE_FACTORS` an export of ``precision`` runs."""
    stages = ["loss graph trace"]
    if decoder:
        stages += ["validation next to the torch model", "decoding graph"]
    else:
        stages.append("validation")
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


#: the streamed int4 export (``exporters/stream.py``) holds one weight at a time; its peak is
#: the weight with its folded transpose and the quantiser's copies, a multiple of the largest
#: tensor (the embedding/tied head), over a base of the interpreter and libraries; after it,
#: the int4 bundle's sessions (validation, frozen-prefix split) hold a share of the fp32
#: weights. Measured on Llama 3.2 3B (docs/benchmarks/scale.md): 7,375 MiB at the head,
#: 493 MiB before it, 1,503 MiB head (4.6x); 2,577 MiB in the split (0.21x the weights)
STREAMED_BASE_BYTES = 512 * 2**20
STREAMED_LARGEST_FACTOR = 4.7
STREAMED_WEIGHTS_FACTOR = 0.25


#: the streamed int8 export (``exporters/stream_int8.py``) holds about two copies of the
#: largest tensor at most: the calibration forward reads the tied embedding/head and runs the
#: head's matmul on it (its abs-max is taken in chunks); quantising a weight adds only its
#: int8 copy and float64 chunks of ``CHUNK_VALUES`` values. After it, the int8 bundle's
#: validation session holds about 0.4x the fp32 weights. Measured (docs/benchmarks/scale.md):
#: Gemma 3 1B, 3,107 MiB in the calibration (1,152 MiB head over 496 MiB: 2.27x), Llama 3.2
#: 1B 1,959 MiB in validation (0.42x its 4,714 MiB of weights)
STREAMED_INT8_LARGEST_FACTOR = 2.3
STREAMED_INT8_WEIGHTS_FACTOR = 0.45


def streamed_memory_estimate(parameters: int, largest_tensor: int, precision: str = "int4") -> int:
    """Bytes the streamed export (int4, or int8) of a model of ``parameters`` weights, the
    largest of them a tensor of ``largest_tensor`` values, is estimated to peak at."""
    if precision == "int8":
        largest, weights = STREAMED_INT8_LARGEST_FACTOR, STREAMED_INT8_WEIGHTS_FACTOR
    else:
        largest, weights = STREAMED_LARGEST_FACTOR, STREAMED_WEIGHTS_FACTOR
    return int(STREAMED_BASE_BYTES + max(largest * largest_tensor * 4, weights * parameters * 4))
