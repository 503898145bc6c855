"""An operator's session against a running sendable-keys, through Python grpcio only.

No .proto files: every message type comes from the server's reflection service. Run by
tests/e2e_python.rs with the server's address as the only argument; exits non-zero (with a
readable assertion) on any deviation.
"""
import sys
import uuid

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

address = sys.argv[1]
channel = grpc.insecure_channel(address)

health = health_pb2_grpc.HealthStub(channel)
status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
assert status == health_pb2.HealthCheckResponse.SERVING, status

pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
service = pool.FindServiceByName("sendable.keys.v1.KeyService")


def enum(type_name, value_name):
    return pool.FindEnumTypeByName(type_name).values_by_name[value_name].number


def call(method_name, **fields):
    method = service.FindMethodByName(method_name)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    rpc = channel.unary_unary(
        f"/{service.full_name}/{method_name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return rpc(request_class(**fields), timeout=10)


def decision_name(response):
    return pool.FindEnumTypeByName("sendable.keys.v1.Decision").values_by_number[
        response.decision
    ].name


session_id = f"py-{uuid.uuid4().hex[:12]}"
session = call(
    "CreateSession",
    session_id=session_id,
    environment=enum("sendable.keys.v1.Environment", "ENVIRONMENT_LIVE"),
    plan=enum("sendable.keys.v1.Plan", "PLAN_FREE"),
)
assert session.session_id == session_id and session.rate_limit_per_minute == 60, session

created = call("CreateKey", session_id=session_id, name="python operator")
secret = created.secret
assert secret.startswith("sk_live_" + created.key.key_id), created.key
assert created.key.display_prefix == "sk_live_" + created.key.key_id

verified = call("VerifyKey", key=secret)
assert decision_name(verified) == "DECISION_VALID" and verified.valid, verified
assert verified.rate_limit.limit == 60 and verified.rate_limit.remaining == 59, verified

revoked = call("RevokeKey", key_id=created.key.key_id, reason="python e2e")
assert revoked.status == enum("sendable.keys.v1.KeyStatus", "KEY_STATUS_REVOKED"), revoked

after = call("VerifyKey", key=secret)
assert decision_name(after) == "DECISION_REVOKED", after

# Errors carry google.rpc details that any gRPC client can read.
try:
    call("CreateSession", session_id="bad id!", environment=0, plan=0)
    raise AssertionError("a bad request was accepted")
except grpc.RpcError as error:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.code()
    details = rpc_status.from_call(error)
    assert details is not None, "no google.rpc.Status in trailers"
    fields = []
    reason = None
    for detail in details.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = (info.reason, info.domain)
    assert fields == ["session_id", "environment", "plan"], fields
    assert reason == ("INVALID_ARGUMENT", "keys.sendable"), reason

print("python operator session: ok")
