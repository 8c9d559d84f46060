"""How callers reach the service: the gRPC and HTTP listeners and what they share.

`grpc_server` (DecisionService, DecisionLogService, ApprovalService and Envoy's ext_authz
`Check` from `extauthz`), `http_app` (the HTTP API), `gateway_http` (the HTTP gateway
endpoint for proxies), `server` (both on one event loop; the HTTP protocol every HTTP
listener runs), `guard` (the Host/Origin/content-type check every HTTP listener shares),
`wire` (every protobuf <-> domain conversion, for the server and the proxy's gRPC client
alike), `paging` (listing queries and page tokens), `tls` (server certificates and mTLS).
"""
