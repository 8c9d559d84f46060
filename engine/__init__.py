"""mcp-policy-engine: a policy decision point for AI-agent MCP tool calls."""

__version__ = "0.1.0"
