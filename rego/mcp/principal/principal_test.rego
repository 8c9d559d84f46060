package mcp.principal_test

import data.mcp.principal

_as(fields) := {"principal": object.union({"session_id": "s-1", "roles": ["imaging-admin", "viewer"]}, fields)}

test_identified_when_credential_verified if {
	principal.identified with input as _as({"authenticated": true, "asserted_by": null})
	principal.roles == {"imaging-admin", "viewer"} with input as _as({"authenticated": true})
}

test_identified_when_asserted_by_an_authenticated_proxy if {
	principal.identified with input as _as({"authenticated": false, "asserted_by": "proxy-a"})
	principal.roles == {"imaging-admin", "viewer"} with input as _as({"asserted_by": "tls:proxy-a.example"})
}

test_no_roles_when_the_caller_only_says_so if {
	every fields in [
		{"authenticated": false, "asserted_by": null},
		{},
		{"authenticated": "true", "asserted_by": ""},
		{"authenticated": 1, "asserted_by": ["proxy-a"]},
	] {
		not principal.identified with input as _as(fields)
		principal.roles == set() with input as _as(fields)
	}
}

test_no_roles_when_input_has_no_principal if {
	not principal.identified with input as {}
	principal.roles == set() with input as {}
	principal.roles == set() with input as "principal"
}

test_only_role_names_count_when_roles_ill_typed if {
	roles := ["imaging-admin", "", 7, null, ["viewer"], {"role": "x"}]
	principal.roles == {"imaging-admin"} with input as _as({"authenticated": true, "roles": roles})
	principal.roles == set() with input as _as({"authenticated": true, "roles": "imaging-admin"})
	principal.roles == set() with input as _as({"authenticated": true, "roles": {"imaging-admin": true}})
}
