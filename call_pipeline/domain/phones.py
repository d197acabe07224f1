"""Phone numbers as the CRM and OutboundBot write them, reduced to one comparable form."""

from __future__ import annotations

import re
import unicodedata

from call_pipeline.domain._values import clean_text

_NON_DIGITS = re.compile(r"[^0-9]")
# How numbers arrive masked (`138****8888`, as the API's own examples show): star-like characters
# (NFKC folds the full-width ＊), or a run of x's, ×'s or #'s standing for digits.
_MASK = re.compile(r"[*∗⁎✱•●]|[xX×#]{2,}")


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


def is_masked_phone(raw: object) -> bool:
    """Whether the number has digits hidden (`138****8888`): its digits are not the number."""
    text = clean_text(raw)
    return text is not None and _MASK.search(unicodedata.normalize("NFKC", text)) is not None


def phone_key(raw: object) -> str | None:
    """The form two numbers are matched by: `normalize_phone`, and None for a masked number, so
    that it matches nobody (its remaining digits would match the wrong person)."""
    return None if is_masked_phone(raw) else normalize_phone(raw)


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
