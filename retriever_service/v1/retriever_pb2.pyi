from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_UNSPECIFIED: _ClassVar[Policy]
    POLICY_EXACT: _ClassVar[Policy]
    POLICY_REST: _ClassVar[Policy]
POLICY_UNSPECIFIED: Policy
POLICY_EXACT: Policy
POLICY_REST: Policy

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("format_version", "vocab_size", "n_tokens", "n_docs", "tokenizer_name", "tokenizer_fingerprint", "shards", "search_port")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_DOCS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PORT_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    vocab_size: int
    n_tokens: int
    n_docs: int
    tokenizer_name: str
    tokenizer_fingerprint: str
    shards: _containers.RepeatedScalarFieldContainer[str]
    search_port: int
    def __init__(self, format_version: _Optional[int] = ..., vocab_size: _Optional[int] = ..., n_tokens: _Optional[int] = ..., n_docs: _Optional[int] = ..., tokenizer_name: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., shards: _Optional[_Iterable[str]] = ..., search_port: _Optional[int] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("min_span", "max_span", "budget", "max_depth", "policy")
    MIN_SPAN_FIELD_NUMBER: _ClassVar[int]
    MAX_SPAN_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    min_span: int
    max_span: int
    budget: int
    max_depth: int
    policy: Policy
    def __init__(self, min_span: _Optional[int] = ..., max_span: _Optional[int] = ..., budget: _Optional[int] = ..., max_depth: _Optional[int] = ..., policy: _Optional[_Union[Policy, str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("context", "params", "shard", "levels", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: _containers.RepeatedScalarFieldContainer[int]
    params: SearchParams
    shard: str
    levels: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, context: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SearchParams, _Mapping]] = ..., shard: _Optional[str] = ..., levels: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("match_length", "occurrences", "tokens", "parents", "counts", "shard", "backoff", "searched_shards", "cut_count")
    MATCH_LENGTH_FIELD_NUMBER: _ClassVar[int]
    OCCURRENCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    CUT_COUNT_FIELD_NUMBER: _ClassVar[int]
    match_length: int
    occurrences: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    shard: str
    backoff: _containers.RepeatedCompositeFieldContainer[Level]
    searched_shards: _containers.RepeatedScalarFieldContainer[str]
    cut_count: int
    def __init__(self, match_length: _Optional[int] = ..., occurrences: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., shard: _Optional[str] = ..., backoff: _Optional[_Iterable[_Union[Level, _Mapping]]] = ..., searched_shards: _Optional[_Iterable[str]] = ..., cut_count: _Optional[int] = ...) -> None: ...

class Level(_message.Message):
    __slots__ = ("match_length", "occurrences", "tokens", "parents", "counts", "cut_count")
    MATCH_LENGTH_FIELD_NUMBER: _ClassVar[int]
    OCCURRENCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    CUT_COUNT_FIELD_NUMBER: _ClassVar[int]
    match_length: int
    occurrences: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    cut_count: int
    def __init__(self, match_length: _Optional[int] = ..., occurrences: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., cut_count: _Optional[int] = ...) -> None: ...
