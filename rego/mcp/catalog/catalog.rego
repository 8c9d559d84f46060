# METADATA
# title: Tool catalog lookup
# description: |
#   Finds the entry of the policy catalog (data.mcp_policy.catalog, loaded from
#   policies/*.yaml: server name, then tool name, then the entry) that
#   describes the called tool, by key: the cost is the same at any catalog
#   size. Names match exactly (case-sensitive, byte for byte). An entry under
#   the called server beats one under "*" (the tool on any server).
#   Used by the decision (its "tool" field) and by the YAML rules package.
# schemas:
#   - data.mcp_policy: schema["mcp_policy.schema"]
package mcp.catalog

# METADATA
# title: Catalog entry of the called tool
# description: |
#   The entry for (input.tool.server, input.tool.name), else the entry for
#   ("*", input.tool.name); undefined when the tool is not in the catalog.
# scope: document
entry := e if {
	e := data.mcp_policy.catalog[input.tool.server][input.tool.name]
	is_object(e)
} else := e if {
	e := data.mcp_policy.catalog["*"][input.tool.name]
	is_object(e)
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
