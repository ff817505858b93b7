"""Hard bounds of the bank's storage, which its settings must stay within.

A module of its own so that ``bank.config`` can check a setting against them without
importing the storage, while the storage takes every setting from its caller: the
dependency runs one way, and the settings' defaults live only in ``ServerConfig``.
"""

LOCKOUT_MS_MAX = 365 * 24 * 60 * 60 * 1000
"""The longest PIN lockout the storage accepts: one year (365 days), in milliseconds.

A lock ends at ``now_ms + lockout_ms``, stored in a signed 64-bit SQLite INTEGER; an
unbounded lockout overflows it: every wrong PIN then fails to be recorded (unlimited
guessing) and takes its whole batch down with it. With one year that sum stays more
than 30,000 times below 2**63 even for a clock in the year 9999, so no setting can
overflow. A year is also as long as a timed lock usefully lasts: a longer one is in
effect permanent, and lifting it is then the operator's job (``python -m bank unlock``),
while any shorter period an operator might want still fits."""
