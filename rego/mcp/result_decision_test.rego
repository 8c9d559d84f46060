package mcp_test

import data.mcp

# The result fold on its own: data.mcp.result_rules is replaced by hand-written
# packages, so these tests depend on neither the shipped result rule packages
# nor the YAML data. (Package mcp_test, beside decision_test.rego: every name
# here starts with _res or test_result.)

_res_block(id) := {"rule": id, "reason": sprintf("%s blocks", [id])}

_res_path(id, path) := {"rule": id, "path": path, "reason": sprintf("%s redacts %s", [id, path])}

_res_pattern(id, pattern) := {"rule": id, "pattern": pattern, "reason": sprintf("%s redacts %s", [id, pattern])}

_res_pass(id) := {"rule": id, "reason": sprintf("%s passes", [id])}

# One result rule package per level, each with one contribution.
_res_pkgs := {
	"block": {"p_block": {"block": {_res_block("b.one")}}},
	"redact": {"p_redact": {"redact": {_res_path("r.one", "$..PatientName")}}},
	"pass": {"p_pass": {"pass": {_res_pass("p.one")}}},
}

_res_rules(levels) := object.union_n([_res_pkgs[level] | some level in levels])

_res_default_pass := {
	"action": "pass",
	"rule": "default.pass",
	"reason": "no result policy rule matched this result",
	"redactions": [],
	"matched": [],
	"shadow": [],
}

_res_redacted(id, path) := {"rule": id, "path": path, "replacement": "[REDACTED]"}

# --- nothing matched: pass ---------------------------------------------------------

test_result_default_pass_when_no_contribution if {
	every rules in [{}, {"empty": {}, "other": {"helper": true}}, {"p": {"block": set(), "redact": [], "pass": set()}}] {
		d := mcp.result_decision with mcp.result_rules as rules
		d == _res_default_pass
	}
}

test_result_always_defined_when_input_missing_or_not_an_object if {
	every bad in [{}, [], "result", null, {"result": "text"}, {"result": [1, 2]}] {
		d := mcp.result_decision with mcp.result_rules as _res_rules(["pass"]) with input as bad
		d.action == "pass"
		d.rule == "p.one"
	}
}

# --- each level on its own -----------------------------------------------------------

test_result_block_when_only_block if {
	d := mcp.result_decision with mcp.result_rules as _res_rules(["block"])
	d == {
		"action": "block",
		"rule": "b.one",
		"reason": "b.one blocks",
		"redactions": [],
		"matched": ["b.one"],
		"shadow": [],
	}
}

test_result_redact_when_only_redact if {
	d := mcp.result_decision with mcp.result_rules as _res_rules(["redact"])
	d == {
		"action": "redact",
		"rule": "r.one",
		"reason": "r.one redacts $..PatientName",
		"redactions": [_res_redacted("r.one", "$..PatientName")],
		"matched": ["r.one"],
		"shadow": [],
	}
}

test_result_redact_by_pattern_with_its_replacement if {
	entry := object.union(_res_pattern("r.ssn", `\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b`), {"replacement": "***-**-****"})
	d := mcp.result_decision with mcp.result_rules as {"p": {"redact": {entry}}}
	d.action == "redact"
	d.redactions == [{"rule": "r.ssn", "pattern": `\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b`, "replacement": "***-**-****"}]
}

test_result_redact_by_pattern_that_blocks_when_found if {
	entry := object.union(_res_pattern("r.key", "AKIA[A-Z0-9]{16}"), {"block_if_found": true, "block_reason": "a key"})
	d := mcp.result_decision with mcp.result_rules as {"p": {"redact": {entry}}}
	d.action == "redact"
	d.redactions == [{
		"rule": "r.key",
		"pattern": "AKIA[A-Z0-9]{16}",
		"replacement": "[REDACTED]",
		"block_if_found": true,
		"block_reason": "a key",
	}]

	# Without a block_reason: one generated; block_if_found false: a plain redaction.
	plain := object.union(_res_pattern("r.key", "AKIA[A-Z0-9]{16}"), {"block_if_found": false})
	bare := object.union(_res_pattern("r.key", "AKIA[A-Z0-9]{16}"), {"block_if_found": true})
	[r | some r in mcp.result_decision.redactions] == [{
		"rule": "r.key",
		"pattern": "AKIA[A-Z0-9]{16}",
		"replacement": "[REDACTED]",
		"block_if_found": true,
		"block_reason": "block by rule r.key",
	}] with mcp.result_rules as {"p": {"redact": {bare}}}
	[r | some r in mcp.result_decision.redactions] == [{
		"rule": "r.key",
		"pattern": "AKIA[A-Z0-9]{16}",
		"replacement": "[REDACTED]",
	}] with mcp.result_rules as {"p": {"redact": {plain}}}
}

test_result_block_invalid_contribution_when_block_if_found_malformed if {
	every extra in [{"block_if_found": "yes"}, {"block_if_found": true, "block_reason": 7}] {
		entry := object.union(_res_pattern("r.key", "AKIA"), extra)
		d := mcp.result_decision with mcp.result_rules as {"p": {"redact": {entry}}}
		d.action == "block"
		d.rule == "result_decision.invalid_contribution"
	}
}

test_result_pass_when_only_pass if {
	d := mcp.result_decision with mcp.result_rules as _res_rules(["pass"])
	d == {
		"action": "pass",
		"rule": "p.one",
		"reason": "p.one passes",
		"redactions": [],
		"matched": ["p.one"],
		"shadow": [],
	}
}

# --- precedence: block > redact > pass ------------------------------------------------

test_result_precedence_when_levels_meet if {
	cases := [
		[["block", "redact"], "block", "b.one", ["b.one", "r.one"]],
		[["block", "pass"], "block", "b.one", ["b.one", "p.one"]],
		[["redact", "pass"], "redact", "r.one", ["p.one", "r.one"]],
		[["pass", "redact", "block"], "block", "b.one", ["b.one", "p.one", "r.one"]],
	]
	every case in cases {
		d := mcp.result_decision with mcp.result_rules as _res_rules(case[0])
		[d.action, d.rule, d.matched] == [case[1], case[2], case[3]]
	}
}

test_result_no_redactions_when_blocked if {
	d := mcp.result_decision with mcp.result_rules as _res_rules(["block", "redact"])
	d.action == "block"
	d.reason == "b.one blocks"
	d.redactions == []
}

test_result_redactions_only_when_redact_wins_over_pass if {
	d := mcp.result_decision with mcp.result_rules as _res_rules(["redact", "pass"])
	d.reason == "r.one redacts $..PatientName"
	d.redactions == [_res_redacted("r.one", "$..PatientName")]
}

# --- several contributions at one level -------------------------------------------------

test_result_rule_and_reason_in_rule_id_order_when_several_blocks if {
	rules := {
		"zeta": {"block": {_res_block("z.last")}},
		"alpha": {"block": {_res_block("b.second"), _res_block("a.first")}},
	}
	d := mcp.result_decision with mcp.result_rules as rules
	d.rule == "a.first"
	d.reason == "a.first blocks; b.second blocks; z.last blocks"
	d.matched == ["a.first", "b.second", "z.last"]
}

test_result_reason_once_when_a_rule_redacts_many_paths if {
	reason := "patient data is not for this caller"
	paths := ["$..PatientName", "$..PatientID", "$..PatientBirthDate"]
	entries := {{"rule": "phi.x", "path": p, "reason": reason} | some p in paths}
	d := mcp.result_decision with mcp.result_rules as {"p": {"redact": entries}}
	d.reason == reason
	d.redactions == [_res_redacted("phi.x", p) | some p in sort(paths)]
	d.matched == ["phi.x"]
}

test_result_reason_generated_when_winners_give_none if {
	rules := {"p": {
		"redact": {{"rule": "r.quiet", "path": "$.a"}, {"rule": "r.empty", "path": "$.b", "reason": ""}},
		"pass": {{"rule": "a.pass"}},
	}}
	d := mcp.result_decision with mcp.result_rules as rules
	d.action == "redact"
	d.rule == "r.empty"
	d.reason == "redact by rule r.empty"
	d2 := mcp.result_decision with mcp.result_rules as {"p": {"pass": {{"rule": "a.pass"}}}}
	d2.reason == "pass by rule a.pass"
}

test_result_redactions_sorted_by_rule_then_path_or_pattern if {
	rules := {
		"one": {"redact": {
			_res_path("z.rule", "$.a"),
			_res_pattern("a.rule", "[0-9]+"),
			_res_path("a.rule", "$..Z"),
			object.union(_res_path("m.rule", "$['a b']"), {"replacement": ""}),
		}},
		"two": {"redact": [_res_path("a.rule", "$..A"), _res_path("a.rule", "$..A")]},
	}
	d := mcp.result_decision with mcp.result_rules as rules
	d.redactions == [
		_res_redacted("a.rule", "$..A"),
		_res_redacted("a.rule", "$..Z"),
		{"rule": "a.rule", "pattern": "[0-9]+", "replacement": "[REDACTED]"},
		{"rule": "m.rule", "path": "$['a b']", "replacement": ""},
		_res_redacted("z.rule", "$.a"),
	]
	d.matched == ["a.rule", "m.rule", "z.rule"]
}

test_result_redactions_carry_only_their_fields_when_extra_fields if {
	entry := object.union(_res_path("r.x", "$.a"), {"note": "internal", "shadow": false})
	d := mcp.result_decision with mcp.result_rules as {"p": {"redact": {entry}}}
	d.redactions == [_res_redacted("r.x", "$.a")]
}

test_result_contributions_as_arrays_when_package_uses_arrays if {
	d := mcp.result_decision with mcp.result_rules as {"p": {"block": [_res_block("b.arr")]}}
	d.rule == "b.arr"
}

# --- paths: the JSONPath subset ------------------------------------------------------------

test_result_path_accepted_when_in_the_subset if {
	every path in [
		"$.a",
		"$..PatientName",
		"$.Patient.DICOM.PatientName",
		"$['Patient']['DICOM']",
		`$["a b"]['c\'d']["\u00e9\n"]`,
		`$['say "hi"']["it's"]`,
		"$..['Patient Name']",
		"$[0][-1][12]",
		"$[1234567890123456]",
		"$[*].x",
		"$.*",
		"$..*",
		"$..[0]",
		"$..[*]",
		"$.Series.*.Instances..PatientID",
		"$.é_x",
		"$._private",
		"$ .a [ 'b' ] ..c",
		"$.a\n",
	] {
		d := mcp.result_decision with mcp.result_rules as {"p": {"redact": {_res_path("r.x", path)}}}
		d.redactions == [_res_redacted("r.x", path)]
	}
}

test_result_path_refused_when_outside_the_subset if {
	every path in [
		"",
		"$", # the whole document: a path selects inside one
		"PatientName",
		"..PatientName",
		" $.a",
		"$.",
		"$..",
		"$...a",
		"$.a.",
		"$. a",
		"$.. a",
		"$.1a",
		"$.a-b",
		"$.a b",
		"$[a]",
		"$['a]",
		`$['a\q']`,
		`$["a\'"]`,
		"$['a' 'b']",
		"$[01]",
		"$[-0]",
		"$[12345678901234567]",
		"$[1:2]",
		"$[0,1]",
		"$['a','b']",
		"$[?(@.a)]",
		"$[?@.a == 1]",
		"$.a\u0000",
	] {
		d := mcp.result_decision with mcp.result_rules as {"p": {"redact": {_res_path("r.x", path)}}}
		d.action == "block"
		d.rule == "result_decision.invalid_contribution"
	}
}

# --- malformed contributions fail closed -----------------------------------------------------

_res_invalid(pkg, level) := sprintf(
	"result policy package mcp.result_rules.%s produced a malformed %s contribution",
	[pkg, level],
)

test_result_block_invalid_contribution_when_entry_malformed if {
	cases := [
		["block", {"rule": "b.x"}], # no reason
		["block", {"rule": "", "reason": "r"}], # empty id
		["block", {"rule": 7, "reason": "r"}],
		["block", {"rule": "b.x", "reason": 7}],
		["block", {"rule": "b.x", "reason": "r", "shadow": "yes"}],
		["block", "no"], # not an object
		["block", ["b.x", "r"]],
		["redact", {"rule": "r.x"}], # neither path nor pattern
		["redact", {"rule": "r.x", "reason": "r"}],
		["redact", {"rule": "r.x", "path": "$.a", "pattern": "a"}], # both
		["redact", {"rule": "r.x", "path": "$.a", "pattern": null}],
		["redact", {"rule": "r.x", "path": null, "pattern": "a"}],
		["redact", {"rule": "r.x", "path": 7}],
		["redact", {"rule": "r.x", "path": ["$.a"]}],
		["redact", {"rule": "r.x", "pattern": ""}],
		["redact", {"rule": "r.x", "pattern": "[0-9]*"}], # matches the empty string
		["redact", {"rule": "r.x", "pattern": "^"}],
		["redact", {"rule": "r.x", "pattern": "("}], # invalid RE2
		["redact", {"rule": "r.x", "pattern": `(?<=a)b`}], # lookbehind: not RE2
		["redact", {"rule": "r.x", "pattern": 7}],
		["redact", {"rule": "r.x", "path": "$.a", "replacement": 7}],
		["redact", {"rule": "r.x", "path": "$.a", "replacement": null}],
		["redact", {"rule": "r.x", "path": "$.a", "reason": false}],
		["redact", {"rule": "r.x", "path": "$.a", "shadow": "true"}],
		["redact", {"rule": "r.x", "path": "$.a", "shadow": 1}],
		["redact", {"rule": "", "path": "$.a"}],
		["redact", {"path": "$.a"}],
		["redact", 7],
		["pass", {"rule": 7}],
		["pass", {"rule": "a.x", "reason": 7}],
		["pass", {"rule": "a.x", "shadow": null}],
		["pass", true],
	]
	every case in cases {
		rules := {"broken": {case[0]: {case[1]}}, "fine": {"pass": {_res_pass("p.one")}}}
		d := mcp.result_decision with mcp.result_rules as rules
		d.action == "block"
		d.rule == "result_decision.invalid_contribution"
		d.reason == _res_invalid("broken", case[0])
		d.redactions == []
		d.matched == ["p.one", "result_decision.invalid_contribution"]
	}
}

test_result_block_invalid_contribution_when_malformed_entry_is_shadow if {
	entry := {"rule": "r.x", "path": "$.a", "pattern": "a", "shadow": true}
	d := mcp.result_decision with mcp.result_rules as {"trial": {"redact": {entry}}}
	d.action == "block"
	d.rule == "result_decision.invalid_contribution"
	d.shadow == []
}

test_result_block_invalid_contribution_when_set_rule_is_not_a_collection if {
	every level in ["block", "redact", "pass"] {
		every value in [true, "block", 7, null, {"a": 7}] {
			rules := {"broken": {level: value}, "fine": {"pass": {_res_pass("p.one")}}}
			d := mcp.result_decision with mcp.result_rules as rules
			d.action == "block"
			d.rule == "result_decision.invalid_contribution"
			d.reason == _res_invalid("broken", level)
		}
	}
}

test_result_reasons_name_each_broken_package if {
	rules := {"b1": {"redact": {{"rule": "r"}}}, "b2": {"pass": 7}}
	d := mcp.result_decision with mcp.result_rules as rules
	d.reason == concat("; ", [_res_invalid("b1", "redact"), _res_invalid("b2", "pass")])
}

# --- load errors of result rule packages -------------------------------------------------------

test_result_load_errors_prefixed_with_their_package if {
	errors := mcp.load_errors with mcp.result_rules as {"a": {"load_errors": {"x is wrong"}}, "b": {}}
		with mcp.rules as {}
	errors == {"mcp.result_rules.a: x is wrong"}
}

test_result_load_errors_beside_the_call_rules_ones if {
	errors := mcp.load_errors with mcp.result_rules as {"a": {"load_errors": ["x is wrong"]}}
		with mcp.rules as {"c": {"load_errors": {"y is wrong"}}}
	errors == {"mcp.result_rules.a: x is wrong", "mcp.rules.c: y is wrong"}
}
