package mcp.rules.catalog_test

import data.mcp.rules.catalog

# roles: [<role>, ...] in a YAML rule: the rule is only for callers that have
# one of those roles, proven (a verified credential, or asserted by an
# authenticated proxy). For anyone else the walk passes over it (listed in
# catalog.skipped) and the next rule of the chain decides; none left is a
# catalog.missing_rule deny. A malformed roles is never passed over: the rule
# is unusable (catalog.invalid_rule). Helpers (_policy, _out, _only, ...) are
# catalog_test.rego's.

_admin_only := {"action": "allow", "reason": "admins may drop things", "roles": ["imaging-admin"]}

_proven(roles) := {"session_id": "s-1", "roles": roles, "authenticated": true, "asserted_by": null}

_asserted(roles) := {"session_id": "s-1", "roles": roles, "authenticated": false, "asserted_by": "proxy-a"}

_claimed(roles) := {"session_id": "s-1", "roles": roles, "authenticated": false, "asserted_by": null}

_by(principal, name) := {"tool": {"server": "srv", "name": name, "arguments": {}}, "principal": principal}

_drop(principal) := _by(principal, "drop_thing")

_drop_own := "catalog.rule.drop_thing"

_critical := {
	"rule": "catalog.risk_default.critical",
	"reason": "critical tools are never allowed",
}

_skipped_drop := [{"id": _drop_own, "where": `rules["drop_thing"]`, "roles": ["imaging-admin"]}]

# --- the rule is for callers with the role ------------------------------------

test_rule_applies_when_role_proven_or_asserted_by_a_proxy if {
	policy := _policy({"drop_thing": _admin_only})
	every principal in [_proven(["imaging-admin"]), _asserted(["viewer", "imaging-admin"])] {
		out := _out with data.mcp_policy as policy with input as _drop(principal)
		out == _only("allow", {"rule": _drop_own, "reason": "admins may drop things"})
		catalog.skipped == [] with data.mcp_policy as policy with input as _drop(principal)
	}
}

test_rule_applies_when_caller_has_any_of_the_roles if {
	rule := object.union(_admin_only, {"roles": ["imaging-admin", "imaging-operator"]})
	out := _out with data.mcp_policy as _policy({"drop_thing": rule}) with input as _drop(_proven(["imaging-operator"]))
	out == _only("allow", {"rule": _drop_own, "reason": "admins may drop things"})
}

# --- anyone else: the next rule of the chain decides --------------------------

test_next_rule_decides_when_role_missing if {
	policy := _policy({"drop_thing": _admin_only})
	every principal in [_proven(["viewer"]), _proven([]), _asserted(["imaging-admins"])] {
		out := _out with data.mcp_policy as policy with input as _drop(principal)
		out == _only("deny", _critical)
		catalog.skipped == _skipped_drop with data.mcp_policy as policy with input as _drop(principal)
	}
}

test_role_does_not_count_when_only_claimed if {
	policy := _policy({"drop_thing": _admin_only})
	every principal in [
		_claimed(["imaging-admin"]),
		{"session_id": "s-1", "roles": ["imaging-admin"]},
		{"session_id": "s-1", "roles": ["imaging-admin"], "authenticated": "yes", "asserted_by": ""},
	] {
		out := _out with data.mcp_policy as policy with input as _drop(principal)
		out == _only("deny", _critical)
	}
	nobody := {"tool": {"server": "srv", "name": "drop_thing", "arguments": {}}}
	out := _out with data.mcp_policy as policy with input as nobody
	out == _only("deny", _critical)
}

test_role_names_match_exactly if {
	policy := _policy({"drop_thing": _admin_only})
	every role in ["Imaging-Admin", "imaging-admin ", "imaging", "*"] {
		out := _out with data.mcp_policy as policy with input as _drop(_proven([role]))
		out == _only("deny", _critical)
	}
}

test_risk_default_for_the_role_and_default_for_others if {
	policy := object.union(_policy({}), {"risk_defaults": {"critical": _admin_only}})
	admin := _out with data.mcp_policy as policy with input as _drop(_proven(["imaging-admin"]))
	admin == _only("allow", {"rule": "catalog.risk_default.critical", "reason": "admins may drop things"})
	other := _out with data.mcp_policy as policy with input as _drop(_proven(["viewer"]))
	other == _only("deny", {"rule": "catalog.missing_rule", "reason": concat("", [
		`tool "drop_thing" on server "srv" has no enforced policy rule for this caller: `,
		`risk_defaults["critical"] is only for the roles imaging-admin, proven`,
	])})
}

test_missing_rule_when_default_is_for_other_roles if {
	policy := object.union(_policy({}), {"default": _admin_only})
	admin := _out with data.mcp_policy as policy with input as _by(_proven(["imaging-admin"]), "unlisted")
	admin == _only("allow", {"rule": "catalog.default", "reason": "admins may drop things"})
	other := _out with data.mcp_policy as policy with input as _by(_claimed(["imaging-admin"]), "unlisted")
	other == _only("deny", {"rule": "catalog.missing_rule", "reason": concat("", [
		`tool "unlisted" on server "srv" has no enforced policy rule for this caller: `,
		"default is only for the roles imaging-admin, proven",
	])})
	skipped := [{"id": "catalog.default", "where": "default", "roles": ["imaging-admin"]}]
	catalog.skipped == skipped with data.mcp_policy as policy with input as _by(_claimed(["imaging-admin"]), "unlisted")
}

test_missing_rule_names_every_rule_walked_when_none_decides if {
	own := {"action": "deny", "shadow": true}
	policy := object.union(_policy({"admin_thing": own}), {"risk_defaults": {"high": _admin_only}})
	out := _out with data.mcp_policy as policy with input as _by(_proven([]), "admin_thing")
	out.deny == {
		{"rule": "catalog.missing_rule", "reason": concat("", [
			`tool "admin_thing" on server "srv" has no enforced policy rule for this caller: `,
			`rules["admin_thing"] is shadow; risk_defaults["high"] is only for the roles imaging-admin, proven`,
		])},
		{
			"rule": "catalog.rule.admin_thing",
			"reason": `tool "admin_thing" on server "srv" is denied (policy rule for this tool)`,
			"shadow": true,
		},
	}
}

test_missing_rule_says_risk_default_missing_when_tool_rule_skipped if {
	policy := object.union(_policy({"drop_thing": _admin_only}), {"risk_defaults": {"critical": null}})
	no_critical := json.remove(policy, ["risk_defaults/critical"])
	out := _out with data.mcp_policy as no_critical with input as _drop(_proven([]))
	out == _only("deny", {"rule": "catalog.missing_rule", "reason": concat("", [
		`tool "drop_thing" on server "srv" has no enforced policy rule for this caller: `,
		`rules["drop_thing"] is only for the roles imaging-admin, proven; risk_defaults has no rule for risk "critical"`,
	])})
}

# --- roles with shadow ------------------------------------------------------------

test_shadow_rule_tried_only_for_its_roles if {
	trial := {"action": "rate_limit", "rate_limit": "5/minute", "shadow": true, "roles": ["imaging-admin"]}
	policy := _policy({"write_thing": trial})
	admin := _out with data.mcp_policy as policy with input as _by(_proven(["imaging-admin"]), "write_thing")
	{c.rule | some c in admin.rate_limit; c.shadow == true} == {"catalog.rule.write_thing"}
	{c.rule | some c in admin.require_approval} == {"catalog.risk_default.medium"}
	other := _out with data.mcp_policy as policy with input as _by(_proven(["viewer"]), "write_thing")
	other.rate_limit == set()
	{c.rule | some c in other.require_approval} == {"catalog.risk_default.medium"}
	catalog.skipped == [] with data.mcp_policy as policy with input as _by(_proven(["imaging-admin"]), "write_thing")
	count(catalog.skipped) == 1 with data.mcp_policy as policy with input as _by(_proven(["viewer"]), "write_thing")
}

test_risk_default_with_roles_not_walked_when_tool_rule_decides if {
	policy := object.union(_policy({"drop_thing": "require_approval"}), {"risk_defaults": {"critical": _admin_only}})
	out := _out with data.mcp_policy as policy with input as _drop(_proven([]))
	{c.rule | some c in out.require_approval} == {_drop_own}
	catalog.skipped == [] with data.mcp_policy as policy with input as _drop(_proven([]))
}

# --- malformed roles: the rule is unusable, never passed over -------------------------

test_invalid_rule_when_roles_malformed if {
	every roles in ["imaging-admin", [], [""], [7], ["imaging-admin", null], {"imaging-admin": true}, null] {
		rule := object.union(_admin_only, {"roles": roles})
		every principal in [_proven(["imaging-admin"]), _proven([]), _claimed([])] {
			out := _out with data.mcp_policy as _policy({"drop_thing": rule}) with input as _drop(principal)
			out == _only("deny", {"rule": "catalog.invalid_rule", "reason": sprintf(
				`invalid policy rule rules["drop_thing"] for tool "drop_thing" on server "srv": %s`,
				[sprintf("roles must be a non-empty list of role names, got %s", [json.marshal(roles)])],
			)})
		}
	}
}

test_load_errors_when_roles_malformed if {
	policy := _policy({"drop_thing": object.union(_admin_only, {"roles": "imaging-admin"})})
	message := `mcp_policy.rules["drop_thing"]: roles must be a non-empty list of role names, got "imaging-admin"`
	catalog.load_errors == {message} with data.mcp_policy as policy
	count(catalog.load_errors) == 0 with data.mcp_policy as _policy({"drop_thing": _admin_only})
}

# --- the decision: "only imaging-admin may drop things" without Rego ------------------

test_decision_allows_only_the_proven_role if {
	policy := _policy({"drop_thing": _admin_only})
	admin := data.mcp.decision with data.mcp_policy as policy with input as _drop(_proven(["imaging-admin"]))
	[admin.action, admin.rule] == ["allow", _drop_own]
	every principal in [_proven(["viewer"]), _claimed(["imaging-admin"])] {
		d := data.mcp.decision with data.mcp_policy as policy with input as _drop(principal)
		[d.action, d.rule, d.denies_tool] == ["deny", "catalog.risk_default.critical", true]
	}
}
