"""Instances whose pixels may carry identity: ``refuse(sop_class, burned, name)``.

PS3.15 E.1.1 lets no de-identifier claim it cleaned the pixels: an instance with
BurnedInAnnotation YES, or of a SOP class that carries burned-in text as a rule, is
refused (``DeidentificationRefused``), unless the profile's ``allow-burned-in`` option
says its user takes responsibility. Both paths of the transform give the same texts:
each of several values counts, its padding ignored. Pure.
"""

from __future__ import annotations

from dicomsync.errors import DeidentificationRefused

# SOP classes that carry burned-in text as a rule: the Secondary Capture family and
# ultrasound (PS3.15 E.1.1 lets no de-identifier claim it cleaned their pixels).
CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound (retired)",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame (retired)",
}


_PADDING = "".join(map(chr, range(33)))  # spaces, NULs, control characters


def values_of(text: str) -> list[str]:
    return [v.strip(_PADDING) for v in text.split("\\")]


def refuse(sop_class: str, burned: str, name: str) -> None:
    """``DeidentificationRefused`` for an instance whose pixels may carry identity.
    ``sop_class`` and ``burned`` (BurnedInAnnotation) are their values as text, several
    joined by a backslash; each value counts, its padding (spaces, NULs, control
    characters) ignored."""
    reason = ""
    classes = [c for c in values_of(sop_class) if c in CLASSES]
    if "YES" in (b.upper() for b in values_of(burned)):
        reason = "BurnedInAnnotation is YES"
    elif classes:
        reason = f"its SOP class ({CLASSES[classes[0]]}) often has identity burned in"
    if reason:
        raise DeidentificationRefused(
            f"{name}: not de-identified: {reason}; the profile's 'allow-burned-in' option "
            "sends such instances, if you take responsibility for their pixels"
        )
