"""Dollar text to integer cents and back, exactly: money never passes through float.

Shared by the ATM (what a customer types) and the bank's account import
(the course's ``accounts.txt``), so both read "$1,024.32" the same way.
"""

import re

_DOLLARS = re.compile(
    r"""\$?
    (?P<whole>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)?   # 1,000 or 1000, or nothing for ".50"
    (?:\.(?P<cents>[0-9]{1,2}))?                  # at most two decimals
    """,
    re.VERBOSE | re.ASCII,
)


def parse_dollars(text: str) -> int:
    """Cents in ``text`` such as ``20``, ``20.5``, ``$1,000.00`` or ``.75``.

    Raises ValueError for anything else: a sign, letters, three decimals, an empty
    string. Zero is allowed here; whether it is a valid amount is the caller's rule.
    """
    match = _DOLLARS.fullmatch(text.strip())
    if match is None or (match["whole"] is None and match["cents"] is None):
        raise ValueError(f"not a dollar amount with at most two decimals: {text!r}")
    whole = int((match["whole"] or "0").replace(",", ""))
    cents = int((match["cents"] or "0").ljust(2, "0"))
    return whole * 100 + cents


def format_cents(cents: int) -> str:
    """``123456`` -> ``$1,234.56``; negative amounts get a leading minus sign."""
    sign = "-" if cents < 0 else ""
    whole, rest = divmod(abs(cents), 100)
    return f"{sign}${whole:,}.{rest:02d}"
