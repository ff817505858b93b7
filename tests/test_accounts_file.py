"""The course's accounts.txt format: parsing, canonical accounts, and bad-line reports.

Every bad line is reported with its number in one exception, and no message or repr
ever contains a PIN.
"""

from pathlib import Path

import pytest

from bank.accounts_file import AccountRecord, AccountsFileError, parse_accounts, read_accounts

GOOD = """\
# account, PIN, opening balance
ac-12345, 1324, 1024.32

  WF-14351 ,9834,   5428.22   # trailing comment
zz-99999,9999,$655.35
BC-01373, 2947, .5
TN-13731, 2435, 0
"""


def test_good_file_parses_in_order_with_canonical_accounts():
    records = parse_accounts(GOOD)
    assert [(r.account, r.pin, r.balance_cents) for r in records] == [
        ("AC-12345", "1324", 102_432),
        ("WF-14351", "9834", 542_822),
        ("ZZ-99999", "9999", 65_535),
        ("BC-01373", "2947", 50),
        ("TN-13731", "2435", 0),
    ]
    assert [r.line_number for r in records] == [2, 4, 5, 6, 7]


def test_empty_and_comment_only_files_have_no_records():
    assert parse_accounts("") == []
    assert parse_accounts("# nothing\n\n   \n# here\n") == []


def test_read_accounts_from_a_file(tmp_path: Path):
    path = tmp_path / "accounts.txt"
    path.write_text(GOOD)
    assert len(read_accounts(path)) == 5


def test_pin_is_not_in_the_repr():
    record = parse_accounts("AC-12345, 1324, 1.00")[0]
    assert "1324" not in repr(record)
    assert record == AccountRecord("AC-12345", "1324", 100, 1)


BAD_LINES = {
    "AC-1234, 1324, 1.00": "AA-NNNNN",
    "AC-12345, 132, 1.00": "4 digits",
    "AC-12345, 13245, 1.00": "4 digits",
    "AC-12345, 1324, -1.00": "dollar amount",
    "AC-12345, 1324, 1.005": "dollar amount",
    "AC-12345, 1324, 1e3": "dollar amount",
    "AC-12345, 1324": "3 comma-separated fields",
    "AC-12345, 1324, 1, 000.00": "3 comma-separated fields",
    "AC-12345 1324 1.00": "3 comma-separated fields",
    "AC-12345, 1324, 99999999999999999999": "largest balance",
}


@pytest.mark.parametrize(("line", "message"), BAD_LINES.items())
def test_bad_line_is_reported_with_its_number(line: str, message: str):
    with pytest.raises(AccountsFileError) as caught:
        parse_accounts(f"# header\nTN-13731, 2435, 1.00\n{line}\n")
    assert caught.value.problems == [(3, caught.value.problems[0][1])]
    assert message in caught.value.problems[0][1]
    assert "<accounts>:3:" in str(caught.value)


def test_all_bad_lines_are_reported_at_once():
    text = "\n".join(BAD_LINES) + "\nAC-12345, 1324, 1.00\nac-12345, 1111, 2.00\n"
    with pytest.raises(AccountsFileError) as caught:
        parse_accounts(text, source="accounts.txt")
    numbers = [number for number, _ in caught.value.problems]
    assert numbers == [*range(1, len(BAD_LINES) + 1), len(BAD_LINES) + 2]
    assert "already defined on line" in caught.value.problems[-1][1]
    assert "accounts.txt:1:" in str(caught.value)


def test_no_pin_appears_in_error_messages():
    text = (
        "AC-12345, 13x4, 1.00\nAC-12345 7777 1.00\nAC-12345, 8888, bad\n"
        "6666, AC-12345, 1.00\nAC-12345, 1.00, 5555x\n"
    )
    with pytest.raises(AccountsFileError) as caught:
        parse_accounts(text)
    assert len(caught.value.problems) == 5
    for pin in ("13x4", "7777", "8888", "6666", "5555"):
        assert pin not in str(caught.value)
