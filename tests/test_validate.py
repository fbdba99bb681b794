"""Request validation done before proposing, with etcd's errors."""
from __future__ import annotations

from typing import Callable

import pytest

from metastore import errors
from metastore.api.pb import rpc_pb2 as pb
from metastore.errors import EtcdError
from metastore.validate import (
    validate_delete_range,
    validate_put,
    validate_range,
    validate_txn,
)

RR = pb.RangeRequest
C = pb.Compare


def fails(err: EtcdError, fn: Callable, *args, **kwargs) -> None:
    with pytest.raises(EtcdError) as info:
        fn(*args, **kwargs)
    assert info.value == err, info.value.message


def put(key: bytes, value: bytes = b"", **kw) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, **kw))


def dele(key: bytes, range_end: bytes = b"") -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end))


def rng(key: bytes, **kw) -> pb.RequestOp:
    return pb.RequestOp(request_range=RR(key=key, **kw))


def sub(compare=(), success=(), failure=()) -> pb.RequestOp:
    return pb.RequestOp(request_txn=pb.TxnRequest(compare=compare, success=success, failure=failure))


def txn(compare=(), success=(), failure=()) -> pb.TxnRequest:
    return pb.TxnRequest(compare=compare, success=success, failure=failure)


def test_range() -> None:
    validate_range(RR(key=b"a"))
    validate_range(RR(key=b"a", sort_order=RR.DESCEND, sort_target=RR.VALUE))
    fails(errors.EMPTY_KEY, validate_range, RR())
    fails(errors.EMPTY_KEY, validate_range, RR(range_end=b"\x00"))
    fails(errors.INVALID_SORT_OPTION, validate_range, RR(key=b"a", sort_order=3))
    fails(errors.INVALID_SORT_OPTION, validate_range, RR(key=b"a", sort_target=5))
    fails(errors.INVALID_SORT_OPTION, validate_range, RR(key=b"a", sort_order=-1))


def test_put() -> None:
    validate_put(pb.PutRequest(key=b"a", value=b"v", lease=3))
    validate_put(pb.PutRequest(key=b"a", ignore_value=True, ignore_lease=True))
    fails(errors.EMPTY_KEY, validate_put, pb.PutRequest(value=b"v"))
    fails(errors.VALUE_PROVIDED, validate_put, pb.PutRequest(key=b"a", value=b"v", ignore_value=True))
    fails(errors.LEASE_PROVIDED, validate_put, pb.PutRequest(key=b"a", lease=1, ignore_lease=True))


def test_delete_range() -> None:
    validate_delete_range(pb.DeleteRangeRequest(key=b"a", range_end=b"b"))
    fails(errors.EMPTY_KEY, validate_delete_range, pb.DeleteRangeRequest(range_end=b"b"))


def test_txn_checks_every_op_recursively() -> None:
    validate_txn(txn([C(key=b"a")], [put(b"a"), rng(b"a"), dele(b"b")], [sub([C(key=b"x")], [put(b"y")])]))
    fails(errors.EMPTY_KEY, validate_txn, txn([C(key=b"")]))
    fails(errors.EMPTY_KEY, validate_txn, txn(success=[put(b"")]))
    fails(errors.EMPTY_KEY, validate_txn, txn(failure=[dele(b"")]))
    fails(errors.INVALID_SORT_OPTION, validate_txn, txn(success=[rng(b"a", sort_order=9)]))
    fails(errors.VALUE_PROVIDED, validate_txn, txn(success=[sub(success=[put(b"a", b"v", ignore_value=True)])]))
    fails(errors.EMPTY_KEY, validate_txn, txn(success=[sub(failure=[sub([C(key=b"")])])]))
    # An op with nothing set: etcd answers "key not found".
    fails(errors.KEY_NOT_FOUND, validate_txn, txn(success=[pb.RequestOp()]))


def test_txn_too_many_ops() -> None:
    validate_txn(txn(success=[put(b"k%d" % i) for i in range(128)]))
    fails(errors.TOO_MANY_OPS, validate_txn, txn(success=[put(b"k%d" % i) for i in range(129)]))
    fails(errors.TOO_MANY_OPS, validate_txn, txn(failure=[rng(b"k")] * 129))
    fails(errors.TOO_MANY_OPS, validate_txn, txn([C(key=b"k")] * 129))
    validate_txn(txn([C(key=b"k")] * 4, [put(b"a")] * 1), max_ops=4)
    fails(errors.TOO_MANY_OPS, validate_txn, txn(success=[put(b"k%d" % i) for i in range(5)]), max_ops=4)
    # A nested txn gets what its parent leaves: 4 - 2 = 2 ops.
    validate_txn(txn(success=[rng(b"a"), sub(success=[rng(b"b"), rng(b"c")])]), max_ops=4)
    fails(
        errors.TOO_MANY_OPS,
        validate_txn,
        txn(success=[rng(b"a"), sub(success=[rng(b"b"), rng(b"c"), rng(b"d")])]),
        max_ops=4,
    )


@pytest.mark.parametrize(
    "ops",
    [
        [put(b"a"), put(b"a")],
        [put(b"a"), dele(b"a")],
        [dele(b"a"), put(b"a")],
        [dele(b"a", b"c"), put(b"b")],
        [put(b"a"), sub(success=[put(b"a")])],
        [sub(success=[put(b"a")]), put(b"a")],
        [sub(failure=[put(b"a")]), put(b"a")],
        [sub(success=[put(b"a")]), sub(success=[put(b"a")])],
        [sub(success=[dele(b"a", b"c")]), put(b"b")],
        [dele(b"a", b"c"), sub(failure=[put(b"b")])],
        [sub(success=[sub(success=[put(b"a")])]), put(b"a")],
        [sub(success=[put(b"a"), put(b"a")])],
        [sub(failure=[put(b"x")]), sub(success=[put(b"x")])],
    ],
)
def test_txn_duplicate_keys(ops: list[pb.RequestOp]) -> None:
    fails(errors.DUPLICATE_KEY, validate_txn, txn(success=ops))
    fails(errors.DUPLICATE_KEY, validate_txn, txn(failure=ops))


@pytest.mark.parametrize(
    "ops",
    [
        [put(b"a"), put(b"b")],
        [dele(b"a"), dele(b"a", b"z")],  # overlapping deletes are fine
        [dele(b"a", b"c"), put(b"c")],  # range_end is exclusive
        [dele(b"b"), put(b"b\x00")],
        [rng(b"a"), put(b"a"), rng(b"a")],
        # The two branches of one nested txn are exclusive.
        [sub(success=[put(b"a")], failure=[put(b"a")])],
        [sub(success=[dele(b"a")], failure=[put(b"a")])],
        # etcd's check reads range_end "\0" literally (no key is below it),
        # so a put after a delete-to-the-end is accepted, as etcd accepts it.
        [dele(b"a", b"\x00"), put(b"b")],
    ],
)
def test_txn_allowed_write_mixes(ops: list[pb.RequestOp]) -> None:
    validate_txn(txn(success=ops))
    validate_txn(txn(success=ops, failure=ops))  # branches are checked separately
