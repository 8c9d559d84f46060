package mcp_test

import data.mcp

# Shadow contributions ("shadow": true): tried, never enforced. They are left out
# of action, rule, reason, rate_limits, approval and matched, and listed in
# decision.shadow. Uses the hand-written helpers of decision_test.rego.

_shadowed(entry) := object.union(entry, {"shadow": true})

# What decision.shadow shows for a shadow entry of each helper.
_seen_deny(id) := {"level": "deny", "rule": id, "reason": sprintf("%s says no", [id])}

_seen_approval(id) := {"level": "require_approval", "rule": id, "reason": sprintf("%s wants a human", [id])}

_seen_limit(id, max_calls) := object.union(_limit(id, max_calls), {"level": "rate_limit"})

_seen_allow(id) := {"level": "allow", "rule": id, "reason": sprintf("%s says yes", [id])}

_no_match := {
	"action": "deny",
	"rule": "default.no_match",
	"reason": "no policy rule matched this call",
	"rate_limits": [],
	"matched": [],
	"denies_tool": false,
	"tool": _unknown_tool,
}

# --- a shadow entry of each level is left out and listed --------------------------

test_shadow_listed_not_enforced_when_each_level_alone if {
	cases := [
		["deny", _shadowed(_deny("d.s")), _seen_deny("d.s")],
		["require_approval", _shadowed(object.union(_approval("r.s"), {"ttl_seconds": 60})), _seen_approval("r.s")],
		["rate_limit", _shadowed(_limit("l.s", 5)), _seen_limit("l.s", 5)],
		["allow", _shadowed(_allow("a.s")), _seen_allow("a.s")],
	]
	every case in cases {
		d := mcp.decision with mcp.rules as {"trial": {case[0]: {case[1]}}}
		d == object.union(_no_match, {"shadow": [case[2]]})
	}
}

test_shadow_left_out_of_decision_when_next_to_each_enforced_level if {
	shadows := {
		"deny": {_shadowed(_deny("s.deny"))},
		"require_approval": {_shadowed(_approval("s.approval"))},
		"rate_limit": {_shadowed(_limit("s.limit", 1))},
		"allow": {_shadowed(_allow("s.allow"))},
	}
	seen := [_seen_allow("s.allow"), _seen_approval("s.approval"), _seen_deny("s.deny"), _seen_limit("s.limit", 1)]
	every level in ["deny", "require_approval", "rate_limit", "allow"] {
		d := mcp.decision with mcp.rules as object.union(_rules([level]), {"trial": shadows})
		enforced := mcp.decision with mcp.rules as _rules([level])
		d == object.union(enforced, {"shadow": seen})
	}
}

# --- shadow deny next to an enforced allow ------------------------------------------

test_allow_when_shadow_deny_next_to_enforced_allow if {
	rules := {"p_allow": {"allow": {_allow("a.one")}}, "trial": {"deny": {_shadowed(_deny("t.no_copies"))}}}
	d := mcp.decision with mcp.rules as rules
	d == {
		"action": "allow",
		"rule": "a.one",
		"reason": "a.one says yes",
		"rate_limits": [],
		"matched": ["a.one"],
		"shadow": [_seen_deny("t.no_copies")],
		"denies_tool": false,
		"tool": _unknown_tool,
	}
}

test_rate_limit_without_approval_when_shadow_approval_next_to_enforced_limit if {
	rules := {
		"p_limit": {"rate_limit": {_limit("l.one", 5)}},
		"trial": {"require_approval": {_shadowed(_approval("t.ask"))}},
	}
	d := mcp.decision with mcp.rules as rules
	d.action == "rate_limit"
	d.rule == "l.one"
	d.reason == "l.one: 5 per minute"
	not d.approval
	d.matched == ["l.one"]
	d.shadow == [_seen_approval("t.ask")]
}

test_allow_without_limits_when_shadow_limit_next_to_enforced_allow if {
	rules := {"p_allow": {"allow": {_allow("a.one")}}, "trial": {"rate_limit": {_shadowed(_limit("t.per_user", 50))}}}
	d := mcp.decision with mcp.rules as rules
	d.action == "allow"
	d.rate_limits == []
	d.matched == ["a.one"]
	d.shadow == [_seen_limit("t.per_user", 50)]
}

test_shadow_listed_when_decision_denies if {
	rules := {"p_deny": {"deny": {_deny("d.one")}}, "trial": {"rate_limit": {_shadowed(_limit("t.limit", 3))}}}
	d := mcp.decision with mcp.rules as rules
	d.action == "deny"
	d.rate_limits == []
	d.shadow == [_seen_limit("t.limit", 3)]
}

test_enforced_limits_only_when_shadow_and_enforced_limits_stack if {
	rules := {
		"p_limit": {"rate_limit": {_limit("l.one", 5)}},
		"trial": {"rate_limit": {_shadowed(_limit("a.stricter", 2))}},
	}
	d := mcp.decision with mcp.rules as rules
	d.action == "rate_limit"
	d.rule == "l.one"
	d.reason == "l.one: 5 per minute"
	d.rate_limits == [_limit("l.one", 5)]
	d.shadow == [_seen_limit("a.stricter", 2)]
}

# --- only shadow entries matched --------------------------------------------------------

test_no_match_deny_when_only_shadow_entries_match if {
	rules := {
		"trial": {
			"deny": {_shadowed(_deny("t.d"))},
			"allow": {_shadowed(_allow("t.a"))},
		},
		"trial2": {"rate_limit": {_shadowed(_limit("t.l", 9))}},
	}
	d := mcp.decision with mcp.rules as rules
	d == object.union(_no_match, {"shadow": [_seen_allow("t.a"), _seen_deny("t.d"), _seen_limit("t.l", 9)]})
}

# --- "shadow": false or absent is enforced ----------------------------------------------

test_enforced_when_shadow_false if {
	rules := {"p": {
		"rate_limit": {object.union(_limit("l.one", 5), {"shadow": false})},
		"allow": {object.union(_allow("a.one"), {"shadow": false})},
	}}
	d := mcp.decision with mcp.rules as rules
	d == {
		"action": "rate_limit",
		"rule": "l.one",
		"reason": "l.one: 5 per minute",
		"rate_limits": [_limit("l.one", 5)],
		"matched": ["a.one", "l.one"],
		"shadow": [],
		"denies_tool": false,
		"tool": _unknown_tool,
	}
}

test_shadow_empty_when_no_shadow_entries if {
	every levels in [[], ["deny"], ["require_approval"], ["rate_limit"], ["allow"]] {
		d := mcp.decision with mcp.rules as _rules(levels)
		d.shadow == []
	}
}

test_both_when_same_rule_id_shadow_and_enforced if {
	rules := {"p": {"allow": {_allow("x.rule")}}, "trial": {"deny": {_shadowed(_deny("x.rule"))}}}
	d := mcp.decision with mcp.rules as rules
	d.action == "allow"
	d.matched == ["x.rule"]
	d.shadow == [_seen_deny("x.rule")]
}

# --- malformed shadow --------------------------------------------------------------------

test_deny_invalid_contribution_when_shadow_not_boolean if {
	entries := {
		"deny": _deny("d.x"),
		"require_approval": _approval("r.x"),
		"rate_limit": _limit("l.x", 1),
		"allow": _allow("a.x"),
	}
	every level, entry in entries {
		every value in ["true", "false", 1, 0, null, [true], {"on": true}] {
			rules := {"broken": {level: {object.union(entry, {"shadow": value})}}, "fine": {"allow": {_allow("a.one")}}}
			d := mcp.decision with mcp.rules as rules
			d.action == "deny"
			d.rule == "decision.invalid_contribution"
			d.reason == _invalid("broken", level).reason
			d.matched == ["a.one", "decision.invalid_contribution"]
			d.shadow == []
		}
	}
}

test_enforced_invalid_contribution_when_shadow_entry_otherwise_malformed if {
	cases := [
		["deny", {"rule": "d.x", "shadow": true}],
		["rate_limit", _shadowed(object.union(_limit("l.x", 1), {"max": 0}))],
		["rate_limit", _shadowed(object.union(_limit("l.x", 1), {"cost": -1}))],
		["require_approval", _shadowed(object.union(_approval("r.x"), {"ttl_seconds": 0}))],
		["allow", {"rule": "", "shadow": true}],
	]
	every case in cases {
		rules := {"broken": {case[0]: {case[1]}}, "fine": {"allow": {_allow("a.one")}}}
		d := mcp.decision with mcp.rules as rules
		d.action == "deny"
		d.rule == "decision.invalid_contribution"
		d.reason == _invalid("broken", case[0]).reason
		d.shadow == []
	}
}

# --- what decision.shadow shows ---------------------------------------------------------

test_shadow_limit_fields_passed_through_when_cost_absent_or_given if {
	without_cost := _shadowed(object.union(_limit("l.calls", 10), {"scope": "agent", "window_seconds": 0.5}))
	with_cost := _shadowed(object.union(_limit("l.spend", 1000), {"scope": "user", "cost": 12.5}))
	zero_cost := _shadowed(object.union(_limit("l.zero", 1), {"cost": 0}))
	d := mcp.decision with mcp.rules as {"trial": {"rate_limit": {without_cost, with_cost, zero_cost}}}
	d.shadow == [
		{
			"level": "rate_limit", "rule": "l.calls", "reason": "l.calls: 10 per minute",
			"max": 10, "window_seconds": 0.5, "scope": "agent",
		},
		{
			"level": "rate_limit", "rule": "l.spend", "reason": "l.spend: 1000 per minute",
			"max": 1000, "window_seconds": 60, "scope": "user", "cost": 12.5,
		},
		{
			"level": "rate_limit", "rule": "l.zero", "reason": "l.zero: 1 per minute",
			"max": 1, "window_seconds": 60, "scope": "session", "cost": 0,
		},
	]
}

test_shadow_shows_only_listed_fields_when_entries_carry_more if {
	rules := {"trial": {
		"rate_limit": {object.union(_shadowed(_limit("l.x", 2)), {"note": "internal"})},
		"deny": {object.union(_shadowed(_deny("d.x")), {"max": 3, "scope": "user", "note": "internal"})},
		"require_approval": {object.union(_shadowed(_approval("r.x")), {"ttl_seconds": 900})},
	}}
	d := mcp.decision with mcp.rules as rules
	d.shadow == [_seen_deny("d.x"), _seen_limit("l.x", 2), _seen_approval("r.x")]
}

test_shadow_reason_generated_when_allow_has_none if {
	rules := {"trial": {"allow": {{"rule": "a.quiet", "shadow": true}, {"rule": "a.empty", "reason": "", "shadow": true}}}}
	d := mcp.decision with mcp.rules as rules
	d.shadow == [
		{"level": "allow", "rule": "a.empty", "reason": "allow by rule a.empty"},
		{"level": "allow", "rule": "a.quiet", "reason": "allow by rule a.quiet"},
	]
}

test_shadow_sorted_by_rule_id_then_level if {
	rules := {
		"zeta": {"deny": {_shadowed(_deny("z.last"))}, "allow": {_shadowed(_allow("a.first"))}},
		"alpha": {
			"rate_limit": {_shadowed(_limit("a.first", 7)), _shadowed(_limit("m.middle", 1))},
			"require_approval": {_shadowed(_approval("a.first"))},
			"deny": {_shadowed(_deny("a.first"))},
		},
	}
	d := mcp.decision with mcp.rules as rules
	d.shadow == [
		_seen_deny("a.first"),
		_seen_approval("a.first"),
		_seen_limit("a.first", 7),
		_seen_allow("a.first"),
		_seen_limit("m.middle", 1),
		_seen_deny("z.last"),
	]
}

test_shadow_contributions_keep_entries_when_listed if {
	entry := _shadowed(_limit("l.s", 4))
	contributions := mcp.shadow_contributions with mcp.rules as {"trial": {"rate_limit": {entry}}}
	contributions == {{"level": "rate_limit", "entry": entry}}
}

test_shadow_from_arrays_when_package_uses_arrays if {
	d := mcp.decision with mcp.rules as {"p": {"deny": [_shadowed(_deny("d.arr"))], "allow": [_allow("a.one")]}}
	d.action == "allow"
	d.shadow == [_seen_deny("d.arr")]
}
