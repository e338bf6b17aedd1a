"""Request bodies -> image bytes (branched.body / branched.serving.extract_image), shared by both servers."""
import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from branched.errors import RequestError
from branched.serving import extract_image


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _multipart(files, data=None):
    req = requests.Request("POST", "http://127.0.0.1/", files=files, data=data).prepare()
    return req.body, req.headers["Content-Type"]


def test_raw_multipart_and_json_bodies(png):
    assert extract_image(png, "") == png
    assert extract_image(png, "image/png") == png
    # A file part among text fields; a field named "image" without a file name.
    assert extract_image(*_multipart({"data": ("a.png", png, "image/png")}, {"threshold": "0.5"})) == png
    assert extract_image(*_multipart({"image": (None, png)}, {"budget": "0.4"})) == png
    b64 = base64.b64encode(png).decode()
    assert extract_image(json.dumps({"image": b64}).encode(), "application/json; charset=utf-8") == png
    assert extract_image(json.dumps({"b64": "data:image/png;base64," + b64}), "application/json") == png
    assert extract_image({"data": b64}, "") == png  # TorchServe hands JSON bodies over decoded


@pytest.mark.parametrize("body, content_type, match", [
    (b"{not json", "application/json", "not valid JSON"),
    (b"[1, 2]", "application/json", "JSON body is a list"),
    (b'{"picture": "AAAA"}', "application/json", "no image field"),
    (b'{"image": 5}', "application/json", "base64 string"),
    (b'{"image": "@@@"}', "application/json", "not valid base64"),
    (b"--x\r\n", "multipart/form-data", "without a boundary"),
    (b"no delimiter here", "multipart/form-data; boundary=xyz", "does not contain its boundary"),
])
def test_bad_bodies_are_400(body, content_type, match):
    with pytest.raises(RequestError, match=match) as info:
        extract_image(body, content_type)
    assert info.value.status == 400


def test_multipart_without_image_field():
    body, ctype = _multipart({"threshold": (None, b"0.5")})
    with pytest.raises(RequestError, match="no image.*'threshold'"):
        extract_image(body, ctype)
