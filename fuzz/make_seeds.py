#!/usr/bin/env python3
"""Write the committed seed corpus of the gguf_parse fuzz target (small valid GGUF files
written by the `gguf` package): metadata of every value type, one small tensor of every
type mlx-native reads, and a file with a custom alignment.

    pip install gguf numpy && python3 fuzz/make_seeds.py
"""

from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

OUT = Path(__file__).resolve().parent / "seeds/gguf_parse"
TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def write(name, build, **kw):
    path = OUT / name
    w = gguf.GGUFWriter(str(path), arch="seed", **kw)
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{path}: {path.stat().st_size} bytes")


def metadata(w):
    w.add_uint8("s.u8", 1)
    w.add_int8("s.i8", -1)
    w.add_uint16("s.u16", 2)
    w.add_int16("s.i16", -2)
    w.add_uint32("s.u32", 3)
    w.add_int32("s.i32", -3)
    w.add_float32("s.f32", 0.5)
    w.add_bool("s.bool", False)
    w.add_string("s.str", "x")
    w.add_uint64("s.u64", 4)
    w.add_int64("s.i64", -4)
    w.add_float64("s.f64", 0.25)
    w.add_array("s.strs", ["a", "b"])
    w.add_array("s.nested", [[1], [2, 3]])
    w.add_tensor("t", np.arange(4, dtype=np.float32).reshape(2, 2))


def one_block_each(w):
    rng = np.random.default_rng(1)
    for qtype in TYPES:
        elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        n = max(elems, 4)
        raw = rng.integers(0, 256, size=(1, n // elems * nbytes), dtype=np.uint8)
        w.add_tensor(qtype.name.lower(), raw, raw_dtype=qtype)


def aligned(w):
    w.add_custom_alignment(64)
    w.add_tensor("a", np.ones(3, dtype=np.float16))
    w.add_tensor("b", np.ones(5, dtype=np.float32))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    write("metadata.gguf", metadata)
    write("blocks.gguf", one_block_each)
    write("aligned.gguf", aligned)


if __name__ == "__main__":
    main()
