package mcp.catalog_test

import data.mcp.catalog
import data.mcp.shipped_test

_call(server, name) := {"tool": {"server": server, "name": name, "arguments": {}}}

_catalog := {
	"srv-a": {"t": {"category": "write", "risk": "high"}, "odd": "not an entry"},
	"*": {"t": {"category": "read", "risk": "low"}, "odd": {"category": "read", "risk": "low"}},
	"srv-b": {"other": {"category": "read"}},
}

test_entry_on_server_when_server_listed if {
	catalog.entry == _catalog["srv-a"].t with data.mcp_policy.catalog as _catalog with input as _call("srv-a", "t")
}

test_entry_on_any_server_when_other_server if {
	catalog.entry == _catalog["*"].t with data.mcp_policy.catalog as _catalog with input as _call("srv-z", "t")
}

test_entry_on_any_server_when_server_entry_not_an_object if {
	catalog.entry == _catalog["*"].odd with data.mcp_policy.catalog as _catalog with input as _call("srv-a", "odd")
}

test_entry_undefined_when_tool_not_listed if {
	not catalog.entry with data.mcp_policy.catalog as _catalog with input as _call("srv-a", "nope")
}

test_tool_known_when_listed if {
	catalog.tool == {"known": true, "category": "write", "risk": "high"} with data.mcp_policy.catalog as _catalog
		with input as _call("srv-a", "t")
}

test_tool_omits_missing_fields_when_entry_incomplete if {
	catalog.tool == {"known": true, "category": "read"} with data.mcp_policy.catalog as _catalog
		with input as _call("srv-b", "other")
}

test_tool_unknown_when_not_listed if {
	catalog.tool == {"known": false} with data.mcp_policy.catalog as _catalog with input as _call("srv-b", "t2")
	not catalog.known with data.mcp_policy.catalog as _catalog with input as _call("srv-b", "t2")
}

test_tool_unknown_when_name_differs_in_case if {
	catalog.tool == {"known": false} with data.mcp_policy.catalog as _catalog with input as _call("srv-b", "Other")
}

test_tool_unknown_when_catalog_not_a_map if {
	every bad in [[{"server": "srv-a", "tool": "t"}], "t", 7] {
		catalog.tool == {"known": false} with data.mcp_policy.catalog as bad with input as _call("srv-a", "t")
	}
}

test_tool_unknown_when_no_policy_data if {
	catalog.tool == {"known": false} with data.mcp_policy as {} with input as _call("srv-a", "t")
}

test_tool_unknown_when_input_missing if {
	catalog.tool == {"known": false} with data.mcp_policy.catalog as _catalog
}

test_shipped_catalog_lists_copy_image_set_on_both_servers if {
	every server in ["awslabs.healthimaging-mcp-server", "awslabs.valkey-mcp-server"] {
		catalog.tool == {"known": true, "category": "write", "risk": "medium"} with data.mcp_policy as shipped_test.policy
			with input as _call(server, "copy_image_set")
	}
}

test_shipped_catalog_describes_copy_image_set if {
	descriptions := {e.copy_image_set.description | some e in shipped_test.policy.catalog}
	descriptions == {concat("", [
		"AWS HealthImaging CopyImageSet: copy an image set, ",
		"optionally into another datastore / over an existing destination",
	])}
}
