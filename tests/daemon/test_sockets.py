"""Serving gRPC on Unix sockets: tight modes from the first instant, the umask untouched."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path

import grpc
import pytest
from asyncinotify import Inotify, Mask

from daemon.sockets import SocketPathError, UnixSockets
from deviceplugin.files import bound_path_length
from deviceplugin.names import MAX_SOCKET_PATH


def no_services(server: grpc.aio.Server) -> None:
    pass


def process_umask() -> int:
    """The umask as the kernel has it now, read without changing it (Linux >= 4.7)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line in /proc/self/status")


async def test_serving_never_touches_the_process_umask(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(mask: int) -> int:
        raise AssertionError(f"os.umask({mask:o}) called: every thread would get it")

    monkeypatch.setattr(os, "umask", refuse)
    sockets = UnixSockets()
    path = short_tmp / "a.sock"
    server = await sockets.serve(path, no_services)
    await sockets.stop(server, path, grace=None)


async def test_files_that_threads_create_meanwhile_keep_their_modes(short_tmp: Path) -> None:
    """What the state store, CDI writer and NFD file do in worker threads while the
    loop binds sockets: every file and directory they make gets the mode it asked for
    under the umask the process started with."""
    umask = process_umask()
    stop = threading.Event()
    seen_umasks: set[int] = set()
    wrong: list[str] = []

    def create_files() -> None:
        index = 0
        while not stop.is_set():
            seen_umasks.add(process_umask())
            directory = short_tmp / "work" / str(index)
            directory.mkdir(mode=0o755, parents=True)
            file = directory / "f"
            file.touch(mode=0o644)
            for path, mode in ((directory, 0o755), (file, 0o644)):
                if stat.S_IMODE(path.stat().st_mode) != mode & ~umask:
                    wrong.append(f"{path}: {stat.S_IMODE(path.stat().st_mode):o}")
            index += 1

    sockets = UnixSockets()
    worker = threading.Thread(target=create_files)
    worker.start()
    try:
        for index in range(100):
            path = short_tmp / f"s{index}.sock"
            server = await sockets.serve(path, no_services)
            await sockets.stop(server, path, grace=None)
    finally:
        stop.set()
        await asyncio.to_thread(worker.join)
    assert seen_umasks == {umask}
    assert wrong == []


async def test_a_socket_appears_with_its_final_mode_and_nothing_else_stays(
    short_tmp: Path,
) -> None:
    sockets = UnixSockets()
    path = short_tmp / "plugin.sock"
    with Inotify() as inotify:
        inotify.add_watch(short_tmp, Mask.CREATE | Mask.MOVED_TO)
        server = await sockets.serve(path, no_services)
        try:
            async with asyncio.timeout(5):
                async for event in inotify:
                    assert event.name is not None
                    if event.name.name == path.name:
                        break
                    # The only other thing ever created here: a private, dot-named directory.
                    assert event.name.name.startswith(".")
                    assert event.mask & Mask.ISDIR
            assert stat.S_IMODE(path.lstat().st_mode) == 0o600
            assert [p.name for p in short_tmp.iterdir()] == [path.name]
            async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 5)
        finally:
            await sockets.stop(server, path, grace=None)
    assert not path.exists()


async def test_a_stale_socket_is_replaced_and_anything_else_refused(short_tmp: Path) -> None:
    sockets = UnixSockets()
    path = short_tmp / "a.sock"
    server = await sockets.serve(path, no_services)
    await server.stop(None)  # a crashed daemon: its socket stays behind
    assert path.is_socket()
    server = await sockets.serve(path, no_services)
    await sockets.stop(server, path, grace=None)
    path.write_text("not a socket")
    with pytest.raises(SocketPathError, match="is not a socket"):
        await sockets.serve(path, no_services)
    assert path.read_text() == "not a socket"
    assert [p.name for p in short_tmp.iterdir()] == [path.name]


def test_the_staging_path_counts_against_the_socket_limit() -> None:
    directory = Path("/" + "d" * 90)
    assert bound_path_length(directory / "a-long-socket-name.sock") == 91 + 24
    assert bound_path_length(directory / "csi.sock") == 91 + len("/.XXXXXXXX/s")
    # A path that fits by itself can need a staging path that does not.
    tight = Path("/" + "d" * 95) / "csi.sock"
    assert len(str(tight)) <= MAX_SOCKET_PATH < bound_path_length(tight)
