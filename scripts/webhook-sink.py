#!/usr/bin/env python3
"""A webhook receiver for measurements: answers every POST 200 at once and
counts them (HTTP/1.1 keep-alive, no framework). Prints the count on SIGTERM
and writes it to the file named by the second argument on every 1,000.

    scripts/webhook-sink.py PORT COUNT_FILE
"""
import asyncio, signal, sys

count = 0

class Sink(asyncio.Protocol):
    def connection_made(self, transport):
        self.t, self.buf = transport, b""

    def data_received(self, data):
        global count
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buf) < head_end + 4 + length:
                return
            self.buf = self.buf[head_end + 4 + length:]
            count += 1
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

async def main(port, count_file):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", port)
    async def report():
        while True:
            await asyncio.sleep(0.2)
            with open(count_file, "w") as f:
                f.write(str(count))
    loop.create_task(report())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
