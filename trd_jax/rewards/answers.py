"""Final-answer extraction shared by the graders: the content of the last ``\\boxed{...}`` (or ``\\fbox``)."""

from __future__ import annotations

_MARKERS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, braces balanced (so
    ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); None when there is none or it is never closed."""
    start = max(text.rfind(m) for m in _MARKERS)
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0 or text[start:open_at].strip() not in _MARKERS:
        return None
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i].strip()
    return None
