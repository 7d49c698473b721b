"""The Kubernetes configuration source: informer-style list-then-watch.

One reflector per resource kind keeps a cache of that kind's objects in step
with the API server, the way client-go's informers do:

* **list** the collection (paged, ``limit``/``continue``), remember the list's
  ``resourceVersion``;
* **watch** from that version with ``allowWatchBookmarks=true``; every event
  (ADDED / MODIFIED / DELETED / BOOKMARK) moves the remembered version on, so a
  dropped connection or a server-side timeout resumes where it stopped;
* on ``410 Gone`` (the version was compacted away) **relist and reconcile**:
  objects that vanished while we were away are emitted as deletions;
* any other failure reconnects with exponential backoff and jitter;
* a collection whose CRD is not installed (``404`` on list) is skipped with ONE
  warning and retried every ``retry_missing_s``, so that it is picked up if the
  CRD appears later.

The cache logic (:class:`ResourceCache`), the line framing of a watch stream
(:class:`LineBuffer`) and the backoff (:class:`Backoff`) are sans-IO; the
blocking ``kubernetes`` client calls run in one thread per resource kind
(:class:`Reflector`) and hand their changes to the event loop with
``call_soon_threadsafe``, so the loop never blocks on the API server.

Wire types stop here: bodies leave this module as
:class:`~ztunnel_py.controller.translate.KubeObject` (``origin`` =
``kubernetes:<Kind>/<namespace>/<name>``), the same type directory mode hands
to the one translator.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from ztunnel_py import log
from ztunnel_py.controller.translate import KubeObject, Problem

logger = log.get("controller.kube")

ORIGIN_PREFIX = "kubernetes:"
MIN_WATCH_S = 1.0  # a watch that ends sooner, empty, is treated as a failure (backoff)


class KubeError(Exception):
    """Base of this module's errors."""


class KubeConfigError(KubeError):
    """Neither in-cluster configuration nor a kubeconfig could be loaded."""


class ApiError(KubeError):
    """The API server answered with an error status (or could not be reached)."""

    def __init__(self, status: int, reason: str, path: str) -> None:
        self.status = status
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: HTTP {status} {reason}".strip())


class Gone(ApiError):
    """410: the resourceVersion we asked for was compacted away; relist."""


class NotInstalled(ApiError):
    """404 on a collection: its CRD (or API group/version) is not served."""


# -- what we watch -----------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """A collection the controller reads; ``versions`` are tried in order."""

    kind: str
    plural: str
    group: str = ""  # "" is the core group (/api/v1)
    versions: tuple[str, ...] = ("v1",)
    namespaced: bool = True
    # Built-in kinds are always served; a 404 on those is an error, not "not installed".
    optional: bool = False
    # Told apart in origins when two groups share a kind (Istio's and Gateway API's Gateway).
    origin_kind: str = ""

    def path(self, version: str) -> str:
        if not self.group:
            return f"/api/{version}/{self.plural}"
        return f"/apis/{self.group}/{version}/{self.plural}"

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    @property
    def name(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


ISTIO_VERSIONS = ("v1", "v1beta1", "v1alpha3")
GATEWAY_VERSIONS = ("v1", "v1beta1")

RESOURCES: tuple[Resource, ...] = (
    Resource("Namespace", "namespaces", namespaced=False),
    Resource("Pod", "pods"),
    Resource("Service", "services"),
    Resource("ServiceAccount", "serviceaccounts"),
    Resource("EndpointSlice", "endpointslices", "discovery.k8s.io"),
    Resource("AuthorizationPolicy", "authorizationpolicies", "security.istio.io",
             ("v1", "v1beta1"), optional=True),
    Resource("PeerAuthentication", "peerauthentications", "security.istio.io",
             ("v1", "v1beta1"), optional=True),
    Resource("VirtualService", "virtualservices", "networking.istio.io", ISTIO_VERSIONS,
             optional=True),
    Resource("DestinationRule", "destinationrules", "networking.istio.io", ISTIO_VERSIONS,
             optional=True),
    Resource("Gateway", "gateways", "gateway.networking.k8s.io", GATEWAY_VERSIONS,
             optional=True),
    Resource("Gateway", "gateways", "networking.istio.io", ISTIO_VERSIONS, optional=True,
             origin_kind="Gateway.networking.istio.io"),
    Resource("HTTPRoute", "httproutes", "gateway.networking.k8s.io", GATEWAY_VERSIONS,
             optional=True),
)


def origin_of(kind: str, namespace: str, name: str) -> str:
    """``kubernetes:Pod/ns/name``, or ``kubernetes:Namespace/name`` for cluster-scoped kinds."""
    return f"{ORIGIN_PREFIX}{kind}/{namespace}/{name}" if namespace else (
        f"{ORIGIN_PREFIX}{kind}/{name}"
    )


# -- sans-IO pieces ------------------------------------------------------------


class ChangeType(enum.Enum):
    UPSERT = "upsert"
    DELETE = "delete"


@dataclass(frozen=True)
class Change:
    type: ChangeType
    resource: Resource
    namespace: str
    name: str
    body: Mapping[str, Any]

    @property
    def origin(self) -> str:
        return origin_of(self.resource.origin_kind or self.resource.kind, self.namespace,
                         self.name)


Key = tuple[str, str]  # (namespace, name)


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _key(body: Mapping[str, Any]) -> Key:
    meta = _meta(body)
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class ResourceCache:
    """One kind's objects and the resourceVersion to resume from (a reflector's store).

    ``replace`` reconciles a fresh list against what we had (emitting deletions
    for objects that vanished); ``apply`` folds one watch event in. Both return
    the changes to hand on, and drop no-op updates (same resourceVersion).
    """

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.version = resource.versions[0]
        self.resource_version = ""
        self.synced = False
        self.installed = True
        self._objects: dict[Key, dict[str, Any]] = {}
        # The reflector thread writes, the event loop reads: every access holds this.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    def objects(self) -> list[tuple[Key, dict[str, Any]]]:
        with self._lock:
            return sorted(self._objects.items())

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def _complete(self, body: Mapping[str, Any]) -> dict[str, Any]:
        # Items in a list response carry no kind/apiVersion; the translator needs both.
        out = dict(body)
        out["kind"] = self.resource.kind
        out.setdefault("apiVersion", self.resource.api_version(self.version))
        return out

    def replace(
        self, items: Iterable[Mapping[str, Any]], resource_version: str, *, version: str = ""
    ) -> list[Change]:
        if version:
            self.version = version
        fresh: dict[Key, dict[str, Any]] = {}
        for item in items:
            body = self._complete(item)
            fresh[_key(body)] = body
        with self._lock:
            return self._replace(fresh, resource_version)

    def _replace(self, fresh: dict[Key, dict[str, Any]], resource_version: str) -> list[Change]:
        changes: list[Change] = []
        for key in sorted(self._objects.keys() - fresh.keys()):
            changes.append(self._change(ChangeType.DELETE, key, self._objects[key]))
        for key, body in sorted(fresh.items()):
            old = self._objects.get(key)
            if old is None or _rv(old) != _rv(body) or old != body:
                changes.append(self._change(ChangeType.UPSERT, key, body))
        self._objects = fresh
        self.resource_version = resource_version
        self.synced = True
        self.installed = True
        return changes

    def mark_not_installed(self) -> list[Change]:
        """The collection is not served (any more): an empty, synced cache."""
        changes = self.replace((), "")
        self.installed = False
        return changes

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> Change | None:
        """Fold a watch event in; raises :class:`Gone` for an ERROR 410."""
        if event_type == "ERROR":
            status = obj if isinstance(obj, Mapping) else {}
            code = int(status.get("code") or 0)
            message = str(status.get("message") or status.get("reason") or "watch error")
            if code == 410:
                raise Gone(410, message, self.resource.name)
            raise ApiError(code or 500, message, self.resource.name)
        rv = _rv(obj)
        if event_type == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return None
        body = self._complete(obj)
        if rv:
            self.resource_version = rv
        with self._lock:
            return self._apply(event_type, _key(body), body)

    def _apply(self, event_type: str, key: Key, body: dict[str, Any]) -> Change | None:
        if event_type in ("ADDED", "MODIFIED"):
            old = self._objects.get(key)
            self._objects[key] = body
            if old is not None and old == body:
                return None
            return self._change(ChangeType.UPSERT, key, body)
        if event_type == "DELETED":
            old = self._objects.pop(key, None)
            return self._change(ChangeType.DELETE, key, old if old is not None else body)
        logger.warning("unknown watch event type ignored", resource=self.resource.name,
                       type=event_type)
        return None

    def _change(self, kind: ChangeType, key: Key, body: Mapping[str, Any]) -> Change:
        return Change(kind, self.resource, key[0], key[1], body)


def _rv(body: Mapping[str, Any]) -> str:
    return str(_meta(body).get("resourceVersion") or "")


class LineBuffer:
    """Frames a watch stream (newline-delimited JSON) from arbitrary chunks."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        events: list[dict[str, Any]] = []
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise ApiError(500, f"undecodable watch event: {exc}", "watch") from None
            if not isinstance(event, dict):
                raise ApiError(500, "watch event is not an object", "watch")
            events.append(event)
        return events


@dataclass
class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def next(self) -> float:
        ceiling = min(self.max_s, self.initial_s * self.factor**self._attempt)
        self._attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


# -- the API client seam ----------------------------------------------------------


def load_api_client(kubeconfig: Path | None = None, context: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster config first, then a kubeconfig.

    ``kubeconfig`` (or ``$KUBECONFIG``, or ``~/.kube/config``) is used when given
    explicitly or when the process is not in a pod.
    """

    cfg = client.Configuration()
    # One long-lived watch per kind, plus room for lists, reviews and Secrets.
    cfg.connection_pool_maxsize = len(RESOURCES) + 8
    errors: list[str] = []
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            return client.ApiClient(cfg)
        except config.ConfigException as exc:
            errors.append(f"in-cluster: {exc}")
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig) if kubeconfig else None,
            context=context,
            client_configuration=cfg,
            persist_config=False,
        )
    except (config.ConfigException, OSError, TypeError) as exc:
        errors.append(f"kubeconfig: {exc}")
        raise KubeConfigError(
            "cannot reach Kubernetes: " + "; ".join(errors)
            + " (run in a pod with a service account, or set KUBECONFIG)"
        ) from None
    return client.ApiClient(cfg)


class KubeApi:
    """The few raw calls this module makes, on the real client's auth, TLS and pool.

    Bodies stay JSON dicts (no generated model classes: they drop fields the
    client does not know, such as Istio's). Blocking: call from a thread.
    """

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: float | tuple[float, float] | None = 30.0,
    ) -> Any:

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        params = [(k, v) for k, v in (query or {}).items() if v is not None and v != ""]
        try:
            request = self.api_client.param_serialize(
                method=method, resource_path=path, query_params=params,
                header_params=headers, body=body, auth_settings=["BearerToken"],
            )
            return self.api_client.call_api(*request, _request_timeout=timeout).response
        except ApiException as exc:
            raise ApiError(int(exc.status or 0), str(exc.reason or exc), path) from None
        except (HTTPError, OSError) as exc:
            raise ApiError(0, f"cannot reach the API server: {exc}", path) from None

    def json(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> dict[str, Any]:

        resp = self._request(method, path, query, body)
        try:
            data = resp.data
        except (HTTPError, OSError) as exc:
            raise ApiError(0, f"connection lost reading the response: {exc}", path) from None
        finally:
            resp.release_conn()
        status = int(resp.status)
        if status >= 400:
            raise _status_error(status, data, path)
        try:
            out = json.loads(data)
        except ValueError:
            raise ApiError(status, "response is not JSON", path) from None
        if not isinstance(out, dict):
            raise ApiError(status, "response is not a JSON object", path)
        return out

    def stream(
        self, path: str, query: Mapping[str, Any], read_timeout_s: float
    ) -> Any:
        """Open a watch; the caller iterates ``resp.stream()`` and must close it."""
        resp = self._request("GET", path, query, timeout=(10.0, read_timeout_s))
        status = int(resp.status)
        if status >= 400:
            try:
                data = resp.data
            finally:
                resp.release_conn()
            raise _status_error(status, data, path)
        return resp


def _status_error(status: int, data: bytes, path: str) -> ApiError:
    reason = ""
    with contextlib.suppress(ValueError, AttributeError):
        reason = str(json.loads(data).get("message") or "")
    if not reason:
        reason = data[:200].decode("utf-8", "replace").strip()
    if status == 410:
        return Gone(status, reason, path)
    if status == 404:
        return NotInstalled(status, reason, path)
    return ApiError(status, reason, path)


# -- one reflector per kind --------------------------------------------------------


@dataclass(frozen=True)
class SourceSettings:
    page_size: int = 500
    watch_timeout_s: int = 300  # server-side timeoutSeconds, jittered up to 2x
    retry_missing_s: float = 60.0  # how often a not-installed CRD is looked for again
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


class Reflector:
    """List-then-watch one kind in a thread; changes go to ``emit`` (thread-safe)."""

    def __init__(
        self,
        api: KubeApi,
        resource: Resource,
        emit: Callable[[Sequence[Change], bool], None],
        settings: SourceSettings,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.api = api
        self.resource = resource
        self.cache = ResourceCache(resource)
        self._emit = emit
        self._settings = settings
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, rng=self._rng)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._resp: Any = None
        self._missing_warned = False
        self._thread = threading.Thread(
            target=self._run, name=f"kube-{resource.plural}", daemon=True
        )
        # Counters, for tests and the admin dump.
        self.lists = 0
        self.watches = 0
        self.relists_on_gone = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # The loop: list when we must, otherwise watch from the last version.
    def _run(self) -> None:
        need_list = True
        last_gone = -MIN_WATCH_S
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                started = time.monotonic()
                if self._watch() or time.monotonic() - started >= MIN_WATCH_S:
                    self._backoff.reset()
                else:  # ended at once with nothing in it: do not hammer the server
                    self._stop.wait(self._backoff.next())
            except NotInstalled as exc:
                if not self.resource.optional:
                    self._failed(exc)
                    continue
                self._not_installed(exc)
                need_list = True
                self._stop.wait(self._settings.retry_missing_s)
            except Gone as exc:
                self.relists_on_gone += 1
                logger.info("watch expired (410 Gone); relisting", resource=self.resource.name,
                            resource_version=self.cache.resource_version, detail=exc.reason)
                need_list = True
                now = time.monotonic()
                if now - last_gone < MIN_WATCH_S:  # 410 right after a relist: back off
                    self._stop.wait(self._backoff.next())
                last_gone = now
            except ApiError as exc:
                self._failed(exc)
            except Exception as exc:  # a bug must not kill the reflector silently
                logger.exception("reflector error", resource=self.resource.name, error=str(exc))
                need_list = True
                self._stop.wait(self._backoff.next())
        logger.debug("reflector stopped", resource=self.resource.name)

    def _failed(self, exc: ApiError) -> None:
        if self._stop.is_set():
            return
        delay = self._backoff.next()
        hint = ""
        if exc.status == 403:
            hint = " (forbidden: check the controller's RBAC in daemonset/base/rbac.yaml)"
        elif exc.status == 401:
            hint = " (unauthenticated: check the service-account token or kubeconfig credentials)"
        logger.warning("API call failed; retrying" + hint, resource=self.resource.name,
                       status=exc.status, reason=exc.reason, retry_in_s=round(delay, 2))
        self._stop.wait(delay)

    def _not_installed(self, exc: NotInstalled) -> None:
        was_installed = self.cache.installed and self.cache.synced
        changes = self.cache.mark_not_installed()
        if not self._missing_warned or was_installed:
            self._missing_warned = True
            logger.warning(
                "resource not served by the API server (CRD not installed?); skipping it and "
                "looking again periodically",
                resource=self.resource.name,
                versions=list(self.resource.versions),
                retry_every_s=self._settings.retry_missing_s,
            )
        self._emit(changes, True)

    def _list(self) -> None:
        last: NotInstalled | None = None
        for version in self.resource.versions:
            try:
                items, rv = self._list_version(version)
            except NotInstalled as exc:
                last = exc
                continue
            self.lists += 1
            if self._missing_warned and not self.cache.installed:
                logger.info("resource is now served; watching it", resource=self.resource.name,
                            version=version)
            changes = self.cache.replace(items, rv, version=version)
            self._emit(changes, True)
            return
        assert last is not None
        raise last

    def _list_version(self, version: str) -> tuple[list[dict[str, Any]], str]:
        path = self.resource.path(version)
        items: list[dict[str, Any]] = []
        cont = ""
        while True:
            body = self.api.json("GET", path, {"limit": self._settings.page_size,
                                               "continue": cont})
            page = body.get("items") or []
            if not isinstance(page, list):
                raise ApiError(500, "list response has no items array", path)
            items.extend(i for i in page if isinstance(i, dict))
            meta = body.get("metadata") or {}
            cont = str(meta.get("continue") or "")
            if not cont:
                return items, str(meta.get("resourceVersion") or "")

    def _watch(self) -> bool:
        """One watch, until the server ends it; whether any event arrived."""
        s = self._settings
        timeout = int(s.watch_timeout_s * (1 + self._rng.random()))
        query = {
            "watch": "1",
            "resourceVersion": self.cache.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": timeout,
        }
        path = self.resource.path(self.cache.version)
        resp = self.api.stream(path, query, read_timeout_s=timeout + 30)
        with self._lock:
            self._resp = resp
        self.watches += 1
        got_events = False
        try:
            if self._stop.is_set():
                return False
            for events in self._events(resp, path):
                got_events = True
                changes = []
                for event in events:
                    change = self.cache.apply(str(event.get("type") or ""),
                                              event.get("object") or {})
                    if change is not None:
                        changes.append(change)
                    self._backoff.reset()
                if changes:
                    self._emit(changes, False)
            return got_events
        finally:
            with self._lock:
                self._resp = None
            with contextlib.suppress(Exception):
                resp.release_conn()
            with contextlib.suppress(Exception):
                resp.close()

    def _events(self, resp: Any, path: str) -> Iterator[list[dict[str, Any]]]:
        framing = LineBuffer()
        try:
            for chunk in resp.stream(amt=None, decode_content=True):
                if self._stop.is_set():
                    return
                events = framing.feed(chunk)
                if events:
                    yield events
        except (HTTPError, OSError, ValueError) as exc:
            if self._stop.is_set():
                return
            raise ApiError(0, f"watch connection dropped: {exc}", path) from None


# -- the source the controller reads ----------------------------------------------


class KubernetesSource:
    """Every watched object, kept current; the controller reads it as one set.

    ``await source.start()`` returns once every kind is listed (or known not to
    be installed), so the first model is complete: a partial first model
    could, for instance, miss a DENY policy. After that ``changed`` is set
    whenever any object changed; :meth:`objects` is the whole current set.
    """

    def __init__(
        self,
        api: KubeApi,
        *,
        resources: Sequence[Resource] = RESOURCES,
        settings: SourceSettings | None = None,
    ) -> None:
        self.api = api
        self.settings = settings or SourceSettings()
        self.resources = tuple(resources)
        self.reflectors: dict[str, Reflector] = {}
        self.changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0
        self._listeners: list[Callable[[Sequence[Change]], None]] = []

    @classmethod
    def from_config(
        cls, kubeconfig: Path | None = None, settings: SourceSettings | None = None
    ) -> KubernetesSource:
        return cls(KubeApi(load_api_client(kubeconfig)), settings=settings)

    @property
    def generation(self) -> int:
        """Bumped on every batch of changes (a cheap "has anything moved" check)."""
        return self._generation

    def add_listener(self, fn: Callable[[Sequence[Change]], None]) -> None:
        """Call ``fn(changes)`` on the event loop for every batch of changes."""
        self._listeners.append(fn)

    async def start(self, sync_timeout_s: float | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        for res in self.resources:
            reflector = Reflector(self.api, res, self._emit_threadsafe, self.settings)
            self.reflectors[res.name] = reflector
            reflector.start()
        await self.wait_synced(sync_timeout_s)

    async def wait_synced(self, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.synced:
            if deadline is not None and time.monotonic() > deadline:
                pending = [n for n, r in self.reflectors.items() if not r.cache.synced]
                raise KubeError(f"initial list did not complete for {pending}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.5)

    @property
    def synced(self) -> bool:
        return bool(self.reflectors) and all(r.cache.synced for r in self.reflectors.values())

    async def stop(self) -> None:
        for r in self.reflectors.values():
            r.stop()
        for r in self.reflectors.values():
            if not await asyncio.to_thread(r.join, 15.0):
                logger.warning("reflector thread did not stop in time", resource=r.resource.name)

    async def __aenter__(self) -> KubernetesSource:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def feed(self, submit: Callable[[list[KubeObject], list[Problem]], None]) -> None:
        """Hand the whole object set to ``submit`` now and after every change, until cancelled.

        ``submit`` is the controller's ``Controller.submit`` / ``ModelSync.submit`` (the
        same entry directory mode's watcher calls); it debounces and translates.
        """
        seen = self._generation
        submit(self.objects(), [])
        while True:
            await self.changed.wait()
            self.changed.clear()
            if self._generation != seen:
                seen = self._generation
                submit(self.objects(), [])

    def objects(self) -> list[KubeObject]:
        """The whole current set, in a stable order, as the translator's input."""
        out: list[KubeObject] = []
        for res in self.resources:
            reflector = self.reflectors.get(res.name)
            if reflector is None:
                continue
            for (ns, name), body in reflector.cache.objects():
                out.append(KubeObject(origin_of(res.origin_kind or res.kind, ns, name), body))
        return out

    def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        for r in self.reflectors.values():
            if kind in (r.resource.kind, r.resource.origin_kind):
                body = r.cache.get(namespace, name)
                if body is not None:
                    return body
        return None

    def _emit_threadsafe(self, changes: Sequence[Change], listed: bool) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed between the check and the call
            loop.call_soon_threadsafe(self._on_changes, tuple(changes), listed)

    def _on_changes(self, changes: Sequence[Change], listed: bool) -> None:
        if changes:
            self._generation += 1
            for fn in self._listeners:
                fn(changes)
        if changes or listed:
            self.changed.set()


def in_cluster_namespace(default: str = "ztunnel-py-system") -> str:
    """The pod's namespace (``POD_NAMESPACE``, else the mounted service-account file)."""

    env = os.environ.get("POD_NAMESPACE")
    if env:
        return env
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    with contextlib.suppress(OSError):
        return path.read_text().strip() or default
    return default
