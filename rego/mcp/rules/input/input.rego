# METADATA
# title: Input hygiene
# description: |
#   Denies calls whose input document is missing or ill-typed in the fields the
#   policy relies on, so that a malformed request can never be allowed.
#   (Each check is a helper rule negated on its own: `not f(input.x)` would be
#   undefined, not true, when input.x is missing.)
package mcp.rules.input

_non_empty_string(x) if {
	is_string(x)
	x != ""
}

# MCP tool names: 1-128 characters of [A-Za-z0-9_.-].
_valid_tool_name(x) if {
	is_string(x)
	regex.match(`^[A-Za-z0-9_.-]{1,128}$`, x)
}

_tool_name_ok if _valid_tool_name(input.tool.name)

_server_ok if _non_empty_string(input.tool.server)

_arguments_ok if is_object(input.tool.arguments)

_session_ok if _non_empty_string(input.principal.session_id)

# Every check at once: a well-formed call (nearly all of them) costs this one
# rule; the deny rules below only look further when it fails.
_well_formed if {
	_valid_tool_name(input.tool.name)
	_non_empty_string(input.tool.server)
	is_object(input.tool.arguments)
	_non_empty_string(input.principal.session_id)
}

# METADATA
# title: Deny contributions
# description: |
#   input.tool_name_invalid, input.server_invalid, input.arguments_invalid,
#   input.session_id_invalid.
# scope: document
deny contains problem if {
	not _well_formed
	some problem in _problems
}

_problems contains {
	"rule": "input.tool_name_invalid",
	"reason": "input.tool.name must be an MCP tool name: 1-128 characters of A-Z, a-z, 0-9, _, . and -",
} if {
	not _tool_name_ok
}

_problems contains {
	"rule": "input.server_invalid",
	"reason": "input.tool.server must be a non-empty string",
} if {
	not _server_ok
}

_problems contains {
	"rule": "input.arguments_invalid",
	"reason": "input.tool.arguments must be an object",
} if {
	not _arguments_ok
}

_problems contains {
	"rule": "input.session_id_invalid",
	"reason": "input.principal.session_id must be a non-empty string",
} if {
	not _session_ok
}
