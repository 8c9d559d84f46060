# METADATA
# title: The shipped policy data, for the shipped tests
# description: |
#   The data document that policies/*.yaml loads (data.mcp_policy), as a value.
#   The framework's own tests that check the shipped policy end to end evaluate
#   it `with data.mcp_policy as shipped.policy`, never on whatever data is
#   loaded: a team that runs `opa test` over the framework's rego/ together
#   with its own policy data (more catalog entries, more rules) or without
#   policies/ at all runs these tests against the shipped data only.
#   tests/test_team_data.py checks that this value is what policies/*.yaml
#   loads, so the two cannot drift apart.
package mcp.shipped_test

_copy_image_set := {
	"category": "write",
	"risk": "medium",
	"description": concat("", [
		"AWS HealthImaging CopyImageSet: copy an image set, ",
		"optionally into another datastore / over an existing destination",
	]),
}

# METADATA
# title: data.mcp_policy as policies/*.yaml ships it
# scope: document
policy := {
	"catalog": {
		"awslabs.healthimaging-mcp-server": {"copy_image_set": _copy_image_set},
		"awslabs.valkey-mcp-server": {"copy_image_set": _copy_image_set},
	},
	"rules": {"copy_image_set": {
		"action": "rate_limit",
		"rate_limit": {"max": 10, "window": 60, "scope": "session"},
	}},
	"risk_defaults": {
		"low": {"action": "allow"},
		"medium": {"action": "require_approval"},
		"high": {"action": "require_approval"},
		"critical": {"action": "deny"},
	},
	"default": {"action": "deny"},
}
