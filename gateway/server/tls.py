"""TLS termination on the data listener: certificates chosen by SNI, reloaded in place,
and client certificates (mTLS) passed upstream in Envoy's `X-Forwarded-Client-Cert`.

The listener is given one `ssl.SSLContext` for its whole life (`TlsTerminator.context`).
Its `sni_callback` hands each handshake the context of the certificate whose SAN DNS
names match the client's SNI (a `*.` wildcard covers exactly one label, RFC 6125 6.4.3),
else the first certificate's, or refuses it with an `unrecognized_name` alert under
`sni_strict`. A reload builds the certificate contexts again from their files and swaps
the list the callback reads: new handshakes get the new pairs, open connections keep
theirs, and a pair that does not load leaves the old ones in place (the reload fails).

What a handshake negotiates besides the certificate (the oldest version accepted,
client verification, ALPN) is the same in every context, so it does not matter which
one OpenSSL consults. `min_version`, `client_auth` and `client_ca` are read at start.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = [
    "Certificate",
    "TlsError",
    "TlsListener",
    "TlsTerminator",
    "forwarded_client_cert",
    "name_matches",
    "tls_extension",
]

log = logging.getLogger("gateway.server")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "require": ssl.CERT_REQUIRED}


class TlsError(Exception):
    """A certificate pair (or the client CA) could not be loaded."""


@dataclass(frozen=True, slots=True)
class Certificate:
    """One PEM certificate chain file and its key file."""

    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class TlsListener:
    """The `server.tls` block's values, as the terminator needs them."""

    certificates: tuple[Certificate, ...]  # the first is the default
    sni_strict: bool = False  # refuse a handshake whose SNI matches no certificate
    min_version: str = "1.2"  # "1.2" or "1.3"
    client_auth: str = "none"  # "none", "optional" or "require"
    client_ca: str | None = None  # PEM CA file for client certificates
    alpn: tuple[str, ...] = ("h2", "http/1.1")  # offered in this order; no h2: HTTP/1.1 only


@dataclass(frozen=True, slots=True)
class _Loaded:
    names: tuple[str, ...]  # SAN DNS names (the subject's CN when there are none), lower case
    not_after: float  # Unix time the certificate expires
    context: ssl.SSLContext


def name_matches(pattern: str, host: str) -> bool:
    """Whether a certificate name covers `host` (both lower case): exactly, or as a
    `*.` wildcard for exactly one leftmost label (`*.example.com` covers
    `api.example.com`, not `example.com` nor `a.b.example.com`)."""
    if pattern == host:
        return True
    if not pattern.startswith("*."):
        return False
    label, dot, rest = host.partition(".")
    return bool(label) and bool(dot) and rest == pattern[2:]


class TlsTerminator:
    """The data listener's TLS: `context` for the listener, `reload` for new files."""

    def __init__(self, listener: TlsListener) -> None:
        self.listener = listener
        self._loaded = self._load(listener)
        self.context = self._context(listener, listener.certificates[0])
        self.context.sni_callback = self._select

    def reload(self, listener: TlsListener) -> None:
        """Read the certificate files again; raise `TlsError` (keeping the pairs in use)
        when one does not load. Settings other than the files apply at the next start."""
        loaded = self._load(listener)
        if (listener.min_version, listener.client_auth, listener.client_ca) != (
            self.listener.min_version,
            self.listener.client_auth,
            self.listener.client_ca,
        ):
            log.warning("tls: min_version, client_auth and client_ca change at the next start")
        self._loaded = loaded
        self.listener = listener

    def describe(self) -> dict[str, object]:
        """For the status page: the versions accepted, client verification, and the
        certificates in use (names and expiry, Unix time)."""
        listener = self.listener
        return {
            "min_version": f"TLSv{listener.min_version}",
            "client_auth": listener.client_auth,
            "sni_strict": listener.sni_strict,
            "certificates": [
                {"names": list(c.names), "not_after": c.not_after} for c in self._loaded
            ],
        }

    def _select(
        self, sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        loaded = self._loaded
        chosen = None
        if server_name:
            host = server_name.lower().rstrip(".")
            for entry in loaded:
                if any(name_matches(name, host) for name in entry.names):
                    chosen = entry
                    break
        if chosen is None:
            if self.listener.sni_strict:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            chosen = loaded[0]
        sock.context = chosen.context
        return None

    def _load(self, listener: TlsListener) -> tuple[_Loaded, ...]:
        loaded = []
        for pair in listener.certificates:
            context = self._context(listener, pair)
            try:
                with open(pair.cert, "rb") as f:
                    leaf = x509.load_pem_x509_certificate(f.read())
            except (OSError, ValueError) as exc:
                raise TlsError(f"cannot read the certificate {pair.cert}: {exc}") from exc
            loaded.append(_Loaded(_names(leaf), leaf.not_valid_after_utc.timestamp(), context))
        return tuple(loaded)

    @staticmethod
    def _context(listener: TlsListener, pair: Certificate) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _VERSIONS[listener.min_version]
        try:
            context.load_cert_chain(pair.cert, pair.key)
        except (OSError, ValueError) as exc:
            raise TlsError(f"cannot load {pair.cert} with {pair.key}: {exc}") from exc
        if listener.client_auth != "none" and listener.client_ca is not None:
            try:
                context.load_verify_locations(listener.client_ca)
            except (OSError, ValueError) as exc:
                raise TlsError(f"cannot load client_ca {listener.client_ca}: {exc}") from exc
            context.verify_mode = _CLIENT_AUTH[listener.client_auth]
        context.set_alpn_protocols(list(listener.alpn))
        return context

    def __repr__(self) -> str:
        names = [n for c in self._loaded for n in c.names]
        return f"TlsTerminator({names}, strict={self.listener.sni_strict})"


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    san = _san(cert)
    if san is None:
        common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(a.value).lower() for a in common)
    return tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))


def forwarded_client_cert(der: bytes) -> bytes:
    """Envoy's `X-Forwarded-Client-Cert` for a verified client certificate:
    `Hash=<sha256 hex of the DER>;Subject="<RFC 4514>"`, then `;URI=` and `;DNS=` for
    each SAN of those kinds."""
    cert = x509.load_der_x509_certificate(der)
    subject = cert.subject.rfc4514_string().replace("\\", "\\\\").replace('"', '\\"')
    fields = [f"Hash={hashlib.sha256(der).hexdigest()}", f'Subject="{subject}"']
    san = _san(cert)
    if san is not None:
        fields += [f"URI={u}" for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        fields += [f"DNS={d}" for d in san.get_values_for_type(x509.DNSName)]
    return ";".join(fields).encode("latin-1", "replace")


_VERSION_NUMBERS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, object]:
    """The ASGI `tls` scope extension of one connection, built once when its handshake
    is done: the version, and the client certificate when one was verified, with its
    `X-Forwarded-Client-Cert` value (`xfcc`, the gateway's own key)."""
    version = ssl_object.version()
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "tls_version": _VERSION_NUMBERS.get(version or ""),
        "version": version,  # "TLSv1.3": what the access log and status page show
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "xfcc": forwarded_client_cert(der) if der else None,
    }
