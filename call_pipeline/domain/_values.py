"""Small coercions shared by the domain modules.

The API bodies are parsed leniently by the SDK (no type checks) and the CRM columns come back from
pandas as None, NaN or pd.NA interchangeably, so every text field goes through one cleaner.
"""

from __future__ import annotations

import math


def clean_text(value: object) -> str | None:
    """Strip a scalar into text; None, NaN, pd.NA, bools and blank strings become None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        # A numeric id that went through a float column (e.g. 5110.0) must compare as "5110".
        if value.is_integer():
            return str(int(value))
    try:
        # NaN-likes are unequal to themselves; pd.NA refuses bool() instead. Both mean "missing".
        if value != value:
            return None
    except TypeError:
        return None
    text = str(value).strip()
    return text or None
