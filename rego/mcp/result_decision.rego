# The decision on the RESULT of an MCP tools/call (data.mcp.result_decision),
# beside the call decision of decision.rego in the same package (whose
# package annotation this file cannot repeat: what a result rule package may
# contribute is described in result_decision's METADATA below).
#
# The input is the call decision's input (tool, principal, request, context,
# built the same way from the same call) plus input.result (the
# CallToolResult as the tool answered it: content, structuredContent?,
# isError?, _meta?), input.result_info {size_bytes, max_bytes} and
# input.request.call_decision_id. The engine evaluates it for every allowed
# call's answer and applies it: pass forwards the result as is, redact
# forwards it rewritten, block forwards a refusal the agent reads
# (isError: true). Whatever cannot be evaluated or applied is blocked.
package mcp

_result_levels := ["block", "redact", "pass"]

# The JSONPath subset of result_decision's METADATA (below), as one RE2
# expression: RFC 9535's grammar for the forms the engine's parser
# (engine/policy/redaction.py) takes. A member name in shorthand is RFC 9535's
# member-name-shorthand; a quoted one takes RFC 9535's escapes; blanks may
# stand between segments and inside brackets, as RFC 9535 allows.
_jsonpath_name := `[A-Za-z_\x{80}-\x{10FFFF}][A-Za-z0-9_\x{80}-\x{10FFFF}]*`

_jsonpath_blank := `[ \t\n\r]*`

_jsonpath_selector := concat("|", [
	`'(?:[^'\\\x00-\x1f]|\\[bfnrt/\\']|\\u[0-9A-Fa-f]{4})*'`,
	`"(?:[^"\\\x00-\x1f]|\\[bfnrt/\\"]|\\u[0-9A-Fa-f]{4})*"`,
	`0|-?[1-9][0-9]{0,15}`,
	`\*`,
])

_jsonpath_segment := concat("|", [
	sprintf(`\.\.?(?:%s|\*)`, [_jsonpath_name]),
	sprintf(`(?:\.\.)?\[%s(?:%s)%s\]`, [_jsonpath_blank, _jsonpath_selector, _jsonpath_blank]),
])

_jsonpath := sprintf(`^\$(?:%s(?:%s))+%s$`, [_jsonpath_blank, _jsonpath_segment, _jsonpath_blank])

# The contribution sets of every rule package directly under
# data.mcp.result_rules, as [level rank, package, set]. One body per level so
# that only those three rules of each package are evaluated.
_result_sets contains [0, name, value] if {
	some name
	value := data.mcp.result_rules[name].block
}

_result_sets contains [1, name, value] if {
	some name
	value := data.mcp.result_rules[name].redact
}

_result_sets contains [2, name, value] if {
	some name
	value := data.mcp.result_rules[name].pass
}

# Every entry of every contribution set: [level rank, package, entry].
_result_entries contains [r, name, entry] if {
	some [r, name, value] in _result_sets
	some entry in value
}

# The well-formed entries of _result_entries: for its level, an object with a
# non-empty rule id, the fields the level needs, the optional ones of the
# right type, and a boolean "shadow" when it has one. (The checks are written
# out per level, not called as functions: a result rule may contribute a
# redaction per attribute, dozens per result, and each call costs.)
_result_valid contains [0, name, c] if {
	some [0, name, c] in _result_entries
	is_string(c.rule)
	c.rule != ""
	is_string(c.reason)
	is_boolean(object.get(c, "shadow", false))
}

# A redaction by path: a JSONPath of the subset, and no pattern.
_result_valid contains [1, name, c] if {
	some [1, name, c] in _result_entries
	is_string(c.rule)
	c.rule != ""
	is_string(c.path)
	regex.match(_jsonpath, c.path)
	not "pattern" in object.keys(c)
	is_string(object.get(c, "replacement", ""))
	is_string(object.get(c, "reason", ""))
	is_boolean(object.get(c, "shadow", false))
}

# A redaction by pattern: a valid RE2 expression that does not match the empty
# string (it would replace nothing everywhere), and no path; "block_if_found"
# a boolean when given.
_result_valid contains [1, name, c] if {
	some [1, name, c] in _result_entries
	is_string(c.rule)
	c.rule != ""
	is_string(c.pattern)
	regex.is_valid(c.pattern)
	not regex.match(c.pattern, "")
	not "path" in object.keys(c)
	is_string(object.get(c, "replacement", ""))
	is_string(object.get(c, "reason", ""))
	is_boolean(object.get(c, "shadow", false))
	is_boolean(object.get(c, "block_if_found", false))
	is_string(object.get(c, "block_reason", ""))
}

_result_valid contains [2, name, c] if {
	some [2, name, c] in _result_entries
	is_string(c.rule)
	c.rule != ""
	is_string(object.get(c, "reason", ""))
	is_boolean(object.get(c, "shadow", false))
}

_result_invalid(name, r) := {
	"rule": "result_decision.invalid_contribution",
	"reason": sprintf(
		"result policy package mcp.result_rules.%s produced a malformed %s contribution",
		[name, _result_levels[r]],
	),
}

# Every enforced contribution as [level rank, rule id, entry]. Malformed
# entries and sets become invalid-contribution blocks: a broken result policy
# never passes a result. (A set, never sorted whole: the fields below sort
# only what they show, so dozens of redactions of one rule cost little.)
_result_enforced contains [r, c.rule, c] if {
	some [r, _, c] in _result_valid
	not c.shadow == true
}

_result_enforced contains [0, "result_decision.invalid_contribution", _result_invalid(name, r)] if {
	some x in _result_entries
	not x in _result_valid
	[r, name, _] := x
}

_result_enforced contains [0, "result_decision.invalid_contribution", _result_invalid(name, r)] if {
	some [r, name, value] in _result_sets
	not is_set(value)
	not is_array(value)
}

# The rank of the winning level (only when something contributed): the most
# restrictive one.
_result_top := min({r | some [r, _, _] in _result_enforced})

# The ids of the winning level's contributions.
_result_winning_ids contains id if {
	some [r, id, _] in _result_enforced
	r == _result_top
}

# Their reasons in rule-id order (then in value order), de-duplicated.
_result_reasons := _unique([x[1] |
	some x in sort({[id, c.reason] |
		some [r, id, c] in _result_enforced
		r == _result_top
		is_string(c.reason)
		c.reason != ""
	})
])

_result_reason := concat("; ", _result_reasons) if {
	count(_result_reasons) > 0
} else := sprintf("%s by rule %s", [_result_levels[_result_top], min(_result_winning_ids)])

# What the engine applies for each enforced redact contribution: its rule, its
# path or pattern, and the replacement, filled in. As [rule id, path or
# pattern, redaction] to sort by; the same redaction from several
# contributions once.
_redaction_keys contains [c.rule, c.path, {
	"rule": c.rule,
	"path": c.path,
	"replacement": object.get(c, "replacement", "[REDACTED]"),
}] if {
	some [1, _, c] in _result_enforced
	is_string(c.path)
}

_redaction_keys contains [c.rule, c.pattern, object.union(
	{
		"rule": c.rule,
		"pattern": c.pattern,
		"replacement": object.get(c, "replacement", "[REDACTED]"),
	},
	_block_if_found(c),
)] if {
	some [1, _, c] in _result_enforced
	is_string(c.pattern)
}

# A pattern redaction that blocks the whole result when it finds anything
# carries that, and the reason the block gives (its block_reason).
_block_if_found(c) := {"block_if_found": true, "block_reason": _block_reason(c)} if c.block_if_found == true

_block_if_found(c) := {} if not c.block_if_found == true

_block_reason(c) := c.block_reason if {
	is_string(c.block_reason)
	c.block_reason != ""
} else := sprintf("block by rule %s", [c.rule])

# Sorted by rule id, then path or pattern (ties in value order).
default _redactions := []

_redactions := [r[2] | some r in sort(_redaction_keys)] if _result_top == 1

# What result_decision.shadow shows of one shadow contribution: its level,
# rule and reason (generated like the decision's when the entry has none).
_result_shadow_view(level, c) := {"level": level, "rule": c.rule, "reason": c.reason} if {
	is_string(c.reason)
	c.reason != ""
} else := {"level": level, "rule": c.rule, "reason": sprintf("%s by rule %s", [level, c.rule])}

# [level rank, rule id, {"level", "rule", "reason"}] for every well-formed
# result contribution with "shadow": true. They decide nothing;
# result_decision.shadow lists them.
_result_shadowed contains [r, c.rule, _result_shadow_view(level, c)] if {
	some [r, _, c] in _result_valid
	c.shadow == true
	level := _result_levels[r]
}

# Sorted by rule id, then level in precedence order (ties in value order).
_result_shadow := [s[2] | some s in sort({[x[1], x[0], x[2]] | some x in _result_shadowed})]

# METADATA
# title: Result decision
# description: |
#   Folds the contributions of every rule package directly under
#   data.mcp.result_rules (the shipped ones and any a user adds) into one
#   decision for the result of an allowed MCP tools/call. A result rule
#   package may define any of three partial sets:
#     block   {"rule", "reason"}
#     redact  {"rule", "path" | "pattern", "replacement"?, "reason"?}
#             exactly one of path (a JSONPath, below) and pattern (an RE2
#             regular expression, what regex.* takes, that does not match
#             the empty string);
#             replacement: the text put in place of what is redacted
#             ("[REDACTED]" when absent);
#             block_if_found (a pattern's, boolean, false when absent): true
#             blocks the whole result, with block_reason (a string), when
#             the engine finds the pattern where Rego does not see it (inside
#             a document it decodes: JSON in a string, base64, gzip)
#     pass    {"rule", "reason"?}
#   Any entry may also carry "shadow": a boolean, false when absent. A shadow
#   entry (true) is tried, not enforced: it never changes the decision and is
#   listed in shadow instead. A malformed entry (shadow or not, including a
#   "shadow" that is not a boolean), or a contribution rule that is not a set
#   (or an array), is an enforced block, result_decision.invalid_contribution:
#   a broken result policy never passes a result. The most restrictive level
#   with an enforced contribution wins: block > redact > pass. No enforced
#   contribution at all is a pass (default.pass): the call policy allowed
#   the call this is the answer of.
#
#   Paths: the JSONPath subset (RFC 9535 syntax) the engine applies. "$" (the
#   root), then one or more segments: .name, ['name'] or ["name"], [n]
#   (negative from the end), [*], .*, and recursive descent ..name,
#   ..['name'], ..[n], ..[*], ..*; no filters, slices or selector lists (and
#   not "$" alone: a path selects inside a document). The engine applies each path at
#   the root of every JSON document in the result (structuredContent, JSON
#   text content, JSON embedded in strings, also as base64 and base64 of
#   gzip), so a rule says what to redact, not where the result carries it,
#   and Rego never walks the result. A pattern replaces its matches in every
#   string of the result.
#
#   The answer; always defined. Fields:
#     action      pass | redact | block
#     rule        id of the first (sorted) contribution at the winning level,
#                 or default.pass when nothing enforced matched
#     reason      reasons of the winning level, in rule-id order,
#                 de-duplicated, joined by "; " (on block: what the agent
#                 reads instead of the result)
#     redactions  on redact: every enforced redact contribution, sorted by
#                 rule id then path or pattern, each {rule, path, replacement}
#                 or {rule, pattern, replacement} (+ block_if_found: true
#                 and block_reason when the contribution says so); [] otherwise
#     matched     sorted ids of every enforced contribution that matched
#     shadow      every shadow contribution (tried, not enforced), sorted by
#                 rule id then level (block, redact, pass); each
#                 {level, rule, reason}; [] when none. Listed whatever the
#                 action.
# entrypoint: true
result_decision := {
	"action": _result_levels[_result_top],
	"rule": min(_result_winning_ids),
	"reason": _result_reason,
	"redactions": _redactions,
	"matched": sort({id | some [_, id, _] in _result_enforced}),
	"shadow": _result_shadow,
} if {
	_result_top
} else := {
	"action": "pass",
	"rule": "default.pass",
	"reason": "no result policy rule matched this result",
	"redactions": [],
	"matched": [],
	"shadow": _result_shadow,
}

# METADATA
# title: Load errors of the result rule packages
# description: |
#   The union of the load_errors sets of every package directly under
#   data.mcp.result_rules, each prefixed with its package; part of
#   data.mcp.load_errors (see decision.rego), checked when a policy is loaded.
# scope: rule
load_errors contains sprintf("mcp.result_rules.%s: %s", [name, msg]) if {
	some name
	errors := data.mcp.result_rules[name].load_errors
	some msg in errors
}
