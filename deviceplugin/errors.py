"""Domain errors of the device-plugin service and the one place they become gRPC statuses."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import grpc

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


class DevicePluginError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidRequestError(DevicePluginError):
    """The kubelet asked for something that cannot be (unknown, unhealthy, repeated ids)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BackendTimeoutError(DevicePluginError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BackendFailureError(DevicePluginError):
    """A vendor hook raised; the message is the vendor's."""

    code = grpc.StatusCode.INTERNAL


async def bounded_hook(
    name: str, call: Awaitable[R], timeout: float, reason: str | None = None
) -> R:
    """Await a vendor hook for at most `timeout` seconds; its failures become ours.

    reason: what set the bound, for the message (hookTimeout, a caller's deadline).
    """
    try:
        async with asyncio.timeout(timeout):
            return await call
    except TimeoutError as error:
        why = f" ({reason})" if reason else ""
        raise BackendTimeoutError(
            f"backend {name} did not finish within {timeout:.3g}s{why}"
        ) from error
    except Exception as error:
        raise BackendFailureError(f"backend {name} failed: {error}") from error


def quoted(value: str, limit: int = 80) -> str:
    """repr() of a request string, shortened: statuses travel in size-limited trailers."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


async def abort(context: grpc.aio.ServicerContext[object, object], error: Exception) -> NoReturn:
    if isinstance(error, DevicePluginError):
        await context.abort(error.code, str(error))
    log.exception("unexpected error in a device-plugin RPC", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")


def grpc_errors(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Turn exceptions raised by a unary servicer method into statuses with messages."""

    @functools.wraps(method)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            context = args[-1] if args else kwargs["context"]
            await abort(context, error)  # type: ignore[arg-type]

    return wrapper
