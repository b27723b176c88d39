"""A real uvicorn server on a free loopback port, in a thread, serving the app on the embedded model."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        # bound here and handed to uvicorn, so no other socket (a client's ephemeral port) can take the port
        # between choosing it and listening on it
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        # the loop and HTTP parser GracefulServer (the real server) pins, whatever else is installed
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    loop="asyncio", http="h11"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
        self.socket.close()


def chat_stream_equals_whole(client, model: str) -> str:
    """A greedy chat answer streamed with the openai client equals the same answer whole; returns it."""
    messages = [{"role": "user", "content": "Say hello."}]
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert streamed == whole.choices[0].message.content and streamed
    return streamed
