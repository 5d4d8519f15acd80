"""The carry plan of ``tools/gpu_check.py``: what a bare GPU machine needs, in ≤ 64 MiB parts.

The GPU machine cannot download, and each call carries at most 64 MiB (the working tree
included). So, on the desktop (``pack``):

- **ONNX Runtime for CUDA, lean.** The ``onnxruntime-gpu`` wheel (255.6 MB) is mostly
  ``libonnxruntime_providers_cuda.so`` (284 MB), whose ``.nv_fatbin`` section holds the CUDA
  kernels as machine code for six architectures (sm_75 … sm_120) and no PTX. Only sm_90 code
  can run on an H200 (machine code runs on its own major version only), so the other entries'
  payloads are zeroed, headers kept: the library then compresses (xz) from 186 MB to ~52 MB.
  The Python package minus the unused ``libonnxruntime.so`` (C API) and TensorRT provider is
  ~9 MB. ``--fallback`` also writes the zeroed payloads, to restore the exact library there if
  the driver ever refused the stripped one.
- **The model, rebuilt from its GGUF.** A fp32 SmolLM2 bundle is 538 MB, but every large
  tensor in it is a dequantised tensor of the 94 MiB ``Q4_1``/``Q8_0`` GGUF, maybe transposed
  (``MatMul`` weights), maybe in rotary order (transformers' ``reverse_permute`` of q/k), maybe
  cast to fp16. ``pack`` finds, for each tensor region of each bundle file, the GGUF tensor and
  transform with exactly its bytes (matched by hash); what matches nothing (graphs, tokenizer,
  LoRA A, small constants) is carried as content-addressed blobs. The recipe lists every
  file's segments and sha256; ``rebuild`` writes the files there and checks every sha256 —
  the bundles are byte-identical to the desktop's. The same recipe rebuilds the Hugging Face
  state dict for the PyTorch comparison.

Parts (``.gpu/p1`` … ``.gpu/pN``, each under the per-call limit with the working tree):
p1 = lean ONNX Runtime + the gguf wheel; p2, p3 = the GGUF split in two (+ recipe, blobs and
the tiny test bundles in the last). ``docs/guides/gpu-check.md`` gives the calls.

Only the standard library and numpy are imported at module level: the GPU machine runs
``stash``/``rebuild`` before anything else is installed.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

LIMIT_MIB = 64  # per call, the working tree included
FATBIN_MAGIC = 0xBA55ED50
CUDA_SO = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
ORT_DROP = ("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so")
MATCH_MIN_BYTES = 1 << 16  # smaller regions are carried inside their file's blobs
RECIPE = "recipe.json"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _digest(buf) -> str:
    return hashlib.blake2b(buf, digest_size=16).hexdigest()


# -- ONNX Runtime, lean ----------------------------------------------------------------------


def fatbin_entries(data: bytes | bytearray) -> Iterator[tuple[int, int, int]]:
    """(payload offset, payload size, sm arch) of every entry of the ELF's ``.nv_fatbin``."""
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    strtab = secs[e_shstrndx][4]

    def name(off: int) -> bytes:
        return bytes(data[strtab + off : data.index(b"\0", strtab + off)])

    found = [s for s in secs if name(s[0]) == b".nv_fatbin"]
    if not found:
        return
    start, end = found[0][4], found[0][4] + found[0][5]
    pos = start
    while pos < end:
        magic, _version, header, size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # containers are 8-byte aligned
            pos += 8
            continue
        p, q = pos + header, pos + header + size
        while p < q:
            _kind, _v, ehs, psz = struct.unpack_from("<HHIQ", data, p)
            (arch,) = struct.unpack_from("<I", data, p + 28)
            yield p + ehs, psz, arch
            p += ehs + psz
        pos = q


def strip_cuda_library(src: Path, dst: Path, keep_arch: int, removed: Path | None = None) -> dict:
    """Copy ``src`` to ``dst`` with every fatbin payload not for ``keep_arch`` zeroed.

    ``removed`` (optional) receives those payloads (offset, size, bytes; xz) for ``restore``.
    """
    data = bytearray(src.read_bytes())
    archs: dict[int, int] = {}
    cut = []
    for off, size, arch in fatbin_entries(data):
        archs[arch] = archs.get(arch, 0) + size
        if arch != keep_arch:
            cut.append((off, size, bytes(data[off : off + size])))
            data[off : off + size] = bytes(size)
    if keep_arch not in archs:
        raise SystemExit(f"{src} has no sm_{keep_arch} code (archs: {sorted(archs)})")
    dst.write_bytes(data)
    if removed is not None:
        with lzma.open(removed, "wb", preset=6) as f:
            for off, size, payload in cut:
                f.write(struct.pack("<QQ", off, size))
                f.write(payload)
    return {
        "archs_mb": {f"sm_{a}": round(s / 1e6, 1) for a, s in sorted(archs.items())},
        "kept": f"sm_{keep_arch}",
        "zeroed_bytes": sum(s for _, s, _ in cut),
        "original_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "stripped_sha256": hashlib.sha256(data).hexdigest(),
    }


def restore_cuda_library(stripped: Path, removed: Path) -> None:
    """Write the zeroed payloads back (the fallback: the exact library of the wheel)."""
    data = bytearray(stripped.read_bytes())
    with lzma.open(removed, "rb") as f:
        while head := f.read(16):
            off, size = struct.unpack("<QQ", head)
            data[off : off + size] = f.read(size)
    stripped.write_bytes(data)


def pack_ort(wheel: Path, out: Path, keep_arch: int, fallback: Path | None) -> dict:
    """``ort-lean.tar.xz`` (the package without the CUDA library) + ``cuda-sm{arch}.so.xz``."""
    work = out / "_ort"
    shutil.rmtree(work, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(work)
    with tarfile.open(out / "ort-lean.tar.xz", "w:xz") as tar:
        for p in sorted(work.rglob("*")):
            rel = p.relative_to(work).as_posix()
            if p.is_file() and not (p.name in ORT_DROP or p.name.startswith("libonnxruntime.so")):
                tar.add(p, arcname=rel, recursive=False)
    stripped = work / "cuda.so"
    info = strip_cuda_library(work / CUDA_SO, stripped, keep_arch, fallback)
    with open(stripped, "rb") as f, lzma.open(out / f"cuda-sm{keep_arch}.so.xz", "wb") as g:
        shutil.copyfileobj(f, g, 1 << 22)
    shutil.rmtree(work)
    return {"wheel": wheel.name, **info}


def install_ort(parts: Path, site: Path) -> None:
    """Unpack the lean package and the stripped CUDA library into ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    with tarfile.open(parts / "ort-lean.tar.xz") as tar:
        tar.extractall(site, filter="data")
    (lib,) = parts.glob("cuda-sm*.so.xz")
    with lzma.open(lib, "rb") as f, open(site / CUDA_SO, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 22)
    for wheel in parts.glob("*.whl"):  # pure-Python wheels: a zip is all pip would unpack
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)


# -- tensor regions of bundle files ----------------------------------------------------------


def _varint(buf, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of the length-delimited fields of one protobuf message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            yield number, pos, pos + n
            pos += n
        else:
            raise ValueError(f"protobuf wire type {wire} at {pos}")


# field numbers of onnx.proto (ModelProto.graph, GraphProto.node/initializer, ...)
_GRAPH, _NODE, _INIT, _ATTR, _ATTR_T, _ATTR_G, _ATTR_TS = 7, 1, 5, 5, 5, 6, 10
_RAW, _FLOATS = 9, 4


def _tensor_regions(buf, start: int, end: int) -> Iterator[tuple[int, int]]:
    for number, a, b in _fields(buf, start, end):
        if number in (_RAW, _FLOATS):
            yield a, b


def _graph_regions(buf, start: int, end: int) -> Iterator[tuple[int, int]]:
    for number, a, b in _fields(buf, start, end):
        if number == _INIT:
            yield from _tensor_regions(buf, a, b)
        elif number == _NODE:
            for n2, a2, b2 in _fields(buf, a, b):
                if n2 != _ATTR:
                    continue
                for n3, a3, b3 in _fields(buf, a2, b2):
                    if n3 in (_ATTR_T, _ATTR_TS):
                        yield from _tensor_regions(buf, a3, b3)
                    elif n3 == _ATTR_G:
                        yield from _graph_regions(buf, a3, b3)


def onnx_regions(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of tensor data stored inside an ``.onnx`` file (raw_data / float_data)."""
    out = []
    for number, a, b in _fields(data, 0, len(data)):
        if number == _GRAPH:
            out += list(_graph_regions(data, a, b))
    return out


def external_regions(model: Path) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges per external-data file referenced by an ``.onnx`` file (desktop: onnx)."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    out: dict[str, list[tuple[int, int]]] = {}
    tensors = list(m.graph.initializer) + [
        a.t for n in m.graph.node for a in n.attribute if a.HasField("t")
    ]
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        kv = {e.key: e.value for e in t.external_data}
        off = int(kv.get("offset", 0))
        out.setdefault(kv["location"], []).append((off, off + int(kv["length"])))
    return out


def safetensors_regions(data: bytes) -> list[tuple[int, int]]:
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    return [
        (base + v["data_offsets"][0], base + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    ]


# -- the GGUF and its transforms -------------------------------------------------------------


class Gguf:
    """Dequantised tensors of a GGUF file (numpy, Hugging Face orientation [out, in])."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.reader = GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._cache: dict[str, np.ndarray] = {}

    def field(self, key: str):
        f = self.reader.fields[key]
        return f.parts[f.data[0]].tolist()[0]

    def base(self, name: str) -> np.ndarray:
        if name not in self._cache:
            from gguf.quants import dequantize

            t = self.tensors[name]
            self._cache[name] = np.ascontiguousarray(dequantize(t.data, t.tensor_type))
        return self._cache[name]

    def transformed(self, name: str, ops: list) -> np.ndarray:
        return apply_ops(self.base(name), ops)


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' inverse of llama.cpp's q/k row permutation (rotary halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def to_float16(w: np.ndarray) -> np.ndarray:
    """fp16 as onnxruntime's float16 converter writes initializers (its own function)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    return convert_np_to_float16(w)


def apply_ops(w: np.ndarray, ops: list) -> np.ndarray:
    for op in ops:
        if op[0] == "perm":
            w = reverse_permute(w, int(op[1]))
        elif op[0] == "T":
            w = w.T
        elif op[0] == "f16":
            w = to_float16(np.ascontiguousarray(w))
        else:
            raise ValueError(f"unknown transform {op}")
    return np.ascontiguousarray(w)


def candidate_ops(name: str, w: np.ndarray, heads: tuple[int, ...]) -> list[list]:
    """Transforms tried for GGUF tensor ``name`` (matching by bytes decides)."""
    orders: list[list] = [[]]
    if w.ndim == 2:
        orders += [[["perm", h]] for h in heads if w.shape[0] % (2 * h) == 0]
        orders += [o + [["T"]] for o in list(orders)]
    return orders + [o + [["f16"]] for o in orders]


# -- pack: recipe + blobs ---------------------------------------------------------------------


class Recipe:
    """Segments of every carried file: ``blob`` (content-addressed) or ``gguf`` (name, ops)."""

    def __init__(
        self,
        gguf: Gguf,
        blobs: Path,
        say: Callable[[str], None] = print,
        min_bytes: int = MATCH_MIN_BYTES,
    ):
        self.gguf = gguf
        self.min_bytes = min_bytes
        self.blobs = blobs
        self.say = say
        blobs.mkdir(parents=True, exist_ok=True)
        heads = tuple(
            sorted(
                {
                    int(gguf.field("llama.attention.head_count")),
                    int(gguf.field("llama.attention.head_count_kv")),
                }
            )
        )
        self.index: dict[str, tuple[str, list]] = {}
        for name in gguf.tensors:
            w = gguf.base(name)
            if w.nbytes < min_bytes // 2:  # (an fp16 copy is half the bytes)
                continue
            for ops in candidate_ops(name, w, heads):
                self.index.setdefault(_digest(apply_ops(w, ops)), (name, ops))
        self.files: list[dict] = []
        self.blob_bytes = 0

    def blob(self, buf) -> str:
        """Store ``buf`` once (xz: graphs and the tokenizer compress ~4×); its name."""
        h = _digest(buf)
        p = self.blobs / h
        if not p.exists():
            p.write_bytes(lzma.compress(bytes(buf), preset=6))
            self.blob_bytes += p.stat().st_size
        return h

    def add_file(self, path: Path, dest: str, regions: list[tuple[int, int]]) -> None:
        data = path.read_bytes()
        view = memoryview(data)
        segments: list = []
        pos = 0
        matched = 0
        for a, b in sorted(regions):
            if b - a < self.min_bytes or a < pos:
                continue
            hit = self.index.get(_digest(view[a:b]))
            if hit is None:
                continue
            if a > pos:
                segments.append([pos, a - pos, {"blob": self.blob(view[pos:a])}])
            segments.append([a, b - a, {"gguf": hit[0], "ops": hit[1]}])
            matched += b - a
            pos = b
        if pos < len(data):
            segments.append([pos, len(data) - pos, {"blob": self.blob(view[pos:])}])
        self.files.append(
            {
                "path": dest,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "segments": segments,
            }
        )
        self.say(
            f"  {dest}: {len(data) / 2**20:,.1f} MiB, {matched / max(len(data), 1):.1%} from GGUF"
        )

    def add_bundle(self, folder: Path, dest: str) -> None:
        """Every file of a bundle folder, with the tensor regions its format exposes."""
        ext: dict[str, list[tuple[int, int]]] = {}
        for f in sorted(folder.iterdir()):
            if f.suffix == ".onnx":
                for loc, regs in external_regions(f).items():
                    ext.setdefault(loc, []).extend(regs)
        for f in sorted(folder.iterdir()):
            if f.suffix == ".onnx":
                regions = onnx_regions(f.read_bytes())
            elif f.suffix == ".safetensors":
                regions = safetensors_regions(f.read_bytes())
            else:
                regions = ext.get(f.name, [])
            self.add_file(f, f"{dest}/{f.name}", regions)

    def add_tensors(self, tensors: dict[str, np.ndarray], dest: str) -> None:
        """A state dict (the PyTorch reference) as named GGUF transforms or blobs."""
        entries = {}
        for name, t in tensors.items():
            t = np.ascontiguousarray(t)
            hit = self.index.get(_digest(t)) if t.nbytes >= self.min_bytes else None
            src = {"gguf": hit[0], "ops": hit[1]} if hit else {"blob": self.blob(t.tobytes())}
            entries[name] = {"dtype": str(t.dtype), "shape": list(t.shape), **src}
        self.files.append({"path": dest, "tensors": entries})

    def write(self, out: Path, extra: dict) -> None:
        (out / RECIPE).write_text(json.dumps({"files": self.files, **extra}, indent=1))


# -- on the GPU machine: stash, assemble, rebuild --------------------------------------------


def stash(parts: Path, store: Path) -> list[str]:
    """Copy a part's files into ``store`` (/tmp survives between calls while warm)."""
    store.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(parts.rglob("*")):
        if p.is_file():
            dst = store / p.relative_to(parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
            copied.append(str(p.relative_to(parts)))
    return copied


def assemble(store: Path, name: str, size: int, digest: str) -> Path:
    """Join ``name.part*`` in ``store`` into ``name`` and check it."""
    out = store / name
    if not (out.exists() and out.stat().st_size == size):
        with open(out, "wb") as g:
            for p in sorted(store.glob(f"{name}.part*")):
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, g, 1 << 22)
    if out.stat().st_size != size or sha256(out) != digest:
        raise SystemExit(f"{out}: the joined parts do not match the packed file (missing part?)")
    return out


def rebuild(store: Path, dest: Path, say: Callable[[str], None] = print) -> dict:
    """Write every file of the recipe under ``dest`` and check its sha256; returns each
    file's fate (``present``, ``rebuilt`` or ``MISMATCH``: reported, the run goes on)."""
    recipe = json.loads((store / RECIPE).read_text())
    g = recipe["gguf"]
    gguf = Gguf(assemble(store, g["name"], g["bytes"], g["sha256"]))
    blobs = store / "blobs"
    done = {}
    for f in recipe["files"]:
        path = dest / f["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if "tensors" in f:  # a state dict: rebuilt on demand by load_tensors
            (path.parent / (path.name + ".json")).write_text(json.dumps(f["tensors"]))
            continue
        if path.exists() and path.stat().st_size == f["bytes"] and sha256(path) == f["sha256"]:
            done[f["path"]] = "present"
            continue
        with open(path, "wb") as out:
            for _off, _n, src in f["segments"]:
                if "blob" in src:
                    out.write(read_blob(blobs, src["blob"]))
                else:
                    out.write(gguf.transformed(src["gguf"], src["ops"]).tobytes())
        ok = sha256(path) == f["sha256"]
        done[f["path"]] = "rebuilt" if ok else "MISMATCH"
        say(f"  {f['path']}: {f['bytes'] / 2**20:,.1f} MiB {'ok' if ok else 'MISMATCH (sha256)'}")
    return done


def read_blob(blobs: Path, name: str) -> bytes:
    return lzma.decompress((blobs / name).read_bytes())


def load_tensors(store: Path, index: Path) -> dict[str, np.ndarray]:
    """A state dict written by :meth:`Recipe.add_tensors`, rebuilt from the GGUF."""
    recipe = json.loads((store / RECIPE).read_text())
    g = recipe["gguf"]
    gguf = Gguf(assemble(store, g["name"], g["bytes"], g["sha256"]))
    out = {}
    for name, e in json.loads(index.read_text()).items():
        if "blob" in e:
            arr = np.frombuffer(read_blob(store / "blobs", e["blob"]), dtype=e["dtype"])
        else:
            arr = gguf.transformed(e["gguf"], e["ops"])
        out[name] = arr.reshape(e["shape"])
    return out


def split(path: Path, sizes: list[int], outs: list[Path]) -> None:
    """Cut ``path`` into consecutive ``name.partK`` files of ``sizes`` bytes (last: the rest)."""
    with open(path, "rb") as f:
        for k, (n, out) in enumerate(zip(sizes, outs, strict=True)):
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"{path.name}.part{k}", "wb") as g:
                g.write(f.read(n) if n >= 0 else f.read())


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def tree_mib(repo: Path) -> float:
    """What travels besides the carried parts: tracked and untracked-not-ignored files."""
    import subprocess

    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return (
        sum(os.path.getsize(repo / p.decode()) for p in out if p and (repo / p.decode()).is_file())
        / 2**20
    )


# -- desktop: the bundles -------------------------------------------------------------------

#: ops the fp16 base keeps in fp32 (Cast around them): RMSNorm's x² and mean, and the loss's
#: log-sum-exp, whose fp16 range (65,504) a model's activations or a 49k-way sum can pass
FP16_KEEP_FP32 = ("Pow", "ReduceMean", "Sqrt", "ReduceMax", "ReduceSum", "Exp", "Log", "CumSum")


def make_fp16_bundle(src: Path, dst: Path) -> Path:
    """A copy of bundle ``src`` whose frozen graph computes in fp16 (onnxruntime's converter;
    trainable inputs and the loss stay fp32 graph inputs/outputs, ``FP16_KEEP_FP32`` ops too)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from edgezo.bundle import load_bundle, write_manifest

    b = load_bundle(src)
    if b.manifest.stages:
        raise SystemExit(f"{src}: make the fp16 base from a bundle without a prefix split")
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    model = onnx.load(str(b.model_path))
    half = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32),
        disable_shape_infer=True,
    )
    onnx.save_model(
        half,
        str(dst / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    files = ["model.onnx", "model.onnx.data"]
    for name in b.manifest.files:
        if name not in files and not name.startswith("model.onnx"):
            shutil.copyfile(src / name, dst / name)
            files.append(name)
    manifest = b.manifest
    manifest.quantization = {
        "scheme": "fp16",
        "converter": "onnxruntime.transformers.float16 (keep_io_types)",
        "fp32_ops": list(FP16_KEEP_FP32),
    }
    write_manifest(dst, manifest, files)
    return dst
