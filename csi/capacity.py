"""Volume sizes: what a CapacityRange asks for, and whether the pool can give it."""

from __future__ import annotations

from csi.errors import InvalidArgumentError, OutOfRangeError
from csi.v1 import csi_pb2

MiB = 1024**2
GiB = 1024**3
# Sizes are whole MiB: the qgroup limit and the block file stay aligned.
ALIGNMENT = MiB
MINIMUM = MiB
DEFAULT = GiB
# The largest whole-MiB size that capacity_bytes (an int64) can carry.
MAXIMUM = (2**63 - 1) // ALIGNMENT * ALIGNMENT


def _round_up(value: int) -> int:
    return -(-value // ALIGNMENT) * ALIGNMENT


def size_for(
    capacity_range: csi_pb2.CapacityRange | None,
    minimum: int = MINIMUM,
    field: str = "capacity_range",
) -> int:
    """The size to provision for a range: at least required, at most limit, whole MiB."""
    required = capacity_range.required_bytes if capacity_range else 0
    limit = capacity_range.limit_bytes if capacity_range else 0
    if required < 0 or limit < 0:
        raise InvalidArgumentError(f"{field}: bytes must not be negative")
    if limit and required > limit:
        raise OutOfRangeError(f"{field}: required_bytes {required} exceeds limit_bytes {limit}")
    if required:
        size = _round_up(max(required, minimum))
    else:
        size = _round_up(max(min(DEFAULT, limit) if limit else DEFAULT, minimum))
    if limit and size > limit:
        size = limit // ALIGNMENT * ALIGNMENT
        if size < max(required, minimum):
            raise OutOfRangeError(
                f"{field}: no size in whole MiB of at least {max(required, minimum)} bytes "
                f"fits below limit_bytes {limit}"
            )
    if size > MAXIMUM:
        raise OutOfRangeError(f"{field}: no volume can hold {size} bytes (at most {MAXIMUM})")
    return size


def expansion_size(capacity_range: csi_pb2.CapacityRange, field: str = "capacity_range") -> int:
    """The size an expansion grows a volume to: what size_for gives, asked with required_bytes."""
    size = size_for(capacity_range, field=field)
    if capacity_range.required_bytes == 0:
        raise InvalidArgumentError(f"{field}.required_bytes: required (the size to grow to)")
    return size


def fits(size: int, capacity_range: csi_pb2.CapacityRange | None) -> bool:
    """Whether an existing volume of `size` satisfies the range (idempotent CreateVolume)."""
    if capacity_range is None:
        return True
    required, limit = capacity_range.required_bytes, capacity_range.limit_bytes
    return size >= required and (not limit or size <= limit)
