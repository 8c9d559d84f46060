// A real MCP client for the interop suite (tests/test_interop.py): the official TypeScript
// SDK's `Client`, driven by a JSON plan, printing what the SDK returned or threw.
//
//   node tests/interop/client.mjs '<plan JSON>'     (or the plan on stdin)
//
// The plan:
//   {"transport": {"type": "stdio", "command": "...", "args": [...], "env": {...}, "cwd": "..."}
//              | {"type": "http", "url": "http://127.0.0.1:PORT/mcp"},
//    "protocolVersion": "2025-06-18",            optional: the version to ask for
//    "steps": [{"op": "listTools"},
//              {"op": "callTool", "name": "copy_image_set", "arguments": {...}, "meta": {...}}]}
//
// Output, one JSON line each, on stdout: first the connection
//   {"op": "connect", "ok": true, "result": {"requested", "negotiated", "serverInfo"}}
// then one line per step, in order:
//   {"op": ..., "ok": true, "result": <what the SDK returned>}
//   {"op": ..., "ok": false, "threw": "<the error's message>", "code"?: <McpError code>}
// A throw is never hidden or retried: "the client threw" is what the tests look for. When
// the connection itself threw, every step is reported {"ok": false, "skipped": "..."}
// (nothing was tried). The exit status is 0 whenever the plan ran, 2 for a bad plan.
//
// Choosing the protocol version: the SDK (1.32.2) has no option for it. Client.connect()
// always sends `initialize` with LATEST_PROTOCOL_VERSION (2025-11-25) and accepts any answer
// in SUPPORTED_PROTOCOL_VERSIONS (2025-11-25, 2025-06-18, 2025-03-26, 2024-11-05,
// 2024-10-07); it has no 2026-07-28 (stateless, server/discover) support at all. So a plan's
// protocolVersion is applied by wrapping the SDK's transport in `RequestedVersion`, a
// Transport (the SDK's documented interface, shared/transport.d.ts) that rewrites
// params.protocolVersion of the outgoing `initialize` request and notes the version the
// server answered. Everything after that is the SDK's own doing: it checks the answer
// against SUPPORTED_PROTOCOL_VERSIONS and, over HTTP, sends the negotiated version as the
// Mcp-Protocol-Version header.

import { readFileSync } from 'node:fs';

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { LATEST_PROTOCOL_VERSION } from '@modelcontextprotocol/sdk/types.js';
import { RequestedVersion, failure, transportFor } from './transport.mjs';

async function runStep(client, step) {
  if (step.op === 'listTools') {
    return client.listTools();
  }
  if (step.op === 'callTool') {
    const params = { name: step.name, arguments: step.arguments ?? {} };
    if (step.meta) {
      params._meta = step.meta;
    }
    return client.callTool(params);
  }
  throw new Error(`unknown step op: ${JSON.stringify(step.op)}`);
}

function emit(line) {
  process.stdout.write(JSON.stringify(line) + '\n');
}

async function main() {
  const text = process.argv[2] ?? readFileSync(0, 'utf8');
  let plan;
  try {
    plan = JSON.parse(text);
    if (!plan || typeof plan.transport !== 'object' || !Array.isArray(plan.steps)) {
      throw new Error('a plan needs "transport" (an object) and "steps" (a list)');
    }
  } catch (error) {
    process.stderr.write(`client.mjs: bad plan: ${error.message}\n`);
    process.exitCode = 2;
    return;
  }

  const inner = transportFor(plan.transport);
  const transport = new RequestedVersion(inner, plan.protocolVersion);
  const client = new Client({ name: 'mcp-policy-interop-ts', version: '1.0.0' });
  let connected = false;
  try {
    await client.connect(transport);
    connected = true;
    emit({
      op: 'connect',
      ok: true,
      result: {
        requested: plan.protocolVersion ?? LATEST_PROTOCOL_VERSION,
        negotiated: transport.negotiated,
        serverInfo: client.getServerVersion(),
      },
    });
  } catch (error) {
    emit(failure('connect', error));
  }

  for (const step of plan.steps) {
    if (!connected) {
      emit({ op: step.op, ok: false, skipped: 'the connection failed' });
      continue;
    }
    try {
      emit({ op: step.op, ok: true, result: await runStep(client, step) });
    } catch (error) {
      emit(failure(step.op, error));
    }
  }

  if (connected && inner instanceof StreamableHTTPClientTransport) {
    try {
      await inner.terminateSession();
    } catch (error) {
      process.stderr.write(`client.mjs: ending the HTTP session failed: ${error.message}\n`);
    }
  }
  try {
    await client.close();
  } catch (error) {
    process.stderr.write(`client.mjs: close failed: ${error.message}\n`);
  }
}

await main();
