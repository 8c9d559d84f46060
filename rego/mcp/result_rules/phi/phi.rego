# METADATA
# title: Patient attributes redacted from HealthImaging results
# description: |
#   For a call to one of the tools listed in data.mcp_policy.results.phi.tools
#   (server -> tool names, "*": any server; policies/results.yaml lists
#   get_image_set_metadata, copy_image_set and search_image_sets of
#   awslabs.healthimaging-mcp-server, and copy_image_set where the catalog
#   also places it), one redact contribution per patient attribute named in
#   phi.attributes (DICOM keywords: PatientName, PatientID, ...) and
#   phi.search_keys (SearchImageSets' DICOMTags keys: DICOMPatientName, ...):
#   {"rule": "phi.dicom_patient", "path": "$..<name>", "replacement", "reason",
#   "shadow"},
#   unless the caller has one of the roles of phi.roles (phi-reader as
#   shipped), proven (data.mcp.principal.roles: a verified credential, or a
#   principal asserted by an authenticated proxy or gateway). Roles a caller
#   merely claims never count, nor do roles given in any other shape.
#   The paths name attributes, not places: the engine applies each one to
#   every JSON document the result carries (structuredContent, JSON text,
#   JSON inside strings, base64 and base64 of gzip included) and blocks the
#   result when a name remains where it cannot be redacted safely. So this
#   package never reads the result, and costs the same at any result size.
#   phi.shadow: true makes every contribution shadow (tried, not enforced).
# schemas:
#   - data.mcp_policy: schema["mcp_policy.schema"]
package mcp.result_rules.phi

import data.mcp.principal

_results := data.mcp_policy.results

_phi := _results.phi

# The called tool is listed for the called server, or for any server ("*").
_applies if input.tool.name in _phi.tools[input.tool.server]

_applies if input.tool.name in _phi.tools["*"]

# The caller has a role that may read the attributes, proven.
_reader if {
	some role in _phi.roles
	role in principal.roles
}

_names contains name if some name in _phi.attributes

_names contains name if some name in _phi.search_keys

# Who may read them, for the reason (the role names of phi.roles, sorted).
_readers := concat(" or ", sort({role | some role in _phi.roles; is_string(role)}))

default _who := "no caller may read them"

_who := sprintf("only callers with the role %s, proven, may read them", [_readers]) if _readers != ""

_reason := sprintf("patient attributes are redacted from the results of %s: %s", [input.tool.name, _who])

_replacement := object.get(_phi, "replacement", "[REDACTED]")

_shadow := object.get(_phi, "shadow", false)

# METADATA
# title: Redact contributions
# description: |
#   phi.dicom_patient, one per attribute name, path "$..<name>", for a listed
#   tool and a caller without a reader role. A name that makes no valid path,
#   a replacement that is not a string or a shadow that is not a boolean
#   (data the schema refuses at load) makes the contribution malformed: the
#   result is blocked (result_decision.invalid_contribution), never passed.
# scope: document
redact contains {
	"rule": "phi.dicom_patient",
	"path": sprintf("$..%v", [name]),
	"replacement": _replacement,
	"reason": _reason,
	"shadow": _shadow,
} if {
	_applies
	not _reader
	some name in _names
}
