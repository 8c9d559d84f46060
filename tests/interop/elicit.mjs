// A real MCP client that lets the server ask its user (URL-mode elicitation), for
// tests/test_elicitation.py: the official TypeScript SDK's `Client`, declaring
// `capabilities.elicitation.url`, driven by a JSON plan, printing what happens as it happens.
//
//   node tests/interop/elicit.mjs '<plan JSON>'     (or the plan on stdin)
//
// The plan:
//   {"transport": {"type": "stdio", "command": "...", "args": [...], "env": {...}, "cwd": "..."}
//              | {"type": "http", "url": "http://127.0.0.1:PORT/mcp"},
//    "action": "accept" | "decline" | "cancel",    what the user answers every elicitation
//    "steps": [{"op": "callTool", "name": "copy_image_set", "arguments": {...}}]}
//
// Output, one JSON line each on stdout, written the moment it happens (the test reads them
// as they come, and approves the call when it sees the elicitation):
//   {"op": "connect", "ok": true, "result": {"negotiated": "2025-11-25"}}
//   {"event": "elicitation", "params": <the elicitation/create params>}
//   {"event": "complete", "params": <the notifications/elicitation/complete params>}
//   {"op": "callTool", "ok": true, "result": <what the SDK returned>}
//   {"op": "callTool", "ok": false, "threw": "<message>", "code"?: <McpError code>}
// A throw is never hidden or retried. The exit status is 0 whenever the plan ran, 2 for a
// bad plan.
//
// The SDK (1.32.2) asks for protocol 2025-11-25 in `initialize` by itself; URL mode is new
// in that version. Its Client checks an incoming elicitation/create against the modes it
// declared before the handler sees it.

import { readFileSync } from 'node:fs';

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import {
  ElicitationCompleteNotificationSchema,
  ElicitRequestSchema,
} from '@modelcontextprotocol/sdk/types.js';
import { RequestedVersion, failure, transportFor } from './transport.mjs';

const ACTIONS = ['accept', 'decline', 'cancel'];

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
    if (!ACTIONS.includes(plan.action)) {
      throw new Error(`"action" must be one of ${ACTIONS.join(', ')}`);
    }
  } catch (error) {
    process.stderr.write(`elicit.mjs: bad plan: ${error.message}\n`);
    process.exitCode = 2;
    return;
  }

  const inner = transportFor(plan.transport);
  const transport = new RequestedVersion(inner);
  const client = new Client(
    { name: 'mcp-policy-elicit-ts', version: '1.0.0' },
    { capabilities: { elicitation: { url: {} } } },
  );
  client.setRequestHandler(ElicitRequestSchema, async (request) => {
    emit({ event: 'elicitation', params: request.params });
    return { action: plan.action };
  });
  client.setNotificationHandler(ElicitationCompleteNotificationSchema, async (notification) => {
    emit({ event: 'complete', params: notification.params });
  });

  let connected = false;
  try {
    await client.connect(transport);
    connected = true;
    emit({ op: 'connect', ok: true, result: { negotiated: transport.negotiated } });
  } catch (error) {
    emit(failure('connect', error));
  }

  for (const step of plan.steps) {
    if (!connected) {
      emit({ op: step.op, ok: false, skipped: 'the connection failed' });
      continue;
    }
    try {
      if (step.op !== 'callTool') {
        throw new Error(`unknown step op: ${JSON.stringify(step.op)}`);
      }
      const result = await client.callTool({ name: step.name, arguments: step.arguments ?? {} });
      emit({ op: step.op, ok: true, result });
    } catch (error) {
      emit(failure(step.op, error));
    }
  }

  if (connected && inner instanceof StreamableHTTPClientTransport) {
    try {
      await inner.terminateSession();
    } catch (error) {
      process.stderr.write(`elicit.mjs: ending the HTTP session failed: ${error.message}\n`);
    }
  }
  try {
    await client.close();
  } catch (error) {
    process.stderr.write(`elicit.mjs: close failed: ${error.message}\n`);
  }
}

await main();
