package mcp.rules.catalog_test

import data.mcp.rules.catalog

# Invalid YAML rules: each mistake is reported (catalog.errors) and turns the
# call into a catalog.invalid_rule deny; the rule's own action never applies.

# The problems found in the rule under test, defined only when each of them is
# a catalog.invalid_rule deny and nothing else is contributed.
_reported := catalog.errors if {
	_out.require_approval == set()
	_out.rate_limit == set()
	_out.allow == set()
	{d.rule | some d in _out.deny} == {"catalog.invalid_rule"}
	count(_out.deny) == count(catalog.errors)
}

_rl(rate_limit) := {"action": "rate_limit", "rate_limit": rate_limit}

test_invalid_rule_reason_names_tool_and_problem if {
	out := _out with data.mcp_policy as _with_rule({"action": "maybe"}) with input as _copy
	out == _only("deny", {
		"rule": "catalog.invalid_rule",
		"reason": concat("", [
			`invalid policy rule rules["copy_image_set"] for tool "copy_image_set" on server "srv": `,
			`unknown action "maybe"; use one of allow, deny, rate_limit, require_approval`,
		]),
	})
}

test_invalid_rule_one_deny_per_problem_when_several if {
	out := _out with data.mcp_policy as _with_rule({"reason": 7, "colour": "red"}) with input as _copy
	count(out.deny) == 3
	catalog.errors == {
		"has no action",
		"reason must be a string, got 7",
		"unknown key(s) colour; allowed: action, reason, rate_limit, approval, shadow",
	} with data.mcp_policy as _with_rule({"reason": 7, "colour": "red"})
		with input as _copy
}

test_invalid_rule_when_not_object_or_action_name if {
	every rule in [5, null, true, ["allow"]] {
		problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
		problems == {"must be an object with an action, or just an action name"}
	}
}

test_invalid_rule_when_bare_name_is_not_an_action if {
	problems := _reported with data.mcp_policy as _with_rule("block") with input as _copy
	problems == {`unknown action "block"; use one of allow, deny, rate_limit, require_approval`}
}

test_invalid_rule_when_action_missing if {
	problems := _reported with data.mcp_policy as _with_rule({"reason": "x"}) with input as _copy
	problems == {"has no action"}
}

test_invalid_rule_when_action_unknown_or_ill_typed if {
	cases := {"Allow": `"Allow"`, "permit": `"permit"`, "": `""`, 1: "1", ["allow"]: `["allow"]`}
	every action, shown in cases {
		problems := _reported with data.mcp_policy as _with_rule({"action": action}) with input as _copy
		problems == {sprintf("unknown action %s; use one of allow, deny, rate_limit, require_approval", [shown])}
	}
}

test_invalid_rule_when_unknown_key if {
	rule := {"action": "allow", "rate_limits": "1/second"}
	problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
	problems == {"unknown key(s) rate_limits; allowed: action, reason, rate_limit, approval, shadow"}
}

test_invalid_rule_when_reason_not_string if {
	rule := {"action": "deny", "reason": ["a"]}
	problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
	problems == {`reason must be a string, got ["a"]`}
}

test_invalid_rule_when_rate_limit_action_has_no_rate_limit if {
	rule := {"action": "rate_limit"}
	problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
	problems == {"action rate_limit needs a rate_limit, e.g. {max: 10, window: 60}"}
}

test_invalid_rule_when_deny_has_rate_limit if {
	rule := {"action": "deny", "rate_limit": "1/minute"}
	problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
	problems == {"rate_limit cannot be combined with action deny"}
}

test_invalid_rule_when_approval_without_require_approval if {
	rule := {"action": "allow", "approval": {"ttl": 60}}
	problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
	problems == {"approval is only valid with action require_approval"}
}

test_invalid_rule_when_rate_limit_wrong_type if {
	cases := {10: "10", true: "true", null: "null", ["10/minute"]: `["10/minute"]`}
	every value, shown in cases {
		problems := _reported with data.mcp_policy as _with_rule(_rl(value)) with input as _copy
		problems == {sprintf(
			"rate_limit must be an object {max, window, scope} or a string like \"10/minute\", got %s",
			[shown],
		)}
	}
}

test_invalid_rule_when_rate_limit_string_malformed if {
	every text in ["10 per minute", "10/fortnight", "10/Minute", "/minute", "-1/minute", "1.5/minute", "10/60", ""] {
		problems := _reported with data.mcp_policy as _with_rule(_rl(text)) with input as _copy
		problems == {sprintf(
			"rate_limit %q is malformed; write <max>/<unit> with unit second, minute, hour or day, e.g. \"10/minute\"",
			[text],
		)}
	}
}

test_invalid_rule_when_rate_limit_string_max_zero if {
	problems := _reported with data.mcp_policy as _with_rule(_rl("0/minute")) with input as _copy
	problems == {"rate_limit max must be an integer >= 1, got 0"}
}

test_invalid_rule_when_rate_limit_unknown_key if {
	rule := _rl({"max": 1, "window": 1, "scpoe": "agent"})
	problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
	problems == {"rate_limit has unknown key(s) scpoe; allowed: max, window, scope, increment_from"}
}

test_invalid_rule_when_max_invalid if {
	cases := {
		0: "0",
		-3: "-3",
		1.5: "1.5",
		"10": `"10"`,
		null: "null",
	}
	every value, shown in cases {
		rule := _rl({"max": value, "window": 60})
		problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
		problems == {sprintf("rate_limit max must be an integer >= 1, got %s", [shown])}
	}
}

test_invalid_rule_when_max_missing if {
	rule := _rl({"window": 60})
	problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
	problems == {"rate_limit max must be an integer >= 1, got null"}
}

test_invalid_rule_when_window_invalid if {
	cases := {0: "0", -60: "-60", "60": `"60"`, "1m": `"1m"`, false: "false"}
	every value, shown in cases {
		rule := _rl({"max": 1, "window": value})
		problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
		problems == {sprintf("rate_limit window must be a number of seconds > 0, got %s", [shown])}
	}
}

test_invalid_rule_when_window_missing if {
	problems := _reported with data.mcp_policy as _with_rule(_rl({"max": 1})) with input as _copy
	problems == {"rate_limit window must be a number of seconds > 0, got null"}
}

test_invalid_rule_when_scope_unknown if {
	cases := {"Session": `"Session"`, "tenant": `"tenant"`, "": `""`, 1: "1", null: "null"}
	every value, shown in cases {
		rule := _rl({"max": 1, "window": 1, "scope": value})
		problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
		problems == {sprintf("rate_limit scope must be one of session, agent, user, global, got %s", [shown])}
	}
}

test_invalid_rule_when_approval_not_object if {
	rule := {"action": "require_approval", "approval": 900}
	problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
	problems == {"approval must be an object like {ttl: 900}, got 900"}
}

test_invalid_rule_when_approval_unknown_key if {
	rule := {"action": "require_approval", "approval": {"ttl_seconds": 900}}
	problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
	problems == {"approval has unknown key(s) ttl_seconds; allowed: ttl"}
}

test_invalid_rule_when_approval_ttl_invalid if {
	cases := {0: "0", -1: "-1", "900": `"900"`, null: "null"}
	every value, shown in cases {
		rule := {"action": "require_approval", "approval": {"ttl": value}}
		problems := _reported with data.mcp_policy as _with_rule(rule) with input as _copy
		problems == {sprintf("approval ttl must be a number of seconds > 0, got %s", [shown])}
	}
}

test_invalid_rule_names_where_when_risk_default_invalid if {
	policy := object.union(_policy({}), {"risk_defaults": {"medium": {"action": "allow", "rate_limit": "ten/minute"}}})
	out := _out with data.mcp_policy as policy with input as _call("write_thing")
	out == _only("deny", {
		"rule": "catalog.invalid_rule",
		"reason": concat("", [
			`invalid policy rule risk_defaults["medium"] for tool "write_thing" on server "srv": `,
			`rate_limit "ten/minute" is malformed; write <max>/<unit> with unit second, minute, hour or day, `,
			`e.g. "10/minute"`,
		]),
	})
}

test_invalid_rule_names_where_when_default_invalid if {
	policy := object.union(_policy({}), {"default": {"action": "rate_limit"}})
	out := _out with data.mcp_policy as policy with input as _call("unlisted")
	out == _only("deny", {
		"rule": "catalog.invalid_rule",
		"reason": concat("", [
			`invalid policy rule default for tool "unlisted" on server "srv": `,
			"action rate_limit needs a rate_limit, e.g. {max: 10, window: 60}",
		]),
	})
}

test_invalid_data_when_sections_have_wrong_type if {
	policy := {"catalog": {"a": 1}, "rules": [], "risk_defaults": "none", "default": "deny"}
	out := _out with data.mcp_policy as policy with input as _call("copy_image_set")
	out.deny == {
		{"rule": "catalog.default", "reason": `tool "copy_image_set" on server "srv" is denied (not in the policy catalog)`},
		{"rule": "catalog.invalid_data", "reason": "policy data mcp_policy.catalog must be a list, got object"},
		{"rule": "catalog.invalid_data", "reason": "policy data mcp_policy.rules must be a map, got array"},
		{"rule": "catalog.invalid_data", "reason": "policy data mcp_policy.risk_defaults must be a map, got string"},
	}
}

test_no_invalid_data_when_shipped_files if {
	out := _out with input as _copy
	every d in out.deny {
		d.rule != "catalog.invalid_data"
	}
}

test_missing_rule_when_rules_and_risk_defaults_wrong_type if {
	policy := {"catalog": _catalog, "rules": "copy_image_set: allow", "risk_defaults": ["allow"]}
	out := _out with data.mcp_policy as policy with input as _copy
	out.deny == {
		{
			"rule": "catalog.missing_rule",
			"reason": concat("", [
				`tool "copy_image_set" on server "srv" has risk "medium" in the policy catalog, `,
				"but risk_defaults has no rule for it",
			]),
		},
		{"rule": "catalog.invalid_data", "reason": "policy data mcp_policy.rules must be a map, got string"},
		{"rule": "catalog.invalid_data", "reason": "policy data mcp_policy.risk_defaults must be a map, got array"},
	}
}
