package mcp.result_rules.phi_test

import data.mcp.result_rules.phi
import data.mcp.shipped_test

# The shipped PHI rule with the shipped policy data (given, never taken from
# whatever data is loaded), and with data changed where a test says so.

_shipped := shipped_test.policy

_hi := "awslabs.healthimaging-mcp-server"

_valkey := "awslabs.valkey-mcp-server"

# A HealthImaging metadata result as the tool answers it (decoded: the engine
# decodes base64 and gzip; Rego never reads the result).
_metadata := {"Patient": {"DICOM": {"PatientName": "DOE^JANE", "PatientID": "MRN-1"}}}

_call(server, tool, principal) := {
	"tool": {"server": server, "name": tool, "arguments": {}},
	"principal": object.union({"agent_id": "a-1", "session_id": "s-1", "roles": []}, principal),
	"request": {"id": "d-2", "time": "2025-06-18T12:00:00Z", "transport": "grpc", "call_decision_id": "d-1"},
	"context": {},
	"result": {"content": [{"type": "text", "text": json.marshal(_metadata)}], "structuredContent": _metadata},
	"result_info": {"size_bytes": 120, "max_bytes": 1048576},
}

_proven(roles) := {"roles": roles, "authenticated": true}

_names := array.concat(_shipped.results.phi.attributes, _shipped.results.phi.search_keys)

_reason(tool) := sprintf(
	"patient attributes are redacted from the results of %s: only callers with the role phi-reader, proven, may read them",
	[tool],
)

_contributions(tool) := {{
	"rule": "phi.dicom_patient",
	"path": sprintf("$..%s", [name]),
	"replacement": "[REDACTED]",
	"reason": _reason(tool),
	"shadow": false,
} |
	some name in _names
}

_paths(contributions) := {c.path | some c in contributions}

test_phi_every_attribute_redacted_when_listed_tool_and_no_reader if {
	cases := [
		[_hi, "get_image_set_metadata"],
		[_hi, "copy_image_set"],
		[_hi, "search_image_sets"],
		[_valkey, "copy_image_set"],
	]
	every case in cases {
		redact := phi.redact with data.mcp_policy as _shipped
			with input as _call(case[0], case[1], _proven(["imaging-admin"]))
		redact == _contributions(case[1])
	}
}

test_phi_the_attributes_of_the_table_and_the_search_keys_when_shipped if {
	redact := phi.redact with data.mcp_policy as _shipped
		with input as _call(_hi, "get_image_set_metadata", {})
	count(redact) == 51
	every path in [
		"$..PatientName", "$..PatientID", "$..IssuerOfPatientID", "$..PatientBirthDate",
		"$..PatientBirthTime", "$..PatientSex", "$..PatientAge", "$..PatientAddress",
		"$..PatientTelephoneNumbers", "$..OtherPatientIDs", "$..OtherPatientIDsSequence",
		"$..OtherPatientNames", "$..PatientBirthName", "$..PatientMotherBirthName",
		"$..MedicalRecordLocator", "$..EthnicGroup", "$..Occupation", "$..PatientComments",
		"$..AdditionalPatientHistory", "$..PatientReligiousPreference", "$..MilitaryRank",
		"$..BranchOfService", "$..CountryOfResidence", "$..RegionOfResidence", "$..PatientSize",
		"$..PatientWeight", "$..ResponsiblePerson", "$..AccessionNumber",
		"$..DICOMPatientName", "$..DICOMPatientId", "$..DICOMPatientBirthDate",
		"$..DICOMPatientSex", "$..DICOMAccessionNumber",
	] {
		path in _paths(redact)
	}
}

test_phi_nothing_redacted_when_tool_or_server_not_listed if {
	cases := [
		[_hi, "list_datastores"],
		[_hi, "Get_Image_Set_Metadata"],
		[_hi, "get_image_set_metadata "],
		[_valkey, "get_image_set_metadata"],
		[_valkey, "search_image_sets"],
		["awslabs.s3-mcp-server", "copy_image_set"],
		["AWSLABS.HEALTHIMAGING-MCP-SERVER", "get_image_set_metadata"],
	]
	every case in cases {
		count(phi.redact) == 0 with data.mcp_policy as _shipped with input as _call(case[0], case[1], {})
	}
}

test_phi_nothing_redacted_when_call_fields_missing_or_ill_typed if {
	every bad in [
		{},
		"get_image_set_metadata",
		{"tool": {"server": _hi}},
		{"tool": {"server": _hi, "name": ["get_image_set_metadata"]}},
		{"tool": {"server": [_hi], "name": "get_image_set_metadata"}},
	] {
		count(phi.redact) == 0 with data.mcp_policy as _shipped with input as bad
	}
}

test_phi_nothing_redacted_when_reader_role_proven if {
	every principal in [
		_proven(["phi-reader"]),
		_proven(["viewer", "phi-reader"]),
		{"roles": ["phi-reader"], "authenticated": false, "asserted_by": "tls:proxy-a.example"},
	] {
		count(phi.redact) == 0 with data.mcp_policy as _shipped
			with input as _call(_hi, "get_image_set_metadata", principal)
	}
}

# A caller's own word never counts: claimed without proof, ill-typed, or a
# near-miss of the role name, it still gets every redaction.
test_phi_redacted_when_reader_role_only_claimed_or_malformed if {
	every principal in [
		{"roles": ["phi-reader"]},
		{"roles": ["phi-reader"], "authenticated": false},
		{"roles": ["phi-reader"], "authenticated": "true"},
		{"roles": ["phi-reader"], "authenticated": 1, "asserted_by": ""},
		{"roles": ["phi-reader"], "asserted_by": null},
		{"roles": ["phi-reader"], "asserted_by": ["proxy-a"]},
		_proven("phi-reader"),
		_proven({"phi-reader": true}),
		_proven([["phi-reader"]]),
		_proven(["PHI-reader", "phi-reader ", "phi_reader"]),
		_proven(null),
		{"authenticated": true},
	] {
		redact := phi.redact with data.mcp_policy as _shipped
			with input as _call(_hi, "get_image_set_metadata", principal)
		redact == _contributions("get_image_set_metadata")
	}
}

test_phi_redactions_whatever_the_result_shape if {
	every result in [null, "DOE^JANE", [], [_metadata], {"content": "PatientName"}, {}] {
		call := json.patch(_call(_hi, "get_image_set_metadata", {}), [{"op": "replace", "path": "/result", "value": result}])
		redact := phi.redact with data.mcp_policy as _shipped with input as call
		redact == _contributions("get_image_set_metadata")
	}
	not_there := json.remove(_call(_hi, "get_image_set_metadata", {}), ["result", "result_info"])
	phi.redact == _contributions("get_image_set_metadata") with data.mcp_policy as _shipped with input as not_there
}

test_phi_any_server_when_listed_under_star if {
	policy := json.patch(_shipped, [{"op": "add", "path": "/results/phi/tools/*", "value": ["read_chart"]}])
	every server in ["srv", _hi, "anything"] {
		redact := phi.redact with data.mcp_policy as policy with input as _call(server, "read_chart", {})
		_paths(redact) == _paths(_contributions("read_chart"))
	}
}

test_phi_replacement_role_and_shadow_from_the_data if {
	policy := json.patch(_shipped, [
		{"op": "replace", "path": "/results/phi/replacement", "value": "<phi>"},
		{"op": "replace", "path": "/results/phi/roles", "value": ["clinician", "auditor"]},
		{"op": "add", "path": "/results/phi/shadow", "value": true},
	])
	count(phi.redact) == 0 with data.mcp_policy as policy
		with input as _call(_hi, "search_image_sets", _proven(["auditor"]))
	redact := phi.redact with data.mcp_policy as policy with input as _call(_hi, "search_image_sets", {})
	count(redact) == 51
	reason := concat("", [
		"patient attributes are redacted from the results of search_image_sets: ",
		"only callers with the role auditor or clinician, proven, may read them",
	])
	every c in redact {
		c.replacement == "<phi>"
		c.shadow == true
		c.reason == reason
	}
}

test_phi_no_reader_when_roles_missing_or_not_role_names if {
	every roles in [[], [7, ""], "phi-reader", null] {
		policy := json.patch(_shipped, [{"op": "replace", "path": "/results/phi/roles", "value": roles}])
		redact := phi.redact with data.mcp_policy as policy
			with input as _call(_hi, "get_image_set_metadata", _proven(["phi-reader"]))
		count(redact) == 51
		every c in redact {
			endswith(c.reason, ": no caller may read them")
		}
	}
	no_roles := json.remove(_shipped, ["results/phi/roles"])
	count(phi.redact) == 51 with data.mcp_policy as no_roles
		with input as _call(_hi, "get_image_set_metadata", _proven(["phi-reader"]))
}

test_phi_default_replacement_when_data_gives_none if {
	policy := json.remove(_shipped, ["results/phi/replacement"])
	redact := phi.redact with data.mcp_policy as policy with input as _call(_hi, "copy_image_set", {})
	{c.replacement | some c in redact} == {"[REDACTED]"}
}

test_phi_nothing_when_the_policy_has_no_phi_section if {
	every policy in [json.remove(_shipped, ["results"]), json.remove(_shipped, ["results/phi"]), {}] {
		count(phi.redact) == 0 with data.mcp_policy as policy with input as _call(_hi, "get_image_set_metadata", {})
	}
}

# --- end to end: the result decision with every shipped result rule ---------------

# The shipped secrets rule adds its patterns (block_if_found) to every result:
# the redactions of the phi rule are these.
_phi_redactions(d) := [r | some r in d.redactions; r.rule == "phi.dicom_patient"]

_secrets_matched := ["secrets.aws_access_key", "secrets.aws_secret_key"]

test_phi_result_decision_redacts_when_shipped if {
	d := data.mcp.result_decision with data.mcp_policy as _shipped with input as _call(_hi, "get_image_set_metadata", {})
	d.action == "redact"
	d.rule == "phi.dicom_patient"

	# The secrets rule's redactions give no reason: the phi rule's is the one.
	d.reason == _reason("get_image_set_metadata")
	_phi_redactions(d) == [{"rule": "phi.dicom_patient", "path": sprintf("$..%s", [name]), "replacement": "[REDACTED]"} |
		some name in sort(_names)
	]
	d.matched == array.concat(["phi.dicom_patient"], _secrets_matched)
	d.shadow == []
}

test_phi_result_decision_no_phi_redactions_when_reader_proven if {
	d := data.mcp.result_decision with data.mcp_policy as _shipped
		with input as _call(_hi, "get_image_set_metadata", _proven(["phi-reader"]))
	_phi_redactions(d) == []
	d.matched == _secrets_matched
}

test_phi_result_decision_shadow_when_data_says_shadow if {
	policy := json.patch(_shipped, [{"op": "add", "path": "/results/phi/shadow", "value": true}])
	d := data.mcp.result_decision with data.mcp_policy as policy with input as _call(_hi, "get_image_set_metadata", {})
	_phi_redactions(d) == []
	d.matched == _secrets_matched
	d.shadow == [{"level": "redact", "rule": "phi.dicom_patient", "reason": _reason("get_image_set_metadata")}]
}

# Data the schema refuses at load, if it got this far, never lets a result
# through unredacted: a name that makes no path, a replacement or a shadow of
# the wrong type blocks it.
test_phi_result_decision_blocks_when_data_would_make_malformed_redactions if {
	every patch in [
		{"op": "add", "path": "/results/phi/attributes/-", "value": "Patient Name"},
		{"op": "add", "path": "/results/phi/attributes/-", "value": 7},
		{"op": "add", "path": "/results/phi/search_keys/-", "value": {"name": "x"}},
		{"op": "replace", "path": "/results/phi/replacement", "value": 7},
		{"op": "add", "path": "/results/phi/shadow", "value": "yes"},
	] {
		policy := json.patch(_shipped, [patch])
		d := data.mcp.result_decision with data.mcp_policy as policy with input as _call(_hi, "get_image_set_metadata", {})
		d.action == "block"
		d.rule == "result_decision.invalid_contribution"
		d.reason == "result policy package mcp.result_rules.phi produced a malformed redact contribution"
	}
}
