"""grpc.health.v1.Health without the grpcio-health-checking package: the two messages are one
field each, so they are encoded by hand (HealthCheckRequest{string service=1},
HealthCheckResponse{enum status=1}). Services: liveness, readiness, the ext_proc service, ""."""
from __future__ import annotations

import asyncio
from typing import Callable

import grpc

SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_request(data: bytes) -> str:
    i, service = 0, ""
    while i < len(data):
        key = data[i]
        i += 1
        field, wire = key >> 3, key & 7
        if wire != 2:
            raise ValueError("unexpected wire type in HealthCheckRequest")
        length, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if field == 1:
            service = data[i:i + length].decode()
        i += length
    return service


def encode_response(status: int) -> bytes:
    return b"\x08" + _varint(status)


def encode_request(service: str) -> bytes:
    raw = service.encode()
    return (b"\x0a" + _varint(len(raw)) + raw) if raw else b""


def decode_response(data: bytes) -> int:
    return data[1] if len(data) >= 2 and data[0] == 0x08 else 0


class HealthService:
    def __init__(self, ready: Callable[[], bool]):
        self.ready = ready

    def status_of(self, service: str) -> int:
        if service in ("", "liveness"):
            return SERVING
        if service in ("readiness", EXT_PROC_SERVICE):
            return SERVING if self.ready() else NOT_SERVING
        return SERVICE_UNKNOWN

    async def check(self, service: str, context) -> int:
        st = self.status_of(service)
        if st == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return st

    async def watch(self, service: str, context):
        last = None
        while True:
            st = self.status_of(service)
            if st != last:
                yield st
                last = st
            await asyncio.sleep(1.0)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": grpc.unary_unary_rpc_method_handler(
                self.check, request_deserializer=decode_request, response_serializer=encode_response),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.watch, request_deserializer=decode_request, response_serializer=encode_response),
        })
