"""A stand-in for vLLM's OpenAI server: the router's relay sees the same HTTP, at no model cost.

For benches of the relay alone (``bench/soak.py --standin``): ``/v1/chat/completions`` and
``/v1/completions`` answer ``"stream": true`` with Server-Sent Events shaped as vLLM's (a role
chunk, ``max_tokens`` content chunks, a usage chunk when ``stream_options.include_usage``, then
``[DONE]``), and otherwise one JSON completion with its usage. ``/health`` answers 200. A client
that goes away mid-stream is counted (``aborted``), as vLLM aborts such a request. A raw asyncio
server on uvloop: one process of it relays far more than a Python router can send it.

    python bench/standin.py --port 8100 [--token-delay-s 0.001]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass


@dataclass
class Counts:
    served: int = 0
    aborted: int = 0


def _chunk(model: str, rid: str, delta: dict[str, str], finish: str | None = None) -> bytes:
    payload = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


def _http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class StandIn:
    """The server: keep-alive HTTP/1.1, one request after another per connection."""

    def __init__(self, token_delay_s: float) -> None:
        self.token_delay_s = token_delay_s
        self.counts = Counts()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not writer.is_closing():
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                length = 0
                rid = "standin"
                for line in lines[1:]:
                    key, _, value = line.partition(b":")
                    if key.lower() == b"content-length":
                        length = int(value)
                    elif key.lower() == b"x-request-id":
                        rid = value.strip().decode()
                body = json.loads(await reader.readexactly(length)) if length else {}
                if path == b"/health":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                elif body.get("stream"):
                    await self._stream(writer, body, rid)
                else:
                    self._whole(writer, body, rid)
                self.counts.served += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, body: dict, rid: str) -> None:
        model, tokens = str(body.get("model", "")), int(body.get("max_tokens") or 16)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        writer.write(_http_chunk(_chunk(model, rid, {"role": "assistant", "content": ""})))
        try:
            for i in range(tokens):
                writer.write(_http_chunk(_chunk(model, rid, {"content": f" w{i}"},
                                                "length" if i == tokens - 1 else None)))
                await writer.drain()
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": rid, "object": "chat.completion.chunk", "model": model, "choices": [],
                         "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}}
                writer.write(_http_chunk(f"data: {json.dumps(usage)}\n\n".encode()))
            writer.write(_http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        except (ConnectionError, RuntimeError):  # uvloop: RuntimeError on a transport the peer closed
            self.counts.aborted += 1
            raise ConnectionResetError from None

    @staticmethod
    def _whole(writer: asyncio.StreamWriter, body: dict, rid: str) -> None:
        tokens = int(body.get("max_tokens") or 16)
        data = json.dumps({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": " ".join(f"w{i}" for i in range(tokens))}}],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
        }).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(data)).encode() + b"\r\n\r\n" + data)


async def serve(host: str, port: int, token_delay_s: float) -> None:
    standin = StandIn(token_delay_s)
    server = await asyncio.start_server(standin.handle, host, port, backlog=1024)
    print(f"stand-in engine on http://{host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-delay-s", type=float, default=0.0, help="pause after each content chunk")
    args = p.parse_args(argv)
    try:
        import uvloop
        uvloop.run(serve(args.host, args.port, args.token_delay_s))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
