"""URLs a request names, fetched from (LoRA adapters) or uploaded to (`output_urls`) on the caller's behalf: the one
place the server opens a connection a request chose.

That is server-side request forgery territory, so by default only https to public addresses is allowed. Every name is
resolved here and the connection goes to the very address that was checked (a second lookup could answer
differently), on the first hop and on every redirect. The body is streamed to disk under a size cap and a deadline.
`allow_private` (the `allow_private_urls` setting) also allows http and loopback or private addresses, for local
development and tests.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urljoin, urlsplit

CHUNK_BYTES = 1 << 20
REDIRECTS = {301, 302, 303, 307, 308}
# Statuses worth another try: the storage was busy or failed, not the request. A 403 (an expired signature) is final.
TRANSIENT = {408, 429, 500, 502, 503, 504}


class FetchError(ValueError):
    """A URL that could not be fetched; the message says why, for the 400 that names the request's field."""


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    timeout_s: float = 120.0  # the whole fetch, redirects included
    allow_private: bool = False
    max_redirects: int = 5


def fetch(
    url: str, destination: Path, policy: FetchPolicy, headers: Mapping[str, str] | None = None, header_host: str = ""
) -> None:
    """Write the body at `url` to `destination`. `headers` (a token) go only to `header_host`, never to a host a
    redirect leads to. Raises FetchError."""
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        host = parts.hostname or ""
        connection = _connect(url, policy, deadline)
        try:
            path = parts.path or "/"
            sent = dict(headers or {}) if host == header_host else {}
            connection.request("GET", f"{path}?{parts.query}" if parts.query else path, headers=sent)
            response = connection.getresponse()
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"{host} answered {response.status} without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise FetchError(f"{host} answered HTTP {response.status} {response.reason}".rstrip())
            _stream(response, destination, policy, deadline)
            return
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"could not be fetched from {host}: {_reason(exc)}") from exc
        finally:
            connection.close()
    raise FetchError(f"more than {policy.max_redirects} redirects")


class UploadError(Exception):
    """An upload that failed for good; `status` is the storage's last HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


def check_url(url: str, allow_private: bool) -> None:
    """Refuse a URL's scheme, credentials or a literal private address now, before any work is done for it; a name
    is resolved and checked when it is connected to."""
    parts = urlsplit(url)
    _check_scheme_and_credentials(parts, allow_private)
    host = parts.hostname or ""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return
    if not allow_private and not _public(literal):
        raise FetchError(f"{host} is a private, loopback or reserved address (allowed only with allow_private_urls)")


def put(
    url: str, body: bytes, content_type: str, allow_private: bool, attempts: int = 3, timeout_s: float = 60.0
) -> None:
    """PUT `body` to `url` (a presigned URL: no redirect is followed), retrying a transient failure with backoff.
    Raises FetchError for a URL that is refused, UploadError when the storage never took it."""
    policy = FetchPolicy(max_bytes=0, timeout_s=timeout_s, allow_private=allow_private)
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    status: int | None = None
    reason = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        connection = _connect(url, policy, time.monotonic() + timeout_s)
        try:
            connection.request("PUT", path, body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            status, reason = response.status, response.reason
            if 200 <= status < 300:
                return
            if status not in TRANSIENT:
                break
        except (OSError, http.client.HTTPException) as exc:
            status, reason = None, _reason(exc)
        finally:
            connection.close()
    answer = f"HTTP {status} {reason}".rstrip() if status is not None else reason
    raise UploadError(f"the upload to {parts.hostname} failed after {attempt + 1} attempt(s): {answer}", status)


def _check_scheme_and_credentials(parts: SplitResult, allow_private: bool) -> None:
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme.lower() not in allowed:
        hint = "" if allow_private else " (http and private addresses need allow_private_urls)"
        raise FetchError(f"the scheme must be https, not {parts.scheme or 'none'!r}{hint}")
    if parts.username is not None or parts.password is not None:
        raise FetchError("credentials in the URL are not accepted")


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast


def fetch_bytes(
    url: str, policy: FetchPolicy, headers: Mapping[str, str] | None = None, header_host: str = ""
) -> bytes:
    """`fetch`, into memory: streamed to a temporary file under the same cap first."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "body"
        fetch(url, path, policy, headers, header_host)
        return path.read_bytes()


def _connect(url: str, policy: FetchPolicy, deadline: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    _check_scheme_and_credentials(parts, policy.allow_private)
    host = parts.hostname
    if not host:
        raise FetchError("the URL names no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise FetchError(f"the port is not valid: {exc}") from exc
    address = _checked_address(host, port, policy.allow_private)
    timeout = max(0.1, deadline - time.monotonic())
    if scheme == "https":
        return _PinnedHTTPS(host, port, address, timeout)
    return _PinnedHTTP(host, port, address, timeout)


def _checked_address(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to: every address `host` resolves to must be public unless `allow_private`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise FetchError(f"the host {host!r} could not be resolved") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        for address in addresses:
            if not _public(ipaddress.ip_address(address.split("%")[0])):
                raise FetchError(
                    f"{host} resolves to {address}, a private, loopback or reserved address (allowed only with "
                    "allow_private_urls)"
                )
    if not addresses:
        raise FetchError(f"the host {host!r} has no address")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to `address`, checked already, whatever `host` would resolve to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to `address`, checked already; the certificate is checked against `host`."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _stream(response: http.client.HTTPResponse, destination: Path, policy: FetchPolicy, deadline: float) -> None:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(f"the file is {int(declared)} bytes, over the limit of {policy.max_bytes}")
    received = 0
    with destination.open("wb") as out:
        # read1: one receive at a time, so a server trickling bytes cannot hold a read past the deadline.
        while chunk := response.read1(CHUNK_BYTES):
            received += len(chunk)
            if received > policy.max_bytes:
                raise FetchError(f"the file is over the limit of {policy.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchError(f"the download took over {policy.timeout_s:.0f} s")
            out.write(chunk)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    return str(exc) or type(exc).__name__
