package mcp_test

import data.mcp
import data.mcp.shipped_test

# End to end: the shipped rule packages and the shipped policy data. The data is
# given (_shipped: what policies/*.yaml loads), never taken from whatever is
# loaded, so these tests hold when a team's own data is loaded beside policies/
# or in its place.

_hi := "awslabs.healthimaging-mcp-server"

_valkey := "awslabs.valkey-mcp-server"

_dest := "0123456789abcdef0123456789abcdef"

_other_store := "fedcba9876543210fedcba9876543210"

_image_set := "00112233445566778899aabbccddeeff"

_other_set := "ffeeddccbbaa99887766554433221100"

# What the real copy_image_set takes (awslabs.healthimaging-mcp-server 0.1.1).
_info := {"sourceImageSet": {"latestVersionId": "1"}}

_args := {"datastore_id": _dest, "source_image_set_id": _image_set, "copy_image_set_information": _info}

_request(server, name, args) := {
	"tool": {"server": server, "name": name, "arguments": args},
	"principal": {"agent_id": "a-1", "session_id": "s-1", "user_id": "u-1", "roles": []},
	"request": {"id": "d-1", "time": "2025-06-18T12:00:00Z", "transport": "grpc", "jsonrpc_id": 7},
	"context": {},
}

_copy(extra) := _request(_hi, "copy_image_set", object.union(_args, extra))

# The shipped policy data, given to every decision below.
_shipped := shipped_test.policy

_shipped_limit := {
	"rule": "catalog.rule.copy_image_set",
	"max": 10,
	"window_seconds": 60,
	"scope": "session",
	"reason": "at most 10 calls per 60 seconds per session",
}

# Beside it, from rego/mcp/rules/copy_image_set: 20 per minute per agent, whatever
# its sessions.
_agent_limit := {
	"rule": "copy_image_set.agent_limit",
	"max": 20,
	"window_seconds": 60,
	"scope": "agent",
	"reason": "at most 20 copies per 60 seconds per agent, over all its sessions",
}

_shipped_limits := [_shipped_limit, _agent_limit]

_shipped_reason := concat("; ", [_shipped_limit.reason, _agent_limit.reason])

_copy_tool := {"known": true, "category": "write", "risk": "medium"}

test_shipped_rate_limit_when_valid_copy_on_either_server if {
	every server in [_hi, _valkey] {
		d := mcp.decision with data.mcp_policy as _shipped with input as _request(server, "copy_image_set", _args)
		d == {
			"action": "rate_limit",
			"rule": "catalog.rule.copy_image_set",
			"reason": _shipped_reason,
			"rate_limits": _shipped_limits,
			"matched": ["catalog.rule.copy_image_set", "copy_image_set.agent_limit"],
			"shadow": [],
			"denies_tool": false,
			"tool": _copy_tool,
		}
	}
}

# Three sessions of one agent share its agent limit: the key the engine counts it
# under is the agent id (scope agent), never the session.
test_shipped_agent_limit_same_whatever_the_session if {
	limits := {json.marshal(d.rate_limits) |
		some sid in ["s-1", "s-2", "s-3"]
		request := json.patch(_copy({}), [{"op": "replace", "path": "/principal/session_id", "value": sid}])
		d := mcp.decision with data.mcp_policy as _shipped with input as request
	}
	limits == {json.marshal(_shipped_limits)}
}

test_shipped_one_shared_limit_when_no_agent_named if {
	d := mcp.decision with data.mcp_policy as _shipped with input as json.remove(_copy({}), ["principal/agent_id"])
	d.action == "rate_limit"
	d.rate_limits == [_shipped_limit, object.union(_agent_limit, {
		"scope": "global",
		"reason": "at most 20 copies per 60 seconds shared by all calls that name no agent",
	})]
}

test_shipped_require_approval_when_copy_into_existing_image_set if {
	info := object.union(_info, {"destinationImageSet": {"imageSetId": _other_set, "latestVersionId": "2"}})
	d := mcp.decision with data.mcp_policy as _shipped with input as _copy({"copy_image_set_information": info})
	reason := sprintf("copy_image_set copies into the existing image set %s of datastore %s, changing it", [
		_other_set,
		_dest,
	])
	d == {
		"action": "require_approval",
		"rule": "copy_image_set.existing_destination",
		"reason": reason,
		"rate_limits": _shipped_limits,
		"approval": {"rule": "copy_image_set.existing_destination", "reason": reason},
		"matched": ["catalog.rule.copy_image_set", "copy_image_set.agent_limit", "copy_image_set.existing_destination"],
		"shadow": [],
		"denies_tool": false,
		"tool": _copy_tool,
	}
}

test_shipped_deny_when_copy_image_set_information_missing if {
	d := mcp.decision with data.mcp_policy as _shipped
		with input as _request(_hi, "copy_image_set", object.remove(_args, ["copy_image_set_information"]))
	d.action == "deny"
	d.rule == "copy_image_set.copy_image_set_information_invalid"
	d.reason == `copy_image_set: argument "copy_image_set_information" is required`
	d.rate_limits == []
	d.denies_tool == false
}

test_shipped_deny_when_copy_image_set_information_malformed if {
	info := {"sourceImageSet": {"latestVersionId": "latest"}, "destinationImageSet": "ffee"}
	d := mcp.decision with data.mcp_policy as _shipped with input as _copy({"copy_image_set_information": info})
	d.action == "deny"
	d.rule == "copy_image_set.copy_image_set_information_invalid"
	d.reason == concat("; ", [
		"copy_image_set: copy_image_set_information.destinationImageSet must be an object {imageSetId, latestVersionId}",
		"copy_image_set: copy_image_set_information.sourceImageSet.latestVersionId must be a version id (1 to 64 digits)",
	])
	not d.approval
}

test_shipped_deny_when_copy_on_unknown_server if {
	d := mcp.decision with data.mcp_policy as _shipped
		with input as _request("awslabs.s3-mcp-server", "copy_image_set", _args)
	d == {
		"action": "deny",
		"rule": "catalog.default",
		"reason": `tool "copy_image_set" on server "awslabs.s3-mcp-server" is denied (not in the policy catalog)`,
		"rate_limits": [],
		"matched": ["catalog.default", "copy_image_set.agent_limit"],
		"shadow": [],
		"denies_tool": true,
		"tool": {"known": false},
	}
}

test_shipped_deny_as_unknown_when_name_is_a_lookalike if {
	every name in [
		"Copy_Image_Set",
		"COPY_IMAGE_SET",
		"ｃｏｐｙ_image_set", # fullwidth letters
		"copy\u200d_image_set", # zero-width joiner
		"copy_image_set\u200b", # trailing zero-width space
	] {
		d := mcp.decision with data.mcp_policy as _shipped with input as _request(_hi, name, _args)
		d.action == "deny"
		d.tool == {"known": false}
		"catalog.default" in d.matched
		d.rate_limits == []
	}
}

test_shipped_deny_as_unknown_when_server_is_a_lookalike if {
	lookalikes := [
		"Awslabs.healthimaging-mcp-server",
		"awslabs.healthimaging-mcp-server ",
		"awslabs.healthimaging\u200d-mcp-server",
	]
	every server in lookalikes {
		d := mcp.decision with data.mcp_policy as _shipped with input as _request(server, "copy_image_set", _args)
		d.action == "deny"
		d.rule == "catalog.default"
		d.tool == {"known": false}
	}
}

test_shipped_tool_name_invalid_when_name_not_ascii if {
	d := mcp.decision with data.mcp_policy as _shipped with input as _request(_hi, "ｃｏｐｙ_image_set", _args)
	d.matched == ["catalog.default", "input.tool_name_invalid"]
}

test_shipped_require_approval_with_limit_when_force_true if {
	d := mcp.decision with data.mcp_policy as _shipped with input as _copy({"force": true})
	d == {
		"action": "require_approval",
		"rule": "copy_image_set.force_overwrite",
		"reason": "copy_image_set with force=true overwrites a destination image set that has changed",
		"rate_limits": _shipped_limits,
		"approval": {
			"rule": "copy_image_set.force_overwrite",
			"reason": "copy_image_set with force=true overwrites a destination image set that has changed",
		},
		"matched": ["catalog.rule.copy_image_set", "copy_image_set.agent_limit", "copy_image_set.force_overwrite"],
		"shadow": [],
		"denies_tool": false,
		"tool": _copy_tool,
	}
}

test_shipped_rate_limit_when_force_false if {
	d := mcp.decision with data.mcp_policy as _shipped with input as _copy({"force": false})
	d.action == "rate_limit"
	d.rate_limits == _shipped_limits
}

test_shipped_deny_when_force_not_boolean if {
	d := mcp.decision with data.mcp_policy as _shipped with input as _copy({"force": "yes"})
	d.action == "deny"
	d.rule == "copy_image_set.force_invalid"
	d.rate_limits == []
}

test_shipped_require_approval_when_cross_datastore if {
	d := mcp.decision with data.mcp_policy as _shipped with input as _copy({"source_datastore_id": _other_store})
	d.action == "require_approval"
	d.rule == "copy_image_set.cross_datastore"
	d.approval.rule == "copy_image_set.cross_datastore"
	d.rate_limits == _shipped_limits
}

test_shipped_rate_limit_when_source_datastore_is_destination if {
	d := mcp.decision with data.mcp_policy as _shipped with input as _copy({"source_datastore_id": _dest})
	d.action == "rate_limit"
	d.matched == ["catalog.rule.copy_image_set", "copy_image_set.agent_limit"]
}

# The real tool's source_datastore_id is a string or null: null is a copy inside datastore_id.
test_shipped_rate_limit_when_source_datastore_null if {
	d := mcp.decision with data.mcp_policy as _shipped with input as _copy({"source_datastore_id": null})
	d.action == "rate_limit"
	d.matched == ["catalog.rule.copy_image_set", "copy_image_set.agent_limit"]
}

test_shipped_approval_lists_both_reasons_when_force_and_cross_datastore if {
	d := mcp.decision with data.mcp_policy as _shipped
		with input as _copy({"force": true, "source_datastore_id": _other_store})
	d.action == "require_approval"
	d.rule == "copy_image_set.cross_datastore"
	d.reason == concat("; ", [
		sprintf("copy_image_set copies an image set from datastore %s into another datastore, %s", [_other_store, _dest]),
		"copy_image_set with force=true overwrites a destination image set that has changed",
	])
	d.approval == {"rule": "copy_image_set.cross_datastore", "reason": d.reason}
}

test_shipped_deny_when_required_arguments_invalid if {
	d := mcp.decision with data.mcp_policy as _shipped
		with input as _request(_hi, "copy_image_set", {"datastore_id": "DS-1"})
	d.action == "deny"
	d.rule == "copy_image_set.copy_image_set_information_invalid"
	d.reason == concat("; ", [
		`copy_image_set: argument "copy_image_set_information" is required`,
		`copy_image_set: argument "datastore_id" must be a 32-character lowercase hex id`,
		`copy_image_set: argument "source_image_set_id" is required`,
	])
	d.rate_limits == []
	d.tool == _copy_tool
}

test_shipped_deny_beats_approval_when_force_and_bad_source_datastore if {
	d := mcp.decision with data.mcp_policy as _shipped
		with input as _copy({"force": true, "source_datastore_id": "nope"})
	d.action == "deny"
	d.rule == "copy_image_set.source_datastore_id_invalid"
	not d.approval
}

test_shipped_limits_stack_when_user_package_adds_limit if {
	per_user := {
		"rule": "extra.per_user",
		"max": 100,
		"window_seconds": 3600,
		"scope": "user",
		"reason": "at most 100 copies per hour per user",
	}

	# mcp.rules.extra stands for a package a user adds; it does not exist in this repository.
	# regal ignore:unresolved-reference
	d := mcp.decision with mcp.rules.extra.rate_limit as {per_user}
		with data.mcp_policy as _shipped with input as _copy({})
	d.action == "rate_limit"
	d.rule == "catalog.rule.copy_image_set"
	d.rate_limits == [_shipped_limit, _agent_limit, per_user]
	d.reason == concat("; ", [_shipped_reason, "at most 100 copies per hour per user"])
	d.matched == ["catalog.rule.copy_image_set", "copy_image_set.agent_limit", "extra.per_user"]
}

test_shipped_user_package_limit_carries_cost_when_given if {
	images := {
		"rule": "extra.images_per_hour",
		"max": 500,
		"window_seconds": 3600,
		"scope": "user",
		"reason": "at most 500 images per hour per user",
		"cost": 12,
	}

	# mcp.rules.extra stands for a package a user adds; it does not exist in this repository.
	# regal ignore:unresolved-reference
	d := mcp.decision with mcp.rules.extra.rate_limit as {images}
		with data.mcp_policy as _shipped with input as _copy({})
	d.action == "rate_limit"
	d.rule == "catalog.rule.copy_image_set"
	d.rate_limits == [_shipped_limit, _agent_limit, images]
	d.matched == ["catalog.rule.copy_image_set", "copy_image_set.agent_limit", "extra.images_per_hour"]
}

test_shipped_user_package_limit_invalid_when_cost_malformed if {
	every cost in [-1, "3"] {
		images := {
			"rule": "extra.images_per_hour",
			"max": 500,
			"window_seconds": 3600,
			"scope": "user",
			"reason": "at most 500 images per hour per user",
			"cost": cost,
		}

		# mcp.rules.extra stands for a package a user adds; it does not exist in this repository.
		# regal ignore:unresolved-reference
		d := mcp.decision with mcp.rules.extra.rate_limit as {images}
			with data.mcp_policy as _shipped with input as _copy({})
		d.action == "deny"
		d.rule == "decision.invalid_contribution"
		d.reason == "policy package mcp.rules.extra produced a malformed rate_limit contribution"
		d.rate_limits == []
		d.matched == ["catalog.rule.copy_image_set", "copy_image_set.agent_limit", "decision.invalid_contribution"]
	}
}

test_shipped_user_package_deny_wins_when_added if {
	night := {"rule": "extra.no_copies_at_night", "reason": "no copies between 22:00 and 06:00"}

	# mcp.rules.extra stands for a package a user adds; it does not exist in this repository.
	# regal ignore:unresolved-reference
	d := mcp.decision with mcp.rules.extra.deny as {night}
		with data.mcp_policy as _shipped with input as _copy({})
	d.action == "deny"
	d.rule == "extra.no_copies_at_night"
	d.rate_limits == []
}

test_shipped_user_package_allow_loses_when_catalog_denies if {
	yes := {"rule": "extra.allow_everything", "reason": "yes"}

	# mcp.rules.extra stands for a package a user adds; it does not exist in this repository.
	# regal ignore:unresolved-reference
	d := mcp.decision with mcp.rules.extra.allow as {yes}
		with data.mcp_policy as _shipped with input as _request(_hi, "delete_datastore", {})
	d.action == "deny"
	d.rule == "catalog.default"
}

test_shipped_risk_defaults_when_catalogued_tool_has_no_rule if {
	entries := {_hi: {
		"search_image_sets": {"category": "read", "risk": "low"},
		"update_image_set_metadata": {"category": "write", "risk": "high"},
		"delete_datastore": {"category": "delete", "risk": "critical"},
	}}
	want := {
		"search_image_sets": ["allow", "catalog.risk_default.low"],
		"update_image_set_metadata": ["require_approval", "catalog.risk_default.high"],
		"delete_datastore": ["deny", "catalog.risk_default.critical"],
	}
	every name, expected in want {
		policy := object.union(_shipped, {"catalog": entries})
		d := mcp.decision with data.mcp_policy as policy with input as _request(_hi, name, {})
		[d.action, d.rule] == expected
	}
}

test_shipped_deny_when_input_missing if {
	d := mcp.decision with data.mcp_policy as _shipped
	d.action == "deny"
	d.rule == "catalog.default"
	d.rate_limits == []
	d.tool == {"known": false}
	d.matched == [
		"catalog.default",
		"input.arguments_invalid",
		"input.server_invalid",
		"input.session_id_invalid",
		"input.tool_name_invalid",
	]
}

test_shipped_deny_when_input_ill_typed if {
	every bad in [
		{},
		[],
		"tools/call",
		{"tool": "copy_image_set"},
		{"tool": {"server": _hi, "name": "copy_image_set", "arguments": "{}"}, "principal": {"session_id": "s-1"}},
		{"tool": {"server": _hi, "name": "copy_image_set", "arguments": _args}, "principal": {"session_id": 1}},
		{"tool": {"server": _hi, "name": "copy_image_set", "arguments": _args}},
		{"tool": {"server": 1, "name": "copy_image_set", "arguments": _args}, "principal": {"session_id": "s"}},
		{"tool": {"server": _hi, "name": ["copy_image_set"], "arguments": _args}, "principal": {"session_id": "s"}},
	] {
		d := mcp.decision with data.mcp_policy as _shipped with input as bad
		d.action == "deny"
		d.rate_limits == []
	}
}

test_shipped_deny_when_session_missing_on_valid_copy if {
	d := mcp.decision with data.mcp_policy as _shipped with input as json.remove(_copy({}), ["principal/session_id"])
	d.action == "deny"
	d.rule == "input.session_id_invalid"
	d.tool == _copy_tool
}

test_shipped_decision_always_has_required_fields if {
	every request in [_copy({}), _copy({"force": true}), {}, _request("x", "y", {})] {
		d := mcp.decision with data.mcp_policy as _shipped with input as request
		every key in ["action", "rule", "reason", "rate_limits", "matched", "shadow", "tool"] {
			key in object.keys(d)
		}
		d.action in {"allow", "deny", "rate_limit", "require_approval"}
	}
}

test_shipped_shadow_empty_when_shipped_policy if {
	every request in [_copy({}), _copy({"force": true}), _copy({"force": "yes"}), {}, _request("x", "y", {})] {
		d := mcp.decision with data.mcp_policy as _shipped with input as request
		d.shadow == []
	}
}

test_shipped_limit_enforced_and_trial_limit_listed_when_user_package_adds_shadow_limit if {
	trial := {
		"rule": "extra.copies_per_user",
		"max": 50,
		"window_seconds": 3600,
		"scope": "user",
		"reason": "at most 50 copies per hour per user",
		"shadow": true,
	}

	# mcp.rules.extra stands for a package a user adds; it does not exist in this repository.
	# regal ignore:unresolved-reference
	d := mcp.decision with mcp.rules.extra.rate_limit as {trial}
		with data.mcp_policy as _shipped with input as _copy({})
	d == {
		"action": "rate_limit",
		"rule": "catalog.rule.copy_image_set",
		"reason": _shipped_reason,
		"rate_limits": _shipped_limits,
		"matched": ["catalog.rule.copy_image_set", "copy_image_set.agent_limit"],
		"shadow": [object.union(object.remove(trial, ["shadow"]), {"level": "rate_limit"})],
		"denies_tool": false,
		"tool": _copy_tool,
	}
}

test_shipped_denies_tool_only_for_denies_that_hold_whatever_the_arguments if {
	critical := {"tool": {"name": "drop", "server": "srv", "arguments": {}}, "principal": {"session_id": "s-1"}}
	policy := object.union(_shipped, {"catalog": {"srv": {"drop": {"category": "delete", "risk": "critical"}}}})
	d := mcp.decision with data.mcp_policy as policy with input as critical
	d.rule == "catalog.risk_default.critical"
	d.denies_tool == true
	bad := mcp.decision with data.mcp_policy as _shipped with input as _request(_hi, "copy_image_set", {})
	bad.action == "deny"
	bad.denies_tool == false
}
