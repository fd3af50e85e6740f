"""The offline buffer and a session's drain of it, without a gateway."""

from __future__ import annotations

from pathlib import Path

from edgeloop.edge.buffer import DiskBuffer, Drain, Lost, MemoryBuffer


def test_a_disk_buffer_reopens_with_its_batches_oldest_first(tmp_path: Path) -> None:
    buffer = DiskBuffer(tmp_path, max_batches=3)
    for i in range(5):
        buffer.append(f"b{i}", f"data {i}".encode())
    assert buffer.take_lost() == Lost(dropped=2)
    buffer.append("b5", b"data 5")
    assert buffer.ack("b3")

    again = DiskBuffer(tmp_path, max_batches=3)
    assert again.ids() == ["b4", "b5"]
    assert again.get("b4") == b"data 4"
    assert again.bytes_used == 2 * len(b"data 0")
    assert again.take_lost() == Lost(dropped=1), "the drop count waits for the next batch"
    assert DiskBuffer(tmp_path).take_lost() == Lost()


def test_unreadable_files_are_set_aside_and_counted(tmp_path: Path) -> None:
    buffer = DiskBuffer(tmp_path)
    for i in range(4):
        buffer.append(f"b{i}", b"x" * 40)
    files = sorted(tmp_path.glob("*.pb"))
    files[0].write_bytes(files[0].read_bytes()[:30])  # truncated
    raw = bytearray(files[1].read_bytes())
    raw[-1] ^= 0xFF  # garbled
    files[1].write_bytes(bytes(raw))
    (tmp_path / "junk.pb").write_bytes(b"?")  # not a name the buffer writes

    reopened = DiskBuffer(tmp_path)
    assert reopened.corrupt == 1, "a misnamed file is set aside at once"
    assert reopened.ids() == ["b0", "b1", "b2", "b3"]
    assert [reopened.get(i) for i in reopened.ids()] == [None, None, b"x" * 40, b"x" * 40]
    assert reopened.ids() == ["b2", "b3"]
    assert reopened.corrupt == 3
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == sorted(
        [files[0].name, files[1].name, "junk.pb"]
    )
    assert DiskBuffer(tmp_path).take_lost() == Lost(corrupt=3)


def test_a_drain_sends_live_batches_first_then_the_backlog_within_its_window() -> None:
    buffer = MemoryBuffer()
    for i in range(5):
        buffer.append(f"old{i}", b"o")
    drain = Drain(buffer, window=2)
    sent = []

    def send() -> str | None:
        taken = drain.next()
        if taken is None:
            return None
        drain.sent(taken[0])
        sent.append(taken[0])
        return taken[0]

    assert send() == "old0"
    buffer.append("live", b"l")
    drain.add("live")
    assert send() == "live"
    assert send() is None, "the window is full"
    buffer.ack("old0")
    drain.answered("old0")
    drain.hold("live")  # the bus could not take it
    assert send() == "old1"
    drain.again("live")
    assert send() == "live", "a batch to send again goes first"
    assert not drain.stalled(60)
    assert drain.stalled(-1)
    for batch_id in ("old1", "live"):
        buffer.ack(batch_id)
        drain.answered(batch_id)
    buffer.ack("old2")  # gone meanwhile (dropped, say): skipped
    assert send() == "old3"
    assert sent == ["old0", "live", "old1", "live", "old3"]
