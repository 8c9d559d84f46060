# How this package reads one YAML rule, as written: its form (a bare action name
# or a map), its limit, whether it is shadow, whom it is for (roles) and what is
# wrong with it. Functions of the rule alone (and of who is calling), apart from
# the chain and the contributions in catalog.rego, which use them.
package mcp.rules.catalog

import data.mcp.principal

_actions := {"allow", "deny", "rate_limit", "require_approval"}

_scopes := {"session", "agent", "user", "global"}

_unit_seconds := {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

# A rule as an object: a bare action name is shorthand for {action: <name>}.
# Undefined for anything else.
_as_rule(raw) := raw if is_object(raw)

_as_rule(raw) := {"action": raw} if is_string(raw)

_has(obj, key) if key in object.keys(obj)

_show(value) := json.marshal(value)

# An integer >= 1 (10 and 10.0 both count).
_is_count(x) if {
	is_number(x)
	floor(x) == x
	x >= 1
}

_is_name(x) if {
	is_string(x)
	x != ""
}

# The limit of a rule, {"max", "window_seconds", "scope"}, from either form of
# rate_limit: {max: 10, window: 60, scope: session} or "10/minute" (scope
# session). Undefined for a rule without rate_limit or with a malformed string.
_limit_of(rule) := {
	"max": object.get(rule.rate_limit, "max", null),
	"window_seconds": object.get(rule.rate_limit, "window", null),
	"scope": object.get(rule.rate_limit, "scope", "session"),
} if {
	is_object(rule.rate_limit)
} else := {
	"max": to_number(parts[1]),
	"window_seconds": _unit_seconds[parts[2]],
	"scope": "session",
} if {
	is_string(rule.rate_limit)
	some parts in regex.find_all_string_submatch_n(
		`^\s*([0-9]+)\s*/\s*(second|minute|hour|day)s?\s*$`,
		rule.rate_limit, 1,
	)
}

# A rule (as written) as this package reads it: [the rule as an object, its
# limit or null without rate_limit]. Defined only for a rule it can use: a
# known action, and a readable limit with a whole max >= 1 and a known scope
# when it has one (action rate_limit must).
_read(raw) := [rule, null] if {
	rule := _as_rule(raw)
	rule.action in {"allow", "deny", "require_approval"}
	not _has(rule, "rate_limit")
	_roles_fine(rule)
}

_read(raw) := [rule, lim] if {
	rule := _as_rule(raw)
	rule.action in _actions
	lim := _limit_of(rule)
	_is_count(lim.max)
	lim.scope in _scopes
	_roles_fine(rule)
}

_usable(rule) if _read(rule)

# What keeps a rule (as written) from being used, one message per problem;
# empty exactly when _usable. Only what the reading above needs: the schema
# checks the rest at load.
_rule_problems(raw) := {"must be an action name or a map with an action"} if {
	not _as_rule(raw)
} else := (_action_problems(_as_rule(raw)) | _limit_problems(_as_rule(raw))) | _roles_problems(_as_rule(raw))

_action_problems(rule) := set() if {
	rule.action in _actions
} else := {sprintf(
	"unknown action %s; use one of allow, deny, rate_limit, require_approval",
	[_show(object.get(rule, "action", null))],
)}

_limit_problems(rule) := {"action rate_limit needs a rate_limit, e.g. {max: 10, window: 60}"} if {
	rule.action == "rate_limit"
	not _has(rule, "rate_limit")
} else := set() if {
	not _has(rule, "rate_limit")
} else := {sprintf(
	"rate_limit %s cannot be read; write {max, window, scope} or <max>/<unit>, e.g. \"10/minute\"",
	[_show(rule.rate_limit)],
)} if {
	not _limit_of(rule)
} else := {sprintf("rate_limit max must be an integer >= 1, got %s", [_show(_limit_of(rule).max)])} if {
	not _is_count(_limit_of(rule).max)
} else := {"rate_limit scope must be one of session, agent, user, global"} if {
	not _limit_of(rule).scope in _scopes
} else := set()

# The argument a weighted limit counts (the object form of rate_limit with
# increment_from; the string form never has one), as written.
_weight_of(rule) := rule.rate_limit.increment_from if {
	is_object(rule.rate_limit)
	_has(rule.rate_limit, "increment_from")
}

# A rule written with shadow: true (a bare action name never is).
default _is_shadow(_) := false

_is_shadow(rule) if rule.shadow == true

# A list of role names: non-empty, each a non-empty string.
_role_names(x) if {
	is_array(x)
	count(x) > 0
	every role in x {
		is_string(role)
		role != ""
	}
}

# A rule (as written) names roles (well formed), and the caller has none of
# them, proven: the rule is not for this caller. Any other rule is for every
# caller, also one whose roles are malformed: it is reached and denies as
# unusable (catalog.invalid_rule), never silently passed over.
_not_for_caller(raw) if {
	_role_names(raw.roles)
	every role in raw.roles {
		not role in principal.roles
	}
}

# A rule without roles, or with a list of role names.
_roles_fine(rule) if not _has(rule, "roles")

_roles_fine(rule) if _role_names(rule.roles)

_roles_problems(rule) := set() if {
	_roles_fine(rule)
} else := {sprintf("roles must be a non-empty list of role names, got %s", [_show(rule.roles)])}
