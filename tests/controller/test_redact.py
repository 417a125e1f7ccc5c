"""Credentials in URLs never reach status, Events or logs."""

from __future__ import annotations

import pytest

from kubetune.controller.redact import redact


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("cannot fetch https://alice:s3cr3t@data.example.com/a.jsonl: 403", "s3cr3t"),
        ("cannot fetch https://tok3n@data.example.com/a.jsonl", "tok3n"),
        ("GET https://b.s3.amazonaws.com/d.jsonl?X-Amz-Credential=AKIAX&X-Amz-Signature=abc123"
         "&X-Amz-Expires=60 failed", "abc123"),
        ("https://acct.blob.core.windows.net/c/d.parquet?sv=2022&sig=QWERTY%3D&se=2030", "QWERTY"),
        ("https://storage.googleapis.com/b/o?X-Goog-Signature=f00d&X-Goog-Date=1", "f00d"),
        ("https://api.example.com/v1/data?token=zz9&page=2", "zz9"),
    ],
)  # fmt: skip
def test_credentials_are_hidden_and_the_rest_kept(text: str, secret: str) -> None:
    hidden = redact(text)
    assert secret not in hidden and "***" in hidden
    assert (
        "example.com" in hidden
        or "amazonaws" in hidden
        or "windows" in hidden
        or ("googleapis" in hidden)
    )


def test_plain_text_and_urls_without_credentials_are_unchanged() -> None:
    for text in ("no such file: /data/a.jsonl", "https://huggingface.co/org/model?revision=main",
                 "see https://example.com/path#frag"):  # fmt: skip
        assert redact(text) == text
