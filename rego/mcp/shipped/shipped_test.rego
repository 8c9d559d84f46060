# METADATA
# title: The shipped policy data, for the shipped tests
# description: |
#   The data document that policies/*.yaml loads (data.mcp_policy), as a value.
#   The framework's own tests that check the shipped policy end to end evaluate
#   it `with data.mcp_policy as shipped.policy`, never on whatever data is
#   loaded: a team that runs `opa test` over the framework's rego/ together
#   with its own policy data (more catalog entries, more rules) or without
#   policies/ at all runs these tests against the shipped data only.
#   tests/test_team_data.py checks that this value is what policies/*.yaml
#   loads, so the two cannot drift apart.
package mcp.shipped_test

_copy_image_set := {
	"category": "write",
	"risk": "medium",
	"description": concat("", [
		"AWS HealthImaging CopyImageSet: copy an image set, ",
		"optionally into another datastore / over an existing destination",
	]),
}

_get_image_set_metadata := {
	"category": "read",
	"risk": "low",
	"description": "AWS HealthImaging GetImageSetMetadata: an image set's DICOM metadata (base64 of gzip'd JSON)",
}

_search_image_sets := {
	"category": "read",
	"risk": "low",
	"description": "AWS HealthImaging SearchImageSets: image sets matching search criteria, with their DICOM tags",
}

# The DICOM keywords of policies/results.yaml (phi.attributes), in its order.
_phi_attributes := [
	"PatientName",
	"PatientID",
	"IssuerOfPatientID",
	"PatientBirthDate",
	"PatientBirthTime",
	"PatientBirthDateInAlternativeCalendar",
	"PatientDeathDateInAlternativeCalendar",
	"PatientAlternativeCalendar",
	"PatientSex",
	"PatientInsurancePlanCodeSequence",
	"OtherPatientIDs",
	"OtherPatientNames",
	"OtherPatientIDsSequence",
	"PatientBirthName",
	"PatientAge",
	"PatientSize",
	"PatientWeight",
	"PatientAddress",
	"InsurancePlanIdentification",
	"PatientMotherBirthName",
	"MilitaryRank",
	"BranchOfService",
	"MedicalRecordLocator",
	"MedicalAlerts",
	"Allergies",
	"CountryOfResidence",
	"RegionOfResidence",
	"PatientTelephoneNumbers",
	"PatientTelecomInformation",
	"EthnicGroup",
	"Occupation",
	"SmokingStatus",
	"AdditionalPatientHistory",
	"PregnancyStatus",
	"LastMenstrualDate",
	"PatientReligiousPreference",
	"PatientSexNeutered",
	"ResponsiblePerson",
	"ResponsibleOrganization",
	"PatientComments",
	"AccessionNumber",
	"AdmittingDiagnosesDescription",
	"AdmissionID",
	"SpecialNeeds",
	"PatientInstitutionResidence",
	"PatientState",
]

_results := {
	"phi": {
		"roles": ["phi-reader"],
		"replacement": "[REDACTED]",
		"tools": {
			"awslabs.healthimaging-mcp-server": ["get_image_set_metadata", "copy_image_set", "search_image_sets"],
			"awslabs.valkey-mcp-server": ["copy_image_set"],
		},
		"attributes": _phi_attributes,
		"search_keys": [
			"DICOMPatientName",
			"DICOMPatientId",
			"DICOMPatientBirthDate",
			"DICOMPatientSex",
			"DICOMAccessionNumber",
		],
	},
	"secrets": {
		"aws_access_key": {
			"description": "an AWS access key id",
			"regex": concat("", [
				`(?:^|[^A-Za-z0-9_]|\\[bfnrt]|\\u[0-9A-Fa-f]{4})`,
				`(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?:$|[^A-Za-z0-9_])`,
			]),
			"hints": [`(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}`],
		},
		"aws_secret_key": {
			"description": "an AWS secret access key",
			"regex": concat("", [
				`(?:secret|Secret|SECRET)[ _-]?(?:(?:access|Access|ACCESS)[ _-]?)?(?:key|Key|KEY)`,
				`(?:[\s"'\\:=>,]|\\[bfnrt]|\\u[0-9A-Fa-f]{4}){1,32}`,
				`[A-Za-z0-9/+]{40}(?:$|[^A-Za-z0-9/+=])`,
			]),
			"hints": ["secret", "Secret", "SECRET"],
		},
	},
}

# METADATA
# title: data.mcp_policy as policies/*.yaml ships it
# scope: document
policy := {
	"catalog": {
		"awslabs.healthimaging-mcp-server": {
			"copy_image_set": _copy_image_set,
			"get_image_set_metadata": _get_image_set_metadata,
			"search_image_sets": _search_image_sets,
		},
		"awslabs.valkey-mcp-server": {"copy_image_set": _copy_image_set},
	},
	"rules": {"copy_image_set": {
		"action": "rate_limit",
		"rate_limit": {"max": 10, "window": 60, "scope": "session"},
	}},
	"risk_defaults": {
		"low": {"action": "allow"},
		"medium": {"action": "require_approval"},
		"high": {"action": "require_approval"},
		"critical": {"action": "deny"},
	},
	"default": {"action": "deny"},
	"results": _results,
}
