"""Turning metastore's errors into what a gRPC client sees."""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from metastore.cluster import NOT_SUPPORTED_FOR_LEARNER
from metastore.errors import EtcdError

log = logging.getLogger("metastore.api")

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])
S = TypeVar("S", bound=Callable[..., AsyncIterator[Any]])
Mapping = Callable[[EtcdError], EtcdError]


def _unchanged(err: EtcdError) -> EtcdError:
    return err


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, name: str, mapped: Mapping) -> None:
    """End the call for `exc`: etcd's code and message for an EtcdError
    (`mapped` first); anything else is a bug, logged and reported as INTERNAL."""
    if isinstance(exc, EtcdError):
        err = mapped(exc)
        await context.abort(err.code, err.message)
    else:  # a bug: say so, keep serving
        log.error("%s failed", name, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"etcdserver: internal error: {exc}")


def etcd_errors(handler: H, mapped: Mapping = _unchanged) -> H:
    """Decorate a unary handler: an EtcdError becomes etcd's (code, message);
    anything else is logged and reported as INTERNAL, and the server keeps serving."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort(context, exc, handler.__name__, mapped)

    return wrapper  # type: ignore[return-value]


def etcd_stream_errors(handler: S, mapped: Mapping = _unchanged) -> S:
    """etcd_errors for a handler that streams its answers: the error ends
    the stream."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async with contextlib.aclosing(handler(self, request, context)) as responses:
                async for resp in responses:
                    yield resp
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort(context, exc, handler.__name__, mapped)

    return wrapper  # type: ignore[return-value]


def flatten_code(err: EtcdError) -> EtcdError:
    """The error as etcd's lock and election services report it: they call
    the KV API through an in-process client that keeps etcd's message but
    loses its code, so the client sees UNKNOWN -- also for "no leader" or a
    timeout, which a client must not blindly retry here (a Lock with lease 0
    that timed out after its put was applied holds a place in the queue).
    A learner's refusal keeps its code: etcd refuses before the service runs."""
    if err == NOT_SUPPORTED_FOR_LEARNER:
        return err
    return EtcdError(grpc.StatusCode.UNKNOWN, err.message)


def recipe_errors(handler: H) -> H:
    """etcd_errors for the lock and election services' unary calls (see flatten_code)."""
    return etcd_errors(handler, flatten_code)


def recipe_stream_errors(handler: S) -> S:
    """etcd_stream_errors for the election service's Observe (see flatten_code)."""
    return etcd_stream_errors(handler, flatten_code)
