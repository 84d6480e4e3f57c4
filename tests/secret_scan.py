"""Search files for a seed or key in the encodings a leak would plausibly use (shared by the
privacy tests): raw bytes either endianness, decimal and hex text, base64; ``.pt`` / ``.bin``
zip archives are searched member by member as well."""

from __future__ import annotations

import base64
import json
import os
import zipfile
from collections.abc import Iterator


def seed_encodings(seed: int) -> list[bytes]:
    raw = [seed.to_bytes(8, "big"), seed.to_bytes(8, "little")]
    minimal = seed.to_bytes((seed.bit_length() + 8) // 8, "little", signed=True)
    text = [str(seed), format(seed, "x"), format(seed, "X"), format(seed, "#x")]
    return [*raw, minimal, *(t.encode() for t in text), *(base64.b64encode(r) for r in raw)]


def key_encodings(key: bytes) -> list[bytes]:
    return [
        key,
        key.hex().encode(),
        key.hex().upper().encode(),
        base64.b64encode(key),
        base64.urlsafe_b64encode(key),
        json.dumps(list(key)).encode(),
        ", ".join(map(str, key)).encode(),
    ]


def blobs(root: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """Every file under ``root`` as bytes, plus every member of zip files (``.pt`` pickles)."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                yield path, f.read()
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    for member in archive.namelist():
                        yield f"{path}:{member}", archive.read(member)


def holders(root: str | os.PathLike, encodings: list[bytes]) -> list[str]:
    """The files (or zip members) under ``root`` that hold any of ``encodings``."""
    return [where for where, blob in blobs(root) if any(e in blob for e in encodings)]
