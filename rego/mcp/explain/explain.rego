# METADATA
# title: Why a call gets its decision
# description: |
#   What `mcp-policy explain` (and GET /v1/decisions/{id}/explain) shows for one
#   input document: the decision, every contribution of every rule package
#   directly under data.mcp.rules (what it is and what became of it), which one
#   won and why, the YAML chain walked for the tool, and the limits and approval
#   that apply. Read by people and tools; never part of a decision. The
#   decision itself is data.mcp.decision's: this package only reads it and the
#   contribution sets it folds (see rego/mcp/decision.rego).
package mcp.explain

import data.mcp.catalog

# METADATA
# title: Precedence of the levels
# description: |
#   The levels in the order data.mcp.decision ranks them, most restrictive
#   first (the test explain_test.rego checks that the winner named here is
#   always the decision's).
# scope: document
precedence := ["deny", "require_approval", "rate_limit", "allow"]

_rank[level] := i if some i, level in precedence

# Every entry of every contribution set, as [rank, package, entry] (any shape:
# what makes it well formed is the decision's to say).
_entries contains [0, name, entry] if {
	some name
	set := data.mcp.rules[name].deny
	some entry in set
}

_entries contains [1, name, entry] if {
	some name
	set := data.mcp.rules[name].require_approval
	some entry in set
}

_entries contains [2, name, entry] if {
	some name
	set := data.mcp.rules[name].rate_limit
	some entry in set
}

_entries contains [3, name, entry] if {
	some name
	set := data.mcp.rules[name].allow
	some entry in set
}

_decision := data.mcp.decision

_top := _rank[_decision.action]

default _rule_of(_) := null

_rule_of(entry) := entry.rule if is_string(entry.rule)

default _reason_of(_) := ""

_reason_of(entry) := entry.reason if is_string(entry.reason)

default _is_shadow(_) := false

_is_shadow(entry) if entry.shadow == true

# A shadow entry the decision d lists (well formed): tried, not enforced.
_listed_shadow(d, level, entry) if {
	_is_shadow(entry)
	some s in d.shadow
	s.level == level
	s.rule == entry.rule
}

# An enforced entry the decision d took (well formed: its id is matched).
_taken(d, entry) if {
	not _is_shadow(entry)
	_rule_of(entry) in d.matched
}

# What became of one contribution of level rank r under the decision d (its
# level's rank top), as [status, sentence].
_outcome(d, top, r, entry) := ["won", "the decision's rule (see winner)"] if {
	_taken(d, entry)
	r == top
	entry.rule == d.rule
} else := ["at the winning level", "at the winning level too: its reason is part of the decision's"] if {
	_taken(d, entry)
	r == top
} else := ["applies", "its rate limit is counted too (limits stack on any action but deny)"] if {
	_taken(d, entry)
	r == 2
	top > 0
} else := ["outranked", sprintf("outranked: %s beats %s", [d.action, precedence[r]])] if {
	_taken(d, entry)
} else := ["shadow", "shadow: tried, not enforced (listed in the decision's shadow)"] if {
	_listed_shadow(d, precedence[r], entry)
} else := ["malformed", _malformed]

_malformed := "malformed for its level: the decision counts it as a deny (decision.invalid_contribution)"

# METADATA
# title: Contributions
# description: |
#   Every entry of every contribution set, most restrictive level first, then
#   by package and entry; each {"package", "level", "rule", "reason", "shadow",
#   "status", "outcome", "entry"}: status won, "at the winning level",
#   applies (a rate limit counted beside the winner), outranked, shadow or
#   malformed; outcome says it in a sentence; entry is the contribution as the
#   package made it.
# scope: document
contributions := [{
	"package": sprintf("mcp.rules.%s", [x[1]]),
	"level": precedence[x[0]],
	"rule": _rule_of(x[2]),
	"reason": _reason_of(x[2]),
	"shadow": _is_shadow(x[2]),
	"status": o[0],
	"outcome": o[1],
	"entry": x[2],
} |
	some x in sort(_entries)
	o := _outcome(_decision, _top, x[0], x[2])
]

_enforced_at_top contains x if {
	some x in _entries
	x[0] == _top
	_taken(_decision, x[2])
}

_tie := "the only enforced contribution at that level" if {
	count(_enforced_at_top) == 1
} else := sprintf("of the %d enforced contributions at that level, %s comes first by rule id", [
	count(_enforced_at_top),
	_decision.rule,
])

_no_match := "no enforced contribution matched the call: nothing allows it, so it is denied (%s)"

_why := sprintf(_no_match, [_decision.rule]) if {
	count(_decision.matched) == 0
} else := sprintf("%s is the most restrictive level with an enforced contribution (%s); %s", [
	_decision.action,
	concat(" > ", precedence),
	_tie,
])

# METADATA
# title: The winner
# description: |
#   {"level", "rule", "why"}: the decision's action and rule, and why they won
#   (the precedence, and the tie-break by rule id).
# scope: document
winner := {"level": _decision.action, "rule": _decision.rule, "why": _why}

# -- the YAML chain -------------------------------------------------------------

default _chain := []

_chain := data.mcp.rules.catalog.chain

_walked[c.where] := c if some c in _chain

_tool_rule_at := sprintf("rules[%q]", [input.tool.name])

_risk_default_at := sprintf("risk_defaults[%q]", [catalog.entry.risk])

_has_tool_rule if data.mcp_policy.rules[input.tool.name]

_has_risk_default if data.mcp_policy.risk_defaults[catalog.entry.risk]

_has_default if data.mcp_policy.default

# What became of one step of the walk that applies to the tool and is written.
_step_status(at) := "enforced: ends the walk" if {
	_walked[at].shadow == false
} else := "shadow: tried, not enforced; the walk goes on" if {
	_walked[at]
} else := "not reached: the walk ended before it"

_not_catalogued := "skipped: the tool is not in the catalog"

_tool_step := {"step": "rule for the tool", "where": _tool_rule_at, "status": _step_status(_tool_rule_at)} if {
	catalog.known
	_has_tool_rule
} else := {"step": "rule for the tool", "where": _tool_rule_at, "status": "none written"} if {
	catalog.known
} else := {"step": "rule for the tool", "where": "rules", "status": _not_catalogued}

_risk_step := {
	"step": "default for its risk",
	"where": _risk_default_at,
	"status": _step_status(_risk_default_at),
} if {
	catalog.known
	_has_risk_default
} else := {"step": "default for its risk", "where": _risk_default_at, "status": "none written"} if {
	catalog.known
} else := {"step": "default for its risk", "where": "risk_defaults", "status": _not_catalogued}

default _default_step := {"step": "default", "where": "default", "status": "none written"}

_default_step := {"step": "default", "where": "default", "status": "skipped: the tool is in the catalog"} if {
	catalog.known
} else := {"step": "default", "where": "default", "status": _step_status("default")} if {
	_has_default
}

# METADATA
# title: The YAML chain walked for the tool
# description: |
#   walk: the three steps (rule for the tool, default for its risk, default),
#   each {"step", "where" in the policy data, "status"}; chain: the rules that
#   contributed, as data.mcp.rules.catalog.chain gives them (each with the rule
#   as written and whether it is shadow).
# scope: document
yaml_chain := {"tool": catalog.tool, "walk": [_tool_step, _risk_step, _default_step], "chain": _chain}

default _approval := null

_approval := _decision.approval

# METADATA
# title: The explanation
# description: |
#   Everything above for the input document, and the limits (the decision's
#   rate_limits: every one must pass) and the approval (null when none) that
#   would apply. Always defined.
# entrypoint: true
# scope: document
explanation := {
	"decision": _decision,
	"precedence": precedence,
	"contributions": contributions,
	"winner": winner,
	"yaml": yaml_chain,
	"limits": _decision.rate_limits,
	"approval": _approval,
}
