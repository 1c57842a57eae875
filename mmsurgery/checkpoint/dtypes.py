"""Names of tensor dtypes as safetensors stores them and as mmsurgery reports them.

Kept free of torch so that reading a safetensors header (and `mmsurgery inspect` on one) never imports it.
"""

from __future__ import annotations

__all__ = ["FLOATING", "FOLD_DTYPES", "ITEMSIZE", "NAME_TO_CODE", "SAFETENSORS_DTYPES", "torch_dtype_name"]

# safetensors code -> (report name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
}

NAME_TO_CODE = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}
ITEMSIZE = {name: size for name, size in SAFETENSORS_DTYPES.values()}
FLOATING = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})


def torch_dtype_name(dtype: object) -> str:
    """`torch.float32` -> `"float32"` without importing torch here."""
    return str(dtype).removeprefix("torch.")


# What `fold --dtype` (and verify's weights stage) may cast floating-point tensors to; "keep" leaves them as stored.
FOLD_DTYPES = ("keep", "float32", "bfloat16", "float16")
