# METADATA
# title: MCP tool-call decision
# description: |
#   Folds the contributions of every rule package directly under data.mcp.rules
#   (the shipped ones and any a user adds) into one decision for an MCP
#   tools/call. A rule package may define any of four partial sets:
#     deny              {"rule", "reason"}
#     require_approval  {"rule", "reason", "ttl_seconds"?, "by"?}
#                       (by: who may decide the approval, "approvers" (the
#                       default: four eyes) or "caller" (also the proven user
#                       behind the agent))
#     rate_limit        {"rule", "reason", "max", "window_seconds", "scope", "cost"?}
#                       (cost: a number >= 0 this call counts against the
#                       limit; the engine counts 1 when it is absent)
#     allow             {"rule", "reason"?}
#   A deny entry may carry "whole_tool": true when it holds for every call to the
#   tool on that server by that principal, whatever the arguments (the decision's
#   denies_tool; a proxy hides such a tool from tools/list).
#   Any entry may also carry "shadow": a boolean, false when absent. A shadow
#   entry (true) is tried, not enforced: it never changes the decision and is
#   listed in decision.shadow instead ("would deny", "would rate-limit", ...).
#   The most restrictive level with an enforced contribution wins:
#   deny > require_approval > rate_limit > allow. No enforced contribution at
#   all is a deny.
package mcp

import data.mcp.catalog

_levels := ["deny", "require_approval", "rate_limit", "allow"]

_rank := {"deny": 0, "require_approval": 1, "rate_limit": 2, "allow": 3}

_scopes := {"session", "agent", "user", "global"}

# Whether contribution c is well formed for the level of rank r, with a boolean
# "shadow" when it has one. Always defined: false for anything else (a
# contribution that is not an object too).
default _valid(_, _) := false

_valid(0, c) if {
	is_string(c.rule)
	c.rule != ""
	is_string(c.reason)
	is_boolean(object.get(c, "whole_tool", false))
	is_boolean(object.get(c, "shadow", false))
}

_valid(1, c) if {
	is_string(c.rule)
	c.rule != ""
	is_string(c.reason)
	ttl := object.get(c, "ttl_seconds", 1)
	is_number(ttl)
	ttl > 0
	object.get(c, "by", "approvers") in {"approvers", "caller"}
	is_boolean(object.get(c, "shadow", false))
}

_valid(2, c) if {
	is_string(c.rule)
	c.rule != ""
	is_string(c.reason)
	is_number(c.max)
	floor(c.max) == c.max
	c.max >= 1
	is_number(c.window_seconds)
	c.window_seconds > 0
	c.scope in _scopes
	cost := object.get(c, "cost", 1)
	is_number(cost)
	cost >= 0
	is_boolean(object.get(c, "shadow", false))
}

_valid(3, c) if {
	is_string(c.rule)
	c.rule != ""
	is_string(object.get(c, "reason", ""))
	is_boolean(object.get(c, "shadow", false))
}

# The contribution sets of every rule package directly under data.mcp.rules, as
# [level rank, package, set]. One body per level so that only those four rules
# of each package are evaluated.
_sets contains [0, name, value] if {
	some name
	value := data.mcp.rules[name].deny
}

_sets contains [1, name, value] if {
	some name
	value := data.mcp.rules[name].require_approval
}

_sets contains [2, name, value] if {
	some name
	value := data.mcp.rules[name].rate_limit
}

_sets contains [3, name, value] if {
	some name
	value := data.mcp.rules[name].allow
}

# Every entry of every contribution set, checked once:
# [level rank, package, entry, well formed].
_entries := [[s[0], s[1], entry, _valid(s[0], entry)] |
	some s in _sets
	some entry in s[2]
]

_invalid(name, r) := {
	"rule": "decision.invalid_contribution",
	"reason": sprintf("policy package mcp.rules.%s produced a malformed %s contribution", [name, _levels[r]]),
}

# METADATA
# title: Contributions
# description: |
#   {"level", "entry"} for every well-formed enforced (not shadow) contribution.
#   A malformed entry (shadow or not, including a "shadow" that is not a
#   boolean), or a contribution rule that is not a set, becomes an enforced
#   deny (decision.invalid_contribution): a broken policy never allows.
# scope: document
contributions contains {"level": _levels[x[0]], "entry": x[2]} if some x in _ranked

# METADATA
# title: Shadow contributions
# description: |
#   {"level", "entry"} for every well-formed contribution with "shadow": true.
#   They decide nothing; decision.shadow lists them.
# scope: document
shadow_contributions contains {"level": _levels[x[0]], "entry": x[2]} if {
	some x in _entries
	x[3]
	x[2].shadow == true
}

# Every enforced contribution as [level rank, rule id, entry], sorted: the most
# restrictive level first, then by rule id (ties in value order, which is
# deterministic). Malformed entries and sets become invalid-contribution denies.
_ranked := sort(_enforced | _broken)

_enforced contains [x[0], x[2].rule, x[2]] if {
	some x in _entries
	x[3]
	not x[2].shadow == true
}

_broken := {[0, "decision.invalid_contribution", _invalid(x[1], x[0])] |
	some x in _entries
	not x[3]
} | {[0, "decision.invalid_contribution", _invalid(s[1], s[0])] |
	some s in _sets
	not is_set(s[2])
	not is_array(s[2])
}

_unique(xs) := [x | some i, x in xs; not x in array.slice(xs, 0, i)]

# The rank of the winning level (only when something contributed).
_top := _ranked[0][0]

_winners := [x[2] | some x in _ranked; x[0] == _top]

_reason := _winners[0].reason if {
	count(_winners) == 1
	is_string(_winners[0].reason)
	_winners[0].reason != ""
} else := joined if {
	joined := concat("; ", _unique([c.reason | some c in _winners; is_string(c.reason); c.reason != ""]))
	joined != ""
} else := sprintf("%s by rule %s", [_levels[_top], _ranked[0][1]])

_limit_fields := ["rule", "max", "window_seconds", "scope", "reason", "cost"]

_rate_limits := [] if {
	_top == 0
} else := [object.filter(x[2], _limit_fields) | some x in _ranked; x[0] == 2]

# The call is denied by an enforced deny that holds whatever the arguments.
default _denies_tool := false

_denies_tool if {
	_top == 0
	some x in _ranked
	x[0] == 0
	x[2].whole_tool == true
}

default _approval := {}

_approval := {"approval": object.union_n([{"rule": _ranked[0][1], "reason": _reason}, _ttl, _by])} if _top == 1

_ttls := [c.ttl_seconds | some c in _winners; is_number(c.ttl_seconds)]

default _ttl := {}

_ttl := {"ttl_seconds": min(_ttls)} if count(_ttls) > 0

# The caller may decide only when every winning contribution lets it: one that
# leaves it to the approvers (the default) is the more restrictive.
default _by := {}

_by := {"by": "caller"} if {
	every c in _winners {
		c.by == "caller"
	}
}

# What decision.shadow shows of one shadow contribution: its level, rule and
# reason (generated like the decision's when the entry has none), and for a
# rate limit the limit itself.
_shadow_reason(level, c) := c.reason if {
	is_string(c.reason)
	c.reason != ""
} else := sprintf("%s by rule %s", [level, c.rule])

_shadow_limit("rate_limit", c) := object.filter(c, ["max", "window_seconds", "scope", "cost"])

_shadow_limit(level, _) := {} if level != "rate_limit"

_shadow_view(level, c) := object.union(
	_shadow_limit(level, c),
	{"level": level, "rule": c.rule, "reason": _shadow_reason(level, c)},
)

# Sorted by rule id, then level in precedence order (ties in value order).
default _shadow := []

_shadow := [x[2] |
	some x in sort({[c.entry.rule, _rank[c.level], _shadow_view(c.level, c.entry)] | some c in shadow_contributions})
] if {
	some x in _entries
	x[2].shadow == true
}

# METADATA
# title: Decision
# description: |
#   The answer for one MCP tools/call; always defined. Fields:
#     action       allow | deny | rate_limit | require_approval
#     rule         id of the first (sorted) contribution at the winning level,
#                  or default.no_match when nothing matched
#     reason       reasons of the winning level, in rule-id order, de-duplicated,
#                  joined by "; "
#     rate_limits  every rate_limit contribution sorted by rule id; [] on deny;
#                  each {rule, max, window_seconds, scope, reason, cost?}
#                  (cost only when the contribution gave one)
#     approval     only for require_approval: {rule, reason, ttl_seconds?, by?}
#                  (ttl_seconds is the smallest one given; by is "caller"
#                  when every winning contribution says so, else absent:
#                  the approvers decide)
#     matched      sorted ids of every enforced contribution that matched
#     shadow       every shadow contribution (tried, not enforced), sorted by
#                  rule id then level (deny, require_approval, rate_limit,
#                  allow); each {level, rule, reason} and, for a rate_limit,
#                  {max, window_seconds, scope, cost?}; [] when none. Listed
#                  whatever the action (also on deny).
#     denies_tool  true when an enforced deny that holds whatever the arguments
#                  ("whole_tool": true) decides: every call to this tool on this
#                  server by this principal is denied; else false
#     tool         {known, category?, risk?} from the catalog
# entrypoint: true
decision := object.union(
	{
		"action": _levels[_top],
		"rule": _ranked[0][1],
		"reason": _reason,
		"rate_limits": _rate_limits,
		"matched": sort({x[1] | some x in _ranked}),
		"shadow": _shadow,
		"denies_tool": _denies_tool,
		"tool": catalog.tool,
	},
	_approval,
) if {
	_top
} else := {
	"action": "deny",
	"rule": "default.no_match",
	"reason": "no policy rule matched this call",
	"rate_limits": [],
	"matched": [],
	"shadow": _shadow,
	"denies_tool": false,
	"tool": catalog.tool,
}

# METADATA
# title: Load errors
# description: |
#   Problems in the policy data that rule packages report, each prefixed with
#   its package: the union of the load_errors sets of every package directly
#   under data.mcp.rules. Evaluated once when a policy is loaded (no input);
#   a policy with any load error is rejected whole and the running one keeps
#   serving. Never part of a decision.
# scope: document
load_errors contains sprintf("mcp.rules.%s: %s", [name, msg]) if {
	some name
	errors := data.mcp.rules[name].load_errors
	some msg in errors
}
