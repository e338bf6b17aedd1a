"""Request body -> image bytes, the same way for every server.

Clients send an image three ways: the raw bytes (``curl -T img.png``, ``Content-Type: image/png``),
a multipart form (``curl -F data=@img.png``) or JSON with the image base64-encoded
(``{"image": "<base64>"}``). :func:`image_from_body` accepts all three. Servers call it through
:func:`branched.serving.extract_image`, which turns its errors into a ``RequestError`` (HTTP 400).
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Mapping, Union

from .errors import ImageError

__all__ = ["Body", "JSON_IMAGE_KEYS", "FORM_IMAGE_FIELDS", "image_from_body", "parse_multipart"]

#: JSON fields that may hold the base64 image, tried in this order.
JSON_IMAGE_KEYS = ("image", "data", "b64")
#: Multipart form fields that hold the image when no part carries a file name.
FORM_IMAGE_FIELDS = ("image", "data", "file", "body")

Body = Union[bytes, bytearray, str, Mapping[str, Any], list]


def image_from_body(body: Body, content_type: str = "") -> bytes:
    """The image bytes a request carries.

    Args:
        body: the request body as bytes; a ``str`` or an already-decoded JSON value (dict/list) is
            also accepted, since some servers (TorchServe) decode JSON and text bodies themselves.
        content_type: the request's ``Content-Type`` header ('' when absent: raw bytes).

    Returns:
        The encoded image (PNG, JPEG, ...); decoding and limits are the preprocessor's job.

    Raises:
        ImageError: a malformed JSON or multipart body, or one without an image in it (HTTP 400).
    """
    mime = (content_type or "").split(";")[0].strip().lower()
    if isinstance(body, (Mapping, list)):
        return _from_json_value(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    body = bytes(body or b"")
    if mime == "application/json" or mime.endswith("+json"):
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ImageError(f"body is not valid JSON ({exc}); send {{\"image\": \"<base64 PNG/JPEG>\"}}") from None
        return _from_json_value(value)
    if mime == "multipart/form-data":
        fields = parse_multipart(body, content_type)
        return _from_form(fields)
    return body


def _from_json_value(value: Any) -> bytes:
    hint = f"send a JSON object with one of the fields {', '.join(JSON_IMAGE_KEYS)} holding the base64 image"
    if not isinstance(value, Mapping):
        raise ImageError(f"JSON body is a {type(value).__name__}; {hint}")
    key = next((k for k in JSON_IMAGE_KEYS if k in value), None)
    if key is None:
        raise ImageError(f"JSON body has no image field; {hint}")
    text = value[key]
    if not isinstance(text, str):
        raise ImageError(f"JSON field {key!r} is a {type(text).__name__}; it must be a base64 string")
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"JSON field {key!r} is not valid base64 ({exc})") from None


def _from_form(fields: list[tuple[str, str | None, bytes]]) -> bytes:
    for name, filename, data in fields:
        if filename:
            return data
    for wanted in FORM_IMAGE_FIELDS:
        for name, _, data in fields:
            if name == wanted:
                return data
    names = ", ".join(repr(n) for n, _, _ in fields) or "none"
    raise ImageError(f"multipart body has no image: send a file part or a field named "
                     f"{' / '.join(FORM_IMAGE_FIELDS)} (fields found: {names})")


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """Split a ``multipart/form-data`` body into ``(field name, file name or None, bytes)``.

    Raises:
        ImageError: no boundary in the content type, or a body that does not follow it.
    """
    boundary = None
    for item in content_type.split(";")[1:]:
        key, _, value = item.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ImageError("multipart/form-data without a boundary in Content-Type; let the client set the header")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise ImageError("multipart body does not contain its boundary; the body is truncated or malformed")
    fields = []
    for chunk in chunks[1:-1]:  # before the first delimiter: preamble; after the last ("--"): epilogue
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ImageError("multipart part without headers; the body is malformed")
        name, filename = None, None
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                for param in value.split(";")[1:]:
                    k, _, v = param.strip().partition("=")
                    if k.lower() == "name":
                        name = v.strip('"')
                    elif k.lower() == "filename":
                        filename = v.strip('"')
        fields.append((name or "", filename, data[:-2] if data.endswith(b"\r\n") else data))
    return fields
