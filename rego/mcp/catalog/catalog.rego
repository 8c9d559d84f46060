# METADATA
# title: Tool catalog lookup
# description: |
#   Finds the entry of the policy catalog (data.mcp_policy.catalog, loaded from
#   policies/*.yaml) that describes the called tool. Names match exactly
#   (case-sensitive, byte for byte). An entry naming the server beats an entry
#   without a server (which matches the tool on any server); among entries of
#   the same kind, the first one in the list wins.
#   Used by the decision (its "tool" field) and by the YAML rules package.
package mcp.catalog

# METADATA
# title: Catalog entries
# description: The catalog list from the policy data; empty when absent or not a list.
# scope: document
default entries := []

entries := data.mcp_policy.catalog if is_array(data.mcp_policy.catalog)

_for_tool := [e | some e in entries; is_object(e); e.tool == input.tool.name]

_on_server := [e | some e in _for_tool; e.server == input.tool.server]

_on_any_server := [e | some e in _for_tool; object.get(e, "server", null) == null]

# METADATA
# title: Catalog entry of the called tool
# description: |
#   The entry for (input.tool.server, input.tool.name); undefined when the tool
#   is not in the catalog.
# scope: document
entry := _on_server[0] if {
	count(_on_server) > 0
} else := _on_any_server[0] if {
	count(_on_any_server) > 0
}

# METADATA
# title: Tool is in the catalog
# description: True when the catalog has an entry for the called tool on the called server.
# scope: document
default known := false

known if is_object(entry)

# METADATA
# title: Tool summary for the decision
# description: |
#   {"known": true, "category": ..., "risk": ...} from the catalog entry, or
#   {"known": false} when the tool is not in the catalog.
# scope: document
default tool := {"known": false}

tool := object.union(object.filter(entry, ["category", "risk"]), {"known": true}) if known
