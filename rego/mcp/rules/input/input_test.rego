package mcp.rules.input_test

# Imported under another name: `import data.mcp.rules.input` would shadow the
# input document, and `with input as ...` would then replace this package.
import data.mcp.rules.input as hygiene

_good := {
	"tool": {"server": "awslabs.healthimaging-mcp-server", "name": "copy_image_set", "arguments": {}},
	"principal": {"agent_id": "a-1", "session_id": "s-1", "user_id": "u-1", "roles": []},
	"request": {"id": "d-1", "time": "2025-06-18T00:00:00Z", "transport": "http", "jsonrpc_id": 7},
	"context": {},
}

_all_ids := {"input.tool_name_invalid", "input.server_invalid", "input.arguments_invalid", "input.session_id_invalid"}

_ids contains d.rule if {
	some d in hygiene.deny
}

_repeat(text, n) := concat("", [text | some _ in numbers.range(1, n)])

test_nothing_when_input_well_formed if {
	hygiene.deny == set() with input as _good
}

test_nothing_when_tool_name_uses_every_allowed_character if {
	name := concat("", ["ABCXYZabcxyz0189_.-", _repeat("x", 109)])
	count(name) == 128
	hygiene.deny == set() with input as object.union(_good, {"tool": {"name": name}})
}

test_deny_all_when_input_missing if {
	_ids == _all_ids
}

test_deny_all_when_input_empty if {
	_ids == _all_ids with input as {}
}

test_deny_all_when_input_not_an_object if {
	_ids == _all_ids with input as ["tools/call"]
}

test_deny_tool_name_when_invalid if {
	every name in [
		"", # empty
		_repeat("a", 129), # too long
		"copy image set", # space
		"ｃｏｐｙ_image_set", # fullwidth letters
		"copy\u200d_image_set", # zero-width joiner
		"copy_image_set\n", # trailing newline
		"tools/call", # slash
		7,
		null,
		["copy_image_set"],
	] {
		ids := _ids with input as object.union(_good, {"tool": {"name": name}})
		ids == {"input.tool_name_invalid"}
	}
}

test_deny_tool_name_when_missing if {
	ids := _ids with input as json.remove(_good, ["tool/name"])
	ids == {"input.tool_name_invalid"}
}

test_deny_server_when_empty_or_not_string if {
	every server in ["", 1, null, {"name": "s"}] {
		ids := _ids with input as object.union(_good, {"tool": {"server": server}})
		ids == {"input.server_invalid"}
	}
}

test_deny_arguments_when_not_object if {
	every arguments in ["{}", [], null, 0] {
		ids := _ids with input as object.union(_good, {"tool": {"arguments": arguments}})
		ids == {"input.arguments_invalid"}
	}
}

test_deny_session_when_empty_missing_or_not_string if {
	every principal in [{"session_id": ""}, {"session_id": 1}, {"session_id": null}, "s-1"] {
		ids := _ids with input as object.union(_good, {"principal": principal})
		ids == {"input.session_id_invalid"}
	}
	ids := _ids with input as json.remove(_good, ["principal/session_id"])
	ids == {"input.session_id_invalid"}
}

test_deny_reasons_when_input_missing if {
	hygiene.deny == {
		{
			"rule": "input.tool_name_invalid",
			"reason": "input.tool.name must be an MCP tool name: 1-128 characters of A-Z, a-z, 0-9, _, . and -",
		},
		{"rule": "input.server_invalid", "reason": "input.tool.server must be a non-empty string"},
		{"rule": "input.arguments_invalid", "reason": "input.tool.arguments must be an object"},
		{"rule": "input.session_id_invalid", "reason": "input.principal.session_id must be a non-empty string"},
	}
}
