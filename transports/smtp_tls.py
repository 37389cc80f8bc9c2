"""smtp_tls — STARTTLS for the smtp agent: the client's TLS policy, its SSL context, and
TLS over the session's own non-blocking socket.

Summary
    Postfix's smtp(8) TLS client (TLS_README, smtp_proto.c smtp_helo()/smtp_start_tls())
    with Python's standard ssl module only:

    * ``smtp_tls_security_level`` (Postfix's levels; empty = ``none``): ``none`` never
      sends STARTTLS; ``may`` (and ``dane``, which without DNSSEC TLSA records is ``may``
      in Postfix too) sends it when EHLO offers it and goes on in the clear otherwise;
      ``encrypt`` requires TLS without checking the certificate; ``verify`` requires a
      certificate trusted by ``smtp_tls_CAfile`` / ``smtp_tls_CApath`` whose name is the
      server's host name (its MX name; Postfix's ``smtp_tls_verify_cert_match =
      hostname``); ``secure`` the same with the nexthop's name (Postfix's
      ``smtp_tls_secure_cert_match = nexthop, dot-nexthop``; the ``dot-nexthop``
      sub-domain match is not implemented). As with Postfix's default
      ``tls_append_default_CA = no``, the system's CA store is not used. ``dane-only``
      and ``fingerprint`` are not implemented: such mail is deferred with Postfix's
      ``4.7.5 TLS is required, but our TLS engine is unavailable`` (never sent in the
      clear).
    * ``smtp_tls_protocols`` (all levels) and ``smtp_tls_mandatory_protocols`` (levels
      that require TLS), Postfix syntax: ``>=TLSv1.2``, ``<=TLSv1.3``, ``!TLSv1``, or a
      list of names; SSLv2/SSLv3 are never used. The versions allowed become the
      context's minimum and maximum (a hole in the middle is not representable and is
      filled); the system's OpenSSL configuration may still refuse TLSv1 and TLSv1.1
      (Debian's does), whatever the parameters allow.
    * ``smtp_tls_cert_file`` / ``smtp_tls_key_file``: a client certificate, optional.
    * The context is made once, in the agent's setup (before the chroot, so the CA and
      certificate files are read from the real root). When it cannot be made (a missing
      CAfile, a bad protocols value) the agent logs ``warning: TLS library problem:
      ...`` and has no TLS engine: ``may`` delivers in the clear, the levels that
      require TLS defer.

    TlsChannel runs TLS over the socket the session already has, with ssl.MemoryBIO and
    the loop's ``sock_*`` calls (asyncio's start_tls needs a transport; the session has
    none): :meth:`TlsChannel.handshake`, :meth:`TlsChannel.recv` (b"" at EOF, also an
    EOF without close_notify) and :meth:`TlsChannel.encrypt`.

Public API
    OPPORTUNISTIC, TLS_REQUIRED, TLS_VERIFY, TLS_UNSUPPORTED    level sets
    level_of(text) -> str                   the level, lower case, "" -> "none"
    protocol_range(text) -> (min, max)      ssl.TLSVersion bounds; ValueError
    client_context(level, cafile, capath, protocols, mandatory_protocols, cert_file,
                   key_file) -> ssl.SSLContext | None       OSError, ssl.SSLError, ValueError
    TlsChannel(context, server_hostname)    .handshake(loop, sock), .recv(loop, sock),
                                            .encrypt(data), .established(namaddrport,
                                            verified) -> str, .obj (ssl.SSLObject)
Logs nothing itself (the session logs the lines).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import warnings

__all__ = ["OPPORTUNISTIC", "TLS_REQUIRED", "TLS_UNSUPPORTED", "TLS_VERIFY", "TlsChannel",
           "client_context", "level_of", "protocol_range"]

# smtp_tls_security_level values
OPPORTUNISTIC = frozenset({"may", "dane"})  # STARTTLS when offered, else the clear
# the levels at which Postfix never sends in the clear (TLS_LEV_ENCRYPT and above; "dane"
# without TLSA records is opportunistic)
TLS_REQUIRED = frozenset({"encrypt", "dane-only", "fingerprint", "verify", "secure"})
TLS_VERIFY = frozenset({"verify", "secure"})  # the certificate is checked
TLS_UNSUPPORTED = frozenset({"dane-only", "fingerprint"})  # no TLS engine for them here

_VERSIONS = [("TLSv1", ssl.TLSVersion.TLSv1), ("TLSv1.1", ssl.TLSVersion.TLSv1_1),
             ("TLSv1.2", ssl.TLSVersion.TLSv1_2), ("TLSv1.3", ssl.TLSVersion.TLSv1_3)]
_NAMES = [name.lower() for name, _ in _VERSIONS]
_OBSOLETE = {"sslv2", "sslv3"}  # valid names, never used
_READ = 65536


def level_of(text: str) -> str:
    """The security level ``text`` names, lower case; empty is ``none``."""
    return text.strip().lower() or "none"


def _index(word: str, text: str) -> int:
    name = word.lower()
    if name in _OBSOLETE:
        return -1
    if name not in _NAMES:
        raise ValueError(f"invalid TLS protocol name {word!r} in {text!r}")
    return _NAMES.index(name)


def protocol_range(text: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """The lowest and highest TLS version a Postfix protocols value allows: ``>=V`` and
    ``<=V`` bounds, ``!V`` exclusions and plain names (only those), separated by
    commas, colons or white space.

    Raises:
        ValueError: an unknown name, or no TLS version left.
    """
    lo, hi = 0, len(_VERSIONS) - 1
    wanted: set[int] = set()
    excluded: set[int] = set()
    for word in text.replace(",", " ").replace(":", " ").split():
        if word.startswith(">="):
            lo = max(lo, _index(word[2:], text))
        elif word.startswith("<="):
            i = _index(word[2:], text)
            hi = min(hi, i) if i >= 0 else -1
        elif word.startswith("!"):
            excluded.add(_index(word[1:], text))
        else:
            wanted.add(_index(word, text))
    allowed = [i for i in (wanted or range(len(_VERSIONS)))
               if i >= 0 and lo <= i <= hi and i not in excluded]
    if not allowed:
        raise ValueError(f"no TLS protocol version left by {text!r}")
    return _VERSIONS[min(allowed)][1], _VERSIONS[max(allowed)][1]


def client_context(level: str, cafile: str, capath: str, protocols: str,
                   mandatory_protocols: str, cert_file: str = "",
                   key_file: str = "") -> ssl.SSLContext | None:
    """The client SSL context for ``level`` (None: no TLS at this level: ``none``, or
    one not implemented here). ``verify``/``secure`` check the certificate against
    ``cafile``/``capath`` only (Postfix's tls_append_default_CA = no) and its name (the
    name is given per connection); the other levels accept any certificate.

    Raises:
        OSError, ssl.SSLError: a file could not be loaded.
        ValueError: a bad protocols value.
    """
    if level not in OPPORTUNISTIC and level not in TLS_REQUIRED or level in TLS_UNSUPPORTED:
        return None
    lo, hi = protocol_range(protocols)
    if level in TLS_REQUIRED:
        mlo, mhi = protocol_range(mandatory_protocols)
        lo, hi = max(lo, mlo), min(hi, mhi)
        if lo > hi:
            raise ValueError(f"no TLS protocol version in both {protocols!r} and "
                             f"{mandatory_protocols!r}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():  # TLSv1 and TLSv1.1 are deprecated in Python's ssl
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version, ctx.maximum_version = lo, hi
    if level in TLS_VERIFY:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if cafile or capath:
            ctx.load_verify_locations(cafile or None, capath or None)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if cafile or capath:  # read as Postfix reads them, so a bad file shows at start
            ctx.load_verify_locations(cafile or None, capath or None)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or cert_file)
    return ctx


class TlsChannel:
    """TLS over a connected non-blocking socket, through memory BIOs (see the module
    docstring). Every call is on the running loop; the socket stays the caller's."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=False,
                                    server_hostname=server_hostname)

    async def _flush(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        if self.outgoing.pending:
            await loop.sock_sendall(sock, self.outgoing.read())

    async def handshake(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """The client handshake (no time limit here: the caller's).

        Raises:
            ssl.SSLError (ssl.SSLCertVerificationError: the certificate was refused),
            OSError, ConnectionError (EOF during the handshake).
        """
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush(loop, sock)
                data = await loop.sock_recv(sock, _READ)
                if not data:
                    raise ConnectionError("Connection closed during the TLS handshake") \
                        from None
                self.incoming.write(data)
        await self._flush(loop, sock)

    async def recv(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
        """Decrypted bytes (at least one), or b"" at the end of the connection (a
        close_notify, or the peer closing the TCP connection without one).

        Raises:
            ssl.SSLError, OSError.
        """
        while True:
            try:
                data = self.obj.read(_READ)
            except ssl.SSLWantReadError:
                await self._flush(loop, sock)  # e.g. a key update's answer
                raw = await loop.sock_recv(sock, _READ)
                if not raw:
                    return b""
                self.incoming.write(raw)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            await self._flush(loop, sock)
            return data

    def encrypt(self, data: bytes | memoryview) -> bytes:
        """``data`` as TLS records, for the socket."""
        self.obj.write(data)
        return self.outgoing.read()

    def pending(self) -> bool:
        """Decrypted or undecrypted data is waiting (nothing was asked)."""
        return bool(self.obj.pending() or self.incoming.pending)

    def established(self, namaddrport: str, verified: bool) -> str:
        """Postfix's tls_client_start() summary: ``Verified`` (the certificate matched,
        verify/secure), ``Untrusted`` (a certificate, not checked) or ``Anonymous`` (none)
        ``TLS connection established to H[ip]:port: TLSv1.3 with cipher C (n/n bits)``."""
        if verified:
            trust = "Verified"
        else:
            trust = "Untrusted" if self.obj.getpeercert(binary_form=True) else "Anonymous"
        name, version, bits = self.obj.cipher() or ("unknown", "unknown", 0)
        version = self.obj.version() or version
        return (f"{trust} TLS connection established to {namaddrport}: {version} with "
                f"cipher {name} ({bits}/{bits} bits)")
