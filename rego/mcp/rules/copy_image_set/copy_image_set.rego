# METADATA
# title: copy_image_set argument rules and per-agent limit
# description: |
#   Checks the arguments of the AWS HealthImaging CopyImageSet tool
#   (input.tool.name == "copy_image_set", on any server) as the real server,
#   awslabs.healthimaging-mcp-server 0.1.1, declares them (and the CopyImageSet
#   API takes them):
#     datastore_id          destination datastore, required, 32-char lowercase hex id
#     source_image_set_id   required, 32-char lowercase hex id
#     copy_image_set_information
#                           required object, no keys but these:
#                             sourceImageSet       required {latestVersionId,
#                                                  DICOMCopies?: {copiableAttributes}}
#                             destinationImageSet  optional {imageSetId, latestVersionId}:
#                                                  the copy goes INTO that existing image
#                                                  set and changes it (approval)
#                           (latestVersionId: a string of digits; imageSetId: a 32-char
#                           lowercase hex id; copiableAttributes: a non-empty string)
#     source_datastore_id   optional, 32-char lowercase hex id or null; absent or null,
#                           the source image set is in datastore_id (a copy inside one
#                           datastore); a different datastore is a cross-datastore copy
#                           (approval)
#   and, for servers that take it (the real one does not declare it):
#     force                 optional boolean; true overwrites a destination image set
#                           that has changed (approval), and only the role
#                           imaging-admin may ask for it once callers are identified
#   Beside the per-session limit of policies/rules.yaml, agent_limit.rego (this package
#   too) limits every agent to 20 copies per 60 seconds over all its sessions
#   (copy_image_set.agent_limit).
package mcp.rules.copy_image_set

import data.mcp.principal

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

# -- copy_image_set_information ------------------------------------------------

# Each object inside copy_image_set_information, by its path from the arguments:
# [required keys, optional keys] (no other key is allowed).
_objects := {
	"copy_image_set_information": [["sourceImageSet"], ["destinationImageSet"]],
	"copy_image_set_information.sourceImageSet": [["latestVersionId"], ["DICOMCopies"]],
	"copy_image_set_information.sourceImageSet.DICOMCopies": [["copiableAttributes"], []],
	"copy_image_set_information.destinationImageSet": [["imageSetId", "latestVersionId"], []],
}

# Each value inside it that is not an object, by path: its kind (_leaf_ok, _kind_text).
_leaves := {
	"copy_image_set_information.sourceImageSet.latestVersionId": "version",
	"copy_image_set_information.sourceImageSet.DICOMCopies.copiableAttributes": "text",
	"copy_image_set_information.destinationImageSet.imageSetId": "id",
	"copy_image_set_information.destinationImageSet.latestVersionId": "version",
}

_kind_text := {
	"version": "a version id (1 to 64 digits)",
	"text": "a non-empty string",
	"id": "a 32-character lowercase hex id",
}

_leaf_ok("version", x) if {
	is_string(x)
	regex.match(`^[0-9]{1,64}$`, x)
}

_leaf_ok("text", x) if {
	is_string(x)
	x != ""
}

_leaf_ok("id", x) if _is_id(x)

# The value at a dotted path inside the arguments; undefined when a step is
# missing or is not an object.
_at(path) := parent[key] if {
	steps := split(path, ".")
	key := steps[count(steps) - 1]
	parent := object.get(_args, array.slice(steps, 0, count(steps) - 1), null)
	is_object(parent)
	_present(parent, key)
}

# The common case, checked at once: the deny rule below looks no further.
_info_ok if {
	info := _args.copy_image_set_information
	is_object(info)
	_source_ok(info.sourceImageSet)
	_destination_ok(info)
	every key in object.keys(info) {
		key in {"sourceImageSet", "destinationImageSet"}
	}
}

_source_ok(source) if {
	is_object(source)
	object.keys(source) == {"latestVersionId"}
	_leaf_ok("version", source.latestVersionId)
}

_source_ok(source) if {
	is_object(source)
	object.keys(source) == {"latestVersionId", "DICOMCopies"}
	_leaf_ok("version", source.latestVersionId)
	is_object(source.DICOMCopies)
	object.keys(source.DICOMCopies) == {"copiableAttributes"}
	_leaf_ok("text", source.DICOMCopies.copiableAttributes)
}

_destination_ok(info) if not _present(info, "destinationImageSet")

_destination_ok(info) if {
	is_object(info.destinationImageSet)
	object.keys(info.destinationImageSet) == {"imageSetId", "latestVersionId"}
	_is_id(info.destinationImageSet.imageSetId)
	_leaf_ok("version", info.destinationImageSet.latestVersionId)
}

_shape(path) := sprintf("an object {%s}", [concat(", ", array.concat(
	_objects[path][0],
	[sprintf("%s?", [k]) | some k in _objects[path][1]],
))])

# What is wrong with copy_image_set_information, one message per problem.
_info_problems contains `argument "copy_image_set_information" is required` if {
	not _present(_args, "copy_image_set_information")
}

_info_problems contains sprintf("%s must be %s", [path, _shape(path)]) if {
	some path, _ in _objects
	value := _at(path)
	not is_object(value)
}

_info_problems contains sprintf("%s.%s is required", [path, key]) if {
	some path, keys in _objects
	is_object(_at(path))
	some key in keys[0]
	not _present(_at(path), key)
}

_info_problems contains sprintf("%s has an unknown key %s; it takes %s", [path, json.marshal(key), _shape(path)]) if {
	some path, keys in _objects
	value := _at(path)
	is_object(value)
	some key in object.keys(value)
	not key in array.concat(keys[0], keys[1])
}

_info_problems contains sprintf("%s must be %s", [path, text]) if {
	some path, kind in _leaves
	value := _at(path)
	not _leaf_ok(kind, value)
	text := _kind_text[kind]
}

# The role that may overwrite (force) a destination image set.
_force_role := "imaging-admin"

# METADATA
# title: Deny contributions
# description: |
#   One per invalid argument: copy_image_set.<argument>_invalid for datastore_id,
#   source_image_set_id (both required) and source_datastore_id (optional, null
#   allowed); copy_image_set.copy_image_set_information_invalid once per problem in
#   copy_image_set_information (missing, not an object, a required key missing, an
#   unknown key, a malformed id, version id or copiableAttributes), the reason
#   naming its path; copy_image_set.force_invalid when force is present and not a
#   boolean.
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
	_args.source_datastore_id != null
	reason := sprintf("copy_image_set: %s", [_id_problem(_args, "source_datastore_id")])
}

deny contains {"rule": "copy_image_set.copy_image_set_information_invalid", "reason": reason} if {
	_applies
	not _info_ok
	some problem in _info_problems
	reason := sprintf("copy_image_set: %s", [problem])
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

	# Only once callers are identified (data.mcp.principal): with nothing proven
	# (loopback, nothing configured: one user) roles say nothing, and this rule
	# does not apply.
	principal.identified
	not _force_role in principal.roles
}

# METADATA
# title: Require-approval contributions
# description: |
#   copy_image_set.existing_destination when copy_image_set_information names a
#   destinationImageSet (the copy changes an image set that exists);
#   copy_image_set.cross_datastore when source_datastore_id is given (not null) and
#   differs from datastore_id; copy_image_set.force_overwrite when force is true.
# scope: document
require_approval contains {"rule": "copy_image_set.existing_destination", "reason": reason} if {
	_applies
	destination := _args.copy_image_set_information.destinationImageSet
	is_object(destination) # anything else is denied (copy_image_set_information_invalid)
	reason := sprintf("copy_image_set copies into the existing image set %v of datastore %v, changing it", [
		object.get(destination, "imageSetId", "?"),
		object.get(_args, "datastore_id", "?"),
	])
}

require_approval contains {
	"rule": "copy_image_set.force_overwrite",
	"reason": "copy_image_set with force=true overwrites a destination image set that has changed",
} if {
	_applies
	_args.force == true
}

require_approval contains {"rule": "copy_image_set.cross_datastore", "reason": reason} if {
	_applies
	_args.source_datastore_id != null
	_args.source_datastore_id != _args.datastore_id
	reason := sprintf("copy_image_set copies an image set from datastore %s into another datastore, %s", [
		_args.source_datastore_id,
		_args.datastore_id,
	])
}
