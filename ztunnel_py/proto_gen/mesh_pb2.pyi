from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_KIND_UNSPECIFIED: _ClassVar[NodeKind]
    NODE_KIND_AGENT: _ClassVar[NodeKind]
    NODE_KIND_WAYPOINT: _ClassVar[NodeKind]
NODE_KIND_UNSPECIFIED: NodeKind
NODE_KIND_AGENT: NodeKind
NODE_KIND_WAYPOINT: NodeKind

class Hello(_message.Message):
    __slots__ = ("node", "kind", "last_version", "codec_version")
    NODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAST_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    node: str
    kind: NodeKind
    last_version: str
    codec_version: int
    def __init__(self, node: _Optional[str] = ..., kind: _Optional[_Union[NodeKind, str]] = ..., last_version: _Optional[str] = ..., codec_version: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("version", "error")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    version: str
    error: str
    def __init__(self, version: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "ack", "nack")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ack: Ack
    nack: Nack
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., nack: _Optional[_Union[Nack, _Mapping]] = ...) -> None: ...

class ResourceKey(_message.Message):
    __slots__ = ("kind", "key")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    kind: str
    key: str
    def __init__(self, kind: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("kind", "key", "body")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    kind: str
    key: str
    body: bytes
    def __init__(self, kind: _Optional[str] = ..., key: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class Update(_message.Message):
    __slots__ = ("version", "base_version", "codec_version", "root_namespace", "upserts", "removals")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROOT_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    REMOVALS_FIELD_NUMBER: _ClassVar[int]
    version: str
    base_version: str
    codec_version: int
    root_namespace: str
    upserts: _containers.RepeatedCompositeFieldContainer[Resource]
    removals: _containers.RepeatedCompositeFieldContainer[ResourceKey]
    def __init__(self, version: _Optional[str] = ..., base_version: _Optional[str] = ..., codec_version: _Optional[int] = ..., root_namespace: _Optional[str] = ..., upserts: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., removals: _Optional[_Iterable[_Union[ResourceKey, _Mapping]]] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("update",)
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    update: Update
    def __init__(self, update: _Optional[_Union[Update, _Mapping]] = ...) -> None: ...
