"""The runner's HTTP/1.1 client: a request out (a JSON body, or a GET), the whole answer back,
over kept-alive connections to one server (http or https), at most `max_connections` at once.

A request is one write (head and body together) and its answer is parsed by `httptools` (C) in
the connection's protocol callbacks, with no task per read: the runner often shares its cores
with the servers it feeds, and every CPU-second it spends there is one they lose.

Proxies come from the environment as `urllib` reads them (`http_proxy`, `https_proxy`, `no_proxy`
and their upper-case forms): an http:// server is asked through the proxy in absolute form, an
https:// one through a CONNECT tunnel with TLS inside it; credentials in the proxy's URL go as
Basic `Proxy-Authorization`. Only http:// proxies are supported: with another, every request
fails with a ConnectError that says so.

Failures are `HttpError`s: `ConnectError` when no connection could be made (refused, unresolved,
TLS refused, or not made before the timeout), `Timeout` when the answer did not arrive within
`timeout_s` of the request's start, `RemoteProtocolError` when the connection closed mid-answer or
the answer does not parse. A kept-alive connection that the server had closed before the request
reached it is replaced by a new one once, unseen by the caller.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import httptools


class HttpError(Exception):
    """A request that got no complete answer."""


class ConnectError(HttpError):
    """No connection could be made to the server."""


class Timeout(HttpError):
    """The answer did not arrive in time."""


class RemoteProtocolError(HttpError):
    """The connection closed mid-answer, or the answer does not parse."""


class _Stale(RemoteProtocolError):
    """The connection closed before any byte of the answer arrived."""


@dataclass(frozen=True)
class Response:
    status_code: int
    headers: dict[str, str]  # names lower-cased; of a repeated header, the last
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON (a ValueError when it is not)."""
        return json.loads(self.content)


class _Connection(asyncio.Protocol):
    """One connection and its one request in flight; `httptools` calls the `on_*` methods."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._answer: asyncio.Future[Response] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._head_done = False  # the status line and headers have been parsed
        self._started = False  # a byte of the answer has arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None and not self.closed
        self._answer = asyncio.get_running_loop().create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._body, self._head_done, self._started = {}, [], False, False
        self.transport.write(data)
        return self._answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._started = True
        if self._parser is None or self._answer is None or self._answer.done():
            self.close()  # bytes that answer no request: the connection cannot be trusted
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._end(RemoteProtocolError(f"malformed answer: {e.__cause__ or e}"))
            self.close()

    def on_message_begin(self) -> None:
        if self._answer is None or self._answer.done():
            raise RemoteProtocolError("an answer to no request")  # data_received closes

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._head_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        if not self._parser.should_keep_alive():
            self.close()
        self._end(Response(self._parser.get_status_code(), self._headers, b"".join(self._body)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is None or self._answer is None or self._answer.done():
            return
        if self._head_done and self._close_delimited:  # its body ends with the connection
            self._end(Response(self._parser.get_status_code(), self._headers, b"".join(self._body)))
        elif self._started:
            self._end(RemoteProtocolError("the server closed the connection mid-answer"))
        else:
            self._end(_Stale("the server closed the connection without answering"))

    @property
    def _close_delimited(self) -> bool:
        chunked = "chunked" in self._headers.get("transfer-encoding", "")
        return "content-length" not in self._headers and not chunked

    def _end(self, outcome: Response | HttpError) -> None:
        if self._answer is None or self._answer.done():
            return
        if isinstance(outcome, Response):
            self._answer.set_result(outcome)
        else:
            self._answer.set_exception(outcome)


class _Tunnel(asyncio.Protocol):
    """A proxy connection until the proxy answers CONNECT: the answer's head, then TLS."""

    def __init__(self) -> None:
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._data = b""

    def data_received(self, data: bytes) -> None:
        self._data += data
        if b"\r\n\r\n" in self._data and not self.head.done():
            self.head.set_result(self._data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(_Stale("the proxy closed the connection without answering"))


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str  # a Proxy-Authorization header line, or ""

    @classmethod
    def for_url(cls, url: SplitResult) -> Proxy | None:
        """The proxy that the environment names for `url`, or None (none, or `no_proxy`)."""
        proxy = urllib.request.getproxies().get(url.scheme)
        if not proxy or urllib.request.proxy_bypass(url.hostname or ""):
            return None
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.scheme != "http":
            raise ValueError(f"{url.scheme}_proxy={proxy}: only http:// proxies are supported")
        auth = ""
        if p.username is not None:
            pair = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
            auth = f"proxy-authorization: Basic {base64.b64encode(pair).decode()}\r\n"
        return cls(p.hostname or "localhost", p.port or 80, auth)


class HttpClient:
    def __init__(
        self, base_url: str, headers: dict[str, str], timeout_s: float, max_connections: int
    ) -> None:
        url = urlsplit(base_url)
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._prefix = url.path.rstrip("/")
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._proxy: Proxy | None = None
        self._proxy_error = ""
        try:
            self._proxy = Proxy.for_url(url)
        except ValueError as e:  # told at the first connection, as the endpoint's problem
            self._proxy_error = str(e)
        netloc = url.netloc.rpartition("@")[2]  # never user:password in a Host header
        fixed = {"host": netloc, "user-agent": "pipeserve-pipeline", **headers}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        if self._proxy is not None and self._ssl is None:  # absolute form, to the proxy
            self._prefix = f"http://{netloc}{self._prefix}"
            self._head += self._proxy.authorization
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []  # kept alive, no request in flight
        self._open: set[_Connection] = set()

    async def post(self, path: str, body: bytes) -> Response:
        """POSTs a JSON `body` (already encoded) to `{base_url}{path}`."""
        head = (
            f"POST {self._prefix}{path} HTTP/1.1\r\n{self._head}"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        return await self._request(head.encode("latin-1") + body)

    async def get(self, path: str) -> Response:
        head = f"GET {self._prefix}{path} HTTP/1.1\r\n{self._head}\r\n"
        return await self._request(head.encode("latin-1"))

    async def aclose(self) -> None:
        for conn in self._open:
            conn.close()
        self._open.clear()
        self._idle.clear()

    async def _request(self, data: bytes) -> Response:
        async with self._slots:
            deadline = asyncio.get_running_loop().time() + self._timeout_s
            while self._idle:
                conn = self._idle.pop()
                if conn.closed or conn.transport is None or conn.transport.is_closing():
                    self._forget(conn)
                    continue
                try:
                    return await self._exchange(conn, data, deadline)
                except _Stale:  # the server had closed it while idle: try the next
                    continue
            try:
                return await self._exchange(await self._connect(deadline), data, deadline)
            except _Stale as e:  # a new connection: the server closed it, not an idle timeout
                raise RemoteProtocolError(str(e)) from None

    async def _connect(self, deadline: float) -> _Connection:
        if self._proxy_error:
            raise ConnectError(self._proxy_error)
        where = f"{self._host}:{self._port}"
        if self._proxy is not None:
            where += f" through the proxy {self._proxy.host}:{self._proxy.port}"
        try:
            async with asyncio.timeout_at(deadline):
                conn = await self._open_connection()
        except TimeoutError:
            raise ConnectError(f"no connection to {where} in time") from None
        except OSError as e:  # refused, unresolved, unreachable, TLS refused (ssl.SSLError)
            raise ConnectError(f"{where}: {str(e) or type(e).__name__}") from None
        self._open.add(conn)
        return conn

    async def _open_connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self._proxy is None:
            tls: dict[str, Any] = {}
            if self._ssl:
                tls = {"ssl": self._ssl, "server_hostname": self._host}
            _, conn = await loop.create_connection(_Connection, self._host, self._port, **tls)
            return conn
        if self._ssl is None:  # plain http: requests go to the proxy in absolute form
            _, conn = await loop.create_connection(_Connection, self._proxy.host, self._proxy.port)
            return conn
        transport, tunnel = await loop.create_connection(
            _Tunnel, self._proxy.host, self._proxy.port
        )
        target = f"{self._host}:{self._port}"
        transport.write(
            f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n{self._proxy.authorization}\r\n".encode()
        )
        try:
            head = await tunnel.head
            status = head.split(b"\r\n", 1)[0].split()
            if len(status) < 2 or not status[1].startswith(b"2"):
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                raise ConnectionRefusedError(f"the proxy refused CONNECT {target}: {line}")
            conn = _Connection()
            tls_transport = await loop.start_tls(
                transport, conn, self._ssl, server_hostname=self._host
            )
        except BaseException:
            transport.close()
            raise
        conn.connection_made(tls_transport)
        return conn

    async def _exchange(self, conn: _Connection, data: bytes, deadline: float) -> Response:
        try:
            async with asyncio.timeout_at(deadline):
                response = await conn.send(data)
        except TimeoutError:
            self._forget(conn)
            raise Timeout(f"no answer within {self._timeout_s:g} s") from None
        except BaseException:  # an error, or the caller cancelled: the answer may still come
            self._forget(conn)
            raise
        if conn.closed:
            self._forget(conn)
        else:
            self._idle.append(conn)
        return response

    def _forget(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)
