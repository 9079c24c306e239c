"""Response compression: the contract's `compression` block (docs/compression.md).

Three parts, each usable alone:

- `negotiate`: the coding a client gets, from its `Accept-Encoding` (RFC 9110 12.5.3):
  q-values honoured, `q=0` refuses, `*` stands for every coding not named, ties broken
  by the gateway's own order; no `Accept-Encoding` at all means identity.
- `CompressionRules.apply`: which answers are compressed and what that does to their
  headers (`Content-Encoding`, `Vary`, `ETag`, `Content-Length`). It edits the
  `GatewayResponse` before its head is sent; anything it cannot do leaves the answer as
  it was (identity), so compression never fails a request that could be answered.
- The encoders: a body that streams is compressed chunk by chunk with a flush after
  every upstream chunk (gzip `Z_SYNC_FLUSH`, brotli `flush`, zstd `FLUSH_BLOCK`), so
  whatever has arrived can be decoded at once (server-sent events stay live); a whole
  answer is compressed in one shot.

The levels are for dynamic content, measured on a 100 KiB JSON answer (the table in
docs/compression.md): cheap enough to run per request, most of the ratio of the slow ones.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, cast

import brotli  # type: ignore[import-untyped]  # (no stubs; used through typed wrappers here)
import zstandard

from gateway.errors import InternalError
from gateway.types import GatewayResponse, Headers, WholeBody

__all__ = [
    "ALGORITHMS",
    "BROTLI_QUALITY",
    "DEFAULT_TYPES",
    "GZIP_LEVEL",
    "ZSTD_LEVEL",
    "CompressionRules",
    "Encoder",
    "accept_encoding",
    "compress_whole",
    "negotiate",
    "new_encoder",
]

log = logging.getLogger("gateway.compression")

ALGORITHMS = ("zstd", "br", "gzip")  # the contract's default order of preference
DEFAULT_TYPES = (
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/problem+json",
    "image/svg+xml",
)
GZIP_LEVEL = 5
BROTLI_QUALITY = 4
ZSTD_LEVEL = 3
# Browsers decode `Content-Encoding: zstd` with at most an 8 MiB window (RFC 9659);
# level 3 uses 2 MiB or less, and a one-shot frame no more than its input.

# RFC 9110 12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(rb"^(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)$")
_NO_CONTENT = frozenset({204, 304})
# Fields that describe the identity bytes and would lie about the encoded ones.
_STALE_WHEN_ENCODED = frozenset(
    {b"content-length", b"accept-ranges", b"content-md5", b"content-digest", b"repr-digest"}
)
_ACCEPT_ENCODING = b"accept-encoding"


def accept_encoding(headers: Headers) -> bytes | None:
    """The request's `Accept-Encoding`, several fields joined as one list; None when
    it sent none."""
    found = [v for n, v in headers if n == _ACCEPT_ENCODING]
    if not found:
        return None
    return found[0] if len(found) == 1 else b",".join(found)


def _weight(params: bytes) -> float | None:
    """The `q` of an element's parameters (1 when absent); None when it is malformed,
    which leaves the element out, as if it had not been sent."""
    q = 1.0
    for param in params.split(b";"):
        name, eq, value = param.partition(b"=")
        if name.strip().lower() != b"q":
            continue  # Accept-Encoding defines only `q`; anything else is ignored
        value = value.strip()
        if not eq or not _QVALUE.match(value):
            return None
        q = float(value)
    return q


def negotiate(accept: bytes | None, codings: tuple[bytes, ...]) -> bytes | None:
    """The content coding to answer with, from `codings` (the gateway's order of
    preference), or None for identity (RFC 9110 12.5.3).

    A coding's weight is its own element's `q`, else that of `*`, else 0 (not
    acceptable); the highest weight above 0 wins, ties going to the earlier of
    `codings`. The client may prefer identity: when `identity` (or `*`, standing for it)
    is given a higher `q` than the best coding, the answer is not encoded. A request
    without `Accept-Encoding` gets identity; so does one that refuses everything,
    identity included (answering it in identity beats a 415)."""
    if accept is None:
        return None
    weights: dict[bytes, float] = {}
    star: float | None = None
    for element in accept.split(b","):
        coding, _, params = element.partition(b";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = _weight(params) if params else 1.0
        if q is None:
            continue
        if coding == b"x-gzip":  # RFC 9110 8.4.1.3: the same as gzip
            coding = b"gzip"
        if coding == b"*":
            star = q if star is None else min(star, q)
        else:  # named twice: the lower weight stands, so a refusal is never overridden
            weights[coding] = min(weights.get(coding, q), q)
    fallback = star if star is not None else 0.0
    best: bytes | None = None
    best_q = 0.0
    for coding in codings:
        q = weights.get(coding, fallback)
        if q > best_q:
            best, best_q = coding, q
    if best is None:
        return None
    identity = weights.get(b"identity", star)  # unnamed: acceptable, but least preferred
    if identity is not None and identity > best_q:
        return None
    return best


class Encoder(Protocol):
    """A streaming compressor: `chunk` returns the encoding of `data`, flushed so that
    everything given so far can be decoded; `finish` ends the stream."""

    def chunk(self, data: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


class _Gzip:
    __slots__ = ("_z",)

    def __init__(self) -> None:
        self._z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: with the gzip wrapper

    def chunk(self, data: bytes) -> bytes:
        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class _Brotli:
    __slots__ = ("_b",)

    def __init__(self) -> None:
        self._b = brotli.Compressor(quality=BROTLI_QUALITY)

    def chunk(self, data: bytes) -> bytes:
        return cast(bytes, self._b.process(data)) + cast(bytes, self._b.flush())

    def finish(self) -> bytes:
        return cast(bytes, self._b.finish())


class _Zstd:
    __slots__ = ("_z",)

    def __init__(self) -> None:
        # A compressor of its own: a ZstdCompressor's context is not shared safely by
        # two streams that interleave.
        self._z = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()

    def chunk(self, data: bytes) -> bytes:
        return self._z.compress(data) + self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        return self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


def new_encoder(coding: bytes) -> Encoder:
    """A streaming encoder for `coding` (`zstd`, `br` or `gzip`)."""
    if coding == b"zstd":
        return _Zstd()
    if coding == b"br":
        return _Brotli()
    if coding == b"gzip":
        return _Gzip()
    raise ValueError(f"unknown content coding {coding!r}")


def compress_whole(
    coding: bytes, data: bytes, zstd: zstandard.ZstdCompressor | None = None
) -> bytes:
    """`data` encoded in one shot (a zstd frame then records its size)."""
    if coding == b"zstd":
        return (zstd or zstandard.ZstdCompressor(level=ZSTD_LEVEL)).compress(data)
    if coding == b"br":
        return cast(bytes, brotli.compress(data, quality=BROTLI_QUALITY))
    if coding == b"gzip":
        return zlib.compress(data, GZIP_LEVEL, wbits=31)
    raise ValueError(f"unknown content coding {coding!r}")


class _EncodedBody:
    """A streamed body, encoded as it goes: one flushed piece per upstream chunk, the
    stream's end after the last. A plain iterator object, like `WholeBody`."""

    __slots__ = ("_body", "_coding", "_done", "_encoder")

    def __init__(self, body: AsyncIterator[bytes], coding: bytes) -> None:
        self._body = body
        self._coding = coding
        self._encoder: Encoder | None = None  # made with the first piece: no cost before
        self._done = False

    def __aiter__(self) -> _EncodedBody:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            try:
                chunk = await self._body.__anext__()
            except StopAsyncIteration:
                self._done = True
                return self._encode(None)
            if chunk:
                out = self._encode(chunk)
                if out:
                    return out
        raise StopAsyncIteration

    def _encode(self, chunk: bytes | None) -> bytes:
        try:
            if self._encoder is None:
                self._encoder = new_encoder(self._coding)
            return self._encoder.finish() if chunk is None else self._encoder.chunk(chunk)
        except Exception as exc:
            # The head is gone, saying Content-Encoding: the answer can only be cut
            # short, as when the upstream's body fails halfway.
            raise InternalError(
                f"compressing the answer ({self._coding.decode()}) failed: {exc!r}"
            ) from exc


@dataclass(frozen=True, slots=True)
class CompressionRules:
    """The `compression` block as plain values: `algorithms` in the gateway's order of
    preference, `min_size` in bytes, `types` as media ranges (`text/*`,
    `application/json`). Built once per runtime; `apply` runs per answer."""

    algorithms: tuple[str, ...] = ALGORITHMS
    min_size: int = 1024
    types: tuple[str, ...] = DEFAULT_TYPES
    codings: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    _exact: frozenset[bytes] = field(init=False, repr=False, compare=False)
    _wild: frozenset[bytes] = field(init=False, repr=False, compare=False)  # `text` of text/*
    _zstd: zstandard.ZstdCompressor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms must be some of {ALGORITHMS}, got {self.algorithms}")
        media = [t.strip().lower().encode("ascii") for t in self.types]
        setattr_ = object.__setattr__
        setattr_(self, "codings", tuple(a.encode("ascii") for a in self.algorithms))
        setattr_(self, "_exact", frozenset(m for m in media if not m.endswith(b"/*")))
        setattr_(self, "_wild", frozenset(m[:-2] for m in media if m.endswith(b"/*")))
        # One-shot compression only (a call that completes before any other starts).
        setattr_(self, "_zstd", zstandard.ZstdCompressor(level=ZSTD_LEVEL))

    def listed(self, content_type: bytes | None) -> bool:
        """The answer's media type is one of `types` (and not gRPC, ever)."""
        if content_type is None:
            return False
        media = content_type.partition(b";")[0].strip().lower()
        if media.startswith(b"application/grpc"):
            return False
        return media in self._exact or media.partition(b"/")[0] in self._wild

    def apply(self, response: GatewayResponse, accept: bytes | None, head: bool = False) -> None:
        """Edit `response`, before its head is sent, into what goes to this client.

        An answer of a listed type gets `Vary: Accept-Encoding`; it is compressed too
        when the client accepts one of `algorithms` and nothing forbids it: no
        `Content-Encoding` already, no `Cache-Control: no-transform`, not 206 nor a
        `Content-Range`, not 204/304, and not a body known (`Content-Length`, or a whole
        one) to be under `min_size`. A compressed answer loses `Content-Length` (a whole
        one carries its compressed length), `Accept-Ranges` and digests of the identity
        bytes, and a strong `ETag` turns weak. A HEAD answer gets the head a GET would
        (without a length) and no body. Failing, it leaves the answer as it came."""
        try:
            self._apply(response, accept, head)
        except Exception:
            log.exception("compression skipped: the answer goes out as it came")

    def _apply(self, response: GatewayResponse, accept: bytes | None, head: bool) -> None:
        headers = response.headers
        content_type: bytes | None = None
        vary: list[bytes] = []
        encoded = False  # Content-Encoding present (whatever it says)
        forbidden = response.status in _NO_CONTENT or response.status == 206
        length: int | None = None
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-type":
                content_type = value
            elif lname == b"vary":
                vary.append(value)
            elif lname == b"content-encoding":
                encoded = True
            elif lname == b"content-range":
                forbidden = True
            elif lname == b"cache-control":
                if b"no-transform" in value.lower():
                    forbidden = True
            elif lname == b"content-length" and value.strip().isdigit():
                length = int(value)
        if not self.listed(content_type):
            return
        whole = None if head else response.whole
        if whole is not None:
            length = len(whole)
        coding = None
        if not (encoded or forbidden or (length is not None and length < self.min_size)):
            coding = negotiate(accept, self.codings)
        out = _with_vary(headers, vary)
        if coding is None:
            response.headers = out
            return
        body: bytes | None = None
        if whole is not None:
            try:
                body = compress_whole(coding, whole, self._zstd)
            except Exception:
                log.exception("compression skipped: the answer goes out uncompressed")
                response.headers = out
                return
        encoded_headers: Headers = []
        for name, value in out:
            lname = name.lower()
            if lname in _STALE_WHEN_ENCODED:
                continue
            if lname == b"etag" and not value.startswith(b"W/"):
                value = b"W/" + value  # the same tag would claim identical bytes
            encoded_headers.append((name, value))
        encoded_headers.append((b"content-encoding", coding))
        if body is not None:
            encoded_headers.append((b"content-length", str(len(body)).encode()))
            response.whole = body
            response.body = WholeBody(body)
        elif not head:
            response.body = _EncodedBody(response.body, coding)
        response.headers = encoded_headers


def _with_vary(headers: Headers, vary: list[bytes]) -> Headers:
    """`headers` with `Accept-Encoding` among the `Vary` names, once: added to the
    first `Vary` field, or as one of its own; left alone under `Vary: *`."""
    for value in vary:
        for token in value.split(b","):
            token = token.strip().lower()
            if token == b"accept-encoding" or token == b"*":
                return list(headers)
    if not vary:
        return [*headers, (b"vary", b"Accept-Encoding")]
    out: Headers = []
    merged = False
    for name, value in headers:
        if not merged and name.lower() == b"vary" and value.strip():
            value = value.strip().rstrip(b",").rstrip() + b", Accept-Encoding"
            merged = True
        out.append((name, value))
    if not merged:  # only empty Vary fields
        out.append((b"vary", b"Accept-Encoding"))
    return out
