"""A small reader of `text/event-stream`, for batchd's own consumers (the demo, the benchmark, the tests).

It parses what the HTML standard's EventSource parses — `id:`, `event:`, `data:` (joined with newlines
when repeated), `retry:`, comments — from any async iterator of byte chunks, such as aiohttp's
`response.content.iter_any()`, with lines split across chunks put back together.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field


@dataclass
class Message:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def is_event(self) -> bool:
        """False for a block of only comments or `retry:`: the browser dispatches no event for it."""
        return bool(self.data_lines)

    data_lines: list[str] = field(default_factory=list, repr=False)


async def messages(chunks: AsyncIterable[bytes]) -> AsyncIterator[Message]:
    """Yields each block (events, and comment-only blocks such as heartbeats) as it is completed."""
    pending = b""
    current = Message()
    touched = False
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode()
            if line == "":
                if touched:
                    current.data = "\n".join(current.data_lines)
                    yield current
                current, touched = Message(), False
                continue
            touched = True
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                current.comments.append(value)
            elif name == "data":
                current.data_lines.append(value)
            elif name == "event":
                current.event = value
            elif name == "id" and "\0" not in value:
                current.id = value
            elif name == "retry" and value.isdigit():
                current.retry = int(value)
