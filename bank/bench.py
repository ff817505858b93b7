"""``python -m bank.bench``: the command stays; the load tool is ``bank.tools.bench``."""

from bank.tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
