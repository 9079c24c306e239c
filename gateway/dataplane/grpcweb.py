"""gRPC-Web (contract: "gRPC", `routes[].grpc_web`): a browser's gRPC call, over HTTP/1.1
or HTTP/2, turned into a gRPC call on the way in and back into gRPC-Web on the way out
(grpc/grpc's doc/PROTOCOL-WEB.md, as Envoy's grpc_web filter does it).

`GrpcWeb` wraps one request's ASGI `receive` and `send`; in between, the data plane
serves an ordinary gRPC call (`IncomingHeaders.grpc`: `te: trailers`, `grpc-timeout`,
its errors as gRPC answers). It is made only for a request whose route has `grpc_web`
and whose content type is gRPC-Web: every other request never meets it.

- In: `content-type: application/grpc-web[-text][+proto]` goes upstream as
  `application/grpc[+proto]`; a `-text` body is base64, decoded as it arrives
  (`Base64Decoder`: chunks cut anywhere, padding allowed at the end of any quantum).
- Out: the answer's content type becomes `application/grpc-web+proto` (`-text+proto`
  for a text call), its messages stream as they came, and its trailers become the
  body's last frame (`trailer_frame`: flag 0x80, a 4-byte big-endian length, then
  `name:value\\r\\n` lines). The inner code is shown the ASGI `http.response.trailers`
  extension so it hands the trailers over whatever the client's protocol; they never
  reach the client's server as trailers. A trailers-only answer (the upstream's, or
  one of the gateway's own errors) keeps `grpc-status` and `grpc-message` in its
  headers, as Envoy does, and gets the trailer frame as its body. In text mode each
  chunk is base64-encoded on its own (padding per chunk, as the spec allows), so a
  message is never held back waiting for the next one.
- A browser reads only the response headers CORS exposes: on an answer that allows
  the origin, `grpc-status` and `grpc-message` are added to
  `Access-Control-Expose-Headers` (the trailer frame carries them anyway).

An answer that is not gRPC (not `application/grpc...`: a non-gRPC upstream, a filter's
early answer) passes through untouched.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable

from gateway.dataplane.headers import IncomingHeaders
from gateway.errors import BadRequest
from gateway.types import Headers, Message, Receive, Scope, Send

__all__ = [
    "TRAILER_FLAG",
    "Base64Decoder",
    "GrpcWeb",
    "grpc_web",
    "trailer_frame",
    "web_content_type",
]

TRAILER_FLAG = 0x80  # the flag byte of the trailer frame (its MSB; PROTOCOL-WEB.md)
_WEB = b"application/grpc-web"
_TEXT = b"application/grpc-web-text"
_GRPC = b"application/grpc"
# Fields of a trailers-only answer's headers that are the call's status: they go into
# the trailer frame (and stay in the headers too).
_STATUS_FIELDS = frozenset({b"grpc-status", b"grpc-message", b"grpc-status-details-bin"})
_EXPOSED = (b"grpc-status", b"grpc-message")
_ACAO = b"access-control-allow-origin"
_ACEH = b"access-control-expose-headers"


class Base64Decoder:
    """A `application/grpc-web-text` body, decoded as it arrives: each complete
    4-character quantum is decoded at once, what is left waits for the next chunk. The
    client may base64-encode each message on its own, so padding may end any quantum,
    not only the last one. `ValueError` (binascii.Error) on anything not base64."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        if self._rest:
            data = self._rest + data
        cut = len(data) & ~3
        self._rest = data[cut:]
        return _decode(data[:cut]) if cut else b""

    def end(self) -> bytes:
        """The body is complete: decode what is left, which may lack its padding."""
        rest, self._rest = self._rest, b""
        if not rest:
            return b""
        if len(rest) == 1:
            raise binascii.Error("a base64 body cannot end with a single character")
        return _decode(rest + b"=" * (4 - len(rest)))

    def __repr__(self) -> str:
        return f"Base64Decoder(pending={len(self._rest)})"


def _decode(data: bytes) -> bytes:
    """Whole quanta, each padded or not: split after every padded quantum (the C
    decoder stops at the first padding), strictly decoding each run."""
    pad = data.find(b"=")
    if pad < 0 or pad >= len(data) - 2:
        return binascii.a2b_base64(data, strict_mode=True)
    parts = []
    while pad >= 0:
        end = (pad // 4 + 1) * 4
        parts.append(binascii.a2b_base64(data[:end], strict_mode=True))
        data = data[end:]
        pad = data.find(b"=")
    if data:
        parts.append(binascii.a2b_base64(data, strict_mode=True))
    return b"".join(parts)


def trailer_frame(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The trailers as gRPC-Web's last body frame: flag 0x80, the block's length (4
    bytes, big-endian), then one `name:value\\r\\n` line per field, names lower-case."""
    block = b"".join(name.lower() + b":" + value + b"\r\n" for name, value in fields)
    return bytes((TRAILER_FLAG,)) + len(block).to_bytes(4, "big") + block


def web_content_type(grpc_type: bytes, text: bool) -> bytes:
    """The gRPC-Web content type for an answer whose gRPC one is `grpc_type`: its
    `+format` suffix kept (`+proto` when it has none), `-text` for a text call."""
    suffix = grpc_type[len(_GRPC) :] or b"+proto"
    return (_TEXT if text else _WEB) + suffix


def _web_mode(content_type: bytes) -> tuple[bytes, bool] | None:
    """(what the content type becomes upstream, text mode) for a gRPC-Web content type;
    None for any other."""
    lower = content_type.lower()
    if lower.startswith(_TEXT):
        tail, text = lower[len(_TEXT) :], True
    elif lower.startswith(_WEB):
        tail, text = lower[len(_WEB) :], False
    else:
        return None
    if tail and tail[:1] not in (b"+", b";"):
        return None  # `application/grpc-webfoo`: not gRPC-Web
    return _GRPC + tail, text


def grpc_web(
    scope: Scope, receive: Receive, send: Send, incoming: IncomingHeaders
) -> GrpcWeb | None:
    """The translation for this request when it is gRPC-Web (None otherwise). The
    upstream headers are rewritten in place: the gRPC content type, and no
    Content-Length for a text body (the decoded body is shorter; the transport frames
    it). `incoming.content_length` stays the encoded length: an upper bound of the
    decoded one, so the size checks and the choice to buffer for replay still hold."""
    headers = incoming.upstream
    mode = None
    text_answer = False
    for i, (name, value) in enumerate(headers):
        if name == b"content-type":
            mode = _web_mode(value)
            if mode is None:
                return None
            headers[i] = (name, mode[0])
        elif name == b"accept" and value[: len(_TEXT)].lower() == _TEXT:
            text_answer = True  # a client that sends binary may still ask for text back
    if mode is None:
        return None
    text = mode[1]
    if text:
        incoming.upstream = [(n, v) for n, v in headers if n != b"content-length"]
    return GrpcWeb(scope, receive, send, text=text, text_answer=text or text_answer)


class GrpcWeb:
    """One gRPC-Web call's `scope`, `receive` and `send` as the data plane sees them
    (see the module docstring)."""

    __slots__ = (
        "_decoder",
        "_head_status",
        "_outer_trailers",
        "_receive",
        "_send",
        "_state",
        "_trailers_due",
        "scope",
        "text",
    )

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, *, text: bool, text_answer: bool
    ) -> None:
        extensions = scope.get("extensions") or {}
        self._outer_trailers = "http.response.trailers" in extensions
        inner = dict(scope)
        inner["extensions"] = {**extensions, "http.response.trailers": {}}
        self.scope: Scope = inner
        self._receive = receive
        self._send = send
        self._decoder = Base64Decoder() if text else None
        self.text = text_answer  # the answer is base64 too
        self._state = "head"  # head | web (translating) | plain (passing through) | done
        self._trailers_due = False  # the inner code will send http.response.trailers
        self._head_status: Headers = []  # a trailers-only answer's status fields

    def __repr__(self) -> str:
        mode = "text" if self._decoder is not None else "binary"
        return f"GrpcWeb({mode}, answer={'text' if self.text else 'binary'}, {self._state})"

    async def receive(self) -> Message:
        message = await self._receive()
        decoder = self._decoder
        if decoder is None or message["type"] != "http.request":
            return message
        more = message.get("more_body", False)
        try:
            body = decoder.feed(message.get("body", b""))
            if not more:
                body += decoder.end()
        except ValueError:
            raise BadRequest("the grpc-web-text request body is not valid base64") from None
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            await self._start(message)
        elif self._state == "web":
            if kind == "http.response.body":
                await self._body(message)
            elif kind == "http.response.trailers":
                self._state = "done"
                fields = message.get("headers", ())
                if self._head_status and not any(n.lower() == b"grpc-status" for n, _ in fields):
                    fields = [*self._head_status, *fields]  # trailers without the status
                await self._send_body(trailer_frame(fields), more=False)
            else:
                await self._send(message)  # a stream reset (gateway.http.reset)
        elif kind != "http.response.trailers" or self._outer_trailers:
            await self._send(message)

    async def _start(self, message: Message) -> None:
        headers: Headers = message.get("headers", [])
        grpc_type = None
        for name, value in headers:
            if name.lower() == b"content-type":
                grpc_type = value
                break
        if grpc_type is None or grpc_type[: len(_GRPC)].lower() != _GRPC:
            # Not a gRPC answer: nothing to translate.
            self._state = "plain"
            if message.get("trailers") and not self._outer_trailers:
                message = {k: v for k, v in message.items() if k != "trailers"}
            await self._send(message)
            return
        self._state = "web"
        self._trailers_due = bool(message.get("trailers", False))
        out: Headers = []
        exposed: int | None = None
        allowed = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-type" or lname == b"content-length":
                continue  # the body is re-framed (and maybe encoded)
            if lname in _STATUS_FIELDS:
                self._head_status.append((lname, value))
            elif lname == _ACAO:
                allowed = True
            elif lname == _ACEH:
                exposed = len(out)
            out.append((name, value))
        out.append((b"content-type", web_content_type(grpc_type.lower(), self.text)))
        if allowed:
            _expose_status(out, exposed)
        await self._send(
            {"type": "http.response.start", "status": message["status"], "headers": out}
        )

    async def _body(self, message: Message) -> None:
        body: bytes = message.get("body", b"")
        if message.get("more_body", False) or self._trailers_due:
            if body:  # the end waits for the trailers, which come as the last frame
                await self._send_body(body, more=True)
            return
        # The end without trailers: a trailers-only answer, whose status was in its head.
        self._state = "done"
        frame = trailer_frame(self._head_status) if self._head_status else b""
        if self.text and body and frame:
            await self._send_body(body, more=True)  # each encoded on its own
            body = b""
        await self._send_body(body + frame, more=False)

    async def _send_body(self, data: bytes, *, more: bool) -> None:
        if self.text and data:
            data = binascii.b2a_base64(data, newline=False)
        await self._send({"type": "http.response.body", "body": data, "more_body": more})


def _expose_status(headers: Headers, at: int | None) -> None:
    """Make sure a CORS answer lets the browser read grpc-status and grpc-message."""
    if at is None:
        headers.append((_ACEH, b", ".join(_EXPOSED)))
        return
    name, value = headers[at]
    listed = {v.strip().lower() for v in value.split(b",")}
    missing = [h for h in _EXPOSED if h not in listed]
    if missing:
        headers[at] = (
            name,
            b", ".join([value, *missing]) if value.strip() else b", ".join(missing),
        )
