"""The reference MCP proxy: decisions enforced in front of real MCP servers.

    agent ──MCP (stdio | streamable HTTP)──► proxy ──MCP (stdio child | URL)──► server
                                               │
                                  Decider: gRPC client | embedded service

core.py      the message-level relay; tools/call decided, tools/list filtered
decider.py   where decisions come from (gRPC or in-process), behind one Protocol
listing.py   which tools tools/list shows
elicitation.py  the agent's client asks its user: URL-mode elicitation, signed requestStates
upstream.py  the server side: a child process, or a streamable HTTP URL
stdio.py     the agent side over stdin/stdout
http.py      the agent side over streamable HTTP (one upstream per MCP session)
serve.py     the two ways to run it
scan.py      `mcp-policy scan`: a policy scaffold from a server's tools
validate.py  `mcp-policy validate`: policy files checked by OPA
cli.py       the three commands
"""
