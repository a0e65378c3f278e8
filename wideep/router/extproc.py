"""Gateway mode: Envoy ext_proc server speaking the GIE endpoint-picker protocol (docs/protocols.md, "Router").

Request bodies arrive FULL_DUPLEX_STREAMED: they are buffered to end-of-stream, the request is
scheduled, then Envoy gets (1) the request-headers answer carrying `x-gateway-destination-endpoint`
(+ `envoy.lb` dynamic metadata, clear_route_cache, P/D headers) and (2) the body back in chunks.
Response bodies pass straight through chunk by chunk, feeding the response hooks on the way.
No endpoint -> ImmediateResponse 503; shed or saturated -> 429 with x-llm-d-request-dropped-reason.
"""
from __future__ import annotations

import logging

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from wideep.router.director import DEST_HEADER, Decision, Director
from wideep.router.errors import error_body, error_headers
from wideep.router.types import SchedulingError

log = logging.getLogger(__name__)

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
BODY_CHUNK = 62 * 1024   # Envoy choked on >128KB single messages (GIE#854)


def _header_map(hm) -> dict[str, str]:
    return {h.key.lower(): (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in hm.headers}


def _set_headers(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                       append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
            for k, v in headers.items()]


def subset_hint(metadata) -> list[str] | None:
    ns = metadata.filter_metadata.get(SUBSET_NAMESPACE) if metadata is not None else None
    if ns is None or SUBSET_KEY not in ns.fields:
        return None
    v = ns.fields[SUBSET_KEY]
    if v.HasField("list_value"):
        return [x.string_value for x in v.list_value.values]
    if v.HasField("string_value"):
        return [s.strip() for s in v.string_value.split(",") if s.strip()]
    return None


def immediate(exc: SchedulingError) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=exc.status),
        headers=pb.HeaderMutation(set_headers=_set_headers(error_headers(exc))),
        body=error_body(exc), details=exc.reason))


def routed_headers(d: Decision) -> pb.ProcessingResponse:
    md = struct_pb2.Struct()
    md.update({LB_NAMESPACE: {DEST_HEADER: d.destination}})
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=_set_headers(d.request_headers)),
            clear_route_cache=True)),
        dynamic_metadata=md)


def body_chunks(body: bytes, request: bool):
    pieces = [body[i:i + BODY_CHUNK] for i in range(0, len(body), BODY_CHUNK)] or [b""]
    for i, piece in enumerate(pieces):
        mut = pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=piece, end_of_stream=i == len(pieces) - 1))
        br = pb.BodyResponse(response=pb.CommonResponse(body_mutation=mut))
        yield pb.ProcessingResponse(request_body=br) if request else pb.ProcessingResponse(response_body=br)


class ExtProcServer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, director: Director):
        self.director = director

    async def Process(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        headers: dict[str, str] = {}
        subset: list[str] | None = None
        body = bytearray()
        decision: Decision | None = None
        scheduled = False
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("request")
                if kind == "request_headers":
                    headers = _header_map(msg.request_headers.headers)
                    subset = subset_hint(msg.metadata_context)
                    if msg.request_headers.end_of_stream:
                        scheduled = True
                        decision, out = await self._schedule(headers, b"", subset)
                        yield out
                        if decision is None:
                            return
                elif kind in ("request_body", "request_trailers"):
                    trailers = kind == "request_trailers"
                    if not trailers:
                        body += msg.request_body.body
                    if (trailers or msg.request_body.end_of_stream) and not scheduled:
                        scheduled = True
                        decision, out = await self._schedule(headers, bytes(body), subset)
                        yield out
                        if decision is None:
                            return
                        for chunk in body_chunks(bytes(body), request=True):
                            yield chunk
                    if trailers:
                        yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_headers":
                    added: dict[str, str] = {}
                    if decision is not None:
                        self.director.response_headers(decision, added)
                    yield pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse(
                        header_mutation=pb.HeaderMutation(set_headers=_set_headers(added)))))
                    if msg.response_headers.end_of_stream and decision is not None:
                        self.director.finish(decision)
                elif kind == "response_body":
                    rb = msg.response_body
                    if decision is not None:
                        self.director.response_body(decision, rb.body, rb.end_of_stream)
                    mut = pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
                        body=rb.body, end_of_stream=rb.end_of_stream))
                    yield pb.ProcessingResponse(response_body=pb.BodyResponse(
                        response=pb.CommonResponse(body_mutation=mut)))
                elif kind == "response_trailers":
                    if decision is not None:
                        self.director.finish(decision)
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        finally:
            if decision is not None:
                self.director.finish(decision)

    async def _schedule(self, headers, body: bytes, subset):
        req = self.director.parse_request(body, headers, headers.get(":path", "/"))
        try:
            d = await self.director.route(req, subset)
        except SchedulingError as exc:
            return None, immediate(exc)
        return d, routed_headers(d)


def add_to_server(server, director: Director) -> ExtProcServer:
    servicer = ExtProcServer(director)
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    return servicer
