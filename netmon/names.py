"""Names the kernel hands over as bytes (a process's comm, a unix socket path) and how
they are shown: in answers, on a terminal, in the log.

Any process can name itself anything, invalid UTF-8 and control characters included.
shown() is the text answers carry: UTF-8, each byte that is not UTF-8 as \\xNN and a
backslash doubled, so that name_bytes() turns it back into exactly the same bytes: the
form a name takes in an answer works as a filter. visible() additionally escapes control
characters, for a terminal or a log line (as ls and ps do): a name cannot clear the
screen or fake a line.
"""
from __future__ import annotations

import re

_ESCAPE = re.compile(rb"\\(\\|x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4})")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def shown(raw: bytes) -> str:
    """Kernel bytes as answer text; name_bytes() undoes it."""
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _unescape(m: re.Match) -> bytes:
    code = m.group(1)
    if code == b"\\":
        return code
    if code[:1] == b"x":
        return bytes([int(code[1:], 16)])
    return chr(int(code[1:], 16)).encode("utf-8", "surrogatepass")


def name_bytes(text: str) -> bytes:
    """The bytes a shown (or visible) name stands for: \\\\ a backslash, \\xNN a byte,
    \\uNNNN a character; any other backslash is itself. UnicodeEncodeError for a lone
    surrogate, which no name holds."""
    return _ESCAPE.sub(_unescape, text.encode())


def visible(text: str) -> str:
    """text for a terminal or a log: control characters (C0, DEL, C1) escaped, as \\xNN
    when they are one byte of UTF-8, else \\u00NN; name_bytes() still undoes it."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if m.group() < "\x80"
                        else f"\\u{ord(m.group()):04x}", text)
