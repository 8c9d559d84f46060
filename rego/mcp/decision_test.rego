package mcp_test

import data.mcp

# The fold on its own: data.mcp.rules is replaced by hand-written packages, so
# these tests depend on neither the shipped rule packages nor the YAML data.

_deny(id) := {"rule": id, "reason": sprintf("%s says no", [id])}

_approval(id) := {"rule": id, "reason": sprintf("%s wants a human", [id])}

_limit(id, max_calls) := {
	"rule": id,
	"max": max_calls,
	"window_seconds": 60,
	"scope": "session",
	"reason": sprintf("%s: %d per minute", [id, max_calls]),
}

_allow(id) := {"rule": id, "reason": sprintf("%s says yes", [id])}

# One rule package per level, each with one contribution.
_pkgs := {
	"deny": {"p_deny": {"deny": {_deny("d.one")}}},
	"require_approval": {"p_approval": {"require_approval": {_approval("r.one")}}},
	"rate_limit": {"p_limit": {"rate_limit": {_limit("l.one", 5)}}},
	"allow": {"p_allow": {"allow": {_allow("a.one")}}},
}

_rules(levels) := object.union_n([_pkgs[level] | some level in levels])

_unknown_tool := {"known": false}

# --- each level on its own ---------------------------------------------------

test_allow_when_only_allow if {
	d := mcp.decision with mcp.rules as _rules(["allow"])
	d == {
		"action": "allow",
		"rule": "a.one",
		"reason": "a.one says yes",
		"rate_limits": [],
		"matched": ["a.one"],
		"shadow": [],
		"denies_tool": false,
		"tool": _unknown_tool,
	}
}

test_rate_limit_when_only_rate_limit if {
	d := mcp.decision with mcp.rules as _rules(["rate_limit"])
	d == {
		"action": "rate_limit",
		"rule": "l.one",
		"reason": "l.one: 5 per minute",
		"rate_limits": [_limit("l.one", 5)],
		"matched": ["l.one"],
		"shadow": [],
		"denies_tool": false,
		"tool": _unknown_tool,
	}
}

test_require_approval_when_only_require_approval if {
	d := mcp.decision with mcp.rules as _rules(["require_approval"])
	d == {
		"action": "require_approval",
		"rule": "r.one",
		"reason": "r.one wants a human",
		"rate_limits": [],
		"approval": {"rule": "r.one", "reason": "r.one wants a human"},
		"matched": ["r.one"],
		"shadow": [],
		"denies_tool": false,
		"tool": _unknown_tool,
	}
}

test_deny_when_only_deny if {
	d := mcp.decision with mcp.rules as _rules(["deny"])
	d == {
		"action": "deny",
		"rule": "d.one",
		"reason": "d.one says no",
		"rate_limits": [],
		"matched": ["d.one"],
		"shadow": [],
		"denies_tool": false,
		"tool": _unknown_tool,
	}
}

test_deny_no_match_when_no_contribution if {
	d := mcp.decision with mcp.rules as {"empty": {}, "other": {"helper": true}}
	d == {
		"action": "deny",
		"rule": "default.no_match",
		"reason": "no policy rule matched this call",
		"rate_limits": [],
		"matched": [],
		"shadow": [],
		"denies_tool": false,
		"tool": _unknown_tool,
	}
}

test_deny_no_match_when_no_rule_packages if {
	d := mcp.decision with mcp.rules as {}
	d.action == "deny"
	d.rule == "default.no_match"
}

# --- precedence: deny > require_approval > rate_limit > allow -----------------

test_precedence_deny_over_require_approval if {
	d := mcp.decision with mcp.rules as _rules(["deny", "require_approval"])
	d.action == "deny"
	d.rule == "d.one"
	d.reason == "d.one says no"
	d.matched == ["d.one", "r.one"]
	not d.approval
}

test_precedence_deny_over_rate_limit if {
	d := mcp.decision with mcp.rules as _rules(["deny", "rate_limit"])
	d.action == "deny"
	d.rule == "d.one"
	d.rate_limits == []
	d.matched == ["d.one", "l.one"]
}

test_precedence_deny_over_allow if {
	d := mcp.decision with mcp.rules as _rules(["deny", "allow"])
	d.action == "deny"
	d.rule == "d.one"
	d.matched == ["a.one", "d.one"]
}

test_precedence_require_approval_over_rate_limit if {
	d := mcp.decision with mcp.rules as _rules(["require_approval", "rate_limit"])
	d.action == "require_approval"
	d.rule == "r.one"
	d.approval == {"rule": "r.one", "reason": "r.one wants a human"}
	d.rate_limits == [_limit("l.one", 5)]
}

test_precedence_require_approval_over_allow if {
	d := mcp.decision with mcp.rules as _rules(["require_approval", "allow"])
	d.action == "require_approval"
	d.rule == "r.one"
	d.rate_limits == []
}

test_precedence_rate_limit_over_allow if {
	d := mcp.decision with mcp.rules as _rules(["rate_limit", "allow"])
	d.action == "rate_limit"
	d.rule == "l.one"
	d.reason == "l.one: 5 per minute"
	d.rate_limits == [_limit("l.one", 5)]
	d.matched == ["a.one", "l.one"]
}

test_precedence_deny_over_all_when_every_level if {
	d := mcp.decision with mcp.rules as _rules(["allow", "rate_limit", "require_approval", "deny"])
	d.action == "deny"
	d.rate_limits == []
	d.matched == ["a.one", "d.one", "l.one", "r.one"]
	not d.approval
}

# --- several contributions at one level ----------------------------------------

test_rule_and_reason_in_rule_id_order_when_several_denies if {
	rules := {
		"zeta": {"deny": {_deny("z.last")}},
		"alpha": {"deny": {_deny("b.second"), _deny("a.first")}},
	}
	d := mcp.decision with mcp.rules as rules
	d.rule == "a.first"
	d.reason == "a.first says no; b.second says no; z.last says no"
	d.matched == ["a.first", "b.second", "z.last"]
}

test_reason_deduplicated_when_reasons_repeat if {
	rules := {"p": {"deny": {
		{"rule": "x.1", "reason": "same"},
		{"rule": "x.2", "reason": "other"},
		{"rule": "x.3", "reason": "same"},
	}}}
	d := mcp.decision with mcp.rules as rules
	d.reason == "same; other"
}

test_limits_stack_sorted_by_rule_id_when_several_packages if {
	rules := {
		"p1": {"rate_limit": {_limit("z.per_session", 10)}, "allow": {_allow("a.one")}},
		"p2": {"rate_limit": {_limit("b.per_user", 100), _limit("m.global", 1000)}},
	}
	d := mcp.decision with mcp.rules as rules
	d.action == "rate_limit"
	d.rule == "b.per_user"
	d.rate_limits == [_limit("b.per_user", 100), _limit("m.global", 1000), _limit("z.per_session", 10)]
	d.reason == "b.per_user: 100 per minute; m.global: 1000 per minute; z.per_session: 10 per minute"
}

test_limits_kept_when_action_allow_has_limit if {
	rules := {"p": {"allow": {_allow("a.one")}, "rate_limit": {_limit("a.one", 3)}}}
	d := mcp.decision with mcp.rules as rules
	d.action == "rate_limit"
	d.rule == "a.one"
	d.matched == ["a.one"]
}

test_rate_limits_carry_only_limit_fields_when_extra_fields if {
	rules := {"p": {"rate_limit": {object.union(_limit("l.one", 5), {"note": "internal"})}}}
	d := mcp.decision with mcp.rules as rules
	d.rate_limits == [_limit("l.one", 5)]
}

test_rate_limits_carry_cost_when_given if {
	every cost in [3, 2.5, 0, 0.0, 1000000] {
		limit := object.union(_limit("l.weighted", 5), {"cost": cost})
		d := mcp.decision with mcp.rules as {"p": {"rate_limit": {limit}}}
		d.action == "rate_limit"
		d.rule == "l.weighted"
		d.rate_limits == [limit]
	}
}

test_rate_limits_without_cost_when_not_given if {
	d := mcp.decision with mcp.rules as _rules(["rate_limit"])
	every limit in d.rate_limits {
		not "cost" in object.keys(limit)
	}
}

test_rate_limits_keep_each_cost_when_weighted_and_unweighted_stack if {
	weighted := object.union(_limit("a.spend", 1000), {"cost": 250})
	rules := {"p1": {"rate_limit": {weighted}}, "p2": {"rate_limit": {_limit("b.calls", 10)}}}
	d := mcp.decision with mcp.rules as rules
	d.rate_limits == [weighted, _limit("b.calls", 10)]
}

test_approval_ttl_smallest_when_several_approvals if {
	rules := {"p": {"require_approval": {
		object.union(_approval("r.b"), {"ttl_seconds": 900}),
		object.union(_approval("r.c"), {"ttl_seconds": 300}),
		_approval("r.a"),
	}}}
	d := mcp.decision with mcp.rules as rules
	d.approval == {
		"rule": "r.a",
		"reason": "r.a wants a human; r.b wants a human; r.c wants a human",
		"ttl_seconds": 300,
	}
}

test_approval_by_caller_when_every_winner_says_caller if {
	rules := {"p": {"require_approval": {
		object.union(_approval("r.a"), {"by": "caller"}),
		object.union(_approval("r.b"), {"by": "caller"}),
	}}}
	d := mcp.decision with mcp.rules as rules
	d.approval.by == "caller"
}

test_approval_by_approvers_when_one_winner_leaves_it_to_them if {
	cases := [
		{object.union(_approval("r.a"), {"by": "caller"}), _approval("r.b")},
		{object.union(_approval("r.a"), {"by": "caller"}), object.union(_approval("r.b"), {"by": "approvers"})},
	]
	every contributions in cases {
		d := mcp.decision with mcp.rules as {"p": {"require_approval": contributions}}
		d.action == "require_approval"
		not d.approval.by
	}
}

test_approval_without_ttl_when_none_given if {
	d := mcp.decision with mcp.rules as _rules(["require_approval"])
	not d.approval.ttl_seconds
}

test_reason_names_rule_when_allow_has_no_reason if {
	rules := {"p": {"allow": {{"rule": "a.quiet"}, {"rule": "a.empty", "reason": ""}}}}
	d := mcp.decision with mcp.rules as rules
	d.action == "allow"
	d.rule == "a.empty"
	d.reason == "allow by rule a.empty"
}

test_contributions_as_arrays_when_package_uses_arrays if {
	d := mcp.decision with mcp.rules as {"p": {"deny": [_deny("d.arr")]}}
	d.rule == "d.arr"
}

# --- malformed contributions fail closed ----------------------------------------

_invalid(pkg, level) := {
	"rule": "decision.invalid_contribution",
	"reason": sprintf("policy package mcp.rules.%s produced a malformed %s contribution", [pkg, level]),
}

test_deny_invalid_contribution_when_entry_malformed if {
	cases := [
		["deny", {"rule": "d.x"}], # no reason
		["deny", {"rule": "", "reason": "r"}], # empty id
		["deny", "no"], # not an object
		["require_approval", {"rule": "r.x"}], # no reason
		["require_approval", {"rule": "r.x", "reason": "r", "ttl_seconds": 0}],
		["require_approval", {"rule": "r.x", "reason": "r", "ttl_seconds": "900"}],
		["require_approval", {"rule": "r.x", "reason": "r", "by": "anyone"}],
		["require_approval", {"rule": "r.x", "reason": "r", "by": true}],
		["rate_limit", object.remove(_limit("l.x", 1), ["reason"])],
		["rate_limit", object.remove(_limit("l.x", 1), ["scope"])],
		["rate_limit", object.union(_limit("l.x", 1), {"max": 0})],
		["rate_limit", object.union(_limit("l.x", 1), {"max": 1.5})],
		["rate_limit", object.union(_limit("l.x", 1), {"max": "10"})],
		["rate_limit", object.union(_limit("l.x", 1), {"window_seconds": 0})],
		["rate_limit", object.union(_limit("l.x", 1), {"window_seconds": "60"})],
		["rate_limit", object.union(_limit("l.x", 1), {"scope": "tenant"})],
		["rate_limit", object.union(_limit("l.x", 1), {"cost": -1})],
		["rate_limit", object.union(_limit("l.x", 1), {"cost": -0.5})],
		["rate_limit", object.union(_limit("l.x", 1), {"cost": "3"})],
		["rate_limit", object.union(_limit("l.x", 1), {"cost": null})],
		["rate_limit", object.union(_limit("l.x", 1), {"cost": true})],
		["rate_limit", object.union(_limit("l.x", 1), {"cost": [3]})],
		["allow", {"rule": 7}],
		["allow", {"rule": "a.x", "reason": 7}],
		["allow", true],
	]
	every case in cases {
		rules := {"broken": {case[0]: {case[1]}}, "fine": {"allow": {_allow("a.one")}}}
		d := mcp.decision with mcp.rules as rules
		d.action == "deny"
		d.rule == "decision.invalid_contribution"
		d.reason == _invalid("broken", case[0]).reason
		d.matched == ["a.one", "decision.invalid_contribution"]
	}
}

test_deny_invalid_contribution_when_set_rule_is_not_a_collection if {
	every level in ["deny", "require_approval", "rate_limit", "allow"] {
		rules := {"broken": {level: true}, "fine": {"allow": {_allow("a.one")}}}
		d := mcp.decision with mcp.rules as rules
		d.action == "deny"
		d.reason == _invalid("broken", level).reason
	}
}

test_valid_ttl_accepted_when_positive if {
	rules := {"p": {"require_approval": {object.union(_approval("r.x"), {"ttl_seconds": 0.5})}}}
	d := mcp.decision with mcp.rules as rules
	d.approval.ttl_seconds == 0.5
}

test_every_scope_accepted_when_well_formed if {
	every scope in ["session", "agent", "user", "global"] {
		rules := {"p": {"rate_limit": {object.union(_limit("l.x", 1), {"scope": scope})}}}
		d := mcp.decision with mcp.rules as rules
		d.action == "rate_limit"
	}
}

# --- denies_tool: an enforced deny that holds whatever the arguments ----------------

_whole(c) := object.union(c, {"whole_tool": true})

test_denies_tool_when_a_whole_tool_deny_decides if {
	rules := {"p": {"deny": {_whole(_deny("d.tool")), _deny("d.args")}, "allow": {_allow("a.one")}}}
	d := mcp.decision with mcp.rules as rules
	d.action == "deny"
	d.denies_tool == true
}

test_denies_tool_false_when_every_deny_depends_on_the_arguments if {
	d := mcp.decision with mcp.rules as {"p": {"deny": {_deny("d.args")}}}
	d.action == "deny"
	d.denies_tool == false
}

test_denies_tool_false_when_the_whole_tool_deny_is_shadow if {
	shadow := object.union(_whole(_deny("d.tool")), {"shadow": true})
	d := mcp.decision with mcp.rules as {"p": {"deny": {shadow}, "allow": {_allow("a.one")}}}
	d.action == "allow"
	d.denies_tool == false
}

test_denies_tool_false_when_whole_tool_false if {
	entry := object.union(_deny("d.x"), {"whole_tool": false})
	d := mcp.decision with mcp.rules as {"p": {"deny": {entry}}}
	d.rule == "d.x"
	d.denies_tool == false
}

test_invalid_contribution_when_whole_tool_not_a_boolean if {
	entry := object.union(_deny("d.x"), {"whole_tool": "yes"})
	d := mcp.decision with mcp.rules as {"p": {"deny": {entry}}}
	d.rule == "decision.invalid_contribution"
	d.denies_tool == false
}
