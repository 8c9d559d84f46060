package mcp.rules.copy_image_set_test

import data.mcp.rules.copy_image_set

_dest := "0123456789abcdef0123456789abcdef"

_source := "fedcba9876543210fedcba9876543210"

_image_set := "00112233445566778899aabbccddeeff"

_valid_args := {"datastore_id": _dest, "source_image_set_id": _image_set}

_call(args) := {
	"tool": {"server": "awslabs.healthimaging-mcp-server", "name": "copy_image_set", "arguments": args},
	"principal": {"agent_id": "a-1", "session_id": "s-1", "user_id": "u-1", "roles": []},
}

_with_args(extra) := _call(object.union(_valid_args, extra))

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
	}
}

test_deny_both_when_arguments_not_an_object if {
	ids := _deny_ids with input as _call(["datastore_id"])
	ids == {"copy_image_set.datastore_id_invalid", "copy_image_set.source_image_set_id_invalid"}
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
	every value in ["not-an-id", "", null, 1, upper(_source)] {
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

test_both_approvals_when_force_and_cross_datastore if {
	ids := _approval_ids with input as _with_args({"force": true, "source_datastore_id": _source})
	ids == {"copy_image_set.force_overwrite", "copy_image_set.cross_datastore"}
}

test_nothing_when_other_arguments_present if {
	extra := {"copy_image_set_information": {"sourceImageSet": {"latestVersionId": "1"}}}
	out := _out with input as _with_args(extra)
	out == {"deny": set(), "require_approval": set()}
}

test_applies_when_any_server if {
	ids := _deny_ids with input as {"tool": {"server": "any.server", "name": "copy_image_set", "arguments": {}}}
	ids == {"copy_image_set.datastore_id_invalid", "copy_image_set.source_image_set_id_invalid"}
}
