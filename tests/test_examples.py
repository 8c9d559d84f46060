"""The example gateway configurations are valid and say what the service relies on.

examples/agentgateway/config.yaml is checked for the same fields in agentgateway's
configuration language (its schema is not packaged; the field names follow its published
configuration reference).

examples/envoy/envoy.yaml is parsed into Envoy's own Bootstrap message (the protos of the
`xds-protos` package), so a field Envoy does not know fails here, and then checked for
what makes it safe: ext_authz after the JWT filter and before the router, the body sent,
no partial bodies, fail closed, gRPC v3 to the service over HTTP/2, a server named per
route, and the claim headers the service reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_authn_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers the type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from engine.settings import PROJECT_ROOT, Settings
from tests.conftest import HEALTHIMAGING

ENVOY = PROJECT_ROOT / "examples" / "envoy" / "envoy.yaml"


def bootstrap(path: Path) -> Any:
    message = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(yaml.safe_load(path.read_text()), message)
    return message


def connection_manager(config: Any) -> Any:
    (listener,) = config.static_resources.listeners
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    return manager


def test_the_envoy_example_parses_as_envoy_config() -> None:
    config = bootstrap(ENVOY)
    assert len(config.static_resources.clusters) == 3


def test_the_envoy_example_puts_every_mcp_request_under_policy() -> None:
    config = bootstrap(ENVOY)
    manager = connection_manager(config)
    names = [f.name for f in manager.http_filters]
    assert names == [
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ], "the agent is authenticated before the decision, the router comes last"

    authz = ext_authz_pb2.ExtAuthz()
    assert manager.http_filters[1].typed_config.Unpack(authz)
    assert authz.transport_api_version == 2  # V3
    assert authz.failure_mode_allow is False, "fail closed"
    assert authz.with_request_body.allow_partial_message is False
    body = authz.with_request_body.max_request_bytes
    assert 0 < body <= Settings().max_body_bytes, "the service must accept what Envoy sends"
    cluster_name = authz.grpc_service.envoy_grpc.cluster_name
    metadata = {m.key: m.value for m in authz.grpc_service.initial_metadata}
    assert metadata["authorization"].startswith("Bearer "), (
        "Envoy proves itself: the principal headers it sets are believed only then"
    )

    (policy,) = [c for c in config.static_resources.clusters if c.name == cluster_name]
    address = policy.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert address.socket_address.port_value == Settings().grpc_port
    options = http_protocol_options_pb2.HttpProtocolOptions()
    policy.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options"), "gRPC is HTTP/2"

    (host,) = manager.route_config.virtual_hosts
    for route in host.routes:
        per_route = ext_authz_pb2.ExtAuthzPerRoute()
        assert route.typed_per_filter_config["envoy.filters.http.ext_authz"].Unpack(per_route)
        assert not per_route.disabled
        assert per_route.check_settings.context_extensions["mcp_server"] == HEALTHIMAGING


def test_the_envoy_example_passes_the_claims_the_service_reads() -> None:
    manager = connection_manager(bootstrap(ENVOY))
    jwt = jwt_authn_pb2.JwtAuthentication()
    assert manager.http_filters[0].typed_config.Unpack(jwt)
    (provider,) = jwt.providers.values()
    headers = {c.header_name: c.claim_name for c in provider.claim_to_headers}
    settings = Settings()
    assert headers == {
        settings.extauthz_agent_header: "client_id",
        settings.extauthz_user_header: "sub",
    }
    assert all(rule.requires.provider_name for rule in jwt.rules), "no route without a token"


AGENTGATEWAY = PROJECT_ROOT / "examples" / "agentgateway" / "config.yaml"


def test_the_agentgateway_example_puts_every_mcp_request_under_policy() -> None:
    config = yaml.safe_load(AGENTGATEWAY.read_text())
    routes = [r for b in config["binds"] for lst in b["listeners"] for r in lst["routes"]]
    assert routes, "at least one route"
    for route in routes:
        assert any("mcp" in backend for backend in route["backends"])
        policies = route["policies"]
        assert {"jwtAuth", "extAuthz"} <= set(policies), "no route without both"
        authz = policies["extAuthz"]
        host, _, port = authz["host"].rpartition(":")
        assert host == "127.0.0.1" and int(port) == Settings().grpc_port
        assert set(authz["protocol"]) == {"grpc"}, "the service answers Check over gRPC"
        assert authz["protocol"]["grpc"]["context"]["mcp_server"] == HEALTHIMAGING
        assert authz["failureMode"] == "deny", "fail closed"
        body = authz["includeRequestBody"]
        assert body["allowPartialMessage"] is False
        assert 0 < body["maxRequestBytes"] <= Settings().max_body_bytes
