package mcp.rules.catalog_test

import data.mcp.rules.catalog
import data.mcp.shipped_test

# Policy data this package cannot use. The schema and load_errors reject it
# when it is loaded; a policy that skipped those checks (an `opa eval` of
# hand-made data) still never allows through such a rule: each rule of the
# chain it cannot read is a catalog.invalid_rule deny and contributes nothing
# else.

# The problems of the rule under test, defined only when each unusable rule
# is a catalog.invalid_rule deny and nothing else is contributed.
_reported := {p |
	some id in catalog.unusable
	some p in catalog._rule_problems(catalog._entry[id].rule)
} if {
	_out.require_approval == set()
	_out.rate_limit == set()
	_out.allow == set()
	{d.rule | some d in _out.deny} == {"catalog.invalid_rule"}
	count(_out.deny) == count(catalog.unusable)
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

test_invalid_rule_problems_joined_when_several if {
	out := _out with data.mcp_policy as _with_rule({"action": "maybe", "rate_limit": "often"}) with input as _copy
	[d.reason | some d in out.deny] == [concat("", [
		`invalid policy rule rules["copy_image_set"] for tool "copy_image_set" on server "srv": `,
		`rate_limit "often" cannot be read; write {max, window, scope} or <max>/<unit>, e.g. "10/minute"; `,
		`unknown action "maybe"; use one of allow, deny, rate_limit, require_approval`,
	])]
}

test_invalid_rule_when_not_object_or_action_name if {
	every value in [7, null, true, ["allow"]] {
		problems := _reported with data.mcp_policy as _with_rule(value) with input as _copy
		problems == {"must be an action name or a map with an action"}
	}
}

test_invalid_rule_when_action_missing_unknown_or_ill_typed if {
	cases := {
		"maybe": `"maybe"`,
		"Allow": `"Allow"`,
	}
	every value, shown in cases {
		problems := _reported with data.mcp_policy as _with_rule(value) with input as _copy
		problems == {sprintf("unknown action %s; use one of allow, deny, rate_limit, require_approval", [shown])}
	}
	every rule in [{"reason": "x"}, {"action": 5}, {"action": ["allow"]}] {
		count(_reported) == 1 with data.mcp_policy as _with_rule(rule) with input as _copy
	}
}

test_invalid_rule_when_rate_limit_action_has_no_rate_limit if {
	problems := _reported with data.mcp_policy as _with_rule({"action": "rate_limit"}) with input as _copy
	problems == {"action rate_limit needs a rate_limit, e.g. {max: 10, window: 60}"}
}

test_invalid_rule_when_rate_limit_unreadable if {
	every value in ["10 per minute", "ten/minute", "10/week", 10, ["10/minute"], null] {
		problems := _reported with data.mcp_policy as _with_rule(_rl(value)) with input as _copy
		problems == {sprintf(
			"rate_limit %s cannot be read; write {max, window, scope} or <max>/<unit>, e.g. \"10/minute\"",
			[json.marshal(value)],
		)}
	}
}

test_invalid_rule_when_rate_limit_string_max_zero if {
	problems := _reported with data.mcp_policy as _with_rule(_rl("0/minute")) with input as _copy
	problems == {"rate_limit max must be an integer >= 1, got 0"}
}

test_invalid_rule_names_where_when_risk_default_invalid if {
	policy := object.union(_policy({}), {"risk_defaults": {"medium": {"action": "ask"}}})
	out := _out with data.mcp_policy as policy with input as _call("write_thing")
	out == _only("deny", {
		"rule": "catalog.invalid_rule",
		"reason": concat("", [
			`invalid policy rule risk_defaults["medium"] for tool "write_thing" on server "srv": `,
			`unknown action "ask"; use one of allow, deny, rate_limit, require_approval`,
		]),
	})
}

test_invalid_rule_names_where_when_default_invalid if {
	policy := object.union(_policy({}), {"default": {"action": "block"}})
	out := _out with data.mcp_policy as policy with input as _call("unlisted")
	out == _only("deny", {
		"rule": "catalog.invalid_rule",
		"reason": concat("", [
			`invalid policy rule default for tool "unlisted" on server "srv": `,
			`unknown action "block"; use one of allow, deny, rate_limit, require_approval`,
		]),
	})
}

# A limit with a bad max or scope cannot be read (catalog.invalid_rule); other
# malformed fields are read as written and the decision rejects the contribution
# they make (decision.invalid_contribution). Neither ever allows.
test_decision_deny_when_limit_fields_malformed if {
	cases := [
		[{"max": 0, "window": 60}, "catalog.invalid_rule"],
		[{"max": 10, "window": 60, "scope": "team"}, "catalog.invalid_rule"],
		[{"max": 10}, "decision.invalid_contribution"],
		[{"max": 2.5, "window": 60}, "catalog.invalid_rule"],
		[{"max": 10, "window": "60"}, "decision.invalid_contribution"],
	]
	every c in cases {
		d := data.mcp.decision with data.mcp_policy as _with_rule(_rl(c[0])) with input as _valid_copy
		[d.action, d.rule] == ["deny", c[1]]
	}
}

# --- load_errors: every rule of the policy data, once per load -----------------------

test_load_errors_name_each_unusable_rule if {
	policy := {
		"catalog": _catalog,
		"rules": {"copy_image_set": {"action": "maybe"}, "read_thing": "allow", "write_thing": _rl("0/hour")},
		"risk_defaults": {"low": "allow", "medium": 5},
		"default": {"action": "rate_limit"},
	}
	catalog.load_errors == {
		`mcp_policy.rules["copy_image_set"]: unknown action "maybe"; use one of allow, deny, rate_limit, require_approval`,
		`mcp_policy.rules["write_thing"]: rate_limit max must be an integer >= 1, got 0`,
		`mcp_policy.risk_defaults["medium"]: must be an action name or a map with an action`,
		"mcp_policy.default: action rate_limit needs a rate_limit, e.g. {max: 10, window: 60}",
	} with data.mcp_policy as policy
}

test_load_errors_folded_with_package_name_by_decision if {
	policy := object.union(_policy({}), {"default": "block"})
	data.mcp.load_errors == {concat("", [
		"mcp.rules.catalog: mcp_policy.default: ",
		`unknown action "block"; use one of allow, deny, rate_limit, require_approval`,
	])} with data.mcp_policy as policy
}

test_load_errors_none_when_shipped_files if {
	count(catalog.load_errors) == 0 with data.mcp_policy as shipped_test.policy
	count(data.mcp.load_errors) == 0 with data.mcp_policy as shipped_test.policy
}

# --- the sections of the policy data ---------------------------------------------------

test_load_errors_when_sections_have_wrong_type if {
	policy := {"catalog": [{"server": "srv", "tool": "t"}], "rules": [], "risk_defaults": "none", "default": "deny"}
	catalog.load_errors == {
		"mcp_policy.catalog must be a map of server to tool to entry, got array",
		"mcp_policy.rules must be a map, got array",
		"mcp_policy.risk_defaults must be a map, got string",
	} with data.mcp_policy as policy
}

# Sections of the wrong type are never read whole per call: the tool is simply
# not found there (and the load checks reject such data).
test_unknown_tool_when_sections_have_wrong_type if {
	policy := {"catalog": [{"server": "srv", "tool": "copy_image_set"}], "rules": [], "default": "deny"}
	out := _out with data.mcp_policy as policy with input as _copy
	out == _only("deny", {
		"rule": "catalog.default",
		"reason": `tool "copy_image_set" on server "srv" is denied (not in the policy catalog)`,
	})
}

test_missing_rule_when_rules_and_risk_defaults_wrong_type if {
	policy := {"catalog": _catalog, "rules": "copy_image_set: allow", "risk_defaults": ["allow"]}
	out := _out with data.mcp_policy as policy with input as _copy
	out.deny == {{
		"rule": "catalog.missing_rule",
		"reason": concat("", [
			`tool "copy_image_set" on server "srv" has risk "medium" in the policy catalog, `,
			"but risk_defaults has no rule for it",
		]),
	}}
}

# _usable (read per call) and _rule_problems (the messages, at load) are two readings of
# one rule; they must agree on every shape, or a rule could pass the load check and then
# deny (or fail it and read fine).
test_usable_exactly_when_no_problems if {
	rules := [
		"allow", "deny", "rate_limit", "maybe", 7, null, [], {},
		{"action": "allow"}, {"action": "deny", "reason": "no"}, {"action": "require_approval"},
		{"action": "rate_limit"}, {"action": 5}, {"reason": "x"},
		_rl("10/minute"), _rl("0/minute"), _rl("10 per minute"), _rl(10), _rl(null),
		_rl({"max": 10, "window": 60}), _rl({"max": 0, "window": 60}), _rl({"max": 2.5, "window": 60}),
		_rl({"max": 10, "window": 60, "scope": "team"}), _rl({"max": 10, "window": 60, "scope": "user"}),
		_rl({"max": "10", "window": 60}), _rl({"window": 60}),
		{"action": "allow", "rate_limit": "5/hour"}, {"action": "deny", "rate_limit": "5/hour"},
		{"action": "require_approval", "rate_limit": {"max": 3, "window": 1}},
	]
	disagree := [raw |
		some raw in rules
		usable := count([x | catalog._usable(catalog._as_rule(raw)); x := true]) == 1
		clean := count(catalog._rule_problems(raw)) == 0
		usable != clean
	]
	disagree == []
	count(rules) == 29
}
