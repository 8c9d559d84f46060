package mcp.rules.catalog_test

# shadow: true in a YAML rule marks every contribution made for that rule
# ("shadow": true); the denies reporting a problem are never shadow.

_shadow_rule(rule) := object.union(rule, {"shadow": true})

_on(c) := object.union(c, {"shadow": true})

_copy_id := "catalog.rule.copy_image_set"

# --- shadow: true --------------------------------------------------------------------

test_shadow_contributions_when_shadow_true_for_each_action if {
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
		out == case[1]
	}
}

test_shadow_generated_reason_when_shadow_rule_has_no_reason if {
	out := _out with data.mcp_policy as _with_rule({"action": "deny", "shadow": true}) with input as _copy
	out == _only("deny", _on({
		"rule": _copy_id,
		"reason": sprintf("%s is denied (policy rule for this tool)", [_subject]),
	}))
}

test_shadow_action_and_limit_when_allow_with_rate_limit_is_shadow if {
	rule := _shadow_rule({"action": "allow", "reason": "reads", "rate_limit": {"max": 5, "window": 10, "scope": "agent"}})
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out.allow == {_on({"rule": _copy_id, "reason": "reads"})}
	out.rate_limit == {_on(_limit(5, 10, "agent", "at most 5 calls per 10 seconds per agent"))}
	out.deny == set()
	out.require_approval == set()
}

test_shadow_action_and_limit_when_require_approval_with_rate_limit_is_shadow if {
	rule := {"action": "require_approval", "reason": "ask", "rate_limit": "2/minute", "shadow": true}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out.require_approval == {_on({"rule": _copy_id, "reason": "ask"})}
	out.rate_limit == {_on(_limit(2, 60, "session", "at most 2 calls per 60 seconds per session"))}
}

test_shadow_weighted_limit_carries_cost_when_shadow_true if {
	rule := _shadow_rule(_pay_rule)
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 40})
	out == _only("rate_limit", _on(_spend_limit(40)))
}

test_shadow_when_risk_default_or_default_is_shadow if {
	risk_policy := object.union(_policy({}), {"risk_defaults": {"low": {"action": "deny", "shadow": true}}})
	out := _out with data.mcp_policy as risk_policy with input as _call("read_thing")
	out == _only("deny", _on({
		"rule": "catalog.risk_default.low",
		"reason": `tool "read_thing" on server "srv" is denied (default for low-risk tools)`,
	}))

	default_rule := {"action": "rate_limit", "rate_limit": "100/hour", "shadow": true}
	default_policy := object.union(_policy({}), {"default": default_rule})
	out2 := _out with data.mcp_policy as default_policy with input as _call("unlisted")
	out2 == _only("rate_limit", _on({
		"rule": "catalog.default", "max": 100, "window_seconds": 3600, "scope": "session",
		"reason": "at most 100 calls per 3600 seconds per session",
	}))
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
			}
		}
	}
}

# --- invalid shadow ---------------------------------------------------------------------

test_invalid_rule_when_shadow_not_boolean if {
	cases := {
		"true": `"true"`,
		"yes": `"yes"`,
		1: "1",
		0: "0",
		null: "null",
		[true]: "[true]",
		{"on": true}: `{"on":true}`,
	}
	every value, shown in cases {
		rule := {"action": "allow", "shadow": value}
		problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
		problems == {sprintf("shadow must be true or false, got %s", [shown])}
	}
}

test_invalid_rule_reason_names_tool_when_shadow_invalid if {
	rule := {"action": "rate_limit", "rate_limit": "10/minute", "shadow": "yes"}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out == _only("deny", {
		"rule": "catalog.invalid_rule",
		"reason": concat("", [
			`invalid policy rule rules["copy_image_set"] for tool "copy_image_set" on server "srv": `,
			`shadow must be true or false, got "yes"`,
		]),
	})
}

test_invalid_rule_never_shadow_when_shadow_rule_invalid if {
	rule := {"action": "maybe", "shadow": true}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out == _only("deny", {
		"rule": "catalog.invalid_rule",
		"reason": concat("", [
			`invalid policy rule rules["copy_image_set"] for tool "copy_image_set" on server "srv": `,
			`unknown action "maybe"; use one of allow, deny, rate_limit, require_approval`,
		]),
	})
}

test_cost_invalid_never_shadow_when_shadow_weighted_limit if {
	rule := _shadow_rule({"action": "allow", "reason": "pay", "rate_limit": _spend_cap})
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": "40"})
	out.deny == {_cost_invalid}
	out.rate_limit == set()
	out.allow == {_on({"rule": "catalog.rule.pay", "reason": "pay"})}
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

# A valid copy_image_set call on "srv": the copy_image_set argument rules contribute nothing.
_valid_copy := {
	"tool": {"server": "srv", "name": "copy_image_set", "arguments": {
		"datastore_id": "0123456789abcdef0123456789abcdef",
		"source_image_set_id": "00112233445566778899aabbccddeeff",
	}},
	"principal": {"session_id": "s-1"},
}

test_decision_no_match_with_shadow_when_only_yaml_rule_is_shadow if {
	rule := _shadow_rule({"action": "rate_limit", "rate_limit": {"max": 5, "window": 60, "scope": "user"}})
	d := data.mcp.decision with data.mcp_policy as _with_rule(rule) with input as _valid_copy
	d == {
		"action": "deny",
		"rule": "default.no_match",
		"reason": "no policy rule matched this call",
		"rate_limits": [],
		"matched": [],
		"shadow": [{
			"level": "rate_limit",
			"rule": _copy_id,
			"reason": "at most 5 calls per 60 seconds per user",
			"max": 5,
			"window_seconds": 60,
			"scope": "user",
		}],
		"tool": {"known": true, "category": "write", "risk": "medium"},
	}
}

test_decision_enforced_and_shadow_when_yaml_rule_is_shadow_and_force_true if {
	rule := _shadow_rule({"action": "allow", "reason": "copies are fine"})
	call := json.patch(_valid_copy, [{"op": "add", "path": "/tool/arguments/force", "value": true}])
	d := data.mcp.decision with data.mcp_policy as _with_rule(rule) with input as call
	d.action == "require_approval"
	d.rule == "copy_image_set.force_overwrite"
	d.matched == ["copy_image_set.force_overwrite"]
	d.shadow == [{"level": "allow", "rule": _copy_id, "reason": "copies are fine"}]
}

test_decision_shadow_carries_cost_when_weighted_shadow_limit if {
	rule := _shadow_rule({"action": "allow", "reason": "pay", "rate_limit": _spend_cap})
	d := data.mcp.decision with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 12.5})
	d.action == "deny"
	d.rule == "default.no_match"
	d.matched == []
	d.shadow == [
		object.union(object.remove(_spend_limit(12.5), ["reason"]), {
			"level": "rate_limit",
			"reason": `at most a total "amount" of 1000 per 3600 seconds per user`,
		}),
		{"level": "allow", "rule": "catalog.rule.pay", "reason": "pay"},
	]
}

test_decision_no_approval_when_yaml_approval_is_shadow if {
	risk_policy := object.union(_policy({}), {"risk_defaults": {"medium": {"action": "require_approval", "shadow": true}}})
	yes := {"rule": "extra.allow", "reason": "yes"}
	call := _call("write_thing")

	# mcp.rules.extra stands for a package a user adds; it does not exist in this repository.
	# regal ignore:unresolved-reference
	d := data.mcp.decision with data.mcp_policy as risk_policy with input as call with data.mcp.rules.extra.allow as {yes}
	d.action == "allow"
	d.rule == "extra.allow"
	not d.approval
	d.matched == ["extra.allow"]
	d.shadow == [{
		"level": "require_approval",
		"rule": "catalog.risk_default.medium",
		"reason": `tool "write_thing" on server "srv" requires human approval (default for medium-risk tools)`,
	}]
}
