# METADATA
# title: copy_image_set argument rules
# description: |
#   Checks the arguments of the AWS HealthImaging CopyImageSet tool
#   (input.tool.name == "copy_image_set", on any server):
#     datastore_id          destination datastore, required, 32-char lowercase hex id
#     source_image_set_id   required, 32-char lowercase hex id
#     source_datastore_id   optional, 32-char lowercase hex id; when it differs from
#                           datastore_id the copy crosses datastores (approval)
#     force                 optional boolean; true overwrites a destination image set
#                           that has changed (approval), and only the role
#                           imaging-admin may ask for it once callers are identified
package mcp.rules.copy_image_set

_applies if input.tool.name == "copy_image_set"

default _args := {}

_args := input.tool.arguments if is_object(input.tool.arguments)

_is_id(x) if {
	is_string(x)
	regex.match(`^[0-9a-f]{32}$`, x)
}

_present(args, key) if key in object.keys(args)

# Both required ids are well formed: the deny rules below look no further (the
# common case costs this one rule).
_ids_ok if {
	_is_id(_args.datastore_id)
	_is_id(_args.source_image_set_id)
}

_id_problem(args, key) := sprintf("argument %q is required", [key]) if not _present(args, key)

_id_problem(args, key) := sprintf("argument %q must be a 32-character lowercase hex id", [key]) if {
	_present(args, key)
	not _is_id(args[key])
}

# The role that may overwrite (force) a destination image set.
_force_role := "imaging-admin"

# Callers are identified when the principal was proven (a verified token or key) or was
# asserted by an authenticated proxy. With neither (loopback, nothing configured: one
# user), roles say nothing and the role rule does not apply.
_identified if input.principal.authenticated == true

_identified if is_string(input.principal.asserted_by)

# METADATA
# title: Deny contributions
# description: |
#   One per invalid argument: copy_image_set.<argument>_invalid for datastore_id,
#   source_image_set_id (both required) and source_datastore_id (optional);
#   copy_image_set.force_invalid when force is present and not a boolean.
# scope: document
deny contains {"rule": sprintf("copy_image_set.%s_invalid", [key]), "reason": reason} if {
	_applies
	not _ids_ok
	some key in ["datastore_id", "source_image_set_id"]
	reason := sprintf("copy_image_set: %s", [_id_problem(_args, key)])
}

deny contains {"rule": "copy_image_set.source_datastore_id_invalid", "reason": reason} if {
	_applies
	_present(_args, "source_datastore_id")
	reason := sprintf("copy_image_set: %s", [_id_problem(_args, "source_datastore_id")])
}

deny contains {
	"rule": "copy_image_set.force_invalid",
	"reason": "copy_image_set: argument \"force\" must be a boolean",
} if {
	_applies
	_present(_args, "force")
	not is_boolean(_args.force)
}

# METADATA
# title: Force needs the admin role
# description: |
#   copy_image_set.force_needs_role when force is true, callers are identified, and the
#   principal lacks the imaging-admin role.
# scope: rule
deny contains {
	"rule": "copy_image_set.force_needs_role",
	"reason": sprintf("copy_image_set with force=true needs the role %s", [_force_role]),
} if {
	_applies
	_args.force == true
	_identified
	not _force_role in input.principal.roles
}

# METADATA
# title: Require-approval contributions
# description: |
#   copy_image_set.force_overwrite when force is true;
#   copy_image_set.cross_datastore when source_datastore_id differs from datastore_id.
# scope: document
require_approval contains {
	"rule": "copy_image_set.force_overwrite",
	"reason": "copy_image_set with force=true overwrites a destination image set that has changed",
} if {
	_applies
	_args.force == true
}

require_approval contains {"rule": "copy_image_set.cross_datastore", "reason": reason} if {
	_applies
	_args.source_datastore_id != _args.datastore_id
	reason := sprintf("copy_image_set copies an image set from datastore %s into another datastore, %s", [
		_args.source_datastore_id,
		_args.datastore_id,
	])
}
