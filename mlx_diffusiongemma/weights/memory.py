"""Whether a model's weights fit in this machine's memory."""

from __future__ import annotations

import os


def physical_memory_bytes() -> int | None:
    """Installed RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory_warning(total_bytes: int, *, physical_bytes: int | None = None) -> str | None:
    """A one-line warning when weights of `total_bytes` need more than ~90% of RAM, else None."""
    ram = physical_bytes or physical_memory_bytes()
    if not ram or total_bytes <= 0.9 * ram:
        return None
    return (
        f"the model's weights need {gb(total_bytes)} GB but this machine has {gb(ram)} GB of memory; "
        "expect heavy swapping or a crash, use a 4-bit quantized conversion instead"
    )


def gb(n: float) -> str:
    """Bytes as gigabytes with one decimal, as messages show them."""
    return f"{n / 1e9:.1f}"
