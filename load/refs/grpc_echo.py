"""The gRPC upstream of the bench's `grpc` scenario: a grpcio server with one generic
unary method, `/test.Echo/Unary`, answering every call with the same fixed-size
message (no protobuf: the bytes pass through untouched).

    python load/refs/grpc_echo.py --port 50051 [--size 100] [--workers 8]
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, default=100, help="bytes in each answer")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    answer = b"y" * args.size

    def unary(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=None, response_serializer=None
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers),
        handlers=(handler,),
        options=[("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=None,
    )
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"grpc echo on 127.0.0.1:{args.port}, {args.size}-byte answers", flush=True)
    stop.wait()
    server.stop(0.5).wait()


if __name__ == "__main__":
    main()
