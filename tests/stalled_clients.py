"""Clients that stop reading, by hand: a WebSocket over a socket with a 4 KiB receive buffer (the
handshake and the frames written here), and a long-polling Engine.IO client that stops polling.
Once stalled, nothing in this process reads for them: only the kernel's small buffer fills."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from typing import Any

import httpx

TINY_BUFFER = 4096


class RawWebSocket:
    """A blocking WebSocket client that reads a frame only when asked to (run it in a thread)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._pending = b""

    @classmethod
    def open(cls, port: int, path: str) -> RawWebSocket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_BUFFER)  # before connect: a small window
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        sock.sendall(request.encode())
        client = cls(sock)
        head = client._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._pending:
            self._pending += self._recv()
        head, _, self._pending = self._pending.partition(marker)
        return head

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        return data

    def _read_exactly(self, n: int) -> bytes:
        while len(self._pending) < n:
            self._pending += self._recv()
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    def receive_text(self) -> str:
        """The next text frame (control frames skipped; the server's frames are not masked)."""
        while True:
            first, second = self._read_exactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read_exactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read_exactly(8))
            payload = self._read_exactly(length)
            if first & 0x0F == 0x1:
                return payload.decode()
            if first & 0x0F == 0x8:
                raise ConnectionError("a close frame")

    def send_text(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def read_to_the_end(self) -> int:
        """Read again, everything, until the server closes the connection; the bytes read. A read
        that waits 10 s for more raises TimeoutError: the connection was left open."""
        total = len(self._pending)
        while data := self.sock.recv(65536):
            total += len(data)
        return total

    def close(self) -> None:
        self.sock.close()


def _stalled_socketio(port: int, session_id: str) -> RawWebSocket:
    ws = RawWebSocket.open(port, "/socket.io/?EIO=4&transport=websocket")
    assert ws.receive_text().startswith("0{")  # Engine.IO open
    ws.send_text("40")
    assert ws.receive_text().startswith("40{")  # Socket.IO connect
    ws.send_text("421" + json.dumps(["join", {"session_id": session_id}]))
    while not (answer := ws.receive_text()).startswith("431"):
        pass  # events of the session (presence) may come first
    assert json.loads(answer[3:])[0]["ok"], answer
    return ws


async def stalled_socketio(port: int, session_id: str) -> RawWebSocket:
    """A Socket.IO tab over a raw WebSocket, joined to the session, that never reads again."""
    return await asyncio.to_thread(_stalled_socketio, port, session_id)


def _stalled_plain(port: int, session_id: str) -> RawWebSocket:
    ws = RawWebSocket.open(port, f"/ws/session/{session_id}")
    first = json.loads(ws.receive_text())
    assert first["event"] == "session", first
    return ws


async def stalled_plain(port: int, session_id: str) -> RawWebSocket:
    """A plain WebSocket client of the session that never reads after its `session` frame."""
    return await asyncio.to_thread(_stalled_plain, port, session_id)


async def stalled_polling(url: str, session_id: str) -> httpx.AsyncClient:
    """A long-polling Socket.IO tab, joined to the session, that never polls again."""
    http = httpx.AsyncClient(base_url=url, timeout=10)
    opened = (await http.get("/socket.io/", params={"EIO": "4", "transport": "polling"})).text
    sid: str = json.loads(opened[1:])["sid"]
    params = {"EIO": "4", "transport": "polling", "sid": sid}
    await http.post("/socket.io/", params=params, content="40")
    assert (await http.get("/socket.io/", params=params)).text.startswith("40{")
    await http.post("/socket.io/", params=params, content="421" + json.dumps(["join", {"session_id": session_id}]))
    ack = None
    while ack is None:  # the join's ack (`43` and its id 1) among the packets of a poll
        packets = (await http.get("/socket.io/", params=params)).text.split("\x1e")
        ack = next((packet for packet in packets if packet.startswith("431")), None)
    joined: list[Any] = json.loads(ack[3:])
    assert joined[0]["ok"], ack
    return http
