package mcp.rules.catalog_test

import data.mcp.rules.catalog
import data.mcp.shipped_test

# shadow: true in a YAML rule: the rule is tried, not enforced. The chain
# rules[<tool>] -> risk_defaults[<risk>] (catalogued tool) or default (any other
# tool) is walked: every shadow rule met before the first rule that is not
# shadow contributes with "shadow": true, and that first non-shadow rule is
# enforced. An all-shadow chain is a catalog.missing_rule deny. The denies
# reporting a problem are never shadow.

_shadow_rule(rule) := object.union(rule, {"shadow": true})

_on(c) := object.union(c, {"shadow": true})

_copy_id := "catalog.rule.copy_image_set"

_hi := "awslabs.healthimaging-mcp-server"

_unlisted_shadow_default := concat("", [
	`tool "unlisted" on server "srv" is not in the policy catalog, `,
	"and the default rule is shadow (not enforced)",
])

# What _risk_defaults.medium (require_approval) contributes for a tool of "srv".
_medium_default(name) := {
	"rule": "catalog.risk_default.medium",
	"reason": sprintf(`tool %q on server "srv" requires human approval (default for medium-risk tools)`, [name]),
}

# _only(level, contribution) plus the enforced medium risk default of copy_image_set.
_and_medium(out) := object.union(out, {"require_approval": approvals}) if {
	approvals := out.require_approval | {_medium_default("copy_image_set")}
}

# --- shadow tool rule: contributed as shadow, the risk default is enforced ----------

test_shadow_and_risk_default_when_tool_rule_shadow_for_each_action if {
	cases := [
		[{"action": "allow", "reason": "fine"}, _only("allow", _on({"rule": _copy_id, "reason": "fine"}))],
		[{"action": "deny", "reason": "no"}, _only("deny", _on({"rule": _copy_id, "reason": "no"}))],
		[
			{"action": "require_approval", "reason": "ask", "approval": {"ttl": 300}},
			_only("require_approval", _on({"rule": _copy_id, "reason": "ask", "ttl_seconds": 300})),
		],
		[
			{"action": "rate_limit", "rate_limit": {"max": 5, "window": 60, "scope": "user"}},
			_only("rate_limit", _on(_limit(5, 60, "user", "at most 5 calls per 60 seconds per user"))),
		],
		[
			{"action": "rate_limit", "rate_limit": "3/hour"},
			_only("rate_limit", _on(_limit(3, 3600, "session", "at most 3 calls per 3600 seconds per session"))),
		],
	]
	every case in cases {
		out := _out with data.mcp_policy as _with_rule(_shadow_rule(case[0])) with input as _copy
		out == _and_medium(case[1])
	}
}

test_shadow_generated_reason_when_shadow_rule_has_no_reason if {
	out := _out with data.mcp_policy as _with_rule({"action": "deny", "shadow": true}) with input as _copy
	out == _and_medium(_only("deny", _on({
		"rule": _copy_id,
		"reason": sprintf("%s is denied (policy rule for this tool)", [_subject]),
	})))
}

test_shadow_action_and_limit_when_allow_with_rate_limit_is_shadow if {
	rule := _shadow_rule({"action": "allow", "reason": "reads", "rate_limit": {"max": 5, "window": 10, "scope": "agent"}})
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out.allow == {_on({"rule": _copy_id, "reason": "reads"})}
	out.rate_limit == {_on(_limit(5, 10, "agent", "at most 5 calls per 10 seconds per agent"))}
	out.deny == set()
	out.require_approval == {_medium_default("copy_image_set")}
}

test_shadow_action_and_limit_when_require_approval_with_rate_limit_is_shadow if {
	rule := {"action": "require_approval", "reason": "ask", "rate_limit": "2/minute", "shadow": true}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out.require_approval == {_on({"rule": _copy_id, "reason": "ask"}), _medium_default("copy_image_set")}
	out.rate_limit == {_on(_limit(2, 60, "session", "at most 2 calls per 60 seconds per session"))}
}

test_shadow_weighted_limit_carries_cost_when_shadow_true if {
	rule := _shadow_rule(_pay_rule)
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 40})
	out == object.union(_only("rate_limit", _on(_spend_limit(40))), {"require_approval": {_medium_default("pay")}})
}

test_chain_and_applied_when_tool_rule_shadow if {
	rule := _shadow_rule({"action": "allow"})
	chain := catalog.chain with data.mcp_policy as _with_rule(rule) with input as _copy
	chain == [
		{
			"id": _copy_id, "where": `rules["copy_image_set"]`,
			"origin": "policy rule for this tool", "rule": rule, "shadow": true,
		},
		{
			"id": "catalog.risk_default.medium", "where": `risk_defaults["medium"]`,
			"origin": "default for medium-risk tools", "rule": {"action": "require_approval"}, "shadow": false,
		},
	]
	applied := catalog.applied with data.mcp_policy as _with_rule(rule) with input as _copy
	applied == chain[1]
}

test_risk_default_enforced_when_tool_rule_shadow_and_risk_default_is_bare_name if {
	policy := _policy({"read_thing": {"action": "deny", "shadow": true}})
	out := _out with data.mcp_policy as policy with input as _call("read_thing")
	out.deny == {_on({
		"rule": "catalog.rule.read_thing",
		"reason": `tool "read_thing" on server "srv" is denied (policy rule for this tool)`,
	})}
	out.allow == {{
		"rule": "catalog.risk_default.low",
		"reason": `tool "read_thing" on server "srv" is allowed (default for low-risk tools)`,
	}}
}

# --- shadow risk default or default: nothing enforced, catalog.missing_rule ------------

test_missing_rule_and_shadow_when_risk_default_shadow_and_no_tool_rule if {
	risk_policy := object.union(_policy({}), {"risk_defaults": {"low": {"action": "deny", "shadow": true}}})
	out := _out with data.mcp_policy as risk_policy with input as _call("read_thing")
	out == object.union(_none, {"deny": {
		_on({
			"rule": "catalog.risk_default.low",
			"reason": `tool "read_thing" on server "srv" is denied (default for low-risk tools)`,
		}),
		{
			"rule": "catalog.missing_rule",
			"reason": `tool "read_thing" on server "srv" has no enforced policy rule, only shadow ones: risk_defaults["low"]`,
		},
	}})
	not catalog.applied with data.mcp_policy as risk_policy with input as _call("read_thing")
}

test_missing_rule_and_shadow_when_tool_rule_and_risk_default_shadow if {
	medium := {"action": "rate_limit", "rate_limit": "5/minute", "shadow": true}
	policy := object.union(_with_rule(_shadow_rule({"action": "allow"})), {"risk_defaults": {"medium": medium}})
	out := _out with data.mcp_policy as policy with input as _copy
	out == {
		"deny": {{
			"rule": "catalog.missing_rule",
			"reason": concat("", [
				`tool "copy_image_set" on server "srv" has no enforced policy rule, only shadow ones: `,
				`rules["copy_image_set"], risk_defaults["medium"]`,
			]),
		}},
		"require_approval": set(),
		"rate_limit": {_on({
			"rule": "catalog.risk_default.medium", "max": 5, "window_seconds": 60, "scope": "session",
			"reason": "at most 5 calls per 60 seconds per session",
		})},
		"allow": {_on({"rule": _copy_id, "reason": sprintf("%s is allowed (policy rule for this tool)", [_subject])})},
	}
}

test_missing_rule_and_shadow_when_tool_rule_shadow_and_risk_has_no_default if {
	policy := _policy({"odd_thing": _shadow_rule({"action": "allow", "reason": "odd is fine"})})
	out := _out with data.mcp_policy as policy with input as _call("odd_thing")
	out == object.union(_only("allow", _on({"rule": "catalog.rule.odd_thing", "reason": "odd is fine"})), {"deny": {{
		"rule": "catalog.missing_rule",
		"reason": concat("", [
			`tool "odd_thing" on server "srv" has no enforced policy rule, only shadow ones: rules["odd_thing"]; `,
			`risk_defaults has no rule for risk "extreme"`,
		]),
	}}})
}

test_missing_rule_and_shadow_when_default_shadow_and_tool_unknown if {
	default_rule := {"action": "rate_limit", "rate_limit": "100/hour", "shadow": true}
	default_policy := object.union(_policy({}), {"default": default_rule})
	out := _out with data.mcp_policy as default_policy with input as _call("unlisted")
	out == {
		"deny": {{
			"rule": "catalog.missing_rule",
			"reason": _unlisted_shadow_default,
		}},
		"require_approval": set(),
		"rate_limit": {_on({
			"rule": "catalog.default", "max": 100, "window_seconds": 3600, "scope": "session",
			"reason": "at most 100 calls per 3600 seconds per session",
		})},
		"allow": set(),
	}
}

# --- shadow: false or absent ----------------------------------------------------------

test_enforced_when_shadow_false if {
	every rule in [
		{"action": "allow", "reason": "fine", "rate_limit": "1/second"},
		{"action": "deny"},
		{"action": "require_approval", "approval": {"ttl": 60}},
		{"action": "rate_limit", "rate_limit": {"max": 10, "window": 60}},
	] {
		out := _out with data.mcp_policy as _with_rule(object.union(rule, {"shadow": false})) with input as _copy
		out == _out with data.mcp_policy as _with_rule(rule) with input as _copy
		every contributions in out {
			every c in contributions {
				not "shadow" in object.keys(c)
				c.rule == _copy_id
			}
		}
	}
}

test_risk_default_not_contributing_when_tool_rule_enforced_and_risk_default_shadow if {
	policy := object.union(_with_rule("allow"), {"risk_defaults": {"medium": {"action": "deny", "shadow": true}}})
	out := _out with data.mcp_policy as policy with input as _copy
	out == _only("allow", {"rule": _copy_id, "reason": sprintf("%s is allowed (policy rule for this tool)", [_subject])})
	chain := catalog.chain with data.mcp_policy as policy with input as _copy
	[c.id | some c in chain] == [_copy_id]
}

# --- invalid shadow ---------------------------------------------------------------------

# A shadow that is not true (the schema rejects anything but true or false at
# load) is not shadow: the rule is enforced, the risk default behind it does not
# contribute.
test_enforced_when_shadow_not_true if {
	every value in ["true", "yes", 1, null, [true], {"on": true}, false] {
		rule := {"action": "rate_limit", "rate_limit": "10/minute", "shadow": value}
		out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
		out == _only("rate_limit", _limit(10, 60, "session", "at most 10 calls per 60 seconds per session"))
	}
}

test_invalid_rule_enforced_and_risk_default_when_shadow_rule_invalid if {
	rule := {"action": "maybe", "shadow": true}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out == _and_medium(_only("deny", {
		"rule": "catalog.invalid_rule",
		"reason": concat("", [
			`invalid policy rule rules["copy_image_set"] for tool "copy_image_set" on server "srv": `,
			`unknown action "maybe"; use one of allow, deny, rate_limit, require_approval`,
		]),
	}))
}

test_invalid_rule_enforced_when_risk_default_behind_shadow_rule_invalid if {
	policy := object.union(_with_rule(_shadow_rule({"action": "allow"})), {"risk_defaults": {"medium": {"action": "ask"}}})
	out := _out with data.mcp_policy as policy with input as _copy
	out == {
		"deny": {{
			"rule": "catalog.invalid_rule",
			"reason": concat("", [
				`invalid policy rule risk_defaults["medium"] for tool "copy_image_set" on server "srv": `,
				`unknown action "ask"; use one of allow, deny, rate_limit, require_approval`,
			]),
		}},
		"require_approval": set(),
		"rate_limit": set(),
		"allow": {_on({"rule": _copy_id, "reason": sprintf("%s is allowed (policy rule for this tool)", [_subject])})},
	}
}

test_invalid_rule_for_each_when_shadow_rule_and_risk_default_invalid if {
	rule := {"action": "permit", "shadow": true}
	policy := object.union(_with_rule(rule), {"risk_defaults": {"medium": 5}})
	out := _out with data.mcp_policy as policy with input as _copy
	out == object.union(_none, {"deny": {
		{
			"rule": "catalog.invalid_rule",
			"reason": concat("", [
				`invalid policy rule rules["copy_image_set"] for tool "copy_image_set" on server "srv": `,
				`unknown action "permit"; use one of allow, deny, rate_limit, require_approval`,
			]),
		},
		{
			"rule": "catalog.invalid_rule",
			"reason": concat("", [
				`invalid policy rule risk_defaults["medium"] for tool "copy_image_set" on server "srv": `,
				"must be an action name or a map with an action",
			]),
		},
	}})
}

test_cost_invalid_never_shadow_when_shadow_weighted_limit if {
	rule := _shadow_rule({"action": "allow", "reason": "pay", "rate_limit": _spend_cap})
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": "40"})
	out.deny == {_cost_invalid}
	out.rate_limit == set()
	out.allow == {_on({"rule": "catalog.rule.pay", "reason": "pay"})}
	out.require_approval == {_medium_default("pay")}
}

test_missing_rule_never_shadow_when_risk_has_no_default if {
	policy := object.union(_policy({"copy_image_set": {"action": "allow", "shadow": true}}), {"risk_defaults": {}})
	out := _out with data.mcp_policy as policy with input as _call("odd_thing")
	out == _only("deny", {
		"rule": "catalog.missing_rule",
		"reason": concat("", [
			`tool "odd_thing" on server "srv" has risk "extreme" in the policy catalog, `,
			"but risk_defaults has no rule for it",
		]),
	})
}

# --- end to end through the decision ----------------------------------------------------

# A valid copy_image_set call on "srv": the copy_image_set argument rules contribute nothing
# but their per-agent limit (_agent_limit: the call names no agent).
_valid_copy := {
	"tool": {"server": "srv", "name": "copy_image_set", "arguments": {
		"datastore_id": "0123456789abcdef0123456789abcdef",
		"source_image_set_id": "00112233445566778899aabbccddeeff",
		"copy_image_set_information": {"sourceImageSet": {"latestVersionId": "1"}},
	}},
	"principal": {"session_id": "s-1"},
}

_agent_limit := {
	"rule": "copy_image_set.agent_limit",
	"max": 20,
	"window_seconds": 60,
	"scope": "global",
	"reason": "at most 20 copies per 60 seconds shared by all calls that name no agent",
}

_copy_tool := {"known": true, "category": "write", "risk": "medium"}

# The example of policies/rules.yaml, on the shipped policy data: marking the
# rule of copy_image_set shadow hands the call to risk_defaults.medium
# (require_approval) and lists the trial limit.
test_decision_shipped_risk_default_and_shadow_limit_when_copy_rule_shadow if {
	rule := {"action": "rate_limit", "rate_limit": {"max": 50, "window": 60}, "shadow": true}
	call := json.patch(_valid_copy, [{"op": "replace", "path": "/tool/server", "value": _hi}])
	policy := object.union(shipped_test.policy, {"rules": {"copy_image_set": rule}})
	d := data.mcp.decision with data.mcp_policy as policy with input as call
	d == {
		"action": "require_approval",
		"rule": "catalog.risk_default.medium",
		"reason": concat("", [
			`tool "copy_image_set" on server "awslabs.healthimaging-mcp-server" requires human approval `,
			"(default for medium-risk tools)",
		]),
		"rate_limits": [_agent_limit],
		"approval": {
			"rule": "catalog.risk_default.medium",
			"reason": concat("", [
				`tool "copy_image_set" on server "awslabs.healthimaging-mcp-server" requires human approval `,
				"(default for medium-risk tools)",
			]),
		},
		"matched": ["catalog.risk_default.medium", "copy_image_set.agent_limit"],
		"shadow": [{
			"level": "rate_limit",
			"rule": _copy_id,
			"reason": "at most 50 calls per 60 seconds per session",
			"max": 50,
			"window_seconds": 60,
			"scope": "session",
		}],
		"denies_tool": false,
		"tool": _copy_tool,
	}
}

test_decision_risk_default_with_shadow_when_only_tool_rule_is_shadow if {
	rule := _shadow_rule({"action": "rate_limit", "rate_limit": {"max": 5, "window": 60, "scope": "user"}})
	d := data.mcp.decision with data.mcp_policy as _with_rule(rule) with input as _valid_copy
	d.action == "require_approval"
	d.rule == "catalog.risk_default.medium"
	d.matched == ["catalog.risk_default.medium", "copy_image_set.agent_limit"]
	d.shadow == [{
		"level": "rate_limit",
		"rule": _copy_id,
		"reason": "at most 5 calls per 60 seconds per user",
		"max": 5,
		"window_seconds": 60,
		"scope": "user",
	}]
}

test_decision_missing_rule_with_shadow_when_risk_default_shadow_and_no_tool_rule if {
	risk_policy := object.union(_policy({}), {"risk_defaults": {"medium": {"action": "allow", "shadow": true}}})
	d := data.mcp.decision with data.mcp_policy as risk_policy with input as _call("write_thing")
	d == {
		"action": "deny",
		"rule": "catalog.missing_rule",
		"reason": `tool "write_thing" on server "srv" has no enforced policy rule, only shadow ones: risk_defaults["medium"]`,
		"rate_limits": [],
		"matched": ["catalog.missing_rule"],
		"shadow": [{
			"level": "allow",
			"rule": "catalog.risk_default.medium",
			"reason": `tool "write_thing" on server "srv" is allowed (default for medium-risk tools)`,
		}],
		"denies_tool": true,
		"tool": {"known": true, "category": "write", "risk": "medium"},
	}
}

test_decision_missing_rule_with_shadow_when_default_shadow_and_tool_unknown if {
	default_policy := object.union(_policy({}), {"default": {"action": "allow", "shadow": true}})
	d := data.mcp.decision with data.mcp_policy as default_policy with input as _call("unlisted")
	d == {
		"action": "deny",
		"rule": "catalog.missing_rule",
		"reason": _unlisted_shadow_default,
		"rate_limits": [],
		"matched": ["catalog.missing_rule"],
		"shadow": [{
			"level": "allow",
			"rule": "catalog.default",
			"reason": `tool "unlisted" on server "srv" is allowed (not in the policy catalog)`,
		}],
		"denies_tool": true,
		"tool": {"known": false},
	}
}

test_decision_unchanged_when_tool_rule_not_shadow if {
	rule := {"action": "rate_limit", "rate_limit": {"max": 5, "window": 60, "scope": "user"}}
	enforced := object.union(rule, {"shadow": false})
	d := data.mcp.decision with data.mcp_policy as _with_rule(enforced) with input as _valid_copy
	d == data.mcp.decision with data.mcp_policy as _with_rule(rule) with input as _valid_copy
	d.action == "rate_limit"
	d.rule == _copy_id
	d.shadow == []
}

test_decision_invalid_rule_deny_when_shadow_rule_invalid if {
	rule := _shadow_rule({"action": "allow", "rate_limit": "10 per minute"})
	d := data.mcp.decision with data.mcp_policy as _with_rule(rule) with input as _valid_copy
	d.action == "deny"
	d.rule == "catalog.invalid_rule"
	d.matched == ["catalog.invalid_rule", "catalog.risk_default.medium", "copy_image_set.agent_limit"]
	d.shadow == []
}

test_decision_enforced_and_shadow_when_yaml_rule_is_shadow_and_force_true if {
	rule := _shadow_rule({"action": "allow", "reason": "copies are fine"})
	call := json.patch(_valid_copy, [{"op": "add", "path": "/tool/arguments/force", "value": true}])
	d := data.mcp.decision with data.mcp_policy as _with_rule(rule) with input as call
	d.action == "require_approval"
	d.rule == "catalog.risk_default.medium"
	d.matched == ["catalog.risk_default.medium", "copy_image_set.agent_limit", "copy_image_set.force_overwrite"]
	d.shadow == [{"level": "allow", "rule": _copy_id, "reason": "copies are fine"}]
}

test_decision_shadow_carries_cost_when_weighted_shadow_limit if {
	rule := _shadow_rule({"action": "allow", "reason": "pay", "rate_limit": _spend_cap})
	d := data.mcp.decision with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 12.5})
	d.action == "require_approval"
	d.rule == "catalog.risk_default.medium"
	d.matched == ["catalog.risk_default.medium"]
	d.shadow == [
		object.union(object.remove(_spend_limit(12.5), ["reason"]), {
			"level": "rate_limit",
			"reason": `at most a total "amount" of 1000 per 3600 seconds per user`,
		}),
		{"level": "allow", "rule": "catalog.rule.pay", "reason": "pay"},
	]
}

test_decision_cost_invalid_deny_when_weighted_shadow_limit_argument_invalid if {
	rule := _shadow_rule({"action": "rate_limit", "rate_limit": _spend_cap})
	every amount in ["12.5", -1, null] {
		d := data.mcp.decision with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": amount})
		d.action == "deny"
		d.rule == "catalog.rate_limit_cost_invalid"
		d.reason == _cost_invalid.reason
		d.matched == ["catalog.rate_limit_cost_invalid", "catalog.risk_default.medium"]
		d.shadow == []
	}
}

# Every rule of the chain is shadow: catalog.missing_rule denies, whatever another
# package allows.
test_decision_missing_rule_beats_other_allow_when_yaml_approval_is_shadow if {
	risk_policy := object.union(_policy({}), {"risk_defaults": {"medium": {"action": "require_approval", "shadow": true}}})
	yes := {"rule": "extra.allow", "reason": "yes"}
	call := _call("write_thing")

	# mcp.rules.extra stands for a package a user adds; it does not exist in this repository.
	# regal ignore:unresolved-reference
	d := data.mcp.decision with data.mcp_policy as risk_policy with input as call with data.mcp.rules.extra.allow as {yes}
	d.action == "deny"
	d.rule == "catalog.missing_rule"
	not d.approval
	d.matched == ["catalog.missing_rule", "extra.allow"]
	d.shadow == [{
		"level": "require_approval",
		"rule": "catalog.risk_default.medium",
		"reason": `tool "write_thing" on server "srv" requires human approval (default for medium-risk tools)`,
	}]
}
