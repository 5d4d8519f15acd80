"""The external-data files an ONNX model names, read without the ``onnx`` package.

A tensor of an ONNX graph may keep its bytes in another file: its ``external_data`` entries
hold a ``location`` relative to the model's folder, which ONNX Runtime opens. A hostile bundle
could point it anywhere (``../../secret``, ``/etc/passwd``); :mod:`edgezo.bundle` refuses such
locations before any session is created, and needs them to be among the files it verifies.

The device side has no ``onnx`` package, so this walks the protobuf wire format itself, only
along the fields where a ``TensorProto`` can sit: the graph's initializers and sparse
initializers, node attributes (tensors and subgraphs, any depth), functions and training
graphs. Big ``raw_data`` fields are skipped by their length, never copied. A file in which the
key ``location`` does not occur has no external data and is not walked at all.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

# field numbers (onnx.proto3)
_MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_GRAPHS = (1, 2)  # TrainingInfoProto.initialization, .algorithm
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE, _ATTR_SPARSES = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL = 8, 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
MAX_DEPTH = 64  # subgraphs nested deeper than this are refused (a real model nests a few)


class MalformedModel(ValueError):
    """The file is not a well-formed ONNX protobuf."""


def external_locations(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor of the model at ``path`` that keeps its
    data in an external file; :class:`MalformedModel` when the file cannot be walked."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise MalformedModel("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(b"location") < 0:  # the entry key every external tensor needs
                return []
            view = memoryview(m)
            try:
                out: list[tuple[str, str]] = []
                _model(view, out)
                return out
            finally:
                view.release()


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedModel(f"a truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of the length-delimited fields of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise MalformedModel(f"a field at byte {pos} runs past its message")
            yield key >> 3, pos, pos + n
            pos += n
        else:
            raise MalformedModel(f"wire type {wire} at byte {pos}")
    if pos != end:
        raise MalformedModel(f"a field at byte {pos} runs past its message")


def _model(buf: memoryview, out: list) -> None:
    for num, s, e in _fields(buf, 0, len(buf)):
        if num == _MODEL_GRAPH:
            _graph(buf, s, e, out, 0)
        elif num == _MODEL_TRAINING:
            for n2, s2, e2 in _fields(buf, s, e):
                if n2 in _TRAINING_GRAPHS:
                    _graph(buf, s2, e2, out, 0)
        elif num == _MODEL_FUNCTIONS:
            for n2, s2, e2 in _fields(buf, s, e):
                if n2 == _FUNCTION_NODE:
                    _node(buf, s2, e2, out, 0)


def _graph(buf: memoryview, start: int, end: int, out: list, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise MalformedModel(f"subgraphs nested more than {MAX_DEPTH} deep")
    for num, s, e in _fields(buf, start, end):
        if num == _GRAPH_NODE:
            _node(buf, s, e, out, depth)
        elif num == _GRAPH_INITIALIZER:
            _tensor(buf, s, e, out)
        elif num == _GRAPH_SPARSE:
            _sparse(buf, s, e, out)


def _node(buf: memoryview, start: int, end: int, out: list, depth: int) -> None:
    for num, s, e in _fields(buf, start, end):
        if num != _NODE_ATTRIBUTE:
            continue
        for n2, s2, e2 in _fields(buf, s, e):
            if n2 in (_ATTR_T, _ATTR_TENSORS):
                _tensor(buf, s2, e2, out)
            elif n2 in (_ATTR_G, _ATTR_GRAPHS):
                _graph(buf, s2, e2, out, depth + 1)
            elif n2 in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse(buf, s2, e2, out)


def _sparse(buf: memoryview, start: int, end: int, out: list) -> None:
    for num, s, e in _fields(buf, start, end):
        if num in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(buf, s, e, out)


def _text(buf: memoryview, s: int, e: int) -> str:
    return bytes(buf[s:e]).decode("utf-8", errors="replace")


def _tensor(buf: memoryview, start: int, end: int, out: list) -> None:
    name, locations = "", []
    for num, s, e in _fields(buf, start, end):
        if num == _TENSOR_NAME:
            name = _text(buf, s, e)
        elif num == _TENSOR_EXTERNAL:
            key = value = None
            for n2, s2, e2 in _fields(buf, s, e):
                if n2 == _ENTRY_KEY:
                    key = _text(buf, s2, e2)
                elif n2 == _ENTRY_VALUE:
                    value = _text(buf, s2, e2)
            if key == "location":
                locations.append(value or "")
    out.extend((name, loc) for loc in locations)
