# METADATA
# title: Who is calling, as far as it was proven
# description: |
#   What input.principal proves about the caller, for rules about who calls: the
#   YAML rules' `roles` (rego/mcp/rules/catalog) and any Rego package (the shipped
#   copy_image_set role rule). Nothing a caller says about itself counts unless
#   it was proven: by a credential this engine verified (principal.authenticated)
#   or by a proxy or gateway the service authenticated, which asserted the
#   principal (principal.asserted_by names it). Without either (loopback with
#   nothing configured: the caller's own word) the caller is not identified and
#   has no roles that count.
package mcp.principal

# METADATA
# title: The caller is identified
# description: |
#   True when the principal was proven (a verified credential) or asserted by an
#   authenticated proxy or gateway; false otherwise, also for input of any other
#   shape.
# scope: document
default identified := false

identified if input.principal.authenticated == true

identified if {
	is_string(input.principal.asserted_by)
	input.principal.asserted_by != ""
}

# METADATA
# title: The caller's roles that count
# description: |
#   The role names (non-empty strings) of input.principal.roles when the caller
#   is identified; empty when it is not, whatever roles it claims.
# scope: document
default roles := set()

roles := {role |
	some role in input.principal.roles
	is_string(role)
	role != ""
} if {
	identified
	is_array(input.principal.roles)
}
