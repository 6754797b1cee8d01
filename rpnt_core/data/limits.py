"""Size limits on what a file from elsewhere may declare, checked before anything is inflated.

Shared by the NPZ reader (zip entries and ``.npy`` headers) and the NWB reader (HDF5 datasets and
the binned arrays it would make); the service's upload limits print sizes the same way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["array_bytes", "check_limit", "describe_bytes"]


def describe_bytes(n: int) -> str:
    """``n`` bytes for a person: ``"512 MB"``, ``"2.2 GB"`` (binary units: 1 MB = 2**20 bytes)."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def check_limit(field: str, n: int, max_bytes: int | None, what: str = "declares {} uncompressed") -> None:
    """Refuse ``n`` bytes over ``max_bytes``.

    Args:
        field: what the error message starts with.
        n: the declared size in bytes.
        max_bytes: the limit; ``None`` means no limit.
        what: what the bytes are, ``{}`` standing for their amount.
    Raises:
        ValueError: ``"<field>: <what>, over the <limit> limit"`` when ``n > max_bytes``.
    """
    if max_bytes is not None and n > max_bytes:
        raise ValueError(
            f"{field}: {what.format(describe_bytes(n))}, over the {describe_bytes(max_bytes)} limit"
        )


def array_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes an array of ``shape`` and ``dtype`` holds (shape × itemsize, no overflow)."""
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n
