"""The bad-input corpus: requests that are malformed, oversized or unusual, and what each server answers.

Every :class:`Case` builds its body at test time (deterministically, from fixed seeds or the bundled
MNIST test split), so nothing large is committed. ``tests/test_reliability.py`` sends every case to a
real TorchServe and a real Ray Serve and checks the status and the message; the README's table
("Reliability and security" / "Bad input") is this list.

What a TorchServe / torchvision user should expect:
- genuinely bad input (no image, a broken image, a body or an image over the limits, malformed JSON
  or base64, a malformed or out-of-range threshold) -> 4xx with ``{"error": "<why>", "status": 4xx}``;
- a valid image in an unusual form (grayscale, palette, CMYK, RGBA, 16-bit, a PNG labelled
  ``image/jpeg`` or ``text/plain``) -> 200 with the same answer as that image converted to 8-bit RGB
  (``same_as``): MNIST itself is grayscale, and PIL and torchvision identify images by their bytes.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from PIL import Image

from branched.build.datasets import load_split
from branched.preprocess import ImageLimits

__all__ = ["Case", "CASES", "SERVERS", "png", "jpeg", "digit", "bomb_png", "b64_json"]

#: Server names a case's expectation may differ by.
SERVERS = ("torchserve", "ray")
MB = 1024 * 1024


# -- image builders --------------------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    return _encode(img, "PNG")


def jpeg(img: Image.Image) -> bytes:
    return _encode(img, "JPEG", quality=90)


@functools.lru_cache(maxsize=1)
def _digits():
    return load_split("mnist5k", "test")


def digit(i: int = 0) -> np.ndarray:
    """MNIST test digit ``i`` (28x28 uint8, grayscale) from the bundled offline dataset."""
    return np.asarray(_digits().images[i])


def _noise(seed: int, h: int, w: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def bomb_png(width: int, height: int, rows: Optional[int] = None) -> bytes:
    """An 8-bit grayscale PNG of ``width x height`` black pixels, compressed row by row.

    Args:
        rows: rows of pixel data actually written (None: all of them); fewer makes a file that only
            *declares* a huge image. A server that decoded it before checking the header would spend
            ``width x height`` bytes of memory, or answer "truncated" instead of the pixel limit.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    data = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def b64_json(data: bytes, key: str = "image") -> bytes:
    return json.dumps({key: base64.b64encode(data).decode()}).encode()


_BOUNDARY = "corpus-boundary-7f3a"


def _form_without_image() -> bytes:
    """A well-formed multipart body whose only field is a threshold (boundary: ``_BOUNDARY``)."""
    return (f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"threshold\"\r\n\r\n0.5\r\n"
            f"--{_BOUNDARY}--\r\n").encode()


def _rgba() -> Image.Image:
    rgb = _noise(3, 24, 24)
    alpha = np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (24, 1))  # transparent .. opaque
    return Image.fromarray(np.dstack([rgb, alpha]))


def _palette() -> Image.Image:
    return Image.fromarray(_noise(4, 24, 24)).quantize(16)


# -- the corpus ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One request of the corpus and what the servers must answer.

    Args:
        name: short id (test ids, README table).
        body: the request body, built from the server's limits (some cases sit just past them).
        headers: request headers: ``Content-Type`` and routing parameters (``threshold`` ...), which
            both servers read from headers.
        status: the expected HTTP status.
        message: a fragment of the JSON ``error`` (formatted with the limits' fields); '' for a 200.
        same_as: for a valid but unusual image: the plain 8-bit RGB PNG whose answer it must equal
            (None for a 200: the body's own answer).
        servers: per-server ``(status, message)`` where a server differs (``None`` message: the
            server's own non-JSON answer, e.g. TorchServe's frontend refusing an oversized body).
        why: the reason for the expected outcome (README).
    """

    name: str
    body: Callable[[ImageLimits], bytes]
    status: int
    message: str = ""
    headers: dict = field(default_factory=dict)
    same_as: Optional[Callable[[], bytes]] = None
    servers: dict = field(default_factory=dict)
    why: str = ""

    def expect(self, server: str, limits: ImageLimits) -> tuple[int, Optional[str]]:
        """``(status, message fragment or None)`` that ``server`` must answer under ``limits``."""
        status, message = self.servers.get(server, (self.status, self.message))
        return status, None if message is None else message.format(**vars(limits))


def _good(limits: ImageLimits) -> bytes:
    return png(Image.fromarray(digit(1)))


def _with_body(build: Callable[[], bytes]) -> Callable[[ImageLimits], bytes]:
    return lambda limits: build()


_GRAY = lambda: Image.fromarray(digit(2))  # noqa: E731 - tiny builders read best inline
#: TorchServe's frontend (Netty) refuses a body over max_request_size itself: an empty 413, no worker involved.
_TS_413 = (413, None)

CASES: list[Case] = [
    # -- no image / broken image
    Case("empty body", _with_body(lambda: b""), 400, "empty request body"),
    Case("text, not an image", _with_body(lambda: b"this is not an image " * 20), 400, "not an image"),
    Case("random bytes", _with_body(lambda: _noise(5, 1, 4096, 1).tobytes()), 400, "not an image"),
    Case("truncated PNG", _with_body(lambda: png(Image.fromarray(_noise(6, 32, 32)))[:1200]), 400,
         "truncated or corrupt"),
    Case("truncated JPEG", _with_body(lambda: jpeg(Image.fromarray(_noise(7, 32, 32)))[:700]), 400,
         "truncated or corrupt"),
    Case("PNG signature only", _with_body(lambda: png(Image.fromarray(digit(0)))[:30]), 400, "not an image"),
    # -- sizes
    Case("50 MB body", _with_body(lambda: b"\0" * (50 * MB)), 413, "the image limit is {max_bytes} bytes",
         servers={"torchserve": _TS_413},
         why="refused from Content-Length before the body is read (Ray: 1.5 x max_bytes; TorchServe: "
             "max_request_size)"),
    Case("body just over max_bytes", lambda lim: b"\0" * (lim.max_bytes + 1024), 413, "the limit is {max_bytes}",
         why="under TorchServe's max_request_size (15 MiB) and Ray's 1.5 x max_bytes: the handler/ingress answers"),
    Case("1x1 image", _with_body(lambda: png(Image.new("RGB", (1, 1), (200, 10, 10)))), 400,
         "both sides must be at least {min_side} pixels",
         why="a 1x1 image carries nothing to classify; min_side (default 8) is configurable"),
    Case("side just under min_side", lambda lim: png(Image.fromarray(_noise(8, lim.min_side - 1, 32))), 400,
         "both sides must be at least {min_side} pixels"),
    Case("image of min_side x min_side", lambda lim: png(Image.fromarray(_noise(9, lim.min_side, lim.min_side))), 200),
    Case("one column over max_pixels", lambda lim: bomb_png(lim.max_pixels // 64 + 1, 64), 400,
         "the limit is {max_pixels} pixels", why="checked from the PNG header, before decoding"),
    Case("decompression bomb (100000x100000 declared, 177 bytes)", _with_body(lambda: bomb_png(100_000, 100_000, rows=1)),
         400, "the limit is {max_pixels} pixels",
         why="a decode would need 10 GB; the header check answers first"),
    # -- valid but unusual images: 200, same answer as the RGB image
    Case("grayscale PNG (MNIST)", _with_body(lambda: png(_GRAY())), 200, same_as=lambda: png(_GRAY().convert("RGB"))),
    Case("grayscale JPEG", _with_body(lambda: jpeg(_GRAY())), 200,
         same_as=lambda: png(Image.open(io.BytesIO(jpeg(_GRAY()))).convert("RGB"))),
    Case("16-bit grayscale PNG", _with_body(lambda: png(Image.fromarray(digit(2).astype(np.uint16) * 257))), 200,
         same_as=lambda: png(_GRAY().convert("RGB")), why="scaled to 8 bits (v / 257)"),
    Case("RGBA PNG (alpha 0..255)", _with_body(lambda: png(_rgba())), 200, same_as=lambda: png(_rgba().convert("RGB")),
         why="alpha is dropped, as PIL convert('RGB') and torchvision decode_image(mode=RGB) do"),
    Case("grayscale + alpha PNG", _with_body(lambda: png(_GRAY().convert("LA"))), 200,
         same_as=lambda: png(_GRAY().convert("RGB"))),
    Case("palette PNG", _with_body(lambda: png(_palette())), 200, same_as=lambda: png(_palette().convert("RGB"))),
    Case("CMYK JPEG", _with_body(lambda: jpeg(Image.fromarray(_noise(10, 24, 24)).convert("CMYK"))), 200,
         same_as=lambda: png(Image.open(io.BytesIO(jpeg(Image.fromarray(_noise(10, 24, 24)).convert("CMYK"))))
                             .convert("RGB"))),
    # -- content types
    Case("PNG labelled image/jpeg", _good, 200, headers={"Content-Type": "image/jpeg"},
         same_as=lambda: _good(ImageLimits()), why="the bytes say what the image is"),
    Case("PNG labelled text/plain", _good, 200, headers={"Content-Type": "text/plain"},
         same_as=lambda: _good(ImageLimits())),
    Case("PNG labelled application/json", _good, 400, "not valid JSON", headers={"Content-Type": "application/json"}),
    Case("PNG as x-www-form-urlencoded (curl --data-binary)", _good, 400, "curl -T",
         headers={"Content-Type": "application/x-www-form-urlencoded"},
         servers={"ray": (200, "")}, same_as=lambda: _good(ImageLimits()),
         why="TorchServe parses such a body as a form; Ray takes the raw bytes"),
    Case("multipart without boundary", _good, 400, "without a boundary", headers={"Content-Type": "multipart/form-data"}),
    Case("multipart without an image field", _with_body(_form_without_image), 400, "no image",
         headers={"Content-Type": f"multipart/form-data; boundary={_BOUNDARY}"}),
    # -- JSON and base64
    Case("malformed JSON", _with_body(lambda: b'{"image": '), 400, "not valid JSON",
         headers={"Content-Type": "application/json"}),
    Case("JSON list", _with_body(lambda: b"[1, 2]"), 400, "JSON body is a list", headers={"Content-Type": "application/json"}),
    Case("JSON without an image field", _with_body(lambda: b'{"picture": "AAAA"}'), 400, "no image field",
         headers={"Content-Type": "application/json"}),
    Case("JSON image not a string", _with_body(lambda: b'{"image": 5}'), 400, "base64 string",
         headers={"Content-Type": "application/json"}),
    Case("malformed base64", _with_body(lambda: b'{"image": "@@@not base64"}'), 400, "not valid base64",
         headers={"Content-Type": "application/json"}),
    Case("base64 of non-image bytes", _with_body(lambda: b64_json(b"hello world")), 400, "not an image",
         headers={"Content-Type": "application/json"}),
    Case("base64 of a truncated PNG", _with_body(lambda: b64_json(png(Image.fromarray(_noise(6, 32, 32)))[:1200])), 400,
         "truncated or corrupt", headers={"Content-Type": "application/json"}),
    Case("base64 grayscale PNG", _with_body(lambda: b64_json(png(_GRAY()))), 200,
         headers={"Content-Type": "application/json"}, same_as=lambda: png(_GRAY().convert("RGB"))),
    # -- routing parameters (headers on both servers)
    Case("threshold not a number", _good, 400, "threshold must be a number", headers={"threshold": "abc"}),
    Case("thresholds with a non-number", _good, 400, "each threshold must be a number", headers={"thresholds": "0.5,x"}),
    Case("threshold above 1", _good, 400, "must be in [0, 1]", headers={"threshold": "1.5"}),
    Case("threshold below 0", _good, 400, "must be in [0, 1]", headers={"threshold": "-0.1"}),
    Case("threshold NaN", _good, 400, "must be in [0, 1]", headers={"threshold": "nan"}),
    Case("thresholds: wrong count", _good, 400, "expected 2 thresholds", headers={"thresholds": "0.5"}),
    Case("budget not a number", _good, 400, "budget must be a number", headers={"budget": "cheap"}),
    Case("budget <= 0", _good, 400, "budget must be a cost fraction > 0", headers={"budget": "-1"}),
    Case("budget below every calibrated point", _good, 400, "no calibrated operating point", headers={"budget": "0.01"}),
    Case("threshold and budget together", _good, 400, "give only one of",
         headers={"threshold": "0.5", "budget": "0.5"}),
]
