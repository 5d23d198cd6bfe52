"""Keyed, repeatable remapping: UIDs, per-patient date offsets and pseudonyms from one secret.

Everything is HMAC-SHA256 with the profile's secret, over a purpose prefix and the
original value, so the same input and secret always give the same output (re-sends,
late instances and a second route agree) and another secret gives other values. The
secret is held only here, never printed: ``repr`` names no secret. Thread-safe.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re

# DICOM's own UIDs (SOP classes, transfer syntaxes, coding schemes) are public: kept.
DICOM_ROOT = "1.2.840.10008."
MAX_DATE_SHIFT_DAYS = 3650
_UID = re.compile(r"[0-9.]{1,64}")


class Keys:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        # bounded: holds() maps a study's UIDs twice per send; one study fits
        self.uid = functools.lru_cache(maxsize=8192)(self._uid)

    def __repr__(self) -> str:
        return "<Keys>"

    def _digest(self, purpose: bytes, value: str) -> bytes:
        return hmac.new(self._secret, purpose + value.encode("utf-8"), hashlib.sha256).digest()

    def _uid(self, uid: str) -> str:
        """``2.25.<int>``: a version-8 UUID made of the HMAC of the original UID."""
        if not uid or (uid.startswith(DICOM_ROOT) and _UID.fullmatch(uid)):
            return uid  # DICOM's own; anything else (text in a DICOM root too) is remapped
        raw = bytearray(self._digest(b"uid\0", uid)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (RFC 9562: custom)
        raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC variant
        return f"2.25.{int.from_bytes(raw, 'big')}"

    def date_offset(self, patient_id: str) -> int:
        """Days every date of this patient moves back: 1 to 3,650, the same for all its studies."""
        raw = self._digest(b"date-offset\0", patient_id)
        return int.from_bytes(raw[:8], "big") % MAX_DATE_SHIFT_DAYS + 1

    def pseudonym(self, patient_id: str) -> str:
        """A keyed-derived pseudonym: ``DS`` and 20 base-32 letters and digits."""
        raw = self._digest(b"patient\0", patient_id)
        return "DS" + base64.b32encode(raw).decode("ascii")[:20]
