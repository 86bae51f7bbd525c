"""Domain errors of the CSI driver and the one place they become gRPC statuses.

Every check in the driver raises one of these with a message naming the field;
`rpc` (applied to each servicer method) turns them into the status code the spec
lists for that condition, and anything unexpected into INTERNAL, logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


class SetupError(Exception):
    """The driver cannot start until an admin fixes something; the message says what and how.

    Restarting the daemon would not help, so the daemon stops only the CSI driver
    and reports the message (log, /readyz) while the device plugins go on.
    """


class CsiError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgumentError(CsiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(CsiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(CsiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class OutOfRangeError(CsiError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhaustedError(CsiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AbortedError(CsiError):
    """Another operation on the same volume, snapshot or name is in flight."""

    code = grpc.StatusCode.ABORTED


class FailedPreconditionError(CsiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class CommandError(CsiError):
    """A storage command (mount, btrfs, losetup...) failed; the message is its stderr."""

    code = grpc.StatusCode.INTERNAL


def quoted(value: str, limit: int = 80) -> str:
    """repr() of a request string, shortened: statuses travel in size-limited trailers."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def rpc(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Turn exceptions raised by a unary CSI servicer method into statuses with messages."""

    @functools.wraps(method)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        context: grpc.aio.ServicerContext[Any, Any] = args[-1] if args else kwargs["context"]  # type: ignore[assignment]
        try:
            return await method(self, *args, **kwargs)
        except grpc.aio.AbortError:
            raise
        except CsiError as error:
            if error.code == grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", method.__name__, error)  # noqa: TRY400 (no traceback: the message says it)
            await context.abort(error.code, str(error))
        except Exception as error:
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")

    return wrapper


class UnimplementedError(CsiError):
    code = grpc.StatusCode.UNIMPLEMENTED
