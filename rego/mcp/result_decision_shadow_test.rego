package mcp_test

import data.mcp

# Shadow result contributions ("shadow": true): tried, never enforced. They are
# left out of action, rule, reason, redactions and matched, and listed in
# result_decision.shadow. Uses the helpers of result_decision_test.rego.

_res_shadowed(entry) := object.union(entry, {"shadow": true})

_res_seen(level, entry) := {"level": level, "rule": entry.rule, "reason": entry.reason}

test_result_shadow_listed_not_enforced_when_each_level_alone if {
	cases := [
		["block", _res_block("b.s")],
		["redact", _res_path("r.s", "$..PatientName")],
		["redact", _res_pattern("r.p", "[0-9]{3}")],
		["pass", _res_pass("p.s")],
	]
	every case in cases {
		d := mcp.result_decision with mcp.result_rules as {"trial": {case[0]: {_res_shadowed(case[1])}}}
		d == object.union(_res_default_pass, {"shadow": [_res_seen(case[0], case[1])]})
	}
}

test_result_shadow_left_out_of_decision_when_next_to_each_enforced_level if {
	shadows := {
		"block": {_res_shadowed(_res_block("s.block"))},
		"redact": {_res_shadowed(_res_path("s.redact", "$..PatientID"))},
		"pass": {_res_shadowed(_res_pass("s.pass"))},
	}
	seen := [
		_res_seen("block", _res_block("s.block")),
		_res_seen("pass", _res_pass("s.pass")),
		_res_seen("redact", _res_path("s.redact", "$..PatientID")),
	]
	every level in ["block", "redact", "pass"] {
		d := mcp.result_decision with mcp.result_rules as object.union(_res_rules([level]), {"trial": shadows})
		enforced := mcp.result_decision with mcp.result_rules as _res_rules([level])
		d == object.union(enforced, {"shadow": seen})
	}
}

test_result_passes_when_shadow_block_next_to_enforced_pass if {
	rules := {"p_pass": {"pass": {_res_pass("p.one")}}, "trial": {"block": {_res_shadowed(_res_block("t.no"))}}}
	d := mcp.result_decision with mcp.result_rules as rules
	d == {
		"action": "pass",
		"rule": "p.one",
		"reason": "p.one passes",
		"redactions": [],
		"matched": ["p.one"],
		"shadow": [_res_seen("block", _res_block("t.no"))],
	}
}

test_result_shadow_redactions_not_applied_when_enforced_redaction_wins if {
	rules := {
		"p_redact": {"redact": {_res_path("r.one", "$..PatientName")}},
		"trial": {"redact": {_res_shadowed(_res_path("t.more", "$..PatientID"))}},
	}
	d := mcp.result_decision with mcp.result_rules as rules
	d.action == "redact"
	d.redactions == [_res_redacted("r.one", "$..PatientName")]
	d.matched == ["r.one"]
	d.shadow == [_res_seen("redact", _res_path("t.more", "$..PatientID"))]
}

test_result_shadow_listed_when_result_blocked if {
	rules := {"p_block": {"block": {_res_block("b.one")}}, "trial": {"pass": {_res_shadowed(_res_pass("t.pass"))}}}
	d := mcp.result_decision with mcp.result_rules as rules
	d.action == "block"
	d.shadow == [_res_seen("pass", _res_pass("t.pass"))]
}

test_result_shadow_sorted_by_rule_then_level_and_listed_once if {
	paths := ["$..A", "$..B", "$..C"]
	rules := {
		"t1": {
			"redact": {_res_shadowed({"rule": "m.same", "path": p, "reason": "why"}) | some p in paths},
			"pass": {_res_shadowed(_res_pass("m.same")), _res_shadowed({"rule": "a.quiet"})},
		},
		"t2": {"block": {_res_shadowed(_res_block("m.same")), _res_shadowed({"rule": "z.empty", "reason": ""})}},
	}
	d := mcp.result_decision with mcp.result_rules as rules
	d.action == "pass"
	d.rule == "default.pass"
	d.shadow == [
		{"level": "pass", "rule": "a.quiet", "reason": "pass by rule a.quiet"},
		{"level": "block", "rule": "m.same", "reason": "m.same blocks"},
		{"level": "redact", "rule": "m.same", "reason": "why"},
		{"level": "pass", "rule": "m.same", "reason": "m.same passes"},
		{"level": "block", "rule": "z.empty", "reason": "block by rule z.empty"},
	]
}

test_result_enforced_when_shadow_false if {
	rules := {"p": {"redact": {object.union(_res_path("r.one", "$.a"), {"shadow": false})}}}
	d := mcp.result_decision with mcp.result_rules as rules
	d.action == "redact"
	d.shadow == []
}
