# METADATA
# title: Rules from the YAML policy data
# description: |
#   Turns the PolicyLayer-style policy data (data.mcp_policy: catalog, rules,
#   risk_defaults, default; see policies/*.yaml) into contributions for the
#   decision. Exactly one YAML rule applies to a call:
#     - rules[<tool>]               when the tool is in the catalog for this server
#                                   and has a rule  (id catalog.rule.<tool>)
#     - risk_defaults[<risk>]       when the tool is in the catalog without a rule
#                                   (id catalog.risk_default.<risk>)
#     - default                     when the tool is not in the catalog
#                                   (id catalog.default)
#   A rule that is missing or invalid yields a deny (fail closed) whose reason
#   names the tool and what is wrong. A weighted rate limit (rate_limit
#   {..., increment_from: <argument>}) costs the value of that tool argument per
#   call; a call whose argument is not a number >= 0 is denied
#   (catalog.rate_limit_cost_invalid). A rule with shadow: true is tried, not
#   enforced: every contribution made for it (its action and its rate limit)
#   carries "shadow": true. The denies reporting a problem (invalid or missing
#   rule, invalid data, invalid cost) are never shadow.
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

# METADATA
# title: The YAML rule that applies to this call
# description: |
#   {"id", "where", "origin", "rule"}: the contribution id, where the rule sits in
#   the policy data, a note for generated reasons and the rule as written.
#   Undefined when no rule applies (see catalog.missing_rule).
# scope: document
applied := {
	"id": sprintf("catalog.rule.%s", [input.tool.name]),
	"where": sprintf("rules[%q]", [input.tool.name]),
	"origin": "policy rule for this tool",
	"rule": _rules[input.tool.name],
} if {
	catalog.known
	input.tool.name in object.keys(_rules)
} else := {
	"id": sprintf("catalog.risk_default.%s", [catalog.entry.risk]),
	"where": sprintf("risk_defaults[%q]", [catalog.entry.risk]),
	"origin": sprintf("default for %s-risk tools", [catalog.entry.risk]),
	"rule": _risk_defaults[catalog.entry.risk],
} if {
	catalog.known
	catalog.entry.risk in object.keys(_risk_defaults)
} else := {
	"id": "catalog.default",
	"where": "default",
	"origin": "not in the policy catalog",
	"rule": data.mcp_policy.default,
} if {
	not catalog.known
	"default" in object.keys(data.mcp_policy)
}

# The applied rule as an object: a bare action name is shorthand for {action: <name>}.
_rule := applied.rule if is_object(applied.rule)

_rule := {"action": applied.rule} if is_string(applied.rule)

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
# title: Rate limit of the applied rule
# description: |
#   {"max", "window_seconds", "scope"} from either form of rate_limit:
#   {max: 10, window: 60, scope: session} or "10/minute" (scope session).
#   Undefined when the rule has no rate_limit or a malformed string.
# scope: document
limit := {
	"max": object.get(_rule.rate_limit, "max", null),
	"window_seconds": object.get(_rule.rate_limit, "window", null),
	"scope": object.get(_rule.rate_limit, "scope", "session"),
} if {
	is_object(_rule.rate_limit)
}

limit := {
	"max": to_number(parts[1]),
	"window_seconds": _unit_seconds[parts[2]],
	"scope": "session",
} if {
	is_string(_rule.rate_limit)
	some parts in regex.find_all_string_submatch_n(
		`^\s*([0-9]+)\s*/\s*(second|minute|hour|day)s?\s*$`,
		_rule.rate_limit, 1,
	)
}

# The limit is weighted: the object form of rate_limit has increment_from (the
# string form never has). _increment_from is the value as written.
_weighted if {
	is_object(_rule.rate_limit)
	_has(_rule.rate_limit, "increment_from")
}

_increment_from := _rule.rate_limit.increment_from if _weighted

# METADATA
# title: Cost of this call under a weighted rate limit
# description: |
#   The value of the tool argument named by rate_limit.increment_from, when it
#   is a number >= 0. Undefined when the limit is not weighted, or when the
#   argument is missing, not a number or negative (see
#   catalog.rate_limit_cost_invalid).
# scope: document
cost := value if {
	_is_name(_increment_from)
	value := input.tool.arguments[_increment_from]
	is_number(value)
	value >= 0
}

# What the rate_limit contribution adds for the cost: nothing for an unweighted
# limit (the engine counts 1), {"cost": <argument>} for a weighted one, and
# undefined (no contribution) when the argument is unusable.
_cost_field := {} if not _weighted

_cost_field := {"cost": cost} if _weighted

# METADATA
# title: Problems with the applied rule
# description: |
#   One message per problem found in the applied rule. Any problem turns the
#   rule into a catalog.invalid_rule deny.
# scope: document
errors contains "must be an object with an action, or just an action name" if {
	rule := applied.rule
	not is_object(rule)
	not is_string(rule)
}

errors contains msg if {
	keys := sort(object.keys(_rule) - _rule_keys)
	count(keys) > 0
	msg := sprintf("unknown key(s) %s; allowed: action, reason, rate_limit, approval, shadow", [concat(", ", keys)])
}

errors contains "has no action" if {
	is_object(_rule)
	not _has(_rule, "action")
}

errors contains msg if {
	action := _rule.action
	not action in _actions
	msg := sprintf("unknown action %s; use one of allow, deny, rate_limit, require_approval", [_show(action)])
}

errors contains msg if {
	reason := _rule.reason
	not is_string(reason)
	msg := sprintf("reason must be a string, got %s", [_show(reason)])
}

errors contains msg if {
	shadow := _rule.shadow
	not is_boolean(shadow)
	msg := sprintf("shadow must be true or false, got %s", [_show(shadow)])
}

errors contains "action rate_limit needs a rate_limit, e.g. {max: 10, window: 60}" if {
	_rule.action == "rate_limit"
	not _has(_rule, "rate_limit")
}

errors contains "rate_limit cannot be combined with action deny" if {
	_rule.action == "deny"
	_has(_rule, "rate_limit")
}

errors contains "approval is only valid with action require_approval" if {
	_has(_rule, "approval")
	_rule.action != "require_approval"
}

errors contains msg if {
	rate_limit := _rule.rate_limit
	not is_object(rate_limit)
	not is_string(rate_limit)
	msg := sprintf(
		"rate_limit must be an object {max, window, scope} or a string like \"10/minute\", got %s",
		[_show(rate_limit)],
	)
}

errors contains msg if {
	rate_limit := _rule.rate_limit
	is_string(rate_limit)
	not limit
	msg := sprintf(
		"rate_limit %q is malformed; write <max>/<unit> with unit second, minute, hour or day, e.g. \"10/minute\"",
		[rate_limit],
	)
}

errors contains msg if {
	keys := sort(object.keys(_rule.rate_limit) - _limit_keys)
	count(keys) > 0
	msg := sprintf("rate_limit has unknown key(s) %s; allowed: max, window, scope, increment_from", [concat(", ", keys)])
}

errors contains msg if {
	_weighted
	not _is_name(_increment_from)
	msg := sprintf(
		"rate_limit increment_from must be the name of a tool argument (a non-empty string), got %s",
		[_show(_increment_from)],
	)
}

errors contains msg if {
	max_calls := limit.max
	not _is_count(max_calls)
	msg := sprintf("rate_limit max must be an integer >= 1, got %s", [_show(max_calls)])
}

errors contains msg if {
	window := limit.window_seconds
	not _is_positive(window)
	msg := sprintf("rate_limit window must be a number of seconds > 0, got %s", [_show(window)])
}

errors contains msg if {
	scope := limit.scope
	not scope in _scopes
	msg := sprintf("rate_limit scope must be one of session, agent, user, global, got %s", [_show(scope)])
}

errors contains msg if {
	approval := _rule.approval
	not is_object(approval)
	msg := sprintf("approval must be an object like {ttl: 900}, got %s", [_show(approval)])
}

errors contains msg if {
	keys := sort(object.keys(_rule.approval) - _approval_keys)
	count(keys) > 0
	msg := sprintf("approval has unknown key(s) %s; allowed: ttl", [concat(", ", keys)])
}

errors contains msg if {
	ttl := _rule.approval.ttl
	not _is_positive(ttl)
	msg := sprintf("approval ttl must be a number of seconds > 0, got %s", [_show(ttl)])
}

_valid if {
	_rule
	count(errors) == 0
}

_reason := _rule.reason if {
	_has(_rule, "reason")
} else := sprintf("%s %s (%s)", [_subject, _verbs[_rule.action], applied.origin])

_calls(1) := "1 call"

_calls(n) := sprintf("%d calls", [n]) if n != 1

_per_window(1) := "per second"

_per_window(w) := sprintf("per %v seconds", [w]) if w != 1

# How much the limit allows: calls, or a total of the counted argument.
_allowance(max_calls) := sprintf("a total %q of %d", [_increment_from, max_calls]) if {
	_weighted
} else := _calls(max_calls)

_limit_reason := _rule.reason if {
	_rule.action == "rate_limit"
	_has(_rule, "reason")
} else := reason if {
	phrases := [_allowance(floor(limit.max)), _per_window(limit.window_seconds), _per_scope[limit.scope]]
	reason := sprintf("at most %s %s %s", phrases)
}

default _ttl := {}

_ttl := {"ttl_seconds": _rule.approval.ttl} if _has(_rule.approval, "ttl")

# What every contribution made for the applied rule adds: {"shadow": true} for
# a rule with shadow: true, nothing otherwise (enforced).
default _shadow := {}

_shadow := {"shadow": true} if _rule.shadow == true

# METADATA
# title: Deny contributions
# description: |
#   The applied rule when its action is deny (shadow when the rule is);
#   never shadow: catalog.invalid_rule for each
#   problem in the applied rule; catalog.missing_rule when no rule applies;
#   catalog.invalid_data when a part of the policy data has the wrong type;
#   catalog.rate_limit_cost_invalid when a weighted rate limit's argument is
#   missing, not a number or negative.
# scope: document
deny contains object.union({"rule": applied.id, "reason": _reason}, _shadow) if {
	_valid
	_rule.action == "deny"
}

deny contains {
	"rule": "catalog.rate_limit_cost_invalid",
	"reason": sprintf("%s: rate limit counts argument %q, which must be a number >= 0", [_subject, _increment_from]),
} if {
	_valid
	_weighted
	not cost
}

deny contains {
	"rule": "catalog.invalid_rule",
	"reason": sprintf("invalid policy rule %s for %s: %s", [applied.where, _subject, problem]),
} if {
	some problem in errors
}

deny contains {
	"rule": "catalog.missing_rule",
	"reason": sprintf("%s has risk %s in the policy catalog, but risk_defaults has no rule for it", [
		_subject,
		_show(object.get(catalog.entry, "risk", null)),
	]),
} if {
	catalog.known
	not applied
}

deny contains {
	"rule": "catalog.missing_rule",
	"reason": sprintf("%s is not in the policy catalog, and the policy data has no default rule", [_subject]),
} if {
	not catalog.known
	not applied
}

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
#   The applied rule when its action is require_approval (with ttl_seconds from
#   approval.ttl; shadow when the rule is).
# scope: document
require_approval contains object.union_n([{"rule": applied.id, "reason": _reason}, _ttl, _shadow]) if {
	_valid
	_rule.action == "require_approval"
}

# METADATA
# title: Rate-limit contributions
# description: |
#   The limit of the applied rule, whatever its (non-deny) action; max is
#   written as an integer (10.0 in YAML becomes 10). A weighted limit adds
#   "cost" (the counted argument); an unweighted one has no cost (counts 1).
#   None when the counted argument is unusable (that call is denied instead,
#   even when the rule is shadow). Shadow when the rule is.
# scope: document
rate_limit contains object.union_n([
	limit,
	{"rule": applied.id, "max": floor(limit.max), "reason": _limit_reason},
	_cost_field, # undefined for an unusable argument: no contribution
	_shadow,
]) if {
	_valid
	limit
}

# METADATA
# title: Allow contributions
# description: The applied rule when its action is allow (shadow when the rule is).
# scope: document
allow contains object.union({"rule": applied.id, "reason": _reason}, _shadow) if {
	_valid
	_rule.action == "allow"
}
