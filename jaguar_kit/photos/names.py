"""Names of individuals and groups: one spelling per name, and one safe path component per name.

Why two steps: an identity is *what* an animal is called, so it is compared after Unicode NFC
normalisation (a folder name from macOS arrives decomposed, ``Jose`` + combining accent, while
the same name typed in a CSV is composed) and with its whitespace trimmed and collapsed
(``"Bob "`` is ``Bob``). A path made from a name is another matter: any name may become a
folder or file name, so :func:`safe_component` turns it into one harmless component (no
separators, no ``..``, no control characters, no leading dot, no name Windows reserves, a
bounded length), whatever the user typed.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_SPACES = re.compile(r"\s+")
# Separators and the characters Windows refuses in names, plus every control character.
_UNSAFE = re.compile(r'[/\\<>:"|?*\x00-\x1f\x7f]')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_COMPONENT_BYTES = 120  # well under the 255 bytes file systems allow, leaving room for suffixes


def few(names: list[str], n: int = 3) -> str:
    """The first ``n`` of ``names``, for a one-line message (``a, b, c, ...``)."""
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def normalise_name(raw: str) -> str:
    """The one spelling of a name: Unicode NFC, trimmed, inner whitespace runs as one space."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", raw)).strip()


def short_digest(text: str, n: int = 8) -> str:
    """A short stable digest of ``text`` (to tell apart names that sanitise alike)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def _truncate_bytes(text: str, limit: int) -> str:
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def safe_component(name: str, keep_suffix: bool = False, max_bytes: int = MAX_COMPONENT_BYTES) -> str:
    """``name`` as one file or folder name that cannot leave the folder it is joined to.

    Separators, Windows-forbidden and control characters become ``_``; leading dots and
    trailing dots or spaces go (``..`` is never a component, nothing becomes hidden);
    Windows' reserved device names get a ``_`` prefix; the result is NFC and at most
    ``max_bytes`` bytes of UTF-8 (``keep_suffix``: a file's extension survives the cut).
    Different names may give the same component: callers that need distinct ones add a
    suffix (see :func:`short_digest`).
    """
    text = _UNSAFE.sub("_", normalise_name(name))
    text = text.lstrip(". ").rstrip(". ")
    stem, dot, suffix = text.rpartition(".") if keep_suffix and "." in text else (text, "", "")
    suffix = _truncate_bytes(suffix, 16)  # a long "extension" is not one
    stem = _truncate_bytes(stem, max_bytes - len((dot + suffix).encode())).rstrip(". ")
    if not stem:
        stem = "_"
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = "_" + stem
    return stem + dot + suffix


__all__ = ["few", "normalise_name", "safe_component", "short_digest"]
