package mcp.rules.copy_image_set_test

import data.mcp.rules.copy_image_set

_dest := "0123456789abcdef0123456789abcdef"

_source := "fedcba9876543210fedcba9876543210"

_image_set := "00112233445566778899aabbccddeeff"

_info := {"sourceImageSet": {"latestVersionId": "1"}}

_valid_args := {"datastore_id": _dest, "source_image_set_id": _image_set, "copy_image_set_information": _info}

_call(args) := {
	"tool": {"server": "awslabs.healthimaging-mcp-server", "name": "copy_image_set", "arguments": args},
	"principal": {"agent_id": "a-1", "session_id": "s-1", "user_id": "u-1", "roles": []},
}

_with_args(extra) := _call(object.union(_valid_args, extra))

# A valid call whose copy_image_set_information is `info` (object.union would merge
# objects, not replace them).
_with_info(info) := _call(json.patch(_valid_args, [{
	"op": "add",
	"path": "/copy_image_set_information",
	"value": info,
}]))

_out := {"deny": copy_image_set.deny, "require_approval": copy_image_set.require_approval}

_deny_ids contains d.rule if {
	some d in copy_image_set.deny
}

_approval_ids contains a.rule if {
	some a in copy_image_set.require_approval
}

test_nothing_when_arguments_valid if {
	out := _out with input as _call(_valid_args)
	out == {"deny": set(), "require_approval": set()}
}

test_nothing_when_other_tool if {
	out := _out with input as {"tool": {"server": "s", "name": "other", "arguments": {}}}
	out == {"deny": set(), "require_approval": set()}
}

test_nothing_when_name_differs_in_case if {
	out := _out with input as {"tool": {"server": "s", "name": "Copy_Image_Set", "arguments": {}}}
	out == {"deny": set(), "require_approval": set()}
}

test_deny_names_argument_when_required_argument_missing if {
	out := _out with input as _call({})
	out.deny == {
		{"rule": "copy_image_set.datastore_id_invalid", "reason": `copy_image_set: argument "datastore_id" is required`},
		{
			"rule": "copy_image_set.source_image_set_id_invalid",
			"reason": `copy_image_set: argument "source_image_set_id" is required`,
		},
		{
			"rule": "copy_image_set.copy_image_set_information_invalid",
			"reason": `copy_image_set: argument "copy_image_set_information" is required`,
		},
	}
}

test_deny_all_required_when_arguments_not_an_object if {
	ids := _deny_ids with input as _call(["datastore_id"])
	ids == {
		"copy_image_set.datastore_id_invalid",
		"copy_image_set.source_image_set_id_invalid",
		"copy_image_set.copy_image_set_information_invalid",
	}
}

test_deny_when_datastore_id_malformed if {
	every value in [
		"0123456789ABCDEF0123456789ABCDEF", # uppercase
		"0123456789abcdef0123456789abcde", # 31 characters
		"0123456789abcdef0123456789abcdef0", # 33 characters
		"0123456789abcdef0123456789abcdeg", # not hex
		" 0123456789abcdef0123456789abcdef", # whitespace
		"0123456789abcdef0123456789abcdef\n", # trailing newline
		"",
		12345678901234567890123456789012, # a number
		null,
		[_dest],
	] {
		out := _out with input as _with_args({"datastore_id": value})
		out.deny == {{
			"rule": "copy_image_set.datastore_id_invalid",
			"reason": `copy_image_set: argument "datastore_id" must be a 32-character lowercase hex id`,
		}}
	}
}

test_deny_when_source_image_set_id_malformed if {
	every value in ["ABC", "", 7, {"id": _image_set}] {
		out := _out with input as _with_args({"source_image_set_id": value})
		out.deny == {{
			"rule": "copy_image_set.source_image_set_id_invalid",
			"reason": `copy_image_set: argument "source_image_set_id" must be a 32-character lowercase hex id`,
		}}
	}
}

test_deny_when_source_datastore_id_malformed if {
	every value in ["not-an-id", "", 1, false, [_source], upper(_source)] {
		ids := _deny_ids with input as _with_args({"source_datastore_id": value})
		ids == {"copy_image_set.source_datastore_id_invalid"}
	}
}

test_deny_reason_names_source_datastore_id_when_malformed if {
	deny := copy_image_set.deny with input as _with_args({"source_datastore_id": "x"})
	{
		"rule": "copy_image_set.source_datastore_id_invalid",
		"reason": `copy_image_set: argument "source_datastore_id" must be a 32-character lowercase hex id`,
	} in deny
}

test_deny_when_force_not_boolean if {
	every value in ["true", 1, 0, null, [true], {}] {
		out := _out with input as _with_args({"force": value})
		out == {
			"deny": {{"rule": "copy_image_set.force_invalid", "reason": `copy_image_set: argument "force" must be a boolean`}},
			"require_approval": set(),
		}
	}
}

test_require_approval_when_force_true if {
	out := _out with input as _with_args({"force": true})
	out == {
		"deny": set(),
		"require_approval": {{
			"rule": "copy_image_set.force_overwrite",
			"reason": "copy_image_set with force=true overwrites a destination image set that has changed",
		}},
	}
}

_as(principal, extra) := object.union(_with_args(extra), {"principal": principal})

_proven(roles) := {
	"agent_id": "a-1", "session_id": "s-1", "user_id": "u-1", "roles": roles,
	"authenticated": true, "asserted_by": null,
}

_asserted(roles) := {
	"agent_id": "a-1", "session_id": "s-1", "user_id": "u-1", "roles": roles,
	"authenticated": false, "asserted_by": "proxy-a",
}

test_deny_force_without_the_role_when_proven if {
	ids := _deny_ids with input as _as(_proven(["viewer"]), {"force": true})
	ids == {"copy_image_set.force_needs_role"}
}

test_deny_force_without_the_role_when_asserted_by_a_proxy if {
	ids := _deny_ids with input as _as(_asserted([]), {"force": true})
	ids == {"copy_image_set.force_needs_role"}
}

test_force_with_the_role_needs_approval_only if {
	every principal in [_proven(["imaging-admin"]), _asserted(["viewer", "imaging-admin"])] {
		out := _out with input as _as(principal, {"force": true})
		out.deny == set()
		_approval_ids == {"copy_image_set.force_overwrite"} with input as _as(principal, {"force": true})
	}
}

test_role_rule_needs_force if {
	ids := _deny_ids with input as _as(_proven([]), {"force": false})
	ids == set()
}

test_nothing_when_force_false if {
	out := _out with input as _with_args({"force": false})
	out == {"deny": set(), "require_approval": set()}
}

test_require_approval_when_cross_datastore if {
	out := _out with input as _with_args({"source_datastore_id": _source})
	out == {
		"deny": set(),
		"require_approval": {{
			"rule": "copy_image_set.cross_datastore",
			"reason": sprintf("copy_image_set copies an image set from datastore %s into another datastore, %s", [
				_source,
				_dest,
			]),
		}},
	}
}

test_nothing_when_source_datastore_is_destination if {
	out := _out with input as _with_args({"source_datastore_id": _dest})
	out == {"deny": set(), "require_approval": set()}
}

# The real server declares source_datastore_id as a string or null (default null):
# null, like absent, is a copy inside datastore_id.
test_nothing_when_source_datastore_id_null if {
	out := _out with input as _with_args({"source_datastore_id": null})
	out == {"deny": set(), "require_approval": set()}
}

test_both_approvals_when_force_and_cross_datastore if {
	ids := _approval_ids with input as _with_args({"force": true, "source_datastore_id": _source})
	ids == {"copy_image_set.force_overwrite", "copy_image_set.cross_datastore"}
}

test_nothing_when_other_arguments_present if {
	out := _out with input as _with_args({"note": "a key the real tool does not declare"})
	out == {"deny": set(), "require_approval": set()}
}

test_applies_when_any_server if {
	ids := _deny_ids with input as {"tool": {"server": "any.server", "name": "copy_image_set", "arguments": {}}}
	ids == {
		"copy_image_set.datastore_id_invalid",
		"copy_image_set.source_image_set_id_invalid",
		"copy_image_set.copy_image_set_information_invalid",
	}
}

# -- copy_image_set_information ------------------------------------------------

_info_denied(reasons) := {{"rule": "copy_image_set.copy_image_set_information_invalid", "reason": r} |
	some r in reasons
}

test_nothing_when_information_has_every_optional_part if {
	info := {
		"sourceImageSet": {"latestVersionId": "12", "DICOMCopies": {"copiableAttributes": `{"SchemaVersion":"1.1"}`}},
		"destinationImageSet": {"imageSetId": _other_set, "latestVersionId": "3"},
	}
	deny := copy_image_set.deny with input as _with_info(info)
	deny == set()
}

test_nothing_when_information_has_dicom_copies if {
	info := {"sourceImageSet": {"latestVersionId": "1", "DICOMCopies": {"copiableAttributes": "{}"}}}
	out := _out with input as _with_info(info)
	out == {"deny": set(), "require_approval": set()}
}

test_deny_when_information_missing if {
	out := _out with input as _call(object.remove(_valid_args, ["copy_image_set_information"]))
	out == {
		"deny": _info_denied({`copy_image_set: argument "copy_image_set_information" is required`}),
		"require_approval": set(),
	}
}

test_deny_when_information_not_an_object if {
	reason := "copy_image_set: copy_image_set_information must be an object {sourceImageSet, destinationImageSet?}"
	every value in [null, "", "{\"sourceImageSet\":{}}", 1, true, [_info]] {
		out := _out with input as _with_info(value)
		out == {"deny": _info_denied({reason}), "require_approval": set()}
	}
}

test_deny_when_source_image_set_missing if {
	every info in [{}, {"destinationImageSet": {"imageSetId": _other_set, "latestVersionId": "1"}}] {
		deny := copy_image_set.deny with input as _with_info(info)
		deny == _info_denied({"copy_image_set: copy_image_set_information.sourceImageSet is required"})
	}
}

test_deny_when_source_image_set_not_an_object if {
	every value in [null, "1", [{"latestVersionId": "1"}]] {
		deny := copy_image_set.deny with input as _with_info({"sourceImageSet": value})
		deny == _info_denied({concat("", [
			"copy_image_set: copy_image_set_information.sourceImageSet must be ",
			"an object {latestVersionId, DICOMCopies?}",
		])})
	}
}

test_deny_when_latest_version_id_missing_or_malformed if {
	every source in [{}, {"DICOMCopies": {"copiableAttributes": "{}"}}] {
		deny := copy_image_set.deny with input as _with_info({"sourceImageSet": source})
		deny == _info_denied({"copy_image_set: copy_image_set_information.sourceImageSet.latestVersionId is required"})
	}
	every value in [1, "", "v1", " 1", "1\n", "-1", "1.0", null, ["1"], concat("", array.reverse([
	"1" |
		some _ in numbers.range(1, 65)
	]))] {
		deny := copy_image_set.deny with input as _with_info({"sourceImageSet": {"latestVersionId": value}})
		deny == _info_denied({concat("", [
			"copy_image_set: copy_image_set_information.sourceImageSet.latestVersionId must be ",
			"a version id (1 to 64 digits)",
		])})
	}
}

test_deny_when_dicom_copies_malformed if {
	prefix := "copy_image_set: copy_image_set_information.sourceImageSet.DICOMCopies"
	cases := [
		[null, sprintf("%s must be an object {copiableAttributes}", [prefix])],
		["{}", sprintf("%s must be an object {copiableAttributes}", [prefix])],
		[{}, sprintf("%s.copiableAttributes is required", [prefix])],
		[{"copiableAttributes": ""}, sprintf("%s.copiableAttributes must be a non-empty string", [prefix])],
		[{"copiableAttributes": {}}, sprintf("%s.copiableAttributes must be a non-empty string", [prefix])],
		[
			{"copiableAttributes": "{}", "all": true},
			sprintf(`%s has an unknown key "all"; it takes an object {copiableAttributes}`, [prefix]),
		],
	]
	every c in cases {
		info := {"sourceImageSet": {"latestVersionId": "1", "DICOMCopies": c[0]}}
		deny := copy_image_set.deny with input as _with_info(info)
		deny == _info_denied({c[1]})
	}
}

test_deny_names_every_unknown_key if {
	info := {
		"sourceImageSet": {"latestVersionId": "1", "versionId": "2"},
		"promoteToPrimary": true,
		"force": true,
	}
	deny := copy_image_set.deny with input as _with_info(info)
	takes := "it takes an object {sourceImageSet, destinationImageSet?}"
	deny == _info_denied({
		sprintf(`copy_image_set: copy_image_set_information has an unknown key "force"; %s`, [takes]),
		sprintf(`copy_image_set: copy_image_set_information has an unknown key "promoteToPrimary"; %s`, [takes]),
		concat("", [
			`copy_image_set: copy_image_set_information.sourceImageSet has an unknown key "versionId"; `,
			"it takes an object {latestVersionId, DICOMCopies?}",
		]),
	})
}

test_deny_when_destination_image_set_malformed if {
	prefix := "copy_image_set: copy_image_set_information.destinationImageSet"
	cases := [
		[null, {sprintf("%s must be an object {imageSetId, latestVersionId}", [prefix])}],
		[_other_set, {sprintf("%s must be an object {imageSetId, latestVersionId}", [prefix])}],
		[{}, {sprintf("%s.imageSetId is required", [prefix]), sprintf("%s.latestVersionId is required", [prefix])}],
		[{"imageSetId": _other_set}, {sprintf("%s.latestVersionId is required", [prefix])}],
		[
			{"imageSetId": upper(_other_set), "latestVersionId": "1"},
			{sprintf("%s.imageSetId must be a 32-character lowercase hex id", [prefix])},
		],
		[
			{"imageSetId": _other_set, "latestVersionId": 1},
			{sprintf("%s.latestVersionId must be a version id (1 to 64 digits)", [prefix])},
		],
		[
			{"imageSetId": _other_set, "latestVersionId": "1", "datastoreId": _source},
			{sprintf(`%s has an unknown key "datastoreId"; it takes an object {imageSetId, latestVersionId}`, [prefix])},
		],
	]
	every c in cases {
		info := {"sourceImageSet": {"latestVersionId": "1"}, "destinationImageSet": c[0]}
		deny := copy_image_set.deny with input as _with_info(info)
		deny == _info_denied(c[1])
	}
}

test_deny_only_information_when_ids_valid if {
	ids := _deny_ids with input as _with_info({"sourceImageSet": {}})
	ids == {"copy_image_set.copy_image_set_information_invalid"}
}

# -- copies into an existing image set -------------------------------------------

_other_set := "ffeeddccbbaa99887766554433221100"

_into_existing := {
	"sourceImageSet": {"latestVersionId": "1"},
	"destinationImageSet": {"imageSetId": _other_set, "latestVersionId": "4"},
}

test_require_approval_when_copy_into_existing_image_set if {
	out := _out with input as _with_info(_into_existing)
	out == {
		"deny": set(),
		"require_approval": {{
			"rule": "copy_image_set.existing_destination",
			"reason": sprintf("copy_image_set copies into the existing image set %s of datastore %s, changing it", [
				_other_set,
				_dest,
			]),
		}},
	}
}

test_approval_reason_when_destination_malformed if {
	# A malformed destination is denied; its approval (when it is an object) does not matter.
	info := {"sourceImageSet": {"latestVersionId": "1"}, "destinationImageSet": {}}
	_deny_ids == {"copy_image_set.copy_image_set_information_invalid"} with input as _with_info(info)
	out := _out with input as _with_info(info)
	out.require_approval == {{
		"rule": "copy_image_set.existing_destination",
		"reason": sprintf("copy_image_set copies into the existing image set ? of datastore %s, changing it", [_dest]),
	}}
	not_an_object := {"sourceImageSet": {"latestVersionId": "1"}, "destinationImageSet": "x"}
	no_approval := _approval_ids with input as _with_info(not_an_object)
	no_approval == set()
}

test_all_approvals_when_existing_destination_cross_datastore_and_force if {
	extra := {"copy_image_set_information": _into_existing, "source_datastore_id": _source, "force": true}
	ids := _approval_ids with input as _with_args(extra)
	ids == {"copy_image_set.existing_destination", "copy_image_set.cross_datastore", "copy_image_set.force_overwrite"}
}

# -- the per-agent limit -----------------------------------------------------------

_per_agent := {
	"rule": "copy_image_set.agent_limit",
	"max": 20,
	"window_seconds": 60,
	"scope": "agent",
	"reason": "at most 20 copies per 60 seconds per agent, over all its sessions",
}

_no_agent := {
	"rule": "copy_image_set.agent_limit",
	"max": 20,
	"window_seconds": 60,
	"scope": "global",
	"reason": "at most 20 copies per 60 seconds shared by all calls that name no agent",
}

test_agent_limit_when_agent_named if {
	limits := copy_image_set.rate_limit with input as _call(_valid_args)
	limits == {_per_agent}
}

test_agent_limit_whatever_the_arguments if {
	every args in [{}, object.union(_valid_args, {"force": true})] {
		limits := copy_image_set.rate_limit with input as _call(args)
		limits == {_per_agent}
	}
}

test_one_shared_limit_when_no_agent_named if {
	every agent in [null, "", 7] {
		request := json.patch(_call(_valid_args), [{"op": "replace", "path": "/principal/agent_id", "value": agent}])
		limits := copy_image_set.rate_limit with input as request
		limits == {_no_agent}
	}
	unnamed := copy_image_set.rate_limit with input as json.remove(_call(_valid_args), ["principal/agent_id"])
	unnamed == {_no_agent}
}

test_no_limit_when_other_tool if {
	limits := copy_image_set.rate_limit with input as {"tool": {"server": "s", "name": "other", "arguments": {}}}
	limits == set()
}
