"""A fake Kubernetes API server that speaks the list/watch protocol over HTTP.

Enough of the real thing to drive the real ``kubernetes`` client:

* collections at ``/api/v1/<plural>`` and ``/apis/<group>/<version>/<plural>``
  (and the ``/namespaces/<ns>/`` forms), a 404 for collections not served (a
  CRD not installed), paged lists (``limit`` / ``continue``) whose items carry
  no ``kind`` / ``apiVersion``, like the real server's;
* ``?watch=1&resourceVersion=N``: a chunked stream of JSON lines (ADDED /
  MODIFIED / DELETED), BOOKMARKs when ``allowWatchBookmarks=true`` and the test
  asks for one, ``ERROR`` with a 410 Status when ``N`` was compacted away,
  ``timeoutSeconds``, and a dropped connection on demand;
* GET / POST of single objects (Secrets), POST of TokenReviews with answers
  the test scripts;
* optional TLS and bearer-token checks (for the in-cluster configuration path).

Every request is recorded in ``requests`` so that tests can assert what the
client asked for (the resume version, bookmarks, relists).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import ipaddress
import json
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-request are part of the script, not errors


@dataclass(frozen=True)
class Collection:
    kind: str
    plural: str
    group: str = ""
    versions: tuple[str, ...] = ("v1",)
    namespaced: bool = True


BUILTINS = (
    Collection("Namespace", "namespaces", namespaced=False),
    Collection("Pod", "pods"),
    Collection("Service", "services"),
    Collection("ServiceAccount", "serviceaccounts"),
    Collection("Secret", "secrets"),
    Collection("ConfigMap", "configmaps"),
    Collection("EndpointSlice", "endpointslices", "discovery.k8s.io"),
)
ISTIO = (
    Collection("AuthorizationPolicy", "authorizationpolicies", "security.istio.io",
               ("v1", "v1beta1")),
    Collection("PeerAuthentication", "peerauthentications", "security.istio.io",
               ("v1", "v1beta1")),
    Collection("VirtualService", "virtualservices", "networking.istio.io",
               ("v1", "v1beta1", "v1alpha3")),
    Collection("DestinationRule", "destinationrules", "networking.istio.io",
               ("v1", "v1beta1", "v1alpha3")),
    Collection("Gateway", "gateways", "networking.istio.io", ("v1", "v1beta1", "v1alpha3")),
)
GATEWAY_API = (
    Collection("Gateway", "gateways", "gateway.networking.k8s.io", ("v1", "v1beta1")),
    Collection("HTTPRoute", "httproutes", "gateway.networking.k8s.io", ("v1", "v1beta1")),
)


@dataclass
class Event:
    rv: int
    coll: Collection
    type: str
    obj: dict[str, Any]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)


class FakeKubeApi:
    def __init__(
        self,
        collections: tuple[Collection, ...] = BUILTINS + ISTIO + GATEWAY_API,
        *,
        tls: bool = False,
        token: str | None = None,
    ) -> None:
        self.collections: dict[tuple[str, str], Collection] = {}
        for c in collections:
            self.install(c)
        self.tls = tls
        self.token = token
        self.cond = threading.Condition()
        self.rv = 100
        self.compacted_rv = 0
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # group,plural,ns,name
        self.history: list[Event] = []
        self.requests: list[Recorded] = []
        self.drop_generation = 0
        self.bookmark_generation = 0
        self.token_reviews: dict[str, dict[str, Any]] = {}  # token -> status
        self.review_requests: list[dict[str, Any]] = []
        self.fail_next: dict[str, int] = {}  # path prefix -> HTTP status to answer once
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-kubeapi-")
        self.ca_file: Path | None = None
        self.open_watches = 0
        self.hold_watches = False  # new watch requests wait while set (see offline())
        self.watch_max_s: float | None = None  # end every watch after this long (0: at once)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FakeKubeApi:
        server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert, key, ca = _self_signed(Path(self._tmp.name))
            ctx.load_cert_chain(cert, key)
            self.ca_file = ca
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-kubeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.drop_generation += 1
            self._stopping = True
            self.cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._tmp.cleanup()

    def __enter__(self) -> FakeKubeApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    _stopping = False

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path | None = None) -> Path:
        path = path or Path(self._tmp.name) / "kubeconfig"
        cluster: dict[str, Any] = {"server": self.url}
        if self.ca_file is not None:
            cluster["certificate-authority"] = str(self.ca_file)
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    # -- scripting the cluster ---------------------------------------------------

    def install(self, coll: Collection) -> None:
        with _maybe(getattr(self, "cond", None)):
            self.collections[(coll.group, coll.plural)] = coll

    def uninstall(self, group: str, plural: str) -> None:
        with self.cond:
            self.collections.pop((group, plural), None)
            self.drop_generation += 1
            self.cond.notify_all()

    def _coll_for(self, body: Mapping[str, Any]) -> Collection:
        group = str(body["apiVersion"]).rpartition("/")[0]
        for c in self.collections.values():
            if c.group == group and c.kind == body["kind"]:
                return c
        for c in BUILTINS + ISTIO + GATEWAY_API:
            if c.group == group and c.kind == body["kind"]:
                return c
        raise KeyError(f"no collection for {body['apiVersion']} {body['kind']}")

    def apply(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace an object; returns the stored copy (with rv, uid)."""
        coll = self._coll_for(body)
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace", "") if coll.namespaced else ""
        if coll.namespaced and not ns:
            ns = meta["namespace"] = "default"
        key = (coll.group, coll.plural, ns, meta["name"])
        with self.cond:
            old = self.objects.get(key)
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
            self.objects[key] = obj
            self.history.append(Event(self.rv, coll, "MODIFIED" if old else "ADDED",
                                      copy.deepcopy(obj)))
            self.cond.notify_all()
        return copy.deepcopy(obj)

    def delete(self, body_or_kind: Mapping[str, Any] | str, namespace: str = "",
               name: str = "", api_version: str = "v1") -> None:
        if isinstance(body_or_kind, str):
            probe = {"apiVersion": api_version, "kind": body_or_kind}
        else:
            probe = dict(body_or_kind)
            namespace = probe["metadata"].get("namespace", "")
            name = probe["metadata"]["name"]
        coll = self._coll_for(probe)
        ns = (namespace or "default") if coll.namespaced else ""
        with self.cond:
            obj = self.objects.pop((coll.group, coll.plural, ns, name))
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append(Event(self.rv, coll, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the history: watches from any version before now get 410 Gone."""
        with self.cond:
            self.compacted_rv = self.rv
            self.history.clear()
            self.cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream (no terminating chunk)."""
        with self.cond:
            self.drop_generation += 1
            self.cond.notify_all()

    @contextlib.contextmanager
    def offline(self) -> Iterator[None]:
        """Cut every watch and hold new ones until the block ends.

        What happens inside (changes, a compaction) is what a client that lost
        its connection misses, deterministically.
        """
        with self.cond:
            self.hold_watches = True
            self.drop_generation += 1
            self.cond.notify_all()
        self.wait_for(lambda: self.open_watches == 0)
        try:
            yield
        finally:
            with self.cond:
                self.hold_watches = False
                self.cond.notify_all()

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current version on watches that allowed them."""
        with self.cond:
            self.bookmark_generation += 1
            self.cond.notify_all()

    def watch_requests(self, plural: str) -> list[Recorded]:
        return [r for r in self.requests
                if r.path.endswith("/" + plural) and r.query.get("watch") in ("1", "true")]

    def list_requests(self, plural: str) -> list[Recorded]:
        return [r for r in self.requests
                if r.method == "GET" and r.path.endswith("/" + plural)
                and r.query.get("watch") not in ("1", "true")]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("fake API server: condition not met in time")
            time.sleep(0.02)

    # -- request routing -------------------------------------------------------------

    def route(self, path: str) -> tuple[Collection, str, str, str] | None:
        """(collection, version, namespace, name) for an API path, or None (404)."""
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2:
            return None
        coll = self.collections.get((group, rest[0]))
        if coll is None or version not in coll.versions:
            return None
        return coll, version, ns, rest[1] if len(rest) == 2 else ""


@contextlib.contextmanager
def _maybe(lock: threading.Condition | None) -> Iterator[None]:
    if lock is None:
        yield
    else:
        with lock:
            yield


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _handler_for(api: FakeKubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        # -- helpers ---------------------------------------------------------

        def _send_json(self, code: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if api.token is None:
                return True
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() == "bearer" and token == api.token:  # the scheme is case-blind
                return True
            self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
            return False

        def _record(self) -> tuple[str, dict[str, str]]:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            with api.cond:
                api.requests.append(Recorded(self.command, url.path, query,
                                             {k.lower(): v for k, v in self.headers.items()}))
                for prefix, code in list(api.fail_next.items()):
                    if url.path.startswith(prefix):
                        del api.fail_next[prefix]
                        self._send_json(code, _status(code, "Injected", f"injected {code}"))
                        return "", {}
            return url.path, query

        def _body(self) -> dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        # -- verbs --------------------------------------------------------------

        def do_GET(self) -> None:
            if not self._authorized():
                return
            path, query = self._record()
            if not path:
                return
            route = api.route(path)
            if route is None:
                self._send_json(404, _status(404, "NotFound", "the server could not find "
                                             "the requested resource"))
                return
            coll, version, ns, name = route
            if name:
                self._get_one(coll, ns, name)
            elif query.get("watch") in ("1", "true"):
                self._watch(coll, version, ns, query)
            else:
                self._list(coll, version, ns, query)

        def do_POST(self) -> None:
            if not self._authorized():
                return
            path, _ = self._record()
            if not path:
                return
            body = self._body()
            if path == "/apis/authentication.k8s.io/v1/tokenreviews":
                self._token_review(body)
                return
            route = api.route(path)
            if route is None or route[3]:
                self._send_json(404, _status(404, "NotFound", "not found"))
                return
            coll, _, ns, _ = route
            key = (coll.group, coll.plural, ns or body.get("metadata", {}).get("namespace", ""),
                   body.get("metadata", {}).get("name", ""))
            if key in api.objects:
                self._send_json(409, _status(409, "AlreadyExists", f"{key[3]} already exists"))
                return
            body.setdefault("metadata", {})["namespace"] = key[2]
            body.setdefault("apiVersion", f"{coll.group}/v1" if coll.group else "v1")
            body.setdefault("kind", coll.kind)
            self._send_json(201, api.apply(body))

        def do_PUT(self) -> None:
            if not self._authorized():
                return
            path, _ = self._record()
            if not path:
                return
            body = self._body()
            route = api.route(path)
            if route is None or not route[3]:
                self._send_json(404, _status(404, "NotFound", "not found"))
                return
            coll, _, ns, name = route
            key = (coll.group, coll.plural, ns, name)
            with api.cond:
                old = api.objects.get(key)
            if old is None:
                self._send_json(404, _status(404, "NotFound", f"{name} not found"))
                return
            sent_rv = body.get("metadata", {}).get("resourceVersion")
            if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
                self._send_json(409, _status(409, "Conflict", "the object has been modified"))
                return
            body.get("metadata", {}).pop("resourceVersion", None)
            self._send_json(200, api.apply(body))

        def _get_one(self, coll: Collection, ns: str, name: str) -> None:
            with api.cond:
                obj = api.objects.get((coll.group, coll.plural, ns, name))
            if obj is None:
                self._send_json(404, _status(404, "NotFound",
                                             f'{coll.plural} "{name}" not found'))
                return
            self._send_json(200, obj)

        def _list(self, coll: Collection, version: str, ns: str, query: dict[str, str]) -> None:
            with api.cond:
                items = [copy.deepcopy(o) for (g, p, n, _), o in sorted(api.objects.items())
                         if g == coll.group and p == coll.plural and (not ns or n == ns)]
                rv = str(api.rv)
            for item in items:  # list items carry no kind/apiVersion, like the real server
                item.pop("kind", None)
                item.pop("apiVersion", None)
            start = int(query.get("continue") or 0)
            limit = int(query.get("limit") or 0) or len(items) or 1
            page = items[start:start + limit]
            meta: dict[str, Any] = {"resourceVersion": rv}
            if start + limit < len(items):
                meta["continue"] = str(start + limit)
            api_version = f"{coll.group}/{version}" if coll.group else version
            self._send_json(200, {"kind": f"{coll.kind}List", "apiVersion": api_version,
                                  "metadata": meta, "items": page})

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _watch(self, coll: Collection, version: str, ns: str, query: dict[str, str]) -> None:
            with api.cond:
                api.cond.wait_for(lambda: not api.hold_watches or api._stopping, 10)
                drop_gen = api.drop_generation
                bm_gen = api.bookmark_generation
                api.open_watches += 1
            since = int(query.get("resourceVersion") or 0)
            bookmarks = query.get("allowWatchBookmarks") == "true"
            timeout = float(query.get("timeoutSeconds") or 1800)
            if api.watch_max_s is not None:
                timeout = min(timeout, api.watch_max_s)
            deadline = time.monotonic() + timeout
            sent = since
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                if since and since < api.compacted_rv:
                    status = _status(410, "Expired", f"too old resource version: {since} "
                                     f"({api.compacted_rv})")
                    self._chunk(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                    self._chunk(b"")
                    return
                while True:
                    with api.cond:
                        pending = [e for e in api.history if e.rv > sent and e.coll == coll
                                   and (not ns or e.obj["metadata"].get("namespace") == ns)]
                        dropped = api.drop_generation != drop_gen
                        do_bookmark = bookmarks and api.bookmark_generation != bm_gen
                        bm_gen = api.bookmark_generation
                        current = api.rv
                        if not pending and not dropped and not do_bookmark:
                            if time.monotonic() >= deadline:
                                self._chunk(b"")
                                return
                            api.cond.wait(0.05)
                            continue
                    if dropped:
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    for e in pending:
                        obj = copy.deepcopy(e.obj)
                        self._chunk(json.dumps({"type": e.type, "object": obj}).encode() + b"\n")
                        sent = e.rv
                    if do_bookmark:
                        api_version = f"{coll.group}/{version}" if coll.group else version
                        bm = {"kind": coll.kind, "apiVersion": api_version,
                              "metadata": {"resourceVersion": str(current),
                                           "annotations": {"k8s.io/initial-events-end": "true"}}}
                        # A BOOKMARK carries only the version; split across two
                        # chunks to exercise the client's line framing.
                        line = json.dumps({"type": "BOOKMARK", "object": bm}).encode() + b"\n"
                        self._chunk(line[:10])
                        self._chunk(line[10:])
                        sent = max(sent, current)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                self.close_connection = True
            finally:
                with api.cond:
                    api.open_watches -= 1

        def _token_review(self, body: dict[str, Any]) -> None:
            spec = body.get("spec") or {}
            token = str(spec.get("token") or "")
            with api.cond:
                api.review_requests.append(copy.deepcopy(body))
                status = copy.deepcopy(api.token_reviews.get(token))
            if status is None:
                status = {"authenticated": False, "error": "invalid bearer token"}
            wanted = spec.get("audiences") or []
            if status.get("authenticated") and wanted:
                have = status.get("audiences") or []
                common = [a for a in wanted if a in have]
                if not common:
                    status = {"authenticated": False,
                              "error": "token audiences do not match"}
                else:
                    status["audiences"] = common
            out = dict(body)
            out["status"] = status
            self._send_json(201, out)

    return Handler


def service_account_review(namespace: str, sa: str, pod: str, pod_uid: str,
                           audiences: tuple[str, ...] = ("istio-ca",)) -> dict[str, Any]:
    """The TokenReview status the real server returns for a projected pod-bound token."""
    return {
        "authenticated": True,
        "user": {
            "username": f"system:serviceaccount:{namespace}:{sa}",
            "uid": str(uuid.uuid4()),
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                       "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [pod_uid],
            },
        },
        "audiences": list(audiences),
    }


def _self_signed(directory: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert_path
