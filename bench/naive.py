"""The naive loop a Python team writes first: the baseline every figure is compared with.

Straight from aio-pika's README: iterate over the queue with a prefetch, POST each body with
aiohttp, ack. No signing, no metrics, no logs, no retries. ``--concurrent`` is the better
version a team writes second: a callback consumer, so up to ``prefetch`` POSTs run at once.

    python -m bench.naive AMQP_URL QUEUE TARGET_URL [--prefetch N] [--concurrent]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aio_pika
import aiohttp


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("amqp_url")
    parser.add_argument("queue")
    parser.add_argument("target_url")
    parser.add_argument("--prefetch", type=int, default=32)
    parser.add_argument("--concurrent", action="store_true")
    args = parser.parse_args()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    connection = await aio_pika.connect_robust(args.amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=args.prefetch)
    queue = await channel.declare_queue(args.queue, passive=True)
    async with aiohttp.ClientSession() as session:

        async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with session.post(args.target_url, data=message.body) as response:
                await response.read()
            await message.ack()

        if args.concurrent:
            await queue.consume(handle)
            await stop.wait()
        else:
            async with queue.iterator() as messages:
                consume = asyncio.ensure_future(_each(messages, handle))
                await stop.wait()
                consume.cancel()
    await connection.close()


async def _each(messages: aio_pika.abc.AbstractQueueIterator, handle: object) -> None:
    async for message in messages:
        await handle(message)  # type: ignore[operator]


if __name__ == "__main__":
    asyncio.run(main())
