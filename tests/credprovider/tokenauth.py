"""A registry token server and an RFC 8693 token exchange endpoint, for the tests.

The registry (auth: token) sends clients to the token server, which checks their basic
auth login and issues an RS256 JWT (signed with openssl, key id in libtrust's format,
which distribution's registry looks up in its root certificate bundle). The exchange
endpoint (HTTPS, self-signed certificate for 127.0.0.1) trades a known pod token for a
registry token the token server then accepts as a password.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ISSUER = "nodeplug-test-issuer"
SERVICE = "nodeplug-test-registry"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed RSA certificate for 127.0.0.1: (cert.pem, key.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def libtrust_key_id(key: Path) -> str:
    der = subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def fake_pod_token(seconds: int) -> str:
    """A JWT-shaped service account token expiring in `seconds` (nobody verifies its signature)."""
    claims = {
        "iss": "kubernetes",
        "sub": "system:serviceaccount:team:puller",
        "exp": int(time.time()) + seconds,
    }
    return f"{b64url(b'{}')}.{b64url(json.dumps(claims).encode())}.{b64url(b'signature')}"


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass  # the tests' output is for failures


def send_json(handler: BaseHTTPRequestHandler, status: int, answer: dict[str, object]) -> None:
    body = json.dumps(answer).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def serve(
    handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
) -> Iterator[str]:
    """Serve on a free loopback port in a thread; yields "127.0.0.1:PORT"."""
    server = _Server(("127.0.0.1", 0), handler)
    if tls:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class TokenServer:
    """Issues registry JWTs to logins in `self.logins` (username -> password)."""

    def __init__(self, key: Path) -> None:
        self.key = key
        self.kid = libtrust_key_id(key)
        self.logins: dict[str, str] = {}

    def _sign(self, claims: dict[str, object]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = (
            f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{b64url(signature)}"

    def token_for(self, authorization: str, query: str) -> str | None:
        if not authorization.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        if self.logins.get(user) != password or not password:
            return None
        access = []
        for scope in urllib.parse.parse_qs(query).get("scope", []):
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + 300, "nbf": now - 10}
        claims |= {"iat": now, "jti": f"{now}-{user}", "access": access}
        return self._sign(claims)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                token = issuer.token_for(self.headers.get("Authorization", ""), query)
                if path != "/token" or token is None:
                    self.send_response(401)
                    self.end_headers()
                    return
                answer = {"token": token, "access_token": token, "expires_in": 300}
                send_json(self, 200, answer)

        return Handler


class ExchangeServer:
    """RFC 8693: trades `pod_token` for a fresh registry password it adds to the logins."""

    def __init__(self, issuer: TokenServer, username: str, pod_token: str) -> None:
        self.issuer, self.username, self.pod_token = issuer, username, pod_token
        self.forms: list[dict[str, str]] = []
        self.delay = 0.0
        self.expires_in: object = 600  # what it answers; tests set wrong values

    def handler(self) -> type[BaseHTTPRequestHandler]:
        exchange = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                exchange.forms.append(form)
                time.sleep(exchange.delay)
                answer: dict[str, object] = {"error": "invalid_grant"}
                status = 400
                if form.get("subject_token") == exchange.pod_token:
                    minted = f"registry-token-{len(exchange.forms)}"
                    exchange.issuer.logins[exchange.username] = minted
                    status = 200
                    answer = {
                        "access_token": minted,
                        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                        "token_type": "Bearer",
                        "expires_in": exchange.expires_in,
                    }
                send_json(self, status, answer)

        return Handler
