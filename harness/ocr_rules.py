"""The OCR task's prompt semantics: which text a prompt asks the image to show.

It sits in the core because the OCR prompt set (which checks every prompt at load time) and the
OCR reward (which scores against it) both need it and must not import each other.
"""

from __future__ import annotations


def ocr_target(prompt: str) -> str:
    """The text inside the prompt's first pair of double quotes (FlowGRPO: ``prompt.split('"')[1]``)."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f'OCR prompt has no "quoted" target text (needs a pair of double quotes): {prompt!r}')
    if not parts[1].replace(" ", ""):
        raise ValueError(f"OCR prompt's first quoted span is empty (or only spaces), nothing to read: {prompt!r}")
    return parts[1]
