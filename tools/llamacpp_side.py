"""llama.cpp's side of tools/bench_size_ppl.py; runs in a side environment, never imported by gift_quant.

    ../side-llamacpp/bin/python tools/llamacpp_side.py --source SRC.gguf --windows ids.npy --work DIR \
        --out points.json [--types F16,Q8_0,...] [--threads 1]

Side environment (not a project dependency; nothing of it is committed, no test needs it):

    python3 -m venv ../side-llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" ../side-llamacpp/bin/pip install llama-cpp-python==0.3.36 gguf numpy

1. ``DIR/fp32.gguf``: every tensor of SRC dequantized to float32 (the weights gift_quant calls ``fp``: transformers
   dequantizes the same blocks with the same ``gguf`` code) with SRC's metadata and tokenizer, file type F32.
2. Each type of --types made from it with ``llama_model_quantize`` (``SOURCE`` = SRC itself, not re-quantized);
   llama.cpp picks its own fallbacks (a K-quant on a 576-wide row falls back to a legacy type), read back per tensor.
3. Per type: file bytes, linear bits/weight (bytes of the decoder blocks' 2-D weights / their weights), the
   embedding's type, WikiText-2 NLL on the windows of ``ids.npy`` (int32, windows x seq_len, made by the main env
   with gift_quant's tokenizer and windowing), and decode tokens/s: best of 3 of 64 greedy tokens after a 32-token
   prompt (the prompt's prefill not timed).

Points already in --out are kept (a rerun only measures what is missing). Needs numpy, gguf and llama_cpp.

``--decode-only``: for tools/bench_decode.py, one decode measurement per type of --types (the files made as above
when missing, no perplexity), printed as one JSON object {type: {"file", "bytes", "decode_tok_s"}}; --out unused.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import time
from pathlib import Path

import numpy as np

LINEAR = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
DEFAULT_TYPES = ("F16", "Q8_0", "Q5_0", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K", "SOURCE")


def window_nll(logits: np.ndarray, ids: np.ndarray, chunk: int = 256) -> float:
    """Summed NLL (nats, float64) of ids[1:] under logits[:-1]: position t predicts token t + 1."""
    total = 0.0
    for i in range(0, len(ids) - 1, chunk):
        x = logits[i:min(i + chunk, len(ids) - 1)].astype(np.float64)
        target = ids[i + 1:i + 1 + len(x)]
        m = x.max(axis=1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
        total += float((lse - x[np.arange(len(x)), target]).sum())
    return total


def linear_bits(tensors: list[tuple[str, int, int]]) -> float:
    """Bits per weight of the decoder blocks' linears, from (name, elements, bytes) of every tensor of a file."""
    rows = [(n, b) for name, n, b in tensors if LINEAR.match(name)]
    return 8 * sum(b for _, b in rows) / sum(n for n, _ in rows)


def tensor_table(path: Path) -> tuple[list[tuple[str, int, int]], dict[str, int], str]:
    """(name, elements, bytes) per tensor, the linears' type counts, and the embedding's type."""
    from gguf import GGUFReader

    try:
        tensors = [(t.name, int(t.n_elements), int(t.n_bytes), t.tensor_type.name) for t in GGUFReader(path).tensors]
    except ValueError:  # a type newer than gguf-py (llama.cpp's Q2_0 in gguf 0.19): read the tensor infos alone
        tensors = header_tensors(path)
    types: dict[str, int] = {}
    for name, _, _, kind in tensors:
        if LINEAR.match(name):
            types[kind] = types.get(kind, 0) + 1
    embedding = next(kind for name, _, _, kind in tensors if name == "token_embd.weight")
    return [(name, n, size) for name, n, size, _ in tensors], types, embedding


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def header_tensors(path: Path) -> list[tuple[str, int, int, str]]:
    """(name, elements, bytes, type) per tensor from the GGUF header alone, for files whose types gguf-py does not
    know: a tensor's bytes are the distance to the next tensor's offset (padding to the file's alignment included)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0]

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return data[pos - n:pos].decode()

    def skip(kind: int) -> None:
        if kind == 8:
            string()
        elif kind == 9:
            inner, n = take("I"), take("Q")
            for _ in range(n):
                skip(inner)
        else:
            take(_SCALARS[kind])

    if take("4s") != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    take("I")
    n_tensors, n_kv = take("Q"), take("Q")
    alignment = 32
    for _ in range(n_kv):
        key, kind = string(), take("I")
        if key == "general.alignment":
            alignment = take("I")
        else:
            skip(kind)
    infos = []
    for _ in range(n_tensors):
        name, dims = string(), take("I")
        shape = [take("Q") for _ in range(dims)]
        infos.append((name, math.prod(shape), take("I"), take("Q")))
    data_bytes = len(data) - -(-pos // alignment) * alignment  # tensor data starts at the next aligned byte
    offsets = sorted(off for *_, off in infos)
    end_of = dict(zip(offsets, offsets[1:] + [data_bytes]))
    return [(name, n, end_of[off] - off, _type_name(kind)) for name, n, kind, off in infos]


def _type_name(kind: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"


def write_fp32(source: Path, out: Path) -> None:
    """SRC's tensors dequantized to float32, its metadata copied (file type set to ALL_F32)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys, LlamaFileType
    from gguf.quants import dequantize

    reader = GGUFReader(source)
    arch = reader.get_field(Keys.General.ARCHITECTURE).contents()
    writer = GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    writer.add_file_type(LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(master: Path, out: Path, name: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}")
    if llama_cpp.llama_model_quantize(str(master).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {name}")


REPACK = True  # --no-repack: llama.cpp's extra buffer types off (weight repacking, AMX), as llama-cli's --no-repack


def load(path: Path, n_ctx: int, threads: int):
    """A context holding every position's logits. Without repacking through a patched llama_model_default_params:
    the bindings expose no other way to set ``use_extra_bufts`` (its AMX kernels segfaulted on one Xeon VM here)."""
    import llama_cpp.llama_cpp as api
    from llama_cpp import Llama

    default = api.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = REPACK
        return p

    api.llama_model_default_params = params
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                     logits_all=True, verbose=False)
    finally:
        api.llama_model_default_params = default


def perplexity(path: Path, windows: np.ndarray, threads: int) -> dict:
    llm = load(path, windows.shape[1], threads)
    nll, start = 0.0, time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        nll += window_nll(llm.scores[: len(w)], w)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return {"nll_sum": nll, "tokens": tokens, "ppl": float(np.exp(nll / tokens)),
            "ppl_seconds": round(time.perf_counter() - start, 1)}


def decode_speed(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> float:
    """Greedy tokens/s after the prompt (its prefill excluded), best of ``repeats``."""
    llm = load(path, len(prompt) + new_tokens + 1, threads)
    best = float("inf")
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def measure(path: Path, windows: np.ndarray, threads: int) -> dict:
    rows, types, embedding = tensor_table(path)
    point = {"file": str(path), "bytes": path.stat().st_size, "linear_bits": linear_bits(rows),
             "linear_types": types, "embedding_type": embedding, "repack": REPACK}
    point["decode_tok_s"] = decode_speed(path, windows[0, :32].tolist(), 64, 3, threads)
    point.update(perplexity(path, windows, threads))
    return point


def type_file(args: argparse.Namespace, name: str) -> Path:
    """The GGUF of one type (SOURCE: the source file itself), made from the fp32 master when missing."""
    if name == "SOURCE":
        return args.source
    master, path = args.work / "fp32.gguf", args.work / f"{name}.gguf"
    if not master.is_file():
        write_fp32(args.source, master)
    if not path.is_file():
        quantize(master, path, name, args.threads)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--windows", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path)
    p.add_argument("--decode-only", action="store_true", help="decode tokens/s of each type only (bench_decode.py)")
    p.add_argument("--repeats", type=int, default=3, help="decode: best of this many")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-repack", action="store_true", help="no weight repacking / AMX (see load)")
    args = p.parse_args(argv)
    global REPACK
    REPACK = not args.no_repack
    args.work.mkdir(parents=True, exist_ok=True)
    windows = np.load(args.windows)
    if args.decode_only:
        speeds = {}
        for name in args.types.split(","):
            path = type_file(args, name)
            speeds[name] = {"file": str(path), "bytes": path.stat().st_size,
                            "decode_tok_s": decode_speed(path, windows[0, :32].tolist(), 64, args.repeats, args.threads)}
        print(json.dumps(speeds))
        return
    if args.out is None:
        p.error("--out is required (except with --decode-only)")
    points = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not (args.work / "fp32.gguf").is_file():  # bench_size_ppl checks it against the fp checkpoint
        write_fp32(args.source, args.work / "fp32.gguf")
    for name in args.types.split(","):
        if name in points:
            continue
        path = type_file(args, name)
        points[name] = measure(path, windows, args.threads)
        print(f"{name}: {points[name]['bytes'] / 1e6:.1f} MB, linears {points[name]['linear_bits']:.2f} b/w, "
              f"ppl {points[name]['ppl']:.3f}, {points[name]['decode_tok_s']:.0f} tok/s", flush=True)
        args.out.write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
