# The contributions of the YAML rules (see catalog.rego): what each rule of the
# chain adds to the decision, and the denies for a missing rule, invalid
# policy data or an unusable cost argument.
package mcp.rules.catalog

import data.mcp.catalog

# What a rule's rate_limit contribution adds for the cost: nothing for an
# unweighted limit (the engine counts 1), {"cost": <argument>} for a weighted
# one, and undefined (no contribution) when the argument is unusable.
_cost_field(id) := {} if not id in _weighted

_cost_field(id) := {"cost": cost[id]} if id in _weighted

_reason(rule, origin) := rule.reason if {
	_has(rule, "reason")
} else := sprintf("%s %s (%s)", [_subject, _verbs[rule.action], origin])

_calls(1) := "1 call"

_calls(n) := sprintf("%d calls", [n]) if n != 1

_per_window(1) := "per second"

_per_window(w) := sprintf("per %v seconds", [w]) if w != 1

# How much a rule's limit allows: calls, or a total of the counted argument.
_allowance(id, max_calls) := sprintf("a total %q of %d", [_increment_from[id], max_calls]) if {
	id in _weighted
} else := _calls(max_calls)

_limit_reason(id, rule, lim) := rule.reason if {
	rule.action == "rate_limit"
	_has(rule, "reason")
} else := sprintf("at most %s %s %s", [
	_allowance(id, floor(lim.max)),
	_per_window(lim.window_seconds),
	_per_scope[lim.scope],
])

_ttl(rule) := {"ttl_seconds": rule.approval.ttl} if {
	_has(rule.approval, "ttl")
} else := {}

# What every contribution made for a rule adds: {"shadow": true} for a shadow
# rule, nothing otherwise (enforced).
default _shadow(_) := {}

_shadow(id) := {"shadow": true} if _entry[id].shadow

# Why no rule is enforced: none applies, or every rule of the chain is shadow.
_missing_reason := sprintf("%s has risk %s in the policy catalog, but risk_defaults has no rule for it", [
	_subject,
	_risk,
]) if {
	catalog.known
	count(chain) == 0
} else := sprintf("%s is not in the policy catalog, and the policy data has no default rule", [_subject]) if {
	count(chain) == 0
} else := sprintf("%s is not in the policy catalog, and the default rule is shadow (not enforced)", [_subject]) if {
	not catalog.known
} else := sprintf("%s has no enforced policy rule, only shadow ones: %s%s", [
	_subject,
	concat(", ", [c.where | some c in chain]),
	_no_risk_default,
])

_risk := _show(object.get(catalog.entry, "risk", null))

# For a catalogued tool (see _missing_reason).
default _no_risk_default := ""

_no_risk_default := sprintf("; risk_defaults has no rule for risk %s", [_risk]) if not _link[1]

# METADATA
# title: Deny contributions
# description: |
#   Each contributing rule whose action is deny (shadow when the rule is);
#   never shadow: catalog.invalid_rule for each problem in a contributing rule;
#   catalog.missing_rule when no rule is enforced (none applies, or all of the
#   chain is shadow); catalog.invalid_data when a part of the policy data has
#   the wrong type; catalog.rate_limit_cost_invalid when the argument counted
#   by a contributing rule's weighted rate limit is missing, not a number or
#   negative.
# scope: document
deny contains object.union({"rule": id, "reason": _reason(rule, origin)}, _shadow(id)) if {
	some id, rule in _rule
	id in _valid
	rule.action == "deny"
	origin := _entry[id].origin
}

deny contains {"rule": "catalog.rate_limit_cost_invalid", "reason": reason} if {
	some id in _valid
	id in _weighted
	not cost[id]
	reason := sprintf("%s: rate limit counts argument %q, which must be a number >= 0", [_subject, _increment_from[id]])
}

deny contains {"rule": "catalog.invalid_rule", "reason": reason} if {
	some [id, problem] in _problems
	reason := sprintf("invalid policy rule %s for %s: %s", [_entry[id].where, _subject, problem])
}

deny contains {"rule": "catalog.missing_rule", "reason": _missing_reason} if not applied

deny contains {
	"rule": "catalog.invalid_data",
	"reason": sprintf("policy data mcp_policy.%s must be %s, got %s", [key, want[1], type_name(value)]),
} if {
	some key, want in {"catalog": ["array", "a list"], "rules": ["object", "a map"], "risk_defaults": ["object", "a map"]}
	value := data.mcp_policy[key]
	type_name(value) != want[0]
}

# METADATA
# title: Require-approval contributions
# description: |
#   Each contributing rule whose action is require_approval (with ttl_seconds
#   from approval.ttl; shadow when the rule is).
# scope: document
require_approval contains object.union_n([
	{"rule": id, "reason": _reason(rule, origin)},
	_ttl(rule),
	_shadow(id),
]) if {
	some id, rule in _rule
	id in _valid
	rule.action == "require_approval"
	origin := _entry[id].origin
}

# METADATA
# title: Rate-limit contributions
# description: |
#   The limit of each contributing rule, whatever its (non-deny) action; max is
#   written as an integer (10.0 in YAML becomes 10). A weighted limit adds
#   "cost" (the counted argument); an unweighted one has no cost (counts 1).
#   None for a rule whose counted argument is unusable (that call is denied
#   instead, even when the rule is shadow). Shadow when the rule is.
# scope: document
rate_limit contains object.union_n([
	lim,
	{"rule": id, "max": floor(lim.max), "reason": _limit_reason(id, rule, lim)},
	_cost_field(id), # undefined for an unusable argument: no contribution
	_shadow(id),
]) if {
	some id, rule in _rule
	id in _valid
	lim := limit[id]
}

# METADATA
# title: Allow contributions
# description: Each contributing rule whose action is allow (shadow when the rule is).
# scope: document
allow contains object.union({"rule": id, "reason": _reason(rule, origin)}, _shadow(id)) if {
	some id, rule in _rule
	id in _valid
	rule.action == "allow"
	origin := _entry[id].origin
}
