"""Phone numbers as the CRM and OutboundBot write them, reduced to one comparable form."""

from __future__ import annotations

import re
import unicodedata

from call_pipeline.domain._values import clean_text

_NON_DIGITS = re.compile(r"[^0-9]")


def normalize_phone(raw: object) -> str | None:
    """Digits only, without the Chinese country code; None when nothing is left.

    `0086` is always a country prefix. A bare `86` is dropped only in front of an 11-digit mobile
    (13 digits starting `861`), because a domestic number may itself start with 86.
    """
    text = clean_text(raw)
    if text is None:
        return None
    # NFKC folds full-width digits (１３８…), which CRM forms typed on Chinese keyboards contain.
    digits = _NON_DIGITS.sub("", unicodedata.normalize("NFKC", text))
    if digits.startswith("0086"):
        digits = digits[4:]
    elif len(digits) == 13 and digits.startswith("861"):
        digits = digits[2:]
    return digits or None


def mask_phone(raw: object) -> str:
    """A phone number fit for logs: `138****0001`, or only the last two digits of a short one."""
    digits = normalize_phone(raw)
    if digits is None:
        return "<no phone>"
    if len(digits) >= 8:
        return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]
    if len(digits) <= 2:
        return "*" * len(digits)
    return "*" * (len(digits) - 2) + digits[-2:]
