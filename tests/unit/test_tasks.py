"""The supervisor's end: a stop signal that arrives after its event loop ended is dropped, not acted on."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator

import pytest

from sandboxd.daemon.tasks import STOP_SIGNALS, drop_stop_signals, held_back_at_the_end, signal_free_executor


@pytest.fixture
def restored_signals() -> Iterator[None]:
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


async def _ends_with(code: int) -> int:
    await asyncio.sleep(0)
    return code


def test_a_ctrl_c_after_the_loop_ended_neither_raises_nor_is_lost_before_the_clean_up(restored_signals: None) -> None:
    code = asyncio.run(held_back_at_the_end(_ends_with(7)))
    # To this thread (pytest may run others, which do not block them: the supervisor's executor
    # threads do, see below, so the kernel gives a process's signal to its main thread).
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # without the hold this raises KeyboardInterrupt here
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # and this ends the test process
    assert code == 7
    assert signal.sigpending() == STOP_SIGNALS
    drop_stop_signals()
    assert signal.sigpending() == set()
    assert {signal.getsignal(sig) for sig in STOP_SIGNALS} == {signal.SIG_IGN}


def test_the_hold_starts_even_when_the_main_coroutine_raises(restored_signals: None) -> None:
    async def fails() -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        asyncio.run(held_back_at_the_end(fails()))
    assert STOP_SIGNALS <= signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_the_loops_executor_threads_never_take_a_stop_signal() -> None:
    async def mask_in_a_worker() -> set[signal.Signals]:
        asyncio.get_running_loop().set_default_executor(signal_free_executor())
        return await asyncio.to_thread(signal.pthread_sigmask, signal.SIG_BLOCK, set())

    assert STOP_SIGNALS <= asyncio.run(mask_in_a_worker())
