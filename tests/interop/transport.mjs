// What the interop scripts (client.mjs, elicit.mjs) share: the SDK transport for a plan's
// "transport" spec, a wrapper that notes (and optionally sets) the protocol version of the
// `initialize` exchange, and the line a failed step prints.
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

// A Transport (the SDK's documented interface, shared/transport.d.ts) around another:
// rewrites params.protocolVersion of the outgoing `initialize` when `version` is given, and
// notes the version the server answered (`negotiated`).
export class RequestedVersion {
  constructor(inner, version) {
    this.inner = inner;
    this.version = version;
    this.initializeId = undefined;
    this.negotiated = undefined;
    this.onclose = undefined;
    this.onerror = undefined;
    this.onmessage = undefined;
  }

  get sessionId() {
    return this.inner.sessionId;
  }

  async start() {
    this.inner.onclose = () => this.onclose?.();
    this.inner.onerror = (error) => this.onerror?.(error);
    this.inner.onmessage = (message, extra) => {
      if (message.id !== undefined && message.id === this.initializeId && message.result) {
        this.negotiated = message.result.protocolVersion;
      }
      this.onmessage?.(message, extra);
    };
    await this.inner.start();
  }

  async send(message, options) {
    if (message.method === 'initialize' && message.id !== undefined) {
      this.initializeId = message.id;
      if (this.version) {
        message = { ...message, params: { ...message.params, protocolVersion: this.version } };
      }
    }
    await this.inner.send(message, options);
  }

  setProtocolVersion(version) {
    this.inner.setProtocolVersion?.(version);
  }

  async close() {
    await this.inner.close();
  }
}

export function transportFor(spec) {
  if (spec.type === 'stdio') {
    return new StdioClientTransport({
      command: spec.command,
      args: spec.args ?? [],
      env: spec.env,
      cwd: spec.cwd,
      stderr: 'inherit',
    });
  }
  if (spec.type === 'http') {
    return new StreamableHTTPClientTransport(new URL(spec.url));
  }
  throw new Error(`unknown transport type: ${JSON.stringify(spec.type)}`);
}

export function failure(op, error) {
  const line = { op, ok: false, threw: error instanceof Error ? error.message : String(error) };
  if (error && typeof error === 'object' && error.code !== undefined) {
    line.code = error.code;
  }
  return line;
}
