#!/usr/bin/env python3
"""Writes the safetensors fixtures read by tests/test_safetensors.cpp and the fuzz seeds.

Files are written by Hugging Face's own `safetensors` package, so that the C++
reader is checked against the reference writer (and our writer against its bytes).
CI does not run this script; the outputs are committed. Rerunning it reproduces
them byte for byte.

    python3 -m venv /tmp/stenv
    /tmp/stenv/bin/pip install safetensors==0.8.0 numpy==2.4.6
    /tmp/stenv/bin/python tests/data/safetensors/make_fixtures.py   # from the repository root

Outputs (see README.md next to this script for every value):
  tests/data/safetensors/python_values.safetensors   every dtype the C++ side converts, plus
                                                      BOOL, a scalar, a zero-size and a rank-5 tensor
  tests/data/safetensors/python_writer_match.safetensors
                                                      tensors skillgraft's writer can produce; the C++
                                                      test rewrites them and compares the bytes
  tests/fuzz/corpus/*.safetensors                     small seeds for the header fuzzer
"""
import os
import struct

import numpy as np
import safetensors
from safetensors import TensorSpec, serialize, serialize_file

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "fuzz", "corpus")


def spec(array, dtype=None):
    """A TensorSpec for a little-endian numpy array; dtype overrides the header dtype (for BF16)."""
    array = np.require(array, requirements="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    assert array.dtype.byteorder in ("<", "=", "|")
    return TensorSpec(dtype=dtype or array.dtype.name, shape=array.shape,
                      data_ptr=array.ctypes.data, data_len=array.nbytes), array


def write(path, tensors, metadata):
    """tensors: {name: (array, header dtype or None)}."""
    keep = {}
    specs = {}
    for name, (array, dtype) in tensors.items():
        specs[name], keep[name] = spec(array, dtype)
    serialize_file(specs, path, metadata=metadata)


def bf16_round_nearest_even(values):
    """float32 -> bfloat16 bits, round to nearest even (the classic integer formula; finite inputs)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def main():
    f16_bits = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x3C01, 0xC000,
                         0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x3555, 0xFBFF], dtype=np.uint16)
    bf16_bits = np.array([0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x4049, 0xC0A0,
                          0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x3EAB, 0xFF7F], dtype=np.uint16)
    values = {
        "f32.matrix": (np.array([[1.5, -2.25, 1e-40], [3.4028234663852886e38, -0.0, np.inf]], np.float32), None),
        "f16.specials": (f16_bits.view(np.float16), None),
        "bf16.specials": (bf16_bits, "bfloat16"),
        "f64.values": (np.array([0.1, -1e300, 5e-324], np.float64), None),
        "i64.ids": (np.array([[1, -100, 2**40], [0, 2**63 - 1, -2**63]], np.int64), None),
        "i32.ids": (np.array([7, -1, 2**31 - 1, -2**31], np.int32), None),
        "u8.bytes": (np.array([0, 7, 255], np.uint8), None),
        "bool.flags": (np.array([True, False], np.bool_), None),
        "scalar": (np.array(2.5, np.float32), None),
        "empty": (np.zeros((0, 3), np.float32), None),
        "rank5": (np.arange(2, dtype=np.float32).reshape(1, 1, 1, 2, 1), None),
    }
    write(os.path.join(HERE, "python_values.safetensors"), values,
          # One key only: the Rust writer orders metadata by a randomly seeded hash.
          {"note": "h\u00e9llo \"quoted\"\n"})

    # What skillgraft's writer produces from float/double tensors and int64 ids. The
    # 16-bit values are rounded here (numpy for F16, the integer formula for BF16),
    # independently of the C++ rounding they are compared with.
    rounded = np.array([0.1, 65519.0, 1e-7, -3.0e-5, 1.0 + 2.0**-11, 65520.0], np.float32)
    with np.errstate(over="ignore"):  # 65520 rounds to infinity in F16, on purpose
        half = rounded.astype(np.float16)
    match = {
        "model.embed.weight": (np.array([[0.25, -1.0, 3.0], [1e-3, 7.5, -0.0]], np.float32), None),
        "double.weight": (np.array([0.1, -2.0 / 3.0], np.float64), None),
        "half.weight": (half, None),
        "bf16.weight": (bf16_round_nearest_even(rounded), "bfloat16"),
        "input_ids": (np.array([[3, 1], [4, -100]], np.int64), None),
        "step": (np.array(1234, np.int64), None),
    }
    write(os.path.join(HERE, "python_writer_match.safetensors"), match, {"format": "pt"})

    # Fuzz seeds: small valid files and a few of the shapes the parser must reject.
    os.makedirs(CORPUS, exist_ok=True)
    write(os.path.join(CORPUS, "valid_mixed.safetensors"),
          {"a": (np.array([1.0, 2.0], np.float32), None), "b": (np.array([1], np.int64), None),
           "c": (np.array([0x3F80], np.uint16), "bfloat16"), "d": (np.array(1.0, np.float16), None)},
          {"k": "v"})
    write(os.path.join(CORPUS, "valid_empty.safetensors"), {}, None)
    write(os.path.join(CORPUS, "valid_zero_size.safetensors"),
          {"z": (np.zeros((0, 2), np.float32), None), "u": (np.array([9], np.uint32), None)}, None)

    def raw(name, header, data=b""):
        with open(os.path.join(CORPUS, name), "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + data)
    raw("invalid_gap.safetensors", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8))
    raw("invalid_escapes.safetensors",
        b'{"__metadata__":{"\\u00e9\\ud83d\\ude00":"x"},"a":{"dtype":"I8","shape":[2],"data_offsets":[0,2],'
        b'"extra":[1.5e3,-0,true,null,{}]}}', bytes(2))

    for folder in (HERE, CORPUS):
        for name in os.listdir(folder):
            if name.endswith(".safetensors"):
                os.chmod(os.path.join(folder, name), 0o644)
    print("safetensors", safetensors.__version__, "numpy", np.__version__)


if __name__ == "__main__":
    main()
