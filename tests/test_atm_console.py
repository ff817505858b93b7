"""``atm.console`` at a real terminal (a pseudo-terminal): what the screen is left with."""

from __future__ import annotations

import io
import os

from atm.console import TerminalConsole


async def test_ctrl_d_at_a_terminal_prompt_ends_the_line_at_once() -> None:
    """Whatever follows (the shell's prompt, when the ATM exits without another word)
    starts on a line of its own."""
    main_fd, terminal_fd = os.openpty()
    out = io.StringIO()
    console = TerminalConsole(fd=terminal_fd, out=out)
    os.write(main_fd, b"\x04")  # Ctrl-D at the start of a line: end of input
    assert await console.read_line("Account number (AA-NNNNN): ") is None
    assert out.getvalue() == "Account number (AA-NNNNN): \n"
    console.write("Goodbye.")
    assert out.getvalue() == "Account number (AA-NNNNN): \nGoodbye.\n"  # no blank line
    os.close(terminal_fd)
    os.close(main_fd)
