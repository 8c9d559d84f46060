package mcp.catalog_test

import data.mcp.catalog

_call(server, name) := {"tool": {"server": server, "name": name, "arguments": {}}}

_entries := [
	{"server": "srv-a", "tool": "t", "category": "write", "risk": "high"},
	{"tool": "t", "category": "read", "risk": "low"},
	{"server": "srv-a", "tool": "t", "category": "admin", "risk": "critical"},
	{"server": "srv-b", "tool": "other", "category": "read"},
	"not an entry",
]

test_entry_on_server_when_server_listed if {
	catalog.entry == _entries[0] with data.mcp_policy.catalog as _entries with input as _call("srv-a", "t")
}

test_entry_without_server_when_other_server if {
	catalog.entry == _entries[1] with data.mcp_policy.catalog as _entries with input as _call("srv-z", "t")
}

test_entry_undefined_when_tool_not_listed if {
	not catalog.entry with data.mcp_policy.catalog as _entries with input as _call("srv-a", "nope")
}

test_tool_known_when_listed if {
	catalog.tool == {"known": true, "category": "write", "risk": "high"} with data.mcp_policy.catalog as _entries
		with input as _call("srv-a", "t")
}

test_tool_omits_missing_fields_when_entry_incomplete if {
	catalog.tool == {"known": true, "category": "read"} with data.mcp_policy.catalog as _entries
		with input as _call("srv-b", "other")
}

test_tool_unknown_when_not_listed if {
	catalog.tool == {"known": false} with data.mcp_policy.catalog as _entries with input as _call("srv-b", "t2")
	not catalog.known with data.mcp_policy.catalog as _entries with input as _call("srv-b", "t2")
}

test_tool_unknown_when_name_differs_in_case if {
	catalog.tool == {"known": false} with data.mcp_policy.catalog as _entries with input as _call("srv-b", "Other")
}

test_entries_empty_when_catalog_not_a_list if {
	catalog.entries == [] with data.mcp_policy.catalog as {"tool": "t"}
	catalog.tool == {"known": false} with data.mcp_policy.catalog as {"tool": "t"} with input as _call("srv-a", "t")
}

test_entries_empty_when_no_policy_data if {
	catalog.entries == [] with data.mcp_policy as {}
}

test_tool_unknown_when_input_missing if {
	catalog.tool == {"known": false} with data.mcp_policy.catalog as _entries
}

test_shipped_catalog_lists_copy_image_set_on_both_servers if {
	every server in ["awslabs.healthimaging-mcp-server", "awslabs.valkey-mcp-server"] {
		catalog.tool == {"known": true, "category": "write", "risk": "medium"} with input as _call(server, "copy_image_set")
	}
}

test_shipped_catalog_describes_copy_image_set if {
	descriptions := {e.description | some e in catalog.entries; e.tool == "copy_image_set"}
	descriptions == {concat("", [
		"AWS HealthImaging CopyImageSet: copy an image set, ",
		"optionally into another datastore / over an existing destination",
	])}
}
