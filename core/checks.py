"""Type checks every layer's validation shares (the Serve config, the API parsers, load-test scenarios)."""
from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An int and not a bool (JSON's true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool: NaN and ±Inf are not numbers a request may carry."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
