"""Status codes: the one byte that starts every reply and every ERROR frame.

Where ISO 8583 (field 39, response code) has an equivalent, our byte value is that code
read as a decimal number, so "Insufficient funds (51)" means the same thing to a bank
person as to our code. Codes of our own start at 0xA0 (160), outside ISO's numeric range.
"""

from enum import IntEnum


class Status(IntEnum):
    APPROVED = 0
    INVALID_TRANSACTION = 12
    INVALID_AMOUNT = 13
    FORMAT_ERROR = 30
    INSUFFICIENT_FUNDS = 51
    INCORRECT_PIN = 55
    EXCEEDS_WITHDRAWAL_LIMIT = 61
    EXCEEDS_FREQUENCY_LIMIT = 65
    """ISO's "exceeds withdrawal frequency limit", the code processors use for velocity
    limits: here, a source account's transfers locked by transfers to no account (spec
    §3.18). Sent only to a client that announced ``Feature.FREQUENCY_LIMIT``."""
    PIN_TRIES_EXCEEDED = 75
    INVALID_TO_ACCOUNT = 76
    ISSUER_UNAVAILABLE = 91
    DUPLICATE_TRANSMISSION = 94
    SYSTEM_MALFUNCTION = 96
    ACCOUNT_IN_USE = 0xA0
    NOT_LOGGED_IN = 0xA1
    ALREADY_LOGGED_IN = 0xA2
    SERVER_BUSY = 0xA3
    UNSUPPORTED_VERSION = 0xA4
    UNKNOWN_SESSION = 0xA5
    SAME_ACCOUNT = 0xA6
    PIN_NOT_ALLOWED = 0xA7


ISO8583_RESPONSE_CODE: dict[Status, str] = {
    Status.APPROVED: "00",
    Status.INVALID_TRANSACTION: "12",
    Status.INVALID_AMOUNT: "13",
    Status.FORMAT_ERROR: "30",
    Status.INSUFFICIENT_FUNDS: "51",
    Status.INCORRECT_PIN: "55",
    Status.EXCEEDS_WITHDRAWAL_LIMIT: "61",
    Status.EXCEEDS_FREQUENCY_LIMIT: "65",
    Status.PIN_TRIES_EXCEEDED: "75",
    Status.INVALID_TO_ACCOUNT: "76",
    Status.ISSUER_UNAVAILABLE: "91",
    Status.DUPLICATE_TRANSMISSION: "94",
    Status.SYSTEM_MALFUNCTION: "96",
}
"""The ISO 8583 field 39 code each status corresponds to; our own codes have none."""
