# METADATA
# title: Credentials blocked from any result
# description: |
#   Blocks a result that carries a credential: for each pattern of
#   data.mcp_policy.results.secrets (id -> {regex, description, hints?,
#   shadow?}; policies/results.yaml ships aws_access_key and aws_secret_key),
#   a block contribution {"rule": "secrets.<id>", "reason"} when the result's
#   JSON text matches its regex, whatever the tool and whoever the caller. The
#   reason names the pattern's description, never the matched text.
#   The text is json.marshal(input.result), made once and searched once per
#   pattern: object keys and string values alike, JSON text inside strings as
#   it is escaped there (\" \n \u003c ...), which the shipped regexes allow
#   for. Base64 or compressed data is not decoded.
#   The same patterns are also redact contributions with block_if_found:
#   inside a document only the engine decodes (JSON in a string, base64,
#   base64 of gzip: get_image_set_metadata's blob), a match blocks the result
#   as a match here does (where this JSON text shows one, the block wins
#   first). A result with nothing found passes.
#   Cost: a regex whose first characters are not literal text makes RE2 try
#   it at every offset of the text (tens of ms per MiB); a pattern's hints
#   (RE2 as well, best literal text or starting with it, which RE2 finds
#   fast) are tried first, and its regex only on a text one of them
#   matches. A result over the size cap is not searched: it is blocked by
#   size.result_too_large whatever it carries.
#   Fail closed: a pattern that cannot be used (not a map, a regex or hint
#   that is not valid RE2: data the load refuses) blocks every result it
#   would search, with its rule id and a reason saying so.
# schemas:
#   - data.mcp_policy: schema["mcp_policy.schema"]
package mcp.result_rules.secrets

_results := data.mcp_policy.results

_patterns := _results.secrets

# The result is within the size cap (else size.result_too_large blocks it).
_within_cap if {
	is_number(input.result_info.size_bytes)
	is_number(input.result_info.max_bytes)
	input.result_info.size_bytes <= input.result_info.max_bytes
}

_text := json.marshal(input.result)

_is_regex(x) if {
	is_string(x)
	x != ""
	regex.is_valid(x)
}

# A pattern this package can use: an object with a valid regex and, when it
# has hints, a non-empty array of valid ones.
_usable(p) if {
	_is_regex(p.regex)
	not "hints" in object.keys(p)
}

_usable(p) if {
	_is_regex(p.regex)
	_non_empty_array(p.hints)
	every hint in p.hints {
		_is_regex(hint)
	}
}

# One of the pattern's hints matches the text, or it has none.
_hinted(p) if not "hints" in object.keys(p)

_hinted(p) if {
	some hint in p.hints
	regex.match(hint, _text)
}

_description(p) := p.description if {
	is_string(p.description)
	p.description != ""
} else := "a credential"

_shadow(p) := {"shadow": p.shadow} if "shadow" in object.keys(p)

_shadow(p) := {} if not "shadow" in object.keys(p)

_reason(p) := sprintf(
	"the tool's result contains what looks like %s: it is not passed on",
	[_description(p)],
)

# METADATA
# title: Block contributions
# description: |
#   secrets.<id> for each pattern the result's JSON text matches (shadow when
#   the pattern says shadow: true); secrets.<id> for each pattern that cannot
#   be used (never shadow), whatever the result.
# scope: document
block contains object.union({"rule": sprintf("secrets.%v", [id]), "reason": _reason(p)}, _shadow(p)) if {
	_within_cap
	some id, p in _patterns
	_usable(p)
	_hinted(p)
	regex.match(p.regex, _text)
}

block contains {
	"rule": sprintf("secrets.%v", [id]),
	"reason": sprintf("the result policy's secret pattern %v cannot be used, so no result can be checked for it", [id]),
} if {
	_within_cap
	some id, p in _patterns
	not _usable(p)
}

# METADATA
# title: Redact contributions
# description: |
#   Each usable pattern (not shadow) as a redaction with block_if_found, for
#   what this JSON text cannot show: the engine searches the documents it
#   decodes and blocks the result on a match.
# scope: document
redact contains {
	"rule": sprintf("secrets.%v", [id]),
	"pattern": p.regex,
	"block_if_found": true,
	"block_reason": _reason(p),
} if {
	_within_cap
	some id, p in _patterns
	_usable(p)
	not p.shadow == true
}

# METADATA
# title: Problems in the policy data, found at load
# description: |
#   One message per secret pattern whose regex or hints are not valid RE2 (the
#   schema checks their shape, not their syntax), and when the secrets section
#   is not a map. Evaluated once when the policy is loaded (data.mcp.load_errors).
# scope: document
load_errors contains sprintf("mcp_policy.results.secrets[%q]: %s", [id, problem]) if {
	is_object(_patterns)
	some id, p in _patterns
	some problem in _problems(p)
}

load_errors contains sprintf("mcp_policy.results.secrets must be a map of pattern id to pattern, got %s", [kind]) if {
	kind := type_name(_patterns) # undefined (no error) when the policy has no secrets
	kind != "object"
}

_problems(p) := {"must be a map with regex and description"} if {
	not is_object(p)
} else := {"regex is not a valid RE2 regular expression" | not _is_regex(p.regex)} | _hint_problems(p)

_hint_problems(p) := {"hints must be a non-empty list of RE2 regular expressions"} if {
	"hints" in object.keys(p)
	not _non_empty_array(p.hints)
} else := {sprintf("hints[%d] is not a valid RE2 regular expression", [i]) |
	some i, hint in p.hints
	not _is_regex(hint)
}

_non_empty_array(x) if {
	is_array(x)
	count(x) > 0
}
