package mcp.rules.catalog_test

import data.mcp.rules.catalog
import data.mcp.shipped_test

# A catalog with one tool per risk class on server "srv", plus copy_image_set.
_catalog := {"srv": {
	"copy_image_set": {"category": "write", "risk": "medium"},
	"read_thing": {"category": "read", "risk": "low"},
	"write_thing": {"category": "write", "risk": "medium"},
	"admin_thing": {"category": "admin", "risk": "high"},
	"drop_thing": {"category": "delete", "risk": "critical"},
	"odd_thing": {"category": "write", "risk": "extreme"},
}}

_risk_defaults := {
	"low": "allow",
	"medium": {"action": "require_approval"},
	"high": {"action": "require_approval", "approval": {"ttl": 600}},
	"critical": {"action": "deny", "reason": "critical tools are never allowed"},
}

_policy(rules) := {
	"catalog": _catalog,
	"rules": rules,
	"risk_defaults": _risk_defaults,
	"default": {"action": "deny"},
}

# _policy with `rule` as the rule for copy_image_set.
_with_rule(rule) := _policy({"copy_image_set": rule})

_call(name) := {"tool": {"server": "srv", "name": name, "arguments": {}}, "principal": {"session_id": "s-1"}}

_copy := _call("copy_image_set")

_subject := `tool "copy_image_set" on server "srv"`

# Everything the package contributes, by level, each deny without "whole_tool"
# (the tests named test_whole_tool_* check that field on its own).
_out := {
	"deny": {object.remove(d, ["whole_tool"]) | some d in catalog.deny},
	"require_approval": catalog.require_approval,
	"rate_limit": catalog.rate_limit,
	"allow": catalog.allow,
}

_none := {"deny": set(), "require_approval": set(), "rate_limit": set(), "allow": set()}

_only(level, contribution) := object.union(_none, {level: {contribution}})

_limit(max_calls, window, scope, reason) := {
	"rule": "catalog.rule.copy_image_set",
	"max": max_calls,
	"window_seconds": window,
	"scope": scope,
	"reason": reason,
}

# --- actions -----------------------------------------------------------------

test_allow_when_action_allow_with_reason if {
	out := _out with data.mcp_policy as _with_rule({"action": "allow", "reason": "fine"}) with input as _copy
	out == _only("allow", {"rule": "catalog.rule.copy_image_set", "reason": "fine"})
}

test_allow_generated_reason_when_reason_absent if {
	out := _out with data.mcp_policy as _with_rule({"action": "allow"}) with input as _copy
	out == _only("allow", {
		"rule": "catalog.rule.copy_image_set",
		"reason": sprintf("%s is allowed (policy rule for this tool)", [_subject]),
	})
}

test_allow_when_rule_is_bare_action_name if {
	out := _out with data.mcp_policy as _with_rule("allow") with input as _copy
	out == _only("allow", {
		"rule": "catalog.rule.copy_image_set",
		"reason": sprintf("%s is allowed (policy rule for this tool)", [_subject]),
	})
}

test_deny_when_action_deny_with_reason if {
	out := _out with data.mcp_policy as _with_rule({"action": "deny", "reason": "no copies"}) with input as _copy
	out == _only("deny", {"rule": "catalog.rule.copy_image_set", "reason": "no copies"})
}

test_deny_generated_reason_when_reason_absent if {
	out := _out with data.mcp_policy as _with_rule({"action": "deny"}) with input as _copy
	out == _only("deny", {
		"rule": "catalog.rule.copy_image_set",
		"reason": sprintf("%s is denied (policy rule for this tool)", [_subject]),
	})
}

test_require_approval_without_ttl_when_no_approval_key if {
	out := _out with data.mcp_policy as _with_rule({"action": "require_approval"}) with input as _copy
	out == _only("require_approval", {
		"rule": "catalog.rule.copy_image_set",
		"reason": sprintf("%s requires human approval (policy rule for this tool)", [_subject]),
	})
}

test_require_approval_with_ttl_when_approval_ttl_given if {
	rule := {"action": "require_approval", "reason": "ask", "approval": {"ttl": 900}}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out == _only("require_approval", {"rule": "catalog.rule.copy_image_set", "reason": "ask", "ttl_seconds": 900})
}

test_require_approval_by_caller_when_approval_by_given if {
	rule := {"action": "require_approval", "reason": "ask", "approval": {"by": "caller"}}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out == _only("require_approval", {"rule": "catalog.rule.copy_image_set", "reason": "ask", "by": "caller"})
}

test_require_approval_without_ttl_when_approval_empty if {
	rule := {"action": "require_approval", "approval": {}}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out.require_approval == {{
		"rule": "catalog.rule.copy_image_set",
		"reason": sprintf("%s requires human approval (policy rule for this tool)", [_subject]),
	}}
}

test_rate_limit_generated_reason_when_reason_absent if {
	rule := {"action": "rate_limit", "rate_limit": {"max": 10, "window": 60}}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out == _only("rate_limit", _limit(10, 60, "session", "at most 10 calls per 60 seconds per session"))
}

test_rate_limit_uses_reason_when_reason_given if {
	rule := {"action": "rate_limit", "reason": "slow down", "rate_limit": {"max": 10, "window": 60}}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out == _only("rate_limit", _limit(10, 60, "session", "slow down"))
}

test_rate_limit_max_written_as_integer_when_float_in_yaml if {
	rule := {"action": "rate_limit", "rate_limit": {"max": 10.0, "window": 0.5}}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out == _only("rate_limit", _limit(10, 0.5, "session", "at most 10 calls per 0.5 seconds per session"))
}

test_rate_limit_scope_phrases_when_scope_given if {
	phrases := {"session": "per session", "agent": "per agent", "user": "per user", "global": "across all callers"}
	every scope, phrase in phrases {
		rule := {"action": "rate_limit", "rate_limit": {"max": 1, "window": 1, "scope": scope}}
		out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
		out == _only("rate_limit", _limit(1, 1, scope, sprintf("at most 1 call per second %s", [phrase])))
	}
}

test_allow_and_limit_when_allow_has_rate_limit if {
	rule := {"action": "allow", "reason": "reads are fine", "rate_limit": {"max": 5, "window": 10, "scope": "user"}}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out.allow == {{"rule": "catalog.rule.copy_image_set", "reason": "reads are fine"}}
	out.rate_limit == {_limit(5, 10, "user", "at most 5 calls per 10 seconds per user")}
	out.deny == set()
	out.require_approval == set()
}

test_approval_and_limit_when_require_approval_has_rate_limit if {
	rule := {"action": "require_approval", "reason": "ask", "rate_limit": "3/hour"}
	out := _out with data.mcp_policy as _with_rule(rule) with input as _copy
	out.require_approval == {{"rule": "catalog.rule.copy_image_set", "reason": "ask"}}
	out.rate_limit == {_limit(3, 3600, "session", "at most 3 calls per 3600 seconds per session")}
	out.deny == set()
	out.allow == set()
}

# --- rate_limit string form ----------------------------------------------------

test_rate_limit_string_when_each_unit if {
	cases := {
		"1/second": 1, "2/seconds": 1,
		"10/minute": 60, "10/minutes": 60,
		"5/hour": 3600, "5/hours": 3600,
		"100/day": 86400, "100/days": 86400,
		" 7 / minute ": 60,
	}
	every text, window in cases {
		out := _out with data.mcp_policy as _with_rule({"action": "rate_limit", "rate_limit": text}) with input as _copy
		some limit in out.rate_limit
		limit.window_seconds == window
		limit.max == to_number(trim_space(split(text, "/")[0]))
		limit.scope == "session"
		count(out.deny) == 0
	}
}

test_rate_limit_string_reason_when_10_per_minute if {
	out := _out with data.mcp_policy as _with_rule({"action": "rate_limit", "rate_limit": "10/minute"}) with input as _copy
	out == _only("rate_limit", _limit(10, 60, "session", "at most 10 calls per 60 seconds per session"))
}

# --- which rule applies ----------------------------------------------------------

test_risk_default_when_tool_has_no_rule if {
	cases := {
		"read_thing": _only("allow", {
			"rule": "catalog.risk_default.low",
			"reason": `tool "read_thing" on server "srv" is allowed (default for low-risk tools)`,
		}),
		"write_thing": _only("require_approval", {
			"rule": "catalog.risk_default.medium",
			"reason": `tool "write_thing" on server "srv" requires human approval (default for medium-risk tools)`,
		}),
		"admin_thing": _only("require_approval", {
			"rule": "catalog.risk_default.high",
			"reason": `tool "admin_thing" on server "srv" requires human approval (default for high-risk tools)`,
			"ttl_seconds": 600,
		}),
		"drop_thing": _only("deny", {"rule": "catalog.risk_default.critical", "reason": "critical tools are never allowed"}),
	}
	every name, want in cases {
		out := _out with data.mcp_policy as _policy({}) with input as _call(name)
		out == want
	}
}

test_rule_beats_risk_default_when_both_exist if {
	out := _out with data.mcp_policy as _policy({"read_thing": "deny"}) with input as _call("read_thing")
	out.deny == {{
		"rule": "catalog.rule.read_thing",
		"reason": `tool "read_thing" on server "srv" is denied (policy rule for this tool)`,
	}}
	out.allow == set()
}

test_missing_rule_when_risk_has_no_default if {
	out := _out with data.mcp_policy as _policy({}) with input as _call("odd_thing")
	out == _only("deny", {
		"rule": "catalog.missing_rule",
		"reason": concat("", [
			`tool "odd_thing" on server "srv" has risk "extreme" in the policy catalog, `,
			"but risk_defaults has no rule for it",
		]),
	})
}

test_default_when_tool_not_in_catalog if {
	out := _out with data.mcp_policy as _policy({}) with input as _call("unlisted")
	out == _only("deny", {
		"rule": "catalog.default",
		"reason": `tool "unlisted" on server "srv" is denied (not in the policy catalog)`,
	})
}

test_default_when_rule_exists_but_tool_not_in_catalog if {
	out := _out with data.mcp_policy as _policy({"unlisted": "allow"}) with input as _call("unlisted")
	out.deny == {{
		"rule": "catalog.default",
		"reason": `tool "unlisted" on server "srv" is denied (not in the policy catalog)`,
	}}
	out.allow == set()
}

test_default_when_catalogued_tool_on_other_server if {
	call := {"tool": {"server": "elsewhere", "name": "copy_image_set", "arguments": {}}}
	out := _out with data.mcp_policy as _with_rule("allow") with input as call
	out.deny == {{
		"rule": "catalog.default",
		"reason": `tool "copy_image_set" on server "elsewhere" is denied (not in the policy catalog)`,
	}}
	out.allow == set()
}

test_default_allow_when_default_action_allow if {
	policy := object.union(_policy({}), {"default": {"action": "allow", "rate_limit": "1/day"}})
	out := _out with data.mcp_policy as policy with input as _call("unlisted")
	out.allow == {{
		"rule": "catalog.default",
		"reason": `tool "unlisted" on server "srv" is allowed (not in the policy catalog)`,
	}}
	out.rate_limit == {{
		"rule": "catalog.default", "max": 1, "window_seconds": 86400, "scope": "session",
		"reason": "at most 1 call per 86400 seconds per session",
	}}
}

test_missing_rule_when_no_default if {
	out := _out with data.mcp_policy as object.remove(_policy({}), ["default"]) with input as _call("unlisted")
	out == _only("deny", {
		"rule": "catalog.missing_rule",
		"reason": concat("", [
			`tool "unlisted" on server "srv" is not in the policy catalog, `,
			"and the policy data has no default rule",
		]),
	})
}

test_missing_rule_when_no_policy_data if {
	out := _out with data.mcp_policy as {} with input as _call("copy_image_set")
	out.deny == {{
		"rule": "catalog.missing_rule",
		"reason": concat("", [
			`tool "copy_image_set" on server "srv" is not in the policy catalog, `,
			"and the policy data has no default rule",
		]),
	}}
}

test_generic_subject_when_input_missing if {
	out := _out with data.mcp_policy as _policy({})
	out == _only("deny", {"rule": "catalog.default", "reason": "the called tool is denied (not in the policy catalog)"})
}

test_exact_name_when_variants_of_copy_image_set if {
	every name in ["Copy_Image_Set", "ｃｏｐｙ_image_set", "copy\u200d_image_set", "copy_image_set "] {
		out := _out with data.mcp_policy as _with_rule("allow") with input as _call(name)
		some d in out.deny
		d.rule == "catalog.default"
		out.allow == set()
	}
}

# --- shipped policy data ----------------------------------------------------------

test_shipped_copy_image_set_rate_limited_when_on_either_server if {
	every server in ["awslabs.healthimaging-mcp-server", "awslabs.valkey-mcp-server"] {
		call := {"tool": {"server": server, "name": "copy_image_set", "arguments": {}}}
		out := _out with data.mcp_policy as shipped_test.policy with input as call
		out == _only("rate_limit", _limit(10, 60, "session", "at most 10 calls per 60 seconds per session"))
	}
}

test_shipped_default_denies_when_tool_unknown if {
	call := {"tool": {"server": "awslabs.valkey-mcp-server", "name": "get", "arguments": {}}}
	out := _out with data.mcp_policy as shipped_test.policy with input as call
	out == _only("deny", {
		"rule": "catalog.default",
		"reason": `tool "get" on server "awslabs.valkey-mcp-server" is denied (not in the policy catalog)`,
	})
}

test_shipped_risk_defaults_when_tool_has_no_rule if {
	want := {"low": "allow", "medium": "require_approval", "high": "require_approval", "critical": "deny"}
	every risk, level in want {
		policy := object.union(shipped_test.policy, {"catalog": {"srv": {"t": {"category": "x", "risk": risk}}}})
		out := _out with data.mcp_policy as policy with input as _call("t")
		{c.rule | some c in out[level]} == {sprintf("catalog.risk_default.%s", [risk])}
		((count(out.deny) + count(out.require_approval)) + count(out.rate_limit)) + count(out.allow) == 1
	}
}

# --- whole_tool: the denies that hold whatever the arguments ---------------------

# {rule id: whole_tool} of the denies given.
_whole_tool(denies) := {d.rule: object.get(d, "whole_tool", false) | some d in denies}

test_whole_tool_when_the_chain_rule_denies if {
	own := catalog.deny with data.mcp_policy as _with_rule("deny") with input as _copy
	_whole_tool(own) == {"catalog.rule.copy_image_set": true}
	risky := object.union(_policy({}), {"risk_defaults": {"medium": "deny"}})
	by_risk := catalog.deny with data.mcp_policy as risky with input as _call("write_thing")
	_whole_tool(by_risk) == {"catalog.risk_default.medium": true}
	fallback := catalog.deny with data.mcp_policy as _policy({}) with input as _call("unlisted")
	_whole_tool(fallback) == {"catalog.default": true}
}

test_whole_tool_when_the_chain_rule_is_unusable_or_missing if {
	unusable := catalog.deny with data.mcp_policy as _with_rule({"action": "maybe"}) with input as _copy
	_whole_tool(unusable) == {"catalog.invalid_rule": true}
	no_default := object.remove(_policy({}), ["default"])
	missing := catalog.deny with data.mcp_policy as no_default with input as _call("unlisted")
	_whole_tool(missing) == {"catalog.missing_rule": true}
}

test_whole_tool_not_when_the_deny_depends_on_an_argument if {
	weighted := {"action": "rate_limit", "rate_limit": {"max": 9, "window": 60, "increment_from": "n"}}
	denies := catalog.deny with data.mcp_policy as _with_rule(weighted) with input as _copy
	_whole_tool(denies) == {"catalog.rate_limit_cost_invalid": false}
}

test_whole_tool_never_on_other_levels if {
	every rule in ["allow", "require_approval", {"action": "rate_limit", "rate_limit": "5/minute"}] {
		out := {level: contributions |
			some level in ["require_approval", "rate_limit", "allow"]
			contributions := catalog[level] with data.mcp_policy as _with_rule(rule) with input as _copy
		}
		every level, contributions in out {
			every c in contributions {
				not c.whole_tool
				level != "deny"
			}
		}
		count(((out.require_approval | out.rate_limit) | out.allow)) > 0
	}
}
