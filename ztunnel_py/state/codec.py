"""Model <-> plain data (JSON), strict and versioned.

One reflective walker, driven by the model's type hints, serves two edges:

* the wire (``encode`` / ``decode``): snake_case JSON carried in the push
  protocol's resource envelopes and dumped by ``/config_dump``; fields equal to
  their default are omitted, everything is checked on the way back in;
* user YAML (``Schema(camel=True)``): Istio's camelCase field names, used by the
  controller's translator; every problem is collected with its field path and a
  hint instead of stopping at the first.

Decoders are compiled once per type and cached. A dataclass's decoder is
generated straight-line code that accepts the plain shapes JSON gives in place
(a str, a list of str, a map of str to str or int...) and hands anything else,
field by field, to the careful walker, which owns every message, path and hint:
the fast path only decides sooner, never differently. The wire side parses
with orjson (strict JSON, in C): an agent decodes a full snapshot of ten
thousand workloads in under a tenth of a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from ztunnel_py.state import routing
from ztunnel_py.state.model import (
    AuthorizationPolicy,
    FrozenMap,
    PeerAuthentication,
    Service,
    Workload,
)
from ztunnel_py.state.snapshot import Snapshot

CODEC_VERSION = 1


class CodecError(ValueError):
    """Data that does not decode into the model; the message names the field path."""


class Issue(NamedTuple):
    path: str  # "spec.http[0].route[1].weight"
    message: str
    hint: str = ""


_BAD: Any = object()  # a value that failed to decode (its issues are already recorded)
_MISSING: Any = object()

Decoder = Callable[[Any, str, list[Issue]], Any]
Encoder = Callable[[Any], Any]


def camel(name: str) -> str:
    """``per_try_timeout`` -> ``perTryTimeout``; a trailing ``_`` (``from_``) is dropped."""
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _type_name(typ: Any) -> str:
    if isinstance(typ, type):
        if issubclass(typ, enum.Enum):
            return "one of " + ", ".join(repr(m.value) for m in typ)
        return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
            typ, f"a mapping ({typ.__name__})"
        )
    origin = typing.get_origin(typ)
    if origin is tuple:
        return "a list"
    if origin is FrozenMap:
        return "a mapping"
    if typ is routing.Duration:
        return "a duration such as 5s or 250ms"
    return str(typ)


def _got(raw: Any) -> str:
    if isinstance(raw, bool):
        return f"{str(raw).lower()} (a boolean)"
    if isinstance(raw, (int, float)):
        return f"{raw!r} (a number)"
    if isinstance(raw, str):
        return f"{raw!r} (a string)"
    if isinstance(raw, list):
        return "a list"
    if isinstance(raw, dict):
        return "a mapping"
    if raw is None:
        return "null"
    return type(raw).__name__


@dataclass(frozen=True)
class _Field:
    name: str
    wire: str
    typ: Any
    required: bool
    default: Any


class Schema:
    """Compiled encoders/decoders for model types, for one naming convention."""

    def __init__(self, *, camel_case: bool, adopt_input: bool = False) -> None:
        """``adopt_input``: decoded FrozenMaps keep the input's own dicts instead of
        copies; only for input nobody else holds (JSON the codec just parsed)."""
        self.camel_case = camel_case
        self.adopt_input = adopt_input
        self._decoders: dict[Any, Decoder] = {}
        self._encoders: dict[Any, Encoder] = {}
        self._fields: dict[type, tuple[_Field, ...]] = {}

    # -- fields --------------------------------------------------------------------

    def fields(self, cls: type) -> tuple[_Field, ...]:
        cached = self._fields.get(cls)
        if cached is not None:
            return cached
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            wire = f.metadata.get("wire") or (camel(f.name) if self.camel_case else f.name)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            out.append(_Field(f.name, wire, hints[f.name], required, default))
        result = tuple(out)
        self._fields[cls] = result
        return result

    # -- decoding --------------------------------------------------------------------

    def decode(self, typ: Any, raw: Any, path: str = "") -> tuple[Any, list[Issue]]:
        """(value or None, issues). The value is None whenever there is an issue."""
        issues: list[Issue] = []
        value = self.decoder(typ)(raw, path, issues)
        return (None if issues or value is _BAD else value), issues

    def decode_fields(
        self,
        cls: type,
        raw: Any,
        path: str,
        issues: list[Issue],
        *,
        given: Mapping[str, Any] | None = None,
    ) -> Any:
        """Decode a dataclass whose fields in ``given`` come from elsewhere (metadata)."""
        return self._decode_dataclass(cls, raw, path, issues, given or {})

    def decoder(self, typ: Any) -> Decoder:
        dec = self._decoders.get(typ)
        if dec is None:
            dec = self._compile(typ)
            self._decoders[typ] = dec
        return dec

    def _compile(self, typ: Any) -> Decoder:
        if typ is Any:
            return lambda raw, path, issues: raw
        if typ is routing.Duration:

            def dec_duration(raw: Any, path: str, issues: list[Issue]) -> Any:
                if isinstance(raw, str) and routing.is_duration(raw):
                    return raw
                issues.append(Issue(path, f"expected {_type_name(typ)}, got {_got(raw)}",
                                    "write a number with a unit: h, m, s, ms, us or ns"))
                return _BAD

            return dec_duration
        origin = typing.get_origin(typ)
        if origin in (typing.Union, types.UnionType):
            return self._compile_union(typ)
        if origin is tuple:
            item_type = typing.get_args(typ)[0]
            item = self.decoder(item_type)
            scalar = item_type if item_type in (str, int) else None

            def dec_tuple(raw: Any, path: str, issues: list[Issue]) -> Any:
                if not isinstance(raw, (list, tuple)):
                    issues.append(Issue(path, f"expected a list, got {_got(raw)}",
                                        "write the value as a YAML list (- item)"))
                    return _BAD
                if scalar is not None:
                    for v in raw:
                        if type(v) is not scalar:
                            break
                    else:
                        return tuple(raw)
                mark = len(issues)
                out = [item(v, path, issues) for v in raw]
                for v in out:
                    if v is _BAD:
                        break
                else:
                    return tuple(out)
                del issues[mark:]  # again, with each item's path
                out = [item(v, f"{path}[{i}]", issues) for i, v in enumerate(raw)]
                return _BAD

            return dec_tuple
        if origin is FrozenMap:
            ktyp, vtyp = typing.get_args(typ)
            vdec = self.decoder(vtyp)

            def dec_map(raw: Any, path: str, issues: list[Issue]) -> Any:
                if not isinstance(raw, Mapping):
                    issues.append(Issue(path, f"expected a mapping, got {_got(raw)}",
                                        "write the value as key: value pairs"))
                    return _BAD
                out: dict[Any, Any] = {}
                if vtyp in (str, int):  # a plain map (labels, port numbers): no call per item
                    for k, v in raw.items():
                        if type(v) is not vtyp:
                            break
                        if type(k) is not ktyp:
                            k = _map_key(k, ktyp)
                            if k is _BAD:
                                break
                        out[k] = v
                    else:
                        return FrozenMap.adopt(out)
                    out = {}
                ok = True
                for k, v in raw.items():
                    key = _map_key(k, ktyp)
                    if key is _BAD:
                        issues.append(Issue(f"{path}.{k}", f"bad key {k!r}: expected "
                                            f"{_type_name(ktyp)}"))
                        ok = False
                        continue
                    out[key] = vdec(v, f"{path}.{k}", issues)
                    ok = ok and out[key] is not _BAD
                return FrozenMap(out) if ok else _BAD

            return dec_map
        if isinstance(typ, type) and issubclass(typ, enum.Enum):
            enum_cls = typ

            def dec_enum(raw: Any, path: str, issues: list[Issue]) -> Any:
                try:
                    return enum_cls(raw)
                except ValueError:
                    names = [str(m.value) for m in enum_cls]
                    close = difflib.get_close_matches(str(raw).upper(), names, n=1)
                    issues.append(Issue(path, f"expected {_type_name(enum_cls)}, got {_got(raw)}",
                                        f"did you mean {close[0]!r}?" if close else ""))
                    return _BAD

            return dec_enum
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):
            return self._compile_dataclass(typ)
        if typ in (str, int, float, bool):
            return _scalar_decoder(typ)
        raise TypeError(f"codec: unsupported model type {typ!r}")

    def _compile_union(self, typ: Any) -> Decoder:
        args = typing.get_args(typ)
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner = self.decoder(rest[0])

            def dec_optional(raw: Any, path: str, issues: list[Issue]) -> Any:
                if raw is None:
                    return None
                return inner(raw, path, issues)

            return dec_optional
        # a union of scalars, e.g. int | str (a Service targetPort)
        scalars = tuple(rest)

        def dec_union(raw: Any, path: str, issues: list[Issue]) -> Any:
            if raw is None and optional:
                return None
            for s in scalars:
                if isinstance(raw, s) and not (isinstance(raw, bool) and s is not bool):
                    return raw
            wanted = " or ".join(_type_name(s) for s in scalars)
            issues.append(Issue(path, f"expected {wanted}, got {_got(raw)}"))
            return _BAD

        return dec_union

    def _compile_dataclass(self, cls: type) -> Decoder:
        """The hot path, generated once per class (straight-line code, one dict lookup
        per field); any problem reruns the careful ``_decode_dataclass`` for its
        messages, paths and hints.

        Frozen dataclasses without ``__post_init__`` are built by filling
        ``__dict__`` (what ``__init__`` does, minus one ``object.__setattr__`` per
        field); defaults are immutable (None, (), an empty FrozenMap), so sharing
        them is safe.
        """
        compiled: Decoder | None = None

        def careful(raw: Any, path: str, issues: list[Issue]) -> Any:
            return self._decode_dataclass(cls, raw, path, issues, {})

        def dec_dataclass(raw: Any, path: str, issues: list[Issue]) -> Any:
            nonlocal compiled
            if compiled is None:  # generated lazily: model types refer to each other
                compiled = self._generate(cls, careful)
            return compiled(raw, path, issues)

        return dec_dataclass

    def _generate(self, cls: type, careful: Decoder) -> Decoder:
        direct = "__post_init__" not in vars(cls) and "__slots__" not in vars(cls)
        fields = self.fields(cls)
        env: dict[str, Any] = {"BAD": _BAD, "careful": careful, "cls": cls,
                               "new": object.__new__, "frozen": FrozenMap.adopt}
        required = [(i, f) for i, f in enumerate(fields) if f.required]
        lines = ["def dec(raw, path, issues):",
                 "    if type(raw) is not dict:",
                 "        return careful(raw, path, issues)",
                 f"    found = {len(required)}"]
        if required:
            lines.append("    try:")
            lines += [f"        v{i} = raw[{f.wire!r}]" for i, f in required]
            lines += ["    except KeyError:  # a required field is missing",
                      "        return careful(raw, path, issues)"]
        for i, f in enumerate(fields):
            env[f"dec_{i}"] = self.decoder(f.typ)
            env[f"default_{i}"] = f.default
            v = f"v{i}"
            if f.required:
                lines += _fast_check(v, f.typ, i, "    ", adopt=self.adopt_input)
            else:
                lines += [f"    if {f.wire!r} not in raw:",
                          f"        {v} = default_{i}",
                          "    else:",
                          "        found += 1",
                          f"        {v} = raw[{f.wire!r}]",
                          *_fast_check(v, f.typ, i, "        ", adopt=self.adopt_input)]
        lines += ["    if found != len(raw):  # an unknown field",
                  "        return careful(raw, path, issues)"]
        values = ", ".join(f"{f.name!r}: v{i}" for i, f in enumerate(fields))
        if direct:
            lines += ["    obj = new(cls)", f"    obj.__dict__.update({{{values}}})",
                      "    return obj"]
        else:
            lines.append(f"    return cls(**{{{values}}})")
        exec(compile("\n".join(lines), f"<codec decoder for {cls.__name__}>", "exec"), env)  # noqa: S102 - our own generated code
        return env["dec"]  # type: ignore[no-any-return]

    def _decode_dataclass(
        self, cls: type, raw: Any, path: str, issues: list[Issue], given: Mapping[str, Any]
    ) -> Any:
        if not isinstance(raw, Mapping):
            issues.append(Issue(path, f"expected a mapping, got {_got(raw)}",
                                f"write {cls.__name__} as key: value pairs"))
            return _BAD
        fields = self.fields(cls)
        by_wire = {f.wire: f for f in fields if f.name not in given}
        kwargs: dict[str, Any] = dict(given)
        ok = True
        prefix = f"{path}." if path else ""
        for key, value in raw.items():
            f = by_wire.get(key) if isinstance(key, str) else None
            if f is None:
                close = difflib.get_close_matches(str(key), list(by_wire), n=1)
                hint = (f"did you mean {close[0]!r}?" if close
                        else "known fields: " + ", ".join(sorted(by_wire)))
                issues.append(Issue(f"{prefix}{key}", f"unknown field {key!r} in {cls.__name__}",
                                    hint))
                ok = False
                continue
            decoded = self.decoder(f.typ)(value, f"{prefix}{key}", issues)
            if decoded is _BAD:
                ok = False
            else:
                kwargs[f.name] = decoded
        for f in fields:
            if f.required and f.name not in kwargs:
                issues.append(Issue(f"{prefix}{f.wire}", f"missing required field {f.wire!r}",
                                    f"{cls.__name__} needs {f.wire}"))
                ok = False
        return cls(**kwargs) if ok else _BAD

    # -- encoding ----------------------------------------------------------------------

    def encode(self, value: Any) -> Any:
        if value is None:
            return None
        return self.encoder(type(value))(value)

    def encoder(self, typ: Any) -> Encoder:
        enc = self._encoders.get(typ)
        if enc is None:
            enc = self._compile_encoder(typ)
            self._encoders[typ] = enc
        return enc

    def _compile_encoder(self, typ: Any) -> Encoder:
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):
            fields = self.fields(typ)

            def enc_dataclass(value: Any) -> Any:
                out: dict[str, Any] = {}
                for f in fields:
                    v = getattr(value, f.name)
                    if not f.required and _is_default(v, f.default):
                        continue
                    out[f.wire] = self._encode_any(v)
                return out

            return enc_dataclass
        return self._encode_any

    def _encode_any(self, v: Any) -> Any:
        if v is None or isinstance(v, (str, bool, int, float)):
            return v
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, tuple):
            return [self._encode_any(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): self._encode_any(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v):
            return self.encoder(type(v))(v)
        raise TypeError(f"codec: cannot encode {type(v).__name__}")


def _fast_check(v: str, typ: Any, i: int, ind: str, *, adopt: bool) -> list[str]:
    """Generated lines that accept ``v`` (the raw value of field ``i``) in place when it
    has the plain shape JSON gives (a str, a list of str, a dict of str to str...),
    else decode it with the field's decoder; a problem reruns the careful path."""
    generic = ["mark = len(issues)",
               f"{v} = dec_{i}({v}, path, issues)",
               f"if {v} is BAD:",
               "    del issues[mark:]",
               "    return careful(raw, path, issues)"]
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _fast_check(v, next(a for a in args if a is not type(None)), i, ind + "    ",
                            adopt=adopt)
        return [f"{ind}if {v} is not None:", *inner]
    if typ in (str, bool, int):  # exact types: True is not an int here
        return [f"{ind}if type({v}) is not {typ.__name__}:", *(ind + "    " + g for g in generic)]
    if origin is tuple and args[0] in (str, int):
        t = args[0].__name__
        return [f"{ind}ok = type({v}) is list",
                f"{ind}if ok:",
                f"{ind}    for x in {v}:",
                f"{ind}        if type(x) is not {t}:",
                f"{ind}            ok = False",
                f"{ind}            break",
                f"{ind}if ok:",
                f"{ind}    {v} = tuple({v})",
                f"{ind}else:",
                *(ind + "    " + g for g in generic)]
    if origin is FrozenMap and args[0] in (str, int) and args[1] in (str, int):
        value = args[1].__name__
        if args[0] is str:
            take = f"{v}" if adopt else f"dict({v})"
            return [f"{ind}ok = type({v}) is dict",
                    f"{ind}if ok:",
                    f"{ind}    for k, x in {v}.items():",
                    f"{ind}        if type(k) is not str or type(x) is not {value}:",
                    f"{ind}            ok = False",
                    f"{ind}            break",
                    f"{ind}if ok:",
                    f"{ind}    {v} = frozen({take})",
                    f"{ind}else:",
                    *(ind + "    " + g for g in generic)]
        # int keys: JSON's are strings, "8080" -> 8080 (ASCII digits only)
        return [f"{ind}ok = type({v}) is dict",
                f"{ind}if ok:",
                f"{ind}    m = {{}}",
                f"{ind}    for k, x in {v}.items():",
                f"{ind}        if type(x) is not {value}:",
                f"{ind}            ok = False",
                f"{ind}            break",
                f"{ind}        if type(k) is str and k.isascii() and k.isdigit():",
                f"{ind}            k = int(k)",
                f"{ind}        elif type(k) is not int:",
                f"{ind}            ok = False",
                f"{ind}            break",
                f"{ind}        m[k] = x",
                f"{ind}if ok:",
                f"{ind}    {v} = frozen(m)",
                f"{ind}else:",
                *(ind + "    " + g for g in generic)]
    return [ind + g for g in generic]


def _is_default(value: Any, default: Any) -> bool:
    if value is None:
        return default is None
    if isinstance(value, (tuple, FrozenMap)):
        return len(value) == 0 and default is not None and len(default) == 0
    return bool(value == default) and type(value) is type(default)


def _map_key(k: Any, ktyp: Any) -> Any:
    if ktyp is str:
        return k if isinstance(k, str) else _BAD
    if ktyp is int:
        if isinstance(k, int) and not isinstance(k, bool):
            return k
        if isinstance(k, str) and k.isascii() and k.isdigit():
            return int(k)
    return _BAD


def _scalar_decoder(typ: type) -> Decoder:
    def dec(raw: Any, path: str, issues: list[Issue]) -> Any:
        if typ is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, typ) and (typ is bool or not isinstance(raw, bool)):
            return raw
        hint = ""
        if typ is str and isinstance(raw, (int, float, bool)):
            hint = f"quote it: '{raw}'"
        elif typ is int and isinstance(raw, str) and raw.isdigit():
            hint = f"remove the quotes: {raw}"
        issues.append(Issue(path, f"expected {_type_name(typ)}, got {_got(raw)}", hint))
        return _BAD

    return dec


# -- the wire: resources by (kind, key) -------------------------------------------------

# decode_resource hands it JSON it has just parsed (and keeps no reference to)
WIRE = Schema(camel_case=False, adopt_input=True)


@dataclass(frozen=True)
class Kind:
    name: str
    cls: type
    for_agents: bool  # agents need it (L4); waypoints get every kind


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("workload", Workload, True),
        Kind("service", Service, True),
        Kind("authorization_policy", AuthorizationPolicy, True),
        Kind("peer_authentication", PeerAuthentication, True),
        Kind("virtual_service", routing.VirtualService, False),
        Kind("destination_rule", routing.DestinationRule, False),
        Kind("gateway", routing.Gateway, False),
        Kind("kubernetes_gateway", routing.KubernetesGateway, True),
        Kind("http_route", routing.KubernetesHTTPRoute, False),
    )
}
_KIND_BY_CLASS = {k.cls: k.name for k in KINDS.values()}

ResourceKey = tuple[str, str]  # (kind, key)


def kind_of(obj: Any) -> str:
    try:
        return _KIND_BY_CLASS[type(obj)]
    except KeyError:
        raise CodecError(f"{type(obj).__name__} is not a resource kind") from None


def key_of(obj: Any) -> str:
    uid = getattr(obj, "uid", None)
    return uid if isinstance(uid, str) else str(obj.key)


def resources(snapshot: Snapshot) -> dict[ResourceKey, Any]:
    """Every object of the snapshot by (kind, key)."""
    out: dict[ResourceKey, Any] = {}
    for group in (
        snapshot.workloads,
        snapshot.services,
        snapshot.authorization_policies,
        snapshot.peer_authentications,
        snapshot.routing,
    ):
        for obj in group:
            out[(kind_of(obj), key_of(obj))] = obj
    return out


def snapshot_from(
    objects: Iterable[Any], *, version: str = "", root_namespace: str = "istio-system"
) -> Snapshot:
    groups: dict[str, list[Any]] = {"w": [], "s": [], "ap": [], "pa": [], "r": []}
    for obj in objects:
        if isinstance(obj, Workload):
            groups["w"].append(obj)
        elif isinstance(obj, Service):
            groups["s"].append(obj)
        elif isinstance(obj, AuthorizationPolicy):
            groups["ap"].append(obj)
        elif isinstance(obj, PeerAuthentication):
            groups["pa"].append(obj)
        else:
            kind_of(obj)  # raises for a stranger
            groups["r"].append(obj)
    return Snapshot(
        version=version,
        workloads=tuple(groups["w"]),
        services=tuple(groups["s"]),
        authorization_policies=tuple(groups["ap"]),
        peer_authentications=tuple(groups["pa"]),
        routing=tuple(groups["r"]),
        root_namespace=root_namespace,
    )


def encode_resource(obj: Any) -> bytes:
    return json.dumps(WIRE.encode(obj), separators=(",", ":"), sort_keys=True).encode()


_WIRE_DECODERS: dict[str, Decoder] = {}  # kind -> WIRE.decoder(its class)


def decode_resource(kind: str, key: str, body: bytes) -> Any:
    """One resource from the wire; ``CodecError`` names kind, key and field."""
    spec = KINDS.get(kind)
    if spec is None:
        raise CodecError(f"unknown resource kind {kind!r} (codec version {CODEC_VERSION})")
    try:
        raw = orjson.loads(body)  # strict JSON (no NaN), UTF-8 checked, in C
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"{kind} {key}: body is not JSON: {exc}") from None
    issues: list[Issue] = []
    decode = _WIRE_DECODERS.get(kind)
    if decode is None:
        decode = _WIRE_DECODERS[kind] = WIRE.decoder(spec.cls)
    value = decode(raw, "", issues)
    if issues or value is _BAD:
        first = issues[0] if issues else Issue("", "does not decode")
        raise CodecError(f"{kind} {key}: {first.path or '(top)'}: {first.message}")
    obj_key = key_of(value)
    if obj_key != key:
        raise CodecError(f"{kind} {key}: body carries key {obj_key!r}")
    return value


def snapshot_to_json(snapshot: Snapshot) -> dict[str, Any]:
    """The ``/config_dump`` document."""
    out: dict[str, Any] = {
        "version": snapshot.version,
        "codec_version": CODEC_VERSION,
        "root_namespace": snapshot.root_namespace,
    }
    for kind in KINDS:
        out[kind] = []
    for (kind, _key), obj in sorted(resources(snapshot).items()):
        out[kind].append(WIRE.encode(obj))
    return out
