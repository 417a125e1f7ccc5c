"""Credentials out of what the operator writes: a trainer's error may quote a dataset or model
URL, and status, Events and logs are read far more widely than the Secret it came from.

Two shapes are hidden: user information in a URL (`https://user:password@host/`) and the
query parameters that carry a signature or token in pre-signed URLs (S3, GCS, Azure SAS) and
token-in-URL APIs.
"""

from __future__ import annotations

import re

HIDDEN = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@")
_SECRET_PARAMS = (
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
    "x-goog-credential", "signature", "sig", "token", "access_token", "api_key", "apikey",
    "key", "password", "secret",
)  # fmt: skip
_QUERY = re.compile(
    r"(?P<name>[?&](?:" + "|".join(re.escape(p) for p in _SECRET_PARAMS) + r")=)[^&\s\"'#]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with URL credentials and signed-query values replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", text)
    return _QUERY.sub(lambda m: f"{m['name']}{HIDDEN}", text)
