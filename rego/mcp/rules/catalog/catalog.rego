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
#   Every contributing rule, shadow or not, is checked: a problem in it yields
#   a deny (catalog.invalid_rule) whose reason names the tool, the rule and what
#   is wrong, and the rule contributes nothing else. A weighted rate limit
#   (rate_limit {..., increment_from: <argument>}) costs the value of that tool
#   argument per call; a call whose argument is not a number >= 0 is denied
#   (catalog.rate_limit_cost_invalid), also for a shadow rule. The denies
#   reporting a problem (invalid or missing rule, invalid data, invalid cost)
#   are never shadow. This file finds the chain and checks its rules;
#   contributions.rego makes the contributions (it depends on this file, never
#   the other way: the service loads modules one by one).
package mcp.rules.catalog

import data.mcp.catalog

_actions := {"allow", "deny", "rate_limit", "require_approval"}

_scopes := {"session", "agent", "user", "global"}

_rule_keys := {"action", "reason", "rate_limit", "approval", "shadow"}

_limit_keys := {"max", "window", "scope", "increment_from"}

_approval_keys := {"ttl"}

_unit_seconds := {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

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

default _rules := {}

_rules := data.mcp_policy.rules if is_object(data.mcp_policy.rules)

default _risk_defaults := {}

_risk_defaults := data.mcp_policy.risk_defaults if is_object(data.mcp_policy.risk_defaults)

default _subject := "the called tool"

_subject := sprintf("tool %q on server %q", [input.tool.name, input.tool.server])

# The chain of rules for this call, in order, each {"id", "where", "origin",
# "rule"}: rules[<tool>] (0) then risk_defaults[<risk>] (1) for a catalogued
# tool, default (2) for any other; a link is absent when its rule is.
_link[0] := {
	"id": sprintf("catalog.rule.%s", [input.tool.name]),
	"where": sprintf("rules[%q]", [input.tool.name]),
	"origin": "policy rule for this tool",
	"rule": _rules[input.tool.name],
} if {
	catalog.known
	input.tool.name in object.keys(_rules)
}

_link[1] := {
	"id": sprintf("catalog.risk_default.%s", [catalog.entry.risk]),
	"where": sprintf("risk_defaults[%q]", [catalog.entry.risk]),
	"origin": sprintf("default for %s-risk tools", [catalog.entry.risk]),
	"rule": _risk_defaults[catalog.entry.risk],
} if {
	catalog.known
	catalog.entry.risk in object.keys(_risk_defaults)
}

_link[2] := {
	"id": "catalog.default",
	"where": "default",
	"origin": "not in the policy catalog",
	"rule": data.mcp_policy.default,
} if {
	not catalog.known
	"default" in object.keys(data.mcp_policy)
}

_candidates := [_link[i] | some i in sort(object.keys(_link))]

# A rule written with shadow: true (a bare action name never is).
default _is_shadow(_) := false

_is_shadow(rule) if rule.shadow == true

# Every rule of the chain before position i is shadow.
_reached(i) if {
	every c in array.slice(_candidates, 0, i) {
		_is_shadow(c.rule)
	}
}

# METADATA
# title: The YAML rules that contribute to this call
# description: |
#   The rules of the chain up to and including the first one that is not
#   shadow, in chain order; each {"id", "where", "origin", "rule", "shadow"}:
#   the contribution id, where the rule sits in the policy data, a note for
#   generated reasons, the rule as written and whether it is shadow (tried,
#   not enforced). Empty when the chain is.
# scope: document
chain := [object.union(c, {"shadow": _is_shadow(c.rule)}) |
	some i, c in _candidates
	_reached(i)
]

# METADATA
# title: The YAML rule enforced for this call
# description: |
#   The entry of chain that is not shadow (the last one). Undefined when every
#   rule of the chain is shadow or there is none (see catalog.missing_rule).
# scope: document
applied := c if {
	some c in chain
	not c.shadow
}

# The chain entries by id (the ids in a chain are distinct).
_entry[c.id] := c if some c in chain

# Each contributing rule as an object, by id: a bare action name is shorthand
# for {action: <name>}. Absent for a rule that is neither (catalog.invalid_rule).
_rule[c.id] := c.rule if {
	some c in chain
	is_object(c.rule)
}

_rule[c.id] := {"action": c.rule} if {
	some c in chain
	is_string(c.rule)
}

_has(obj, key) if key in object.keys(obj)

_show(value) := json.marshal(value)

# An integer >= 1 (10 and 10.0 both count).
_is_count(x) if {
	is_number(x)
	floor(x) == x
	x >= 1
}

_is_positive(x) if {
	is_number(x)
	x > 0
}

_is_name(x) if {
	is_string(x)
	x != ""
}

# METADATA
# title: Rate limits of the contributing rules
# description: |
#   By contribution id: {"max", "window_seconds", "scope"} from either form of
#   rate_limit: {max: 10, window: 60, scope: session} or "10/minute" (scope
#   session). No entry for a rule without rate_limit or with a malformed string.
# scope: document
limit[id] := {
	"max": object.get(rule.rate_limit, "max", null),
	"window_seconds": object.get(rule.rate_limit, "window", null),
	"scope": object.get(rule.rate_limit, "scope", "session"),
} if {
	some id, rule in _rule
	is_object(rule.rate_limit)
}

limit[id] := {
	"max": to_number(parts[1]),
	"window_seconds": _unit_seconds[parts[2]],
	"scope": "session",
} if {
	some id, rule in _rule
	is_string(rule.rate_limit)
	some parts in regex.find_all_string_submatch_n(
		`^\s*([0-9]+)\s*/\s*(second|minute|hour|day)s?\s*$`,
		rule.rate_limit, 1,
	)
}

# Ids of the rules whose limit is weighted: the object form of rate_limit has
# increment_from (the string form never has). _increment_from is the value as
# written.
_weighted contains id if {
	some id, rule in _rule
	is_object(rule.rate_limit)
	_has(rule.rate_limit, "increment_from")
}

_increment_from[id] := _rule[id].rate_limit.increment_from if some id in _weighted

# METADATA
# title: Cost of this call under the weighted rate limits
# description: |
#   By contribution id: the value of the tool argument named by
#   rate_limit.increment_from, when it is a number >= 0. No entry when the
#   rule's limit is not weighted, or when the argument is missing, not a number
#   or negative (see catalog.rate_limit_cost_invalid).
# scope: document
cost[id] := value if {
	some id, name in _increment_from
	_is_name(name)
	value := input.tool.arguments[name]
	is_number(value)
	value >= 0
}

# [id, message] per problem found in a contributing rule. Any problem turns the
# rule into catalog.invalid_rule denies.
_problems contains [c.id, "must be an object with an action, or just an action name"] if {
	some c in chain
	not is_object(c.rule)
	not is_string(c.rule)
}

_problems contains [id, msg] if {
	some id, rule in _rule
	keys := sort(object.keys(rule) - _rule_keys)
	count(keys) > 0
	msg := sprintf("unknown key(s) %s; allowed: action, reason, rate_limit, approval, shadow", [concat(", ", keys)])
}

_problems contains [id, "has no action"] if {
	some id, rule in _rule
	not _has(rule, "action")
}

_problems contains [id, msg] if {
	some id, rule in _rule
	not rule.action in _actions
	msg := sprintf("unknown action %s; use one of allow, deny, rate_limit, require_approval", [_show(rule.action)])
}

_problems contains [id, msg] if {
	some id, rule in _rule
	not is_string(rule.reason)
	msg := sprintf("reason must be a string, got %s", [_show(rule.reason)])
}

_problems contains [id, msg] if {
	some id, rule in _rule
	not is_boolean(rule.shadow)
	msg := sprintf("shadow must be true or false, got %s", [_show(rule.shadow)])
}

_problems contains [id, "action rate_limit needs a rate_limit, e.g. {max: 10, window: 60}"] if {
	some id, rule in _rule
	rule.action == "rate_limit"
	not _has(rule, "rate_limit")
}

_problems contains [id, "rate_limit cannot be combined with action deny"] if {
	some id, rule in _rule
	rule.action == "deny"
	_has(rule, "rate_limit")
}

_problems contains [id, "approval is only valid with action require_approval"] if {
	some id, rule in _rule
	_has(rule, "approval")
	rule.action != "require_approval"
}

_problems contains [id, msg] if {
	some id, rule in _rule
	not is_object(rule.rate_limit)
	not is_string(rule.rate_limit)
	msg := sprintf(
		"rate_limit must be an object {max, window, scope} or a string like \"10/minute\", got %s",
		[_show(rule.rate_limit)],
	)
}

_problems contains [id, msg] if {
	some id, rule in _rule
	is_string(rule.rate_limit)
	not limit[id]
	msg := sprintf(
		"rate_limit %q is malformed; write <max>/<unit> with unit second, minute, hour or day, e.g. \"10/minute\"",
		[rule.rate_limit],
	)
}

_problems contains [id, msg] if {
	some id, rule in _rule
	keys := sort(object.keys(rule.rate_limit) - _limit_keys)
	count(keys) > 0
	msg := sprintf("rate_limit has unknown key(s) %s; allowed: max, window, scope, increment_from", [concat(", ", keys)])
}

_problems contains [id, msg] if {
	some id, name in _increment_from
	not _is_name(name)
	msg := sprintf(
		"rate_limit increment_from must be the name of a tool argument (a non-empty string), got %s",
		[_show(name)],
	)
}

_problems contains [id, msg] if {
	some id, lim in limit
	not _is_count(lim.max)
	msg := sprintf("rate_limit max must be an integer >= 1, got %s", [_show(lim.max)])
}

_problems contains [id, msg] if {
	some id, lim in limit
	not _is_positive(lim.window_seconds)
	msg := sprintf("rate_limit window must be a number of seconds > 0, got %s", [_show(lim.window_seconds)])
}

_problems contains [id, msg] if {
	some id, lim in limit
	not lim.scope in _scopes
	msg := sprintf("rate_limit scope must be one of session, agent, user, global, got %s", [_show(lim.scope)])
}

_problems contains [id, msg] if {
	some id, rule in _rule
	not is_object(rule.approval)
	msg := sprintf("approval must be an object like {ttl: 900}, got %s", [_show(rule.approval)])
}

_problems contains [id, msg] if {
	some id, rule in _rule
	keys := sort(object.keys(rule.approval) - _approval_keys)
	count(keys) > 0
	msg := sprintf("approval has unknown key(s) %s; allowed: ttl", [concat(", ", keys)])
}

_problems contains [id, msg] if {
	some id, rule in _rule
	not _is_positive(rule.approval.ttl)
	msg := sprintf("approval ttl must be a number of seconds > 0, got %s", [_show(rule.approval.ttl)])
}

# METADATA
# title: Problems with the contributing rules
# description: |
#   One message per problem found in the contributing rules (shadow or not).
#   Any problem turns its rule into a catalog.invalid_rule deny, whose reason
#   also says which rule it is.
# scope: document
errors contains msg if some [_, msg] in _problems

_broken contains id if some [id, _] in _problems

# Ids of the contributing rules without a problem: only these contribute their
# action and limit.
_valid contains id if {
	some id, _ in _rule
	not id in _broken
}
