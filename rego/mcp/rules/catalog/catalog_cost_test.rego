package mcp.rules.catalog_test

import data.mcp.rules.catalog
import data.mcp.shipped_test

# Weighted rate limits: rate_limit {..., increment_from: <argument>} makes each
# call cost the value of that tool argument instead of 1.

_pay_entry := {"category": "write", "risk": "medium"}

# _policy with `rule` as the rule for the catalogued tool "pay".
_pay_policy(rule) := object.union(_policy({"pay": rule}), {"catalog": {"srv": {"pay": _pay_entry}}})

_spend_cap := {"max": 1000, "window": 3600, "scope": "user", "increment_from": "amount"}

_pay_rule := {"action": "rate_limit", "rate_limit": _spend_cap}

_pay(args) := {
	"tool": {"server": "srv", "name": "pay", "arguments": args},
	"principal": {"session_id": "s-1", "user_id": "u-1"},
}

_spend_limit(cost) := {
	"rule": "catalog.rule.pay",
	"max": 1000,
	"window_seconds": 3600,
	"scope": "user",
	"reason": `at most a total "amount" of 1000 per 3600 seconds per user`,
	"cost": cost,
}

_cost_invalid := {
	"rule": "catalog.rate_limit_cost_invalid",
	"reason": `tool "pay" on server "srv": rate limit counts argument "amount", which must be a number >= 0`,
}

# --- valid cost ------------------------------------------------------------------

test_cost_is_argument_when_number_at_least_zero if {
	every amount in [250, 12.5, 0, 0.0, 1000, 5000] {
		out := _out with data.mcp_policy as _pay_policy(_pay_rule) with input as _pay({"amount": amount})
		out == _only("rate_limit", _spend_limit(amount))
		cost := catalog.cost with data.mcp_policy as _pay_policy(_pay_rule) with input as _pay({"amount": amount})
		cost == {"catalog.rule.pay": amount}
	}
}

test_cost_ignores_other_arguments_when_weighted if {
	args := {"amount": 7, "currency": "EUR", "count": "x"}
	out := _out with data.mcp_policy as _pay_policy(_pay_rule) with input as _pay(args)
	out == _only("rate_limit", _spend_limit(7))
}

test_cost_with_rule_reason_when_reason_given if {
	rule := object.union(_pay_rule, {"reason": "spend cap"})
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 3})
	out == _only("rate_limit", object.union(_spend_limit(3), {"reason": "spend cap"}))
}

test_cost_when_allow_has_weighted_limit if {
	rule := {"action": "allow", "reason": "payments are fine", "rate_limit": _spend_cap}
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 40})
	out.allow == {{"rule": "catalog.rule.pay", "reason": "payments are fine"}}
	out.rate_limit == {_spend_limit(40)}
	out.deny == set()
	out.require_approval == set()
}

test_cost_default_scope_session_when_scope_absent if {
	rule := {"action": "rate_limit", "rate_limit": {"max": 1, "window": 1, "increment_from": "n"}}
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"n": 1})
	out == _only("rate_limit", {
		"rule": "catalog.rule.pay",
		"max": 1,
		"window_seconds": 1,
		"scope": "session",
		"reason": `at most a total "n" of 1 per second per session`,
		"cost": 1,
	})
}

# --- no cost: unweighted limits count 1 ---------------------------------------------

test_no_cost_when_object_form_without_increment_from if {
	rule := {"action": "rate_limit", "rate_limit": {"max": 1000, "window": 3600, "scope": "user"}}
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 250})
	out == _only("rate_limit", {
		"rule": "catalog.rule.pay",
		"max": 1000,
		"window_seconds": 3600,
		"scope": "user",
		"reason": "at most 1000 calls per 3600 seconds per user",
	})
	catalog.cost == {} with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 250})
}

test_no_cost_when_string_form if {
	rule := {"action": "rate_limit", "rate_limit": "10/minute"}
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 250, "increment_from": "amount"})
	out == _only("rate_limit", {
		"rule": "catalog.rule.pay",
		"max": 10,
		"window_seconds": 60,
		"scope": "session",
		"reason": "at most 10 calls per 60 seconds per session",
	})
	catalog.cost == {} with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 250})
}

test_no_cost_when_shipped_copy_image_set if {
	call := {"tool": {
		"server": "awslabs.healthimaging-mcp-server",
		"name": "copy_image_set",
		"arguments": {"amount": 5},
	}}
	out := _out with data.mcp_policy as shipped_test.policy with input as call
	out.rate_limit == {_limit(10, 60, "session", "at most 10 calls per 60 seconds per session")}
}

# --- unusable argument: the call is denied --------------------------------------------

test_cost_invalid_when_argument_missing if {
	out := _out with data.mcp_policy as _pay_policy(_pay_rule) with input as _pay({"amout": 250})
	out == _only("deny", _cost_invalid)
}

test_cost_invalid_when_argument_not_a_number if {
	every value in ["250", "", "abc", null, true, false, [250], {"value": 250}] {
		out := _out with data.mcp_policy as _pay_policy(_pay_rule) with input as _pay({"amount": value})
		out == _only("deny", _cost_invalid)
	}
}

test_cost_invalid_when_argument_negative if {
	every value in [-1, -0.01, -1000000] {
		out := _out with data.mcp_policy as _pay_policy(_pay_rule) with input as _pay({"amount": value})
		out == _only("deny", _cost_invalid)
	}
}

test_cost_invalid_when_arguments_missing_or_not_object if {
	calls := [
		{"tool": {"server": "srv", "name": "pay"}},
		{"tool": {"server": "srv", "name": "pay", "arguments": [250]}},
		{"tool": {"server": "srv", "name": "pay", "arguments": "amount=250"}},
	]
	every call in calls {
		out := _out with data.mcp_policy as _pay_policy(_pay_rule) with input as call
		out == _only("deny", _cost_invalid)
	}
}

test_cost_invalid_keeps_other_contributions_when_action_allow if {
	rule := {"action": "allow", "rate_limit": _spend_cap}
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({})
	out.deny == {_cost_invalid}
	out.rate_limit == set()
	count(out.allow) == 1
}

test_cost_invalid_names_argument_when_other_name if {
	rule := {"action": "rate_limit", "rate_limit": {"max": 5, "window": 60, "increment_from": "bytes \"in\""}}
	out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"bytes": 1})
	out == _only("deny", {
		"rule": "catalog.rate_limit_cost_invalid",
		"reason": `tool "pay" on server "srv": rate limit counts argument "bytes \"in\"", which must be a number >= 0`,
	})
}

# --- increment_from of a wrong type: the call is denied ---------------------------

# The schema rejects such a rule at load; read anyway, no argument can be counted.
test_cost_invalid_when_increment_from_not_a_name if {
	every value in [5, "", null, true, ["amount"], {"arg": "amount"}] {
		rule := {"action": "rate_limit", "rate_limit": object.union(_spend_cap, {"increment_from": value})}
		out := _out with data.mcp_policy as _pay_policy(rule) with input as _pay({"amount": 1, "5": 1})
		{d.rule | some d in out.deny} == {"catalog.rate_limit_cost_invalid"}
		out.rate_limit == set()
	}
}

# --- end to end through the decision ---------------------------------------------------

test_decision_rate_limit_carries_cost_when_weighted if {
	d := data.mcp.decision with data.mcp_policy as _pay_policy(_pay_rule) with input as _pay({"amount": 12.5})
	d == {
		"action": "rate_limit",
		"rule": "catalog.rule.pay",
		"reason": `at most a total "amount" of 1000 per 3600 seconds per user`,
		"rate_limits": [_spend_limit(12.5)],
		"matched": ["catalog.rule.pay"],
		"shadow": [],
		"denies_tool": false,
		"tool": {"known": true, "category": "write", "risk": "medium"},
	}
}

test_decision_deny_when_weighted_argument_invalid if {
	d := data.mcp.decision with data.mcp_policy as _pay_policy(_pay_rule) with input as _pay({"amount": "12.5"})
	d == {
		"action": "deny",
		"rule": "catalog.rate_limit_cost_invalid",
		"reason": _cost_invalid.reason,
		"rate_limits": [],
		"matched": ["catalog.rate_limit_cost_invalid"],
		"shadow": [],
		"denies_tool": false,
		"tool": {"known": true, "category": "write", "risk": "medium"},
	}
}
