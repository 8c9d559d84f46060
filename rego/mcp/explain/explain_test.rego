package mcp.explain_test

import data.mcp.explain

# The explanation beside the decision it explains. The fold's tests replace
# data.mcp.rules by hand-written packages; the YAML chain's use the shipped
# rule packages with policy data given here.

_deny(id) := {"rule": id, "reason": sprintf("%s says no", [id])}

_allow(id) := {"rule": id, "reason": sprintf("%s says yes", [id])}

_approval(id) := {"rule": id, "reason": sprintf("%s wants a human", [id])}

_limit(id) := {"rule": id, "reason": "5 per minute", "max": 5, "window_seconds": 60, "scope": "session"}

_status(e) := {[c.rule, c.status] | some c in e.contributions}

test_deny_beats_allow_and_says_why if {
	rules := {"p_deny": {"deny": {_deny("d.one")}}, "p_allow": {"allow": {_allow("a.one")}}}
	e := explain.explanation with data.mcp.rules as rules
	e.winner.level == "deny"
	e.winner.rule == "d.one"
	contains(e.winner.why, "deny > require_approval > rate_limit > allow")
	contains(e.winner.why, "the only enforced contribution at that level")
	_status(e) == {["d.one", "won"], ["a.one", "outranked"]}
	e.contributions[0].package == "mcp.rules.p_deny"
	e.contributions[0].level == "deny"
	e.contributions[0].reason == "d.one says no"
	e.contributions[1].outcome == "outranked: deny beats allow"
	e.approval == null
	e.limits == []
}

test_a_tie_is_broken_by_rule_id if {
	rules := {"p": {"deny": {_deny("z.late"), _deny("b.early")}}}
	e := explain.explanation with data.mcp.rules as rules
	e.winner.rule == "b.early"
	contains(e.winner.why, "of the 2 enforced contributions at that level, b.early comes first by rule id")
	_status(e) == {["b.early", "won"], ["z.late", "at the winning level"]}
}

test_shadow_and_malformed_contributions_are_named if {
	rules := {"p": {
		"allow": {_allow("a.one")},
		"deny": {object.union(_deny("d.shadow"), {"shadow": true})},
		"require_approval": {{"rule": "r.bad"}},
	}}
	e := explain.explanation with data.mcp.rules as rules
	_status(e) == {["a.one", "outranked"], ["d.shadow", "shadow"], ["r.bad", "malformed"]}

	# The malformed one is what denies (decision.invalid_contribution).
	e.winner.rule == "decision.invalid_contribution"
	some c in e.contributions
	c.rule == "d.shadow"
	c.shadow == true
}

test_a_contribution_that_is_not_an_object_is_malformed if {
	rules := {"p": {"deny": {"just a string"}}}
	e := explain.explanation with data.mcp.rules as rules
	e.contributions == [{
		"package": "mcp.rules.p",
		"level": "deny",
		"rule": null,
		"reason": "",
		"shadow": false,
		"status": "malformed",
		"outcome": "malformed for its level: the decision counts it as a deny (decision.invalid_contribution)",
		"entry": "just a string",
	}]
}

test_limits_beside_an_approval_apply if {
	rules := {"p": {"require_approval": {_approval("r.one")}, "rate_limit": {_limit("l.one")}}}
	e := explain.explanation with data.mcp.rules as rules
	e.winner.level == "require_approval"
	_status(e) == {["r.one", "won"], ["l.one", "applies"]}
	e.approval == {"rule": "r.one", "reason": "r.one wants a human"}
	e.limits == [_limit("l.one")]
}

test_nothing_matched_is_explained if {
	e := explain.explanation with data.mcp.rules as {}
	e.contributions == []
	e.winner.rule == "default.no_match"
	contains(e.winner.why, "no enforced contribution matched the call")
}

# The winner named is always the decision's, whatever the mix of levels.
test_the_winner_is_always_the_decisions if {
	pkgs := {
		"deny": {"p0": {"deny": {_deny("d.x")}}},
		"require_approval": {"p1": {"require_approval": {_approval("r.x")}}},
		"rate_limit": {"p2": {"rate_limit": {_limit("l.x")}}},
		"allow": {"p3": {"allow": {_allow("a.x")}}},
	}
	every mask in numbers.range(1, 15) {
		rules := object.union_n([pkgs[level] |
			some i, level in explain.precedence
			bits.and(mask, bits.lsh(1, i)) != 0
		])
		e := explain.explanation with data.mcp.rules as rules
		d := data.mcp.decision with data.mcp.rules as rules
		e.winner.level == d.action
		e.winner.rule == d.rule
		e.decision == d
	}
}

# -- the YAML chain, with the shipped rule packages ----------------------------

_server := "files.example"

_policy := {
	"catalog": {_server: {
		"read_file": {"category": "read", "risk": "low"},
		"write_file": {"category": "write", "risk": "medium"},
		"wipe_disk": {"category": "delete", "risk": "high"},
		"stat_file": {"category": "read", "risk": "critical"},
	}},
	"rules": {
		"read_file": {"action": "allow"},
		"write_file": {"action": "deny", "shadow": true},
	},
	"risk_defaults": {
		"low": "allow",
		"medium": {"action": "rate_limit", "rate_limit": "10/minute"},
		"high": "require_approval",
	},
	"default": "deny",
}

_call(tool) := {
	"tool": {"server": _server, "name": tool, "arguments": {}},
	"principal": {"agent_id": "a-1", "session_id": "s-1", "user_id": "u-1", "roles": []},
	"request": {"id": "d-1", "time": "2026-01-05T12:00:00Z", "transport": "http", "jsonrpc_id": 1},
	"context": {},
}

_walk(e) := [s.status | some s in e.yaml.walk]

test_walk_rule_for_the_tool_ends_it if {
	w1 := explain.explanation with input as _call("read_file") with data.mcp_policy as _policy
	_walk(w1) == [
		"enforced: ends the walk",
		"not reached: the walk ended before it",
		"skipped: the tool is in the catalog",
	]
	e := explain.explanation with input as _call("read_file") with data.mcp_policy as _policy
	e.yaml.tool == {"known": true, "category": "read", "risk": "low"}
	[s.where | some s in e.yaml.walk] == [`rules["read_file"]`, `risk_defaults["low"]`, "default"]
	[c.id | some c in e.yaml.chain] == ["catalog.rule.read_file"]
}

test_walk_a_shadow_rule_goes_on_to_the_risk_default if {
	w2 := explain.explanation with input as _call("write_file") with data.mcp_policy as _policy
	_walk(w2) == [
		"shadow: tried, not enforced; the walk goes on",
		"enforced: ends the walk",
		"skipped: the tool is in the catalog",
	]
	e := explain.explanation with input as _call("write_file") with data.mcp_policy as _policy
	e.winner.rule == "catalog.risk_default.medium"
	e.limits[0].max == 10
	_status(e) == {
		["catalog.rule.write_file", "shadow"],
		["catalog.risk_default.medium", "won"],
	}
}

test_walk_without_a_rule_for_the_tool if {
	w3 := explain.explanation with input as _call("wipe_disk") with data.mcp_policy as _policy
	_walk(w3) == ["none written", "enforced: ends the walk", "skipped: the tool is in the catalog"]
	w4 := explain.explanation with input as _call("stat_file") with data.mcp_policy as _policy
	_walk(w4) == ["none written", "none written", "skipped: the tool is in the catalog"]
	e := explain.explanation with input as _call("wipe_disk") with data.mcp_policy as _policy
	e.approval.rule == "catalog.risk_default.high"
}

test_walk_of_a_tool_not_in_the_catalog if {
	skipped := "skipped: the tool is not in the catalog"
	w5 := explain.explanation with input as _call("format_disk") with data.mcp_policy as _policy
	_walk(w5) == [skipped, skipped, "enforced: ends the walk"]
	no_default := object.remove(_policy, ["default"])
	w6 := explain.explanation with input as _call("format_disk") with data.mcp_policy as no_default
	_walk(w6) == [skipped, skipped, "none written"]
	shadow_default := object.union(_policy, {"default": {"action": "deny", "shadow": true}})
	w7 := explain.explanation with input as _call("format_disk") with data.mcp_policy as shadow_default
	_walk(w7) == [skipped, skipped, "shadow: tried, not enforced; the walk goes on"]
}

test_explanation_is_defined_for_a_malformed_input if {
	e := explain.explanation with input as {"tool": 7} with data.mcp_policy as _policy
	e.decision.action == "deny"
	count(e.yaml.walk) == 3
}
