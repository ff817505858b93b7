"""``python -m bank.chaos``: the command stays; the crash harness is ``bank.tools.chaos``."""

from bank.tools.chaos import main

if __name__ == "__main__":
    raise SystemExit(main())
