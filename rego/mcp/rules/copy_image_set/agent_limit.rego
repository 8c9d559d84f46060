# The per-agent limit of copy_image_set: at most 20 copies per 60 seconds per agent,
# however many sessions it opens, beside the per-session limit of policies/rules.yaml
# (a YAML rule carries one limit). Every limit must pass. A copy of the policy without
# this file has the per-session limit alone (the tests' shared service; benchmarks).
package mcp.rules.copy_image_set

# The limit every agent shares over all its sessions (policies/rules.yaml keeps
# the per-session one).
_agent_limit := {
	"rule": "copy_image_set.agent_limit",
	"max": 20,
	"window_seconds": 60,
}

_names_agent if {
	is_string(input.principal.agent_id)
	input.principal.agent_id != ""
}

# METADATA
# title: Rate-limit contributions
# description: |
#   copy_image_set.agent_limit: at most 20 copies per 60 seconds per agent
#   (scope agent), however many sessions it opens, on top of the per-session limit
#   of policies/rules.yaml. Calls that name no agent cannot be told apart by
#   agent: they share one counter (scope global), as one agent would.
# scope: document
rate_limit contains object.union(_agent_limit, {
	"scope": "agent",
	"reason": "at most 20 copies per 60 seconds per agent, over all its sessions",
}) if {
	_applies
	_names_agent
}

rate_limit contains object.union(_agent_limit, {
	"scope": "global",
	"reason": "at most 20 copies per 60 seconds shared by all calls that name no agent",
}) if {
	_applies
	not _names_agent
}
