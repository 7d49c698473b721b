from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CreateCertificateRequest(_message.Message):
    __slots__ = ("csr", "validity_duration", "identity")
    CSR_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_DURATION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    csr: str
    validity_duration: int
    identity: str
    def __init__(self, csr: _Optional[str] = ..., validity_duration: _Optional[int] = ..., identity: _Optional[str] = ...) -> None: ...

class CreateCertificateResponse(_message.Message):
    __slots__ = ("cert_chain", "trust_bundle")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[str]
    trust_bundle: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cert_chain: _Optional[_Iterable[str]] = ..., trust_bundle: _Optional[_Iterable[str]] = ...) -> None: ...
