"""Where content work runs (bridge/delivery/content.py): a small plain message on the event
loop, every shape of issue 15's hostile corpus (however small) and every big or spooled
message in a worker thread, at most ``parse_threads`` at once."""

from __future__ import annotations

import threading

import hostile_corpus as corpus
import pytest
import trio
from bridge_process import message, until
from payload_samples import smtp_source

from bridge.base.transaction import MessageBuffer
from bridge.delivery.content import LIGHT_MAX, ContentWork, is_light


def buffer(data: bytes, spool_threshold: int = 1 << 20) -> MessageBuffer:
    buf = MessageBuffer(spool_threshold)
    for i in range(0, len(data), 1000):
        buf.write(data[i : i + 1000])
    return buf


@pytest.mark.parametrize(
    "data",
    [
        smtp_source(4096),  # the benchmark's (a), (b) and (e)
        smtp_source(256 * 1024),  # (c)
        message(body="Hello.\r\n" * 1000),
        message(subject="Grüße", body="Grüße", Content_Type="text/plain; charset=utf-8"),
        message(Content_Type='text/plain; charset="ISO-8859-1"', Content_Transfer_Encoding="qp"),
        message(to="Bob <bob@example.org>, carol@example.org, Dan <dan@example.org>"),
    ],
)
def test_a_small_plain_message_is_light(data: bytes) -> None:
    assert is_light(buffer(data))


@pytest.mark.parametrize(
    "data",
    [
        corpus.encoded_words_subject(5),
        corpus.many_addresses(20),
        corpus.nested_multiparts(1),
        corpus.many_parts(2),
        corpus.punycode_body(100),
        corpus.text_in_charset("base64", b"aGVsbG8=\r\n"),
        corpus.text_in_charset("zlib_codec", b"x\r\n"),
        corpus.utf7_surrogate(),
        corpus.header_injection_attachment(),
        corpus.control_filename_attachment(),
        message(Content_Type="message/rfc822"),
        message(Content_Disposition="attachment; filename*=utf-8''a.txt"),
        message(subject="(" * 9),
        message(**{f"X_H{i}": "x" for i in range(60)}),  # many header lines
        message(X_Long="x" * 5000),  # a big header block
        message(body="x" * LIGHT_MAX),  # too big
        message(Content_Transfer_Encoding="base64", body="eHh4\r\n" * 20000),  # to decode
    ],
)
def test_a_shape_that_can_parse_slowly_is_not_light(data: bytes) -> None:
    assert not is_light(buffer(data))


def test_a_spooled_message_is_not_light() -> None:
    assert not is_light(buffer(message(), spool_threshold=10))


async def test_content_work_runs_inline_or_in_a_bounded_thread_pool() -> None:
    work = ContentWork(threads=1)
    loop_thread = threading.get_ident()
    assert await work.run(True, threading.get_ident) == loop_thread
    assert await work.run(False, threading.get_ident) != loop_thread

    running = 0
    most = 0
    gate = threading.Event()

    def job() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        gate.wait(5)
        running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(work.run, False, job)

        async def two_waiting() -> bool:
            return work.limiter.statistics().tasks_waiting == 2

        with trio.fail_after(30):
            await until(two_waiting)
        assert work.limiter.borrowed_tokens == 1  # the two others wait for the one thread
        gate.set()
    assert most == 1
