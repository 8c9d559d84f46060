# METADATA
# title: Rules from the YAML policy data
# description: |
#   Turns the PolicyLayer-style policy data (data.mcp_policy: catalog, rules,
#   risk_defaults, default; see policies/*.yaml) into contributions for the
#   decision. The rule for a call is picked from a chain:
#     - rules[<tool>]               when the tool is in the catalog for this server
#                                   and has a rule  (id catalog.rule.<tool>)
#     - risk_defaults[<risk>]       when the tool is in the catalog and
#                                   risk_defaults has its risk class
#                                   (id catalog.risk_default.<risk>)
#     - default                     when the tool is not in the catalog
#                                   (id catalog.default)
#   (a catalogued tool's chain is rules[<tool>] then risk_defaults[<risk>]; an
#   uncatalogued tool's chain is default alone). The chain is walked in order:
#   each rule with shadow: true is tried, not enforced (every contribution made
#   for it, its action and its rate limit, carries "shadow": true) and the walk
#   goes on; the first rule that is not shadow is enforced and ends the walk.
#   Those rules (the shadow ones met first and the enforced one) contribute.
#   When the chain has no rule that is not shadow, the call is denied
#   (catalog.missing_rule), as when no rule applies at all (fail closed).
#
#   Roles: a rule with `roles: [<role>, ...]` is only for callers that have one
#   of those roles, proven (data.mcp.principal.roles: a verified credential, or
#   a principal asserted by an authenticated proxy or gateway; a caller that is
#   not identified has no roles that count). For any other caller the walk
#   passes over it as if it were not there (listed in `skipped`), and the next
#   rule of the chain decides; none left is catalog.missing_rule. So "only
#   imaging-admin may call it" is the tool's own rule {action: allow, roles:
#   [imaging-admin]} with a risk whose default denies (critical, as shipped).
#
#   Cost: per call, the chain's rules are read by key (never a whole section
#   of the policy data), so a call costs the same at any catalog size. The
#   policy data is checked once, when it is loaded: by
#   schema/mcp_policy.schema.json, then by load_errors below. A rule of the
#   chain this package cannot read anyway (data that skipped those checks) is
#   a catalog.invalid_rule deny and contributes nothing else.
#
#   A weighted rate limit (rate_limit {..., increment_from: <argument>}) costs
#   the value of that tool argument per call; a call whose argument is not a
#   number >= 0 is denied (catalog.rate_limit_cost_invalid), also for a shadow
#   rule. The denies reporting a problem (unusable or missing rule, invalid
#   cost) are never shadow.
# schemas:
#   - data.mcp_policy: schema["mcp_policy.schema"]
package mcp.rules.catalog

import data.mcp.catalog

_verbs := {
	"allow": "is allowed",
	"deny": "is denied",
	"rate_limit": "is rate limited",
	"require_approval": "requires human approval",
}

_per_scope := {
	"session": "per session",
	"agent": "per agent",
	"user": "per user",
	"global": "across all callers",
}

_where := ["rules[%q]", "risk_defaults[%q]", "default"]

_origin := ["policy rule for this tool", "default for %s-risk tools", "not in the policy catalog"]

default _subject := "the called tool"

_subject := sprintf("tool %q on server %q", [input.tool.name, input.tool.server])

# The links of the chain, each {"at", "id", "rule"}: at 0 the tool's own
# rule, at 1 its risk default (both only for a catalogued tool), at 2 the
# default (only for any other tool). A link is undefined when its rule is;
# roles do not change which links there are (see _not_for_caller).
_own := {"at": 0, "id": concat("", ["catalog.rule.", input.tool.name]), "rule": rule} if {
	catalog.known
	rule := data.mcp_policy.rules[input.tool.name]
}

_by_risk := {"at": 1, "id": concat("", ["catalog.risk_default.", catalog.entry.risk]), "rule": rule} if {
	catalog.known
	rule := data.mcp_policy.risk_defaults[catalog.entry.risk]
}

_fallback := {"at": 2, "id": "catalog.default", "rule": rule} if {
	not catalog.known
	rule := data.mcp_policy.default
}

# The links of the chain that exist, in chain order (at most two).
_links := array.concat(array.concat([_own | _own], [_by_risk | _by_risk]), [_fallback | _fallback])

# The walk stops before link i: an earlier link is for this caller and not shadow.
_stopped_before(i) if {
	some j, l in _links
	j < i
	not _not_for_caller(l.rule)
	not _is_shadow(l.rule)
}

# The links that contribute, in chain order: the walk passes over the rules
# not for this caller and stops at the first rule that is not shadow.
_reached := [l |
	some i, l in _links
	not _not_for_caller(l.rule)
	not _stopped_before(i)
]

# The links the walk passed over (not for this caller), in chain order.
_passed_over := [l |
	some i, l in _links
	_not_for_caller(l.rule)
	not _stopped_before(i)
]

# The reached links by id (the ids in a chain are distinct).
_entry[c.id] := c if some c in _reached

# A rule of the chain is enforced (not shadow).
_enforced if {
	some c in _reached
	not _is_shadow(c.rule)
}

_where_of(c) := sprintf(_where[c.at], [input.tool.name]) if c.at == 0

_where_of(c) := sprintf(_where[c.at], [catalog.entry.risk]) if c.at == 1

_where_of(c) := _where[c.at] if c.at == 2

_origin_of(c) := sprintf(_origin[c.at], [catalog.entry.risk]) if c.at == 1

_origin_of(c) := _origin[c.at] if c.at != 1

# METADATA
# title: The YAML rules of the chain that are not for this caller
# description: |
#   The rules the walk passed over because they name roles the caller does not
#   have, proven; each {"id", "where", "roles"}, in chain order. They contribute
#   nothing. Empty when there is none.
# scope: document
skipped := [{"id": c.id, "where": _where_of(c), "roles": c.rule.roles} | some c in _passed_over]

# METADATA
# title: The YAML rules that contribute to this call
# description: |
#   The rules of the chain up to and including the first one that is not
#   shadow, in chain order; each {"id", "where", "origin", "rule", "shadow"}:
#   the contribution id, where the rule sits in the policy data, a note for
#   generated reasons, the rule as written and whether it is shadow (tried,
#   not enforced). Empty when the chain is.
# scope: document
chain := [{
	"id": c.id,
	"where": _where_of(c),
	"origin": _origin_of(c),
	"rule": c.rule,
	"shadow": _is_shadow(c.rule),
} |
	some c in _reached
]

# METADATA
# title: The YAML rule enforced for this call
# description: |
#   The entry of chain that is not shadow (the last one). Undefined when every
#   rule of the chain is shadow or there is none (see catalog.missing_rule).
# scope: document
applied := c if {
	_enforced
	some c in chain
	not c.shadow
}

# METADATA
# title: Rate limits of the contributing rules
# description: |
#   By contribution id, the limit of each contributing rule that has one.
#   (Scope rule, not document: OPA 1.22's `opa build` cannot place a
#   document-scope annotation on a rule whose ref has a variable.)
# scope: rule
limit[c.id] := _limit_of(_as_rule(c.rule)) if some c in _reached

# The contributing rules this package can use, each read once, in chain
# order: [link, the rule as an object, its limit or null].
_usable_links := [[c, r[0], r[1]] |
	some c in _reached
	r := _read(c.rule)
]

# METADATA
# title: Contributing rules this package cannot use
# description: |
#   Ids of the rules of the chain this package cannot read. The load checks
#   reject such data; a policy that skipped them still never lets these rules
#   allow anything: each is a catalog.invalid_rule deny.
# scope: document
unusable := {c.id | some c in _reached} - {l[0].id | some l in _usable_links}

# METADATA
# title: Cost of this call under the weighted rate limits
# description: |
#   By contribution id: the value of the tool argument named by
#   rate_limit.increment_from, when it is a number >= 0. No entry when the
#   rule's limit is not weighted, or when the argument is missing, not a number
#   or negative (see catalog.rate_limit_cost_invalid). Scope rule, as limit's.
# scope: rule
cost[c.id] := value if {
	some [c, rule, _] in _usable_links
	name := _weight_of(rule)
	_is_name(name)
	value := input.tool.arguments[name]
	is_number(value)
	value >= 0
}

# What a contribution made for a rule adds to its fields: {"shadow": true} for
# a shadow rule, else nothing; for its limit also {"cost": <argument>} when
# weighted (undefined, no contribution, when that argument is unusable).
_extra(c) := {} if {
	not _is_shadow(c.rule)
} else := {"shadow": true}

_limit_extra(c, rule) := _extra(c) if {
	not _weight_of(rule)
} else := object.union(_extra(c), {"cost": cost[c.id]})

_reason(c, rule) := rule.reason if {
	_has(rule, "reason")
} else := sprintf("%s %s (%s)", [_subject, _verbs[rule.action], _origin_of(c)])

_calls(1) := "1 call"

_calls(n) := sprintf("%d calls", [n]) if n != 1

_per_window(1) := "per second"

_per_window(w) := sprintf("per %v seconds", [w]) if w != 1

# How much a rule's limit allows: calls, or a total of the counted argument.
_allowance(rule, max_calls) := sprintf("a total %q of %d", [_weight_of(rule), max_calls]) if {
	_weight_of(rule)
} else := _calls(max_calls)

_limit_reason(rule, lim) := rule.reason if {
	rule.action == "rate_limit"
	_has(rule, "reason")
} else := sprintf("at most %s %s %s", [
	_allowance(rule, floor(lim.max)),
	_per_window(lim.window_seconds),
	_per_scope[lim.scope],
])

_ttl(rule) := {"ttl_seconds": rule.approval.ttl} if {
	_has(rule.approval, "ttl")
} else := {}

_by(rule) := {"by": rule.approval.by} if {
	_has(rule.approval, "by")
} else := {}

# Why no rule is enforced: rules not for this caller, none applies, or every
# rule of the chain is shadow.
_missing_reason := sprintf("%s has no enforced policy rule for this caller: %s%s", [
	_subject,
	concat("; ", [_why_not(c) | some i, c in _links; not _stopped_before(i)]),
	_no_risk_default,
]) if {
	count(_passed_over) > 0
} else := sprintf("%s has risk %s in the policy catalog, but risk_defaults has no rule for it", [
	_subject,
	_risk,
]) if {
	catalog.known
	count(_reached) == 0
} else := sprintf("%s is not in the policy catalog, and the policy data has no default rule", [_subject]) if {
	count(_reached) == 0
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

_no_risk_default := sprintf("; risk_defaults has no rule for risk %s", [_risk]) if {
	catalog.known
	not _by_risk
}

# Why a link of the chain walked does not decide (when none does): it is not
# for this caller, or it is shadow.
_why_not(c) := sprintf("%s is only for the roles %s, proven", [_where_of(c), concat(", ", c.rule.roles)]) if {
	_not_for_caller(c.rule)
} else := sprintf("%s is shadow", [_where_of(c)])

# METADATA
# title: Deny contributions
# description: |
#   Each contributing rule whose action is deny (shadow when the rule is);
#   never shadow: catalog.invalid_rule for each contributing rule this package
#   cannot use; catalog.missing_rule when no rule is enforced (none applies,
#   or all of the chain is shadow); catalog.rate_limit_cost_invalid when the
#   argument counted by a contributing rule's weighted rate limit is missing,
#   not a number or negative. All but the last hold whatever the arguments
#   ("whole_tool": true: the tool is hidden from tools/list).
# scope: document
deny contains object.union({"rule": c.id, "reason": _reason(c, rule), "whole_tool": true}, _extra(c)) if {
	some [c, rule, _] in _usable_links
	rule.action == "deny"
}

deny contains {"rule": "catalog.rate_limit_cost_invalid", "reason": reason} if {
	some [c, rule, _] in _usable_links
	name := _weight_of(rule)
	not cost[c.id]
	reason := sprintf("%s: rate limit counts argument %q, which must be a number >= 0", [_subject, name])
}

deny contains {"rule": "catalog.invalid_rule", "reason": reason, "whole_tool": true} if {
	some c in _reached
	c.id in unusable
	problems := concat("; ", sort(_rule_problems(c.rule)))
	reason := sprintf("invalid policy rule %s for %s: %s", [_where_of(c), _subject, problems])
}

deny contains {"rule": "catalog.missing_rule", "reason": _missing_reason, "whole_tool": true} if not _enforced

# METADATA
# title: Require-approval contributions
# description: |
#   Each contributing rule whose action is require_approval (with ttl_seconds
#   from approval.ttl and by from approval.by; shadow when the rule is).
# scope: document
require_approval contains object.union_n([
	{"rule": c.id, "reason": _reason(c, rule)},
	_ttl(rule),
	_by(rule),
	_extra(c),
]) if {
	some [c, rule, _] in _usable_links
	rule.action == "require_approval"
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
rate_limit contains object.union(
	{
		"rule": c.id,
		"max": floor(lim.max),
		"window_seconds": lim.window_seconds,
		"scope": lim.scope,
		"reason": _limit_reason(rule, lim),
	},
	_limit_extra(c, rule), # undefined for an unusable argument: no contribution
) if {
	some [c, rule, lim] in _usable_links
	lim != null
	rule.action != "deny"
}

# METADATA
# title: Allow contributions
# description: Each contributing rule whose action is allow (shadow when the rule is).
# scope: document
allow contains object.union({"rule": c.id, "reason": _reason(c, rule)}, _extra(c)) if {
	some [c, rule, _] in _usable_links
	rule.action == "allow"
}

# Every rule in the policy data, with where it sits (load_errors only: this
# reads whole sections of the policy data).
_all_rules contains [sprintf("rules[%q]", [tool]), raw] if some tool, raw in data.mcp_policy.rules

_all_rules contains [sprintf("risk_defaults[%q]", [risk]), raw] if some risk, raw in data.mcp_policy.risk_defaults

_all_rules contains ["default", data.mcp_policy.default]

_sections := {
	"catalog": ["object", "a map of server to tool to entry"],
	"rules": ["object", "a map"],
	"risk_defaults": ["object", "a map"],
}

# METADATA
# title: Problems in the policy data, found at load
# description: |
#   One message per section of the policy data of the wrong type and per rule
#   this package could not use. Evaluated once when the policy is loaded,
#   never per call (see data.mcp.load_errors): a policy with load errors is
#   rejected whole.
# scope: document
load_errors contains sprintf("mcp_policy.%s: %s", [where, problem]) if {
	some [where, raw] in _all_rules
	some problem in _rule_problems(raw)
}

load_errors contains sprintf("mcp_policy.%s must be %s, got %s", [key, want[1], type_name(value)]) if {
	some key, want in _sections
	value := data.mcp_policy[key]
	type_name(value) != want[0]
}
