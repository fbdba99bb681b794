"""How the gRPC layer reports a streaming handler's failures (api/errors.py):
etcd's code and message for an EtcdError, INTERNAL for a bug, and the
flattened code of the lock and election services."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from metastore import errors
from metastore.api.errors import etcd_stream_errors, recipe_stream_errors
from metastore.cluster import NOT_SUPPORTED_FOR_LEARNER


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


def run(handler, context: Context) -> list:
    async def collect() -> list:
        got = []
        with pytest.raises(Aborted):
            async for item in handler(None, None, context):
                got.append(item)
        return got
    return asyncio.run(collect())


def streaming(error: Exception):
    async def handler(self, request, context):
        yield 1
        raise error
    return handler


def test_an_etcd_error_ends_the_stream_with_its_code_after_what_was_sent():
    context = Context()
    assert run(etcd_stream_errors(streaming(errors.NO_LEADER)), context) == [1]
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader")


def test_a_bug_ends_the_stream_as_internal():
    context = Context()
    assert run(etcd_stream_errors(streaming(KeyError("boom"))), context) == [1]
    code, message = context.aborted
    assert code == grpc.StatusCode.INTERNAL and "boom" in message


def test_the_election_stream_flattens_codes_but_a_learners_refusal():
    context = Context()
    run(recipe_stream_errors(streaming(errors.LEASE_NOT_FOUND)), context)
    assert context.aborted == (grpc.StatusCode.UNKNOWN, "etcdserver: requested lease not found")
    run(recipe_stream_errors(streaming(NOT_SUPPORTED_FOR_LEARNER)), context)
    assert context.aborted == (NOT_SUPPORTED_FOR_LEARNER.code, NOT_SUPPORTED_FOR_LEARNER.message)
