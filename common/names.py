"""Names that callers choose and services store (index databases, catalogue categories): one rule.

A name is stored as a key (LMDB keys, snapshot blobs, log records) and shown in messages, so it is
short, printable and unambiguous: letters and digits (any script), the punctuation `_-.:/@+`, and
single spaces inside (detector classes such as "cell phone" are category names); at most
MAX_NAME_BYTES UTF-8 bytes. No gRPC here: callers map InvalidArgument to a status code.
"""

from __future__ import annotations

import re

from common.errors import InvalidArgument, quote

MAX_NAME_BYTES = 128
# A model version names a folder models/<name>/<version>/: a positive integer (18 digits at most).
_VERSION = re.compile(r"[0-9]{1,18}")
ALLOWED_PUNCTUATION = "_-.:/@+"


def check_name(kind: str, value: str) -> None:
    """Raises InvalidArgument, saying what to change, unless `value` is a valid `kind` name
    (e.g. kind="database" or "category")."""
    rule = (
        f"a {kind} name is 1 to {MAX_NAME_BYTES} UTF-8 bytes of letters, digits, single inner spaces "
        f"and {ALLOWED_PUNCTUATION}"
    )
    if not value:
        raise InvalidArgument(f"{kind} is required: {rule}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidArgument(
            f"{kind} name {quote(value)} is {size} UTF-8 bytes, above the limit of {MAX_NAME_BYTES}: {rule}"
        )
    if value != value.strip():
        raise InvalidArgument(f"{kind} name {quote(value)} starts or ends with whitespace: {rule}")
    for position, char in enumerate(value):
        if char.isalnum() or char in ALLOWED_PUNCTUATION:
            continue
        if char == " " and value[position - 1] != " ":
            continue
        what = "a second space in a row" if char == " " else f"character {char!r} (U+{ord(char):04X})"
        raise InvalidArgument(f"{kind} name {quote(value)} has {what} at position {position}: {rule}")


def check_version(field: str, version: str) -> str:
    """`version` (empty: the model's default) unless it is not a positive integer: InvalidArgument."""
    if version and (not _VERSION.fullmatch(version) or int(version) == 0):
        raise InvalidArgument(
            f"{field} {quote(version)} is not a version: send a positive integer (a version folder "
            "models/<name>/<version>/; ListModels lists them), or leave it empty for the default",
            violations=[(field, "not a positive integer")],
        )
    return version
