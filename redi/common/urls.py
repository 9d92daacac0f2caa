"""What is a URL (as opposed to a path on this machine), and a URL made safe to print."""
from __future__ import annotations

import re
from pathlib import Path

from redi.common.errors import UserError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    """Whether `text` names something by URL (s3://, http(s)://, file://, …) rather than a local path."""
    return _SCHEME.match(text) is not None


def redact(text: str) -> str:
    """`text` with the user info (user:password@) and the query strings of its URLs removed."""
    text = re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*@", r"\1", text)
    return re.sub(r"(://[^\s?]*)\?[^\s'\"]*", r"\1", text)


def local_path(text: str | Path, flag: str) -> Path:
    """The value of a flag that names a path on this machine (a run directory, an output folder); a URL is one
    sentence, where a Path would turn it into a local folder named after the URL (`redi publish` writes to URLs)."""
    text = str(text)
    if is_url(text) and not text.startswith("file://"):
        raise UserError(f"{flag} {redact(text)} is a URL, but {flag} is a path on this machine's disk.")
    return Path(text.removeprefix("file://"))
