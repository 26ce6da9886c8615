"""Request checks, without a server: every refusal names its field and has the right status."""

from __future__ import annotations

import grpc
import pytest

from rest.types import SearchParams
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.validation import RequestError, RequestLimits, SearchRequestParser

LIMITS = RequestLimits(vocab_size=100, max_context_tokens=8, shards=("shard-00000", "shard-00001"))


def parse(**fields):
    return SearchRequestParser(LIMITS).parse(pb.SearchRequest(**fields))


def refusal(**fields) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(**fields)
    return info.value


def test_unset_params_are_the_defaults():
    parsed = parse(context=[1, 2, 3])
    assert parsed.params == SearchParams()
    assert parsed.shards is None
    assert parse(context=[1], params=pb.SearchParams()).params == SearchParams()


def test_set_fields_override_only_themselves():
    wire_params = pb.SearchParams(budget=0, max_depth=3, policy=pb.POLICY_REST)
    parsed = parse(context=[1], params=wire_params)
    assert parsed.params == SearchParams(budget=0, max_depth=3, policy="rest")


def test_context_is_cut_to_the_last_max_span_tokens():
    parsed = parse(context=[1, 2, 3, 4, 5], params=pb.SearchParams(min_span=1, max_span=2))
    assert parsed.context == [4, 5]


def test_a_named_shard_is_searched_alone():
    assert parse(context=[1], shard="shard-00001").shards == ["shard-00001"]


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"context": []}, "context"),
        ({"context": list(range(9))}, "context"),  # over max_context_tokens (8)
        ({"context": [1, 100]}, "context"),  # id == vocab_size
        ({"context": [1], "params": pb.SearchParams(min_span=0)}, "params.min_span"),
        ({"context": [1], "params": pb.SearchParams(max_span=257)}, "params.max_span"),
        ({"context": [1], "params": pb.SearchParams(min_span=5, max_span=3)}, "params.max_span"),
        ({"context": [1], "params": pb.SearchParams(budget=4097)}, "params.budget"),
        ({"context": [1], "params": pb.SearchParams(max_depth=0)}, "params.max_depth"),
        ({"context": [1], "params": pb.SearchParams(max_depth=257)}, "params.max_depth"),
        ({"context": [1], "params": pb.SearchParams(policy=7)}, "params.policy"),
    ],
)
def test_invalid_argument_names_the_field(fields, field_name):
    error = refusal(**fields)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message.startswith(field_name), error.message


def test_out_of_vocabulary_message_says_where():
    error = refusal(context=[5, 6, 250, 7])
    assert "token id 250 at position 2" in error.message
    assert "size 100" in error.message


def test_unknown_shard_is_not_found_and_lists_the_served_ones():
    error = refusal(context=[1], shard="shard-00009")
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.message.startswith("shard")
    assert "shard-00000" in error.message


def test_empty_shard_name_is_not_found():
    assert refusal(context=[1], shard="").code == grpc.StatusCode.NOT_FOUND


def test_params_are_validated_every_time_they_are_invalid():
    parser = SearchRequestParser(LIMITS)
    bad = pb.SearchRequest(context=[1], params=pb.SearchParams(budget=5000))
    for _ in range(2):  # an invalid message is never remembered as valid
        with pytest.raises(RequestError):
            parser.parse(bad)


def test_a_malformed_message_is_invalid_argument_naming_the_type():
    from retriever_service.validation import decode

    with pytest.raises(RequestError) as info:
        decode(pb.SearchRequest, b"\x0a\x05\x01")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "rest.retriever.v1.SearchRequest" in info.value.message
    valid = pb.SearchRequest(context=[3]).SerializeToString()
    assert decode(pb.SearchRequest, valid).context == [3]


def test_refusals_stay_short_whatever_the_request_or_the_server_holds():
    from retriever_service.validation import MAX_MESSAGE_CHARS

    many = RequestLimits(vocab_size=100, max_context_tokens=8,
                         shards=tuple(f"shard-{i:05d}" for i in range(5000)))
    with pytest.raises(RequestError) as info:
        SearchRequestParser(many).parse(pb.SearchRequest(context=[1], shard="y" * 100_000))
    message = info.value.message
    assert len(message) < 400, message
    assert "100000 characters" in message and "shard-00000" in message
    assert "and 4992 more" in message
    assert len(RequestError(grpc.StatusCode.INTERNAL, "z" * 50_000).message) == MAX_MESSAGE_CHARS


def test_levels_default_to_one_and_are_capped():
    from rest.datastore import MAX_LEVELS

    assert parse(context=[1]).levels == 1
    assert parse(context=[1], levels=MAX_LEVELS).levels == MAX_LEVELS
    for levels in (0, MAX_LEVELS + 1):
        error = refusal(context=[1], levels=levels)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.message.startswith("levels"), error.message
