"""All settings in one object: flags override environment (MCP_POLICY_*), which overrides
the defaults here. Secrets are SecretStr and never printed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.state.decision_log import LogSettings

# Run from a checkout, the shipped Rego, policy pack and schema are the checkout's own
# top-level rego/, policies/ and schema/ (what `opa test rego/ policies/` tests). An installed
# copy (`pip install .`, a wheel) carries them as package data in engine/_data/ (see
# pyproject.toml), under the same names, so a policy's revision is the same either way.
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
PACKAGED_DATA = Path(__file__).resolve().parent / "_data"
IN_CHECKOUT = (CHECKOUT_ROOT / "pyproject.toml").is_file() and (CHECKOUT_ROOT / "rego").is_dir()
# The directory holding the shipped rego/, policies/ and schema/.
PROJECT_ROOT = CHECKOUT_ROOT if IN_CHECKOUT else PACKAGED_DATA
DEFAULT_POLICY_PATHS = (PROJECT_ROOT / "rego", PROJECT_ROOT / "policies")
DEFAULT_POLICY_SCHEMA = PROJECT_ROOT / "schema" / "mcp_policy.schema.json"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mcp-policy"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MCP_POLICY_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address both listeners bind to.")
    http_port: int = Field(8080, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    state_dir: Path = Field(default_factory=_default_state_dir)
    approver_token: SecretStr | None = Field(
        None,
        description="The operator credential (decision log, status, reload; a random one is "
        "made if unset). Also the one approver, named operator, when neither approvers_file "
        "nor approver_issuer is set.",
    )
    approvers_file: Path | None = Field(
        None,
        description="Named approvers (people): the hashed-token file `mcp-policy approvers "
        "add|list|revoke` manages (approvers.yaml). Edits take effect within seconds.",
    )
    approver_issuer: str | None = Field(
        None,
        description="OIDC/OAuth issuer whose JWTs prove approvers (with approver_audience): "
        "a token whose approver_role_claim includes approver_role, named by its sub.",
    )
    approver_audience: str | None = Field(
        None, description="The aud an approver JWT must carry (needed with approver_issuer)."
    )
    approver_jwks_url: str | None = Field(
        None, description="The approver issuer's JWKS URL (default: from its metadata)."
    )
    approver_role_claim: str = Field(
        "roles", description="The approver JWT claim listing its roles (dots for nesting)."
    )
    approver_role: str = Field(
        "approver", description="The role an approver JWT needs in approver_role_claim."
    )
    engine: Literal["inprocess", "opa"] = Field(
        "inprocess",
        description="Where policies are evaluated: inprocess (OPA's Go evaluator inside this "
        "process, the default) or opa (an OPA server the service starts and supervises, "
        "asked over REST). Setting opa_url always means that OPA server.",
    )
    opa_url: str | None = Field(None, description="Use this OPA instead of starting one.")
    opa_token: SecretStr | None = Field(None, description="Bearer token for an external OPA.")
    opa_binary: str = Field("opa", description="OPA binary to run when no opa_url is given.")
    opa_timeout_ms: int = Field(250, ge=1, description="Deadline of one policy evaluation.")
    result_timeout_ms: int = Field(
        2000,
        ge=1,
        description="Deadline of one result policy evaluation (a tool result can be a MiB).",
    )
    policy_paths: list[Path] = Field(
        default_factory=lambda: list(DEFAULT_POLICY_PATHS),
        description="Directories of Rego modules and YAML/JSON data loaded into OPA.",
    )
    policy_schema: Path | None = Field(
        DEFAULT_POLICY_SCHEMA,
        description="JSON Schema the policy data must match to be loaded.",
    )
    reload_interval_seconds: float = Field(
        1.0, ge=0, description="How often the policy files are checked for changes; 0: never."
    )
    opa_config: Path | None = Field(
        None,
        description="OPA's configuration file (YAML or JSON: services, keys, labels, bundles, "
        "decision_logs, status), run by OPA's own plugins in the engine library for either "
        "engine. With bundles, policy comes only from the bundle server.",
    )
    bundle: Path | None = Field(
        None,
        description="A bundle file (`opa build`, `mcp-policy build`) to load the policy from "
        "instead of policy_paths; reloaded when it changes.",
    )
    bundle_verification_key: SecretStr | None = Field(
        None,
        description="The bundle file must be signed: a PEM public key (or its path), or the "
        "HMAC secret, as `opa run --verification-key`.",
    )
    bundle_verification_key_id: str = Field(
        "default", description="The key id the bundle file's signature names."
    )
    bundle_signing_alg: str = Field(
        "RS256", description="The signature algorithm of the bundle file (RS256, ES256, HS256…)."
    )
    bundle_scope: str = Field("", description="The scope the bundle file's signature carries.")
    instance_id: str | None = Field(
        None,
        description="This replica's id: labels.id in OPA status reports and decision-log "
        "events (default: random per start, as OPA).",
    )
    fleet_stop_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="On stop, how long the decision-log uploader may spend sending what it "
        "holds (the rest stays in its spool on disk for the next start).",
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    result_max_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Tool results up to this size (UTF-8 bytes of their compact JSON) are "
        "decided on; the result policy sees it as input.result_info.max_bytes (the shipped "
        "rule size.result_too_large blocks larger ones). POST /v1/decide-result and "
        "DecideResult take a request of up to max_body_bytes more than this: a larger one "
        "is refused (413, RESOURCE_EXHAUSTED).",
    )
    http_header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="An HTTP connection must send a complete request head within this long "
        "of opening (or of its previous response), or it is closed.",
    )
    http_body_timeout_seconds: float = Field(
        30.0, gt=0, description="An HTTP request body must be complete this long after its head."
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) whose browser requests the HTTP API "
        "accepts besides its own origin; a request with any other Origin header (null "
        "included) is refused with 403. JSON list in the environment.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header values (a name: any port; name:port: that port) the HTTP API "
        "answers besides loopback names and its own address, where Host is checked: bound "
        "to loopback, or without clients_file / tls_client_ca. Others get 421 (DNS "
        "rebinding). JSON list in the environment.",
    )

    @field_validator("allowed_origins", "allowed_hosts")
    @classmethod
    def _guard_entries(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value:  # the guard's own parsers (imported only when there is something to check)
            from engine.transports.guard import parse_host, parse_origin

            parse = parse_origin if info.field_name == "allowed_origins" else parse_host
            for entry in value:
                parse(entry)
        return value

    max_json_depth: int = Field(24, ge=2, le=30)
    approval_ttl_seconds: float = Field(900, gt=0, description="How long a pending approval waits.")
    approval_max_pending_per_agent: int = Field(
        20,
        ge=1,
        description="Approvals one agent may have waiting for a human at once, over all its "
        "sessions (calls without an agent_id count as one agent). A call that would open "
        "one more is denied (rule approval.too_many_pending). At least 1: there is no "
        "'no cap'.",
    )
    approval_max_pending_per_session: int = Field(
        10,
        ge=1,
        description="Approvals one session of an agent may have waiting at once; as above.",
    )
    grant_ttl_seconds: float = Field(900, gt=0, description="How long an approved grant lasts.")
    public_url: str | None = Field(
        None,
        description="The service's HTTP address as people reach it (https://policy.example): "
        "the approvals console's links (each decision's approval.url, webhooks, the proxy's "
        "elicitation) start with it. Default: http(s)://host:http_port as the service "
        "listens.",
    )

    console_session_idle_seconds: float = Field(
        1800,
        gt=0,
        description="The approvals console signs a person out after this long without a "
        "request (sessions are kept in the service's memory: a restart signs everyone out).",
    )
    console_session_max_seconds: float = Field(
        43200,
        gt=0,
        description="The approvals console signs a person out this long after sign-in, "
        "however active.",
    )
    console_oidc_client_id: str | None = Field(
        None,
        description="The approvals console's client id at the approvers' OpenID Provider "
        "(approver_issuer): sign-in with OpenID Connect (authorization code + PKCE S256), "
        "redirect URI <public_url>/console/oidc/callback. Unset: no OpenID Connect sign-in.",
    )
    console_oidc_client_secret: SecretStr | None = Field(
        None,
        description="The console client's secret (client_secret_basic); unset: a public "
        "client, proven by PKCE alone.",
    )

    @field_validator("public_url")
    @classmethod
    def _public_url_absolute(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ValueError(
                "public_url must be an absolute http(s) URL without a query, like "
                "https://policy.example or https://gw.example/policy"
            )
        return value.rstrip("/")

    def console_base(self) -> str:
        """Where the console's pages are: public_url (or the listener's address) + /console."""
        if self.public_url is not None:
            return self.public_url + "/console"
        scheme = "https" if self.tls_cert is not None else "http"
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        elif host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        return f"{scheme}://{host}:{self.http_port}/console"

    approval_webhook_urls: SecretStr | None = Field(
        None,
        description="Approval webhooks: http(s) URLs, comma-separated, each sent every approval "
        "event (approval.requested, approved, denied, used, expired) as JSON with the "
        "console link, signed per Standard Webhooks with approval_webhook_secret. Secret: "
        "a webhook URL's path often is one (Slack's are).",
    )
    approval_webhook_secret: SecretStr | None = Field(
        None,
        description="The Standard Webhooks secret the webhooks are signed with: whsec_ and "
        "the base64 of 24 to 64 random bytes (whsec_$(openssl rand -base64 32)).",
    )
    approval_webhook_file: Path | None = Field(
        None,
        description="A YAML file of webhook endpoints with options of their own (url, secret, "
        "format standard|slack, events, timeout_seconds, attempts, queue); see "
        "engine/notify/webhooks.py.",
    )

    @field_validator("approval_webhook_urls")
    @classmethod
    def _webhook_urls(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from engine.notify.webhooks import check_url

            for url in value.get_secret_value().split(","):
                if url.strip():
                    check_url(url.strip())
        return value

    @property
    def webhook_urls(self) -> list[str]:
        """approval_webhook_urls, one URL each."""
        if self.approval_webhook_urls is None:
            return []
        urls = self.approval_webhook_urls.get_secret_value().split(",")
        return [url.strip() for url in urls if url.strip()]

    @field_validator("approval_webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from engine.notify.webhooks import check_secret

            check_secret(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _one_policy_source(self) -> Settings:
        if self.bundle is not None and "policy_paths" in self.model_fields_set:
            raise ValueError(
                "bundle and policy_paths both name the policy: give one (a bundle file holds "
                "the whole policy)"
            )
        return self

    @model_validator(mode="after")
    def _webhook_urls_signed(self) -> Settings:
        if self.webhook_urls and self.approval_webhook_secret is None:
            raise ValueError(
                "approval_webhook_urls needs approval_webhook_secret (whsec_...): webhooks "
                "are always signed"
            )
        return self

    state_store: Literal["memory", "sqlite", "redis"] | None = Field(
        None,
        description="Where rate-limit counters and approvals live: memory (one process, "
        "forgotten on restart), sqlite (files under state_dir; several processes on one "
        "host) or redis (shared by replicas). Default: redis when redis_url is set, else "
        "sqlite.",
    )
    redis_url: SecretStr | None = Field(None, description="e.g. redis://127.0.0.1:6379/0")
    redis_prefix: str = Field("mcp-policy:", description="Key prefix in a shared Redis.")
    redis_timeout_ms: int = Field(250, ge=1, description="Deadline of one Redis operation.")
    redis_max_connections: int = Field(32, ge=1, description="Connections per process.")
    redis_cluster: bool = Field(
        False,
        description="redis_url names a node of a Redis Cluster (any one: the others are "
        "found from it, and moved slots followed). Each call's counters share a hash tag, "
        "so every script runs on one node. redis_max_connections then bounds the Redis "
        "operations in flight per process (a burst waits for a turn), hence the "
        "connections per node. Needs database 0 and a redis_prefix without { or }.",
    )
    sqlite_busy_timeout_ms: int = Field(500, ge=0, description="Wait for a locked SQLite file.")
    rate_limit_fail_mode: Literal["closed", "open"] = Field(
        "closed",
        description="When the rate-limit store is unreachable: closed denies calls that "
        "have a limit; open lets them through unlimited (and logs it). Approvals and OPA "
        "always fail closed.",
    )
    decision_log: str | None = Field(
        None,
        description='Decision log JSONL file (default: decisions.jsonl in state_dir), "-" for '
        'stderr, "off".',
    )
    decision_db: bool = Field(
        True,
        description="Also keep decisions in decisions.sqlite3 in "
        "state_dir (needed by GET /v1/decisions and status).",
    )
    decision_log_arguments: Literal["hash", "raw", "redacted"] = Field(
        "hash",
        description="Tool arguments in the log: only their SHA-256, raw, or raw with "
        "the decision_log_redact fields' values replaced.",
    )
    decision_log_redact: list[str] = Field(default_factory=list)
    decision_log_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    decision_log_backups: int = Field(5, ge=0, description="Rotated JSONL files kept.")
    decision_log_retention_days: float = Field(
        30,
        gt=0,
        description="Days records are kept: SQLite rows, and rotated JSONL files whose newest "
        "record is older are deleted (their last hash anchored).",
    )
    decision_log_db_max_bytes: int = Field(
        1024**3,
        ge=64 * 1024,
        description="The SQLite copy's records take at most this many bytes: past it the "
        "oldest are deleted first (beside the retention in days).",
    )
    decision_log_invalid_requests_per_second: float = Field(
        20,
        ge=0,
        description="invalid_request events written to the decision log per second at "
        "most; the rest are counted in one summary record. 0: only summaries.",
    )
    decision_log_too_many_pending_per_second: float = Field(
        5,
        ge=0,
        description="approval.too_many_pending decisions written to the decision log per "
        "second per agent at most; the rest are counted in one summary record. 0: only "
        "summaries.",
    )
    decision_log_max_argument_bytes: int = Field(
        16 * 1024,
        ge=0,
        description="Logged arguments (raw, redacted) larger than this, as JSON, are left "
        "out of the record; arguments_sha256 still identifies them.",
    )
    decision_log_input: bool = Field(
        False,
        description="Keep each decision's exact policy input in the decision log (its tool "
        "arguments as decision_log_arguments says: hash keeps only their SHA-256, which "
        "replay and explain cannot evaluate exactly) and what the policy answered: what "
        "`mcp-policy explain --decision-id` and `mcp-policy replay` read.",
    )
    decision_log_sync: Literal["batch", "always"] = Field(
        "batch",
        description="batch: decisions are answered at once and logged within ~10 ms (a "
        "crash loses what is queued). always: an allow is answered only once its record is "
        "on disk in every sink (JSONL fsynced, SQLite committed with synchronous=FULL, "
        "written in groups); one that cannot be written is denied (engine.state_unavailable).",
    )
    otel_exporter: Literal["none", "otlp", "console"] = Field(
        "none",
        description="Export OpenTelemetry traces: otlp (OTEL_EXPORTER_OTLP_* "
        "environment variables), console, or none.",
    )
    log_level: str = Field("INFO")
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate (chain) both listeners present; with tls_key, turns "
        "TLS on for gRPC and HTTP.",
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert (no passphrase).")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA certificate(s): when set, every caller must present a client "
        "certificate signed by it (mTLS). Needs tls_cert and tls_key.",
    )
    tls_client_names: list[str] = Field(
        default_factory=list,
        description="Client certificate names (subjectAltName DNS names or URIs such as "
        "spiffe://...; the common name of a certificate without any) allowed to call; "
        "empty: any certificate tls_client_ca signed. JSON list in the environment.",
    )
    insecure: bool = Field(
        False,
        description="Serve on a non-loopback address without TLS (logged as a warning); "
        "without it the service refuses to start there.",
    )
    clients_file: Path | None = Field(
        None,
        description="Decision clients (proxies) by bearer token: a hashed clients file "
        "(mcp-policy clients add). With it or tls_client_ca, callers of Decide and "
        "ReportOutcome must prove themselves.",
    )
    agent_issuer: str | None = Field(
        None,
        description="Verify agent credentials sent with decisions (`credential`) as JWTs "
        "of this issuer (its JWKS found through its metadata, or agent_jwks_url).",
    )
    agent_audience: str | None = Field(
        None, description="The aud an agent JWT must carry (needed with agent_issuer)."
    )
    agent_jwks_url: str | None = Field(None, description="The issuer's JWKS, if not discovered.")
    agent_roles_claim: str = Field("roles", description="The claim holding an agent's roles.")
    agent_keys_file: Path | None = Field(
        None, description="Verify agent credentials as API keys of this keys file."
    )
    gateway_servers: dict[str, str] = Field(
        default_factory=dict,
        description="Forward-auth (POST /v1/check): the MCP server behind each forwarded "
        "host (X-Forwarded-Host or Host, with or without its port), when the gateway sends "
        "no X-MCP-Server header; an unmapped host is its own server name. JSON in the "
        "environment.",
    )
    gateway_refusal_status: Literal[200, 403] = Field(
        403,
        description="Forward-auth: the HTTP status of a refused call (its body is the "
        "JSON-RPC answer for the agent). Traefik and Envoy hand the body to the client only "
        "on a non-2xx status; 200 only suits gateways that pass a 2xx body on.",
    )
    gateway_non_mcp: Literal["deny", "allow"] = Field(
        "deny",
        description="Forward-auth: what to answer for a request that carries no MCP "
        "message (no body, or a body that is not JSON-RPC): deny (403) or allow (200).",
    )

    @model_validator(mode="before")
    @classmethod
    def _gateway_status_from_text(cls, data: object) -> object:
        # The environment gives "403" as text; the literal needs the number.
        if isinstance(data, dict):
            status = data.get("gateway_refusal_status")
            if isinstance(status, str) and status.strip().isdigit():
                data = {**data, "gateway_refusal_status": int(status)}
        return data

    extauthz_servers: dict[str, str] = Field(
        default_factory=dict,
        description="Envoy ext_authz: MCP server name by request host (:authority), used "
        "when the route sets no mcp_server context extension; unmapped hosts are their own "
        "server name. JSON object in the environment.",
    )
    extauthz_agent_header: str = Field(
        "x-mcp-agent-id",
        description="Envoy ext_authz: the header the gateway sets to the agent it verified "
        "(asserted by the gateway; a verified agent credential takes its place).",
    )
    extauthz_user_header: str = Field(
        "x-mcp-user-id",
        description="Envoy ext_authz: the header the gateway sets to the user it verified.",
    )
    extauthz_non_mcp: Literal["deny", "allow"] = Field(
        "deny",
        description="Envoy ext_authz: what to answer for requests that are not MCP JSON-RPC "
        "POSTs (deny: 403).",
    )

    @model_validator(mode="after")
    def _agent_issuer_complete(self) -> Settings:
        if (self.agent_issuer is None) != (self.agent_audience is None):
            raise ValueError("agent_issuer and agent_audience go together")
        return self

    @model_validator(mode="after")
    def _tls_together(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if self.tls_client_names and self.tls_client_ca is None:
            raise ValueError("tls_client_names needs tls_client_ca")
        return self

    @model_validator(mode="after")
    def _approver_issuer_complete(self) -> Settings:
        if self.approver_issuer is not None and not self.approver_audience:
            raise ValueError("approver_issuer needs approver_audience")
        if self.approver_issuer is None and (self.approver_audience or self.approver_jwks_url):
            raise ValueError("approver_audience and approver_jwks_url need approver_issuer")
        if self.console_oidc_client_id is not None and self.approver_issuer is None:
            raise ValueError(
                "console_oidc_client_id needs approver_issuer (the OpenID Provider people "
                "sign in with)"
            )
        if self.console_oidc_client_secret is not None and self.console_oidc_client_id is None:
            raise ValueError("console_oidc_client_secret needs console_oidc_client_id")
        return self

    @model_validator(mode="after")
    def _redis_cluster_usable(self) -> Settings:
        if not self.redis_cluster:
            return self
        if self.redis_url is None:
            raise ValueError("redis_cluster needs redis_url (any node of the cluster)")
        url = urlsplit(self.redis_url.get_secret_value())
        if url.scheme not in ("redis", "rediss"):
            raise ValueError("redis_cluster needs a redis:// or rediss:// redis_url")
        if url.path.strip("/") not in ("", "0"):
            raise ValueError("redis_cluster needs database 0 in redis_url (a cluster has no other)")
        if "{" in self.redis_prefix or "}" in self.redis_prefix:
            raise ValueError(
                "redis_cluster needs a redis_prefix without { or } (the keys carry hash tags)"
            )
        return self

    @property
    def store(self) -> str:
        if self.state_store is not None:
            return self.state_store
        return "redis" if self.redis_url is not None else "sqlite"

    @property
    def approvals_db(self) -> Path:
        return self.state_dir / "approvals.sqlite3"

    @property
    def decision_log_settings(self) -> LogSettings:
        jsonl = self.decision_log or str(self.state_dir / "decisions.jsonl")
        return LogSettings(
            jsonl=jsonl,
            database=self.state_dir / "decisions.sqlite3" if self.decision_db else None,
            arguments=self.decision_log_arguments,
            redact=tuple(self.decision_log_redact),
            max_bytes=self.decision_log_max_bytes,
            backups=self.decision_log_backups,
            retention_days=self.decision_log_retention_days,
            db_max_bytes=self.decision_log_db_max_bytes,
            max_argument_bytes=self.decision_log_max_argument_bytes,
            invalid_requests_per_second=self.decision_log_invalid_requests_per_second,
            too_many_pending_per_second=self.decision_log_too_many_pending_per_second,
            sync=self.decision_log_sync,
            input=self.decision_log_input,
        )

    @property
    def rate_limits_db(self) -> Path:
        return self.state_dir / "ratelimits.sqlite3"
