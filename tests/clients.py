"""One client interface over both transports, so one table of cases runs through each.

Both return the decision as the HTTP API spells it (verdict "allow", snake_case fields),
and raise `ApiError` (with the HTTP status or gRPC code) for refused requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

from mcppolicy.v1 import approval_pb2, approval_pb2_grpc, decision_pb2, decision_pb2_grpc


@dataclass
class ApiError(Exception):
    status: int | str
    message: str


def _from_proto(message: Any) -> dict[str, Any]:
    out = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for holder in (out, out.get("approval", {})):
        for key in ("verdict", "status"):
            if key in holder:
                holder[key] = (
                    holder[key].split("_", 1)[1].lower()
                    if key == "verdict"
                    else holder[key].removeprefix("APPROVAL_STATUS_").lower()
                )
    for key in ("limit", "remaining"):
        if key in out.get("rate_limit", {}):
            out["rate_limit"][key] = int(out["rate_limit"][key])
    return out


class HttpClient:
    name = "http"

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.raw = client

    async def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.raw.post("/v1/decide", json=body)
        return self._json(response)

    async def report(self, decision_id: str, succeeded: bool, token: str | None) -> dict[str, Any]:
        """Report an outcome (a token of None sends none); the ack, or ApiError."""
        body: dict[str, Any] = {"succeeded": succeeded}
        if token is not None:
            body["outcome_token"] = token
        response = await self.raw.post(f"/v1/decisions/{decision_id}/outcome", json=body)
        result: dict[str, Any] = self._json(response)
        return result

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code != 200:
            error = response.json().get("error", {})
            raise ApiError(response.status_code, error.get("message", response.text))
        return response.json()

    async def approvals(self, token: str | None, *, status: str | None = None) -> list[Any]:
        params = {"status": status} if status else {}
        response = await self.raw.get("/v1/approvals", params=params, headers=_auth(token))
        result: list[Any] = self._json(response)
        return result

    async def get_approval(self, token: str | None, approval_id: str) -> dict[str, Any]:
        response = await self.raw.get(f"/v1/approvals/{approval_id}", headers=_auth(token))
        result: dict[str, Any] = self._json(response)
        return result

    async def act(
        self, token: str | None, approval_id: str, verb: str, approver: str, comment: str = ""
    ) -> dict[str, Any]:
        response = await self.raw.post(
            f"/v1/approvals/{approval_id}/{verb}",
            headers=_auth(token),
            json={"approver": approver, "comment": comment},
        )
        result: dict[str, Any] = self._json(response)
        return result

    async def act_as(
        self,
        token: str | None,
        approval_id: str,
        verb: str,
        comment: str = "",
        *,
        approver: str | None = None,
    ) -> dict[str, Any]:
        """Approve or deny with the credential alone; `approver` is sent only when given."""
        body: dict[str, Any] = {"comment": comment}
        if approver is not None:
            body["approver"] = approver
        response = await self.raw.post(
            f"/v1/approvals/{approval_id}/{verb}", headers=_auth(token), json=body
        )
        result: dict[str, Any] = self._json(response)
        return result


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class GrpcClient:
    name = "grpc"

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.decisions = decision_pb2_grpc.DecisionServiceStub(channel)
        self.approval_stub = approval_pb2_grpc.ApprovalServiceStub(channel)

    async def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        body = dict(body)
        if isinstance(body.get("message"), dict | list):
            body["message"] = json.dumps(body["message"])
        if "tool" in body and "message" in body:
            # `tool` and `message` are one oneof: a message holds only one, so the bytes
            # of both are sent as a client built before the oneof would send them.
            message = body.pop("message")
            first = json_format.ParseDict(body, decision_pb2.DecideRequest())
            second = decision_pb2.DecideRequest(message=message)
            raw = self.channel.unary_unary(
                "/mcppolicy.v1.DecisionService/Decide",
                request_serializer=lambda data: data,
                response_deserializer=decision_pb2.DecideResponse.FromString,
            )
            data = first.SerializeToString() + second.SerializeToString()
            return _from_proto(await self._call(raw, data))
        request = json_format.ParseDict(body, decision_pb2.DecideRequest())
        return _from_proto(await self._call(self.decisions.Decide, request))

    async def report(self, decision_id: str, succeeded: bool, token: str | None) -> dict[str, Any]:
        request = decision_pb2.ReportOutcomeRequest(
            decision_id=decision_id, succeeded=succeeded, outcome_token=token or ""
        )
        return _from_proto(await self._call(self.decisions.ReportOutcome, request))

    @staticmethod
    async def _call(method: Any, request: Any, token: str | None = None) -> Any:
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            return await method(request, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise ApiError(exc.code().name, exc.details() or "") from exc

    async def approvals(self, token: str | None, *, status: str | None = None) -> list[Any]:
        request = approval_pb2.ListApprovalsRequest(
            status=f"APPROVAL_STATUS_{status.upper()}" if status else 0
        )
        response = await self._call(self.approval_stub.ListApprovals, request, token)
        return [_from_proto(a) for a in response.approvals]

    async def get_approval(self, token: str | None, approval_id: str) -> dict[str, Any]:
        response = await self._call(
            self.approval_stub.GetApproval, approval_pb2.GetApprovalRequest(id=approval_id), token
        )
        return _from_proto(response.approval)

    async def act(
        self, token: str | None, approval_id: str, verb: str, approver: str, comment: str = ""
    ) -> dict[str, Any]:
        method = self.approval_stub.Approve if verb == "approve" else self.approval_stub.Deny
        request_type = (
            approval_pb2.ApproveRequest if verb == "approve" else approval_pb2.DenyRequest
        )
        response = await self._call(
            method, request_type(id=approval_id, approver=approver, comment=comment), token
        )
        return _from_proto(response.approval)

    async def act_as(
        self,
        token: str | None,
        approval_id: str,
        verb: str,
        comment: str = "",
        *,
        approver: str | None = None,
    ) -> dict[str, Any]:
        """Approve or deny with the credential alone; `approver` is set only when given."""
        method = self.approval_stub.Approve if verb == "approve" else self.approval_stub.Deny
        request_type = (
            approval_pb2.ApproveRequest if verb == "approve" else approval_pb2.DenyRequest
        )
        request = request_type(id=approval_id, comment=comment)
        if approver is not None:
            request.approver = approver
        response = await self._call(method, request, token)
        return _from_proto(response.approval)
