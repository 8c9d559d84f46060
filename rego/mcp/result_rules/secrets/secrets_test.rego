package mcp.result_rules.secrets_test

import data.mcp.result_rules.secrets
import data.mcp.shipped_test

# The shipped secret patterns with the shipped policy data (given, never taken
# from whatever data is loaded), on results that carry credentials in every
# place a result can, and on near-misses that must pass.

_shipped := shipped_test.policy

# AWS's documented example credentials.
_key_id := "AKIAIOSFODNN7EXAMPLE"

_secret := "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

_call(result) := {
	"tool": {"server": "srv", "name": "read_file", "arguments": {}},
	"principal": {"session_id": "s-1", "roles": []},
	"request": {"id": "d-2", "time": "2025-06-18T12:00:00Z", "transport": "http"},
	"context": {},
	"result": result,
	"result_info": {"size_bytes": 1000, "max_bytes": 1048576},
}

_text(t) := {"content": [{"type": "text", "text": t}]}

_structured(value) := {"content": [{"type": "text", "text": json.marshal(value)}], "structuredContent": value}

# The rule ids of block contributions.
_ids(blocks) := {b.rule | some b in blocks}

_reason(what) := sprintf("the tool's result contains what looks like %s: it is not passed on", [what])

# --- access key ids -------------------------------------------------------------------

test_secrets_access_key_blocked_wherever_the_result_has_it if {
	every result in [
		_text(_key_id),
		_text(sprintf("[default]\naws_access_key_id = %s\n", [_key_id])),
		_text(sprintf("keys:\n%s\n%s", ["AKIAXXXXXXXXXXXXXXX1", _key_id])),
		_text(sprintf("\t%s\t", [_key_id])),
		_text(sprintf("<AccessKeyId>%s</AccessKeyId>", [_key_id])),
		_text(sprintf("key=%s&x=1", [_key_id])),
		_text(sprintf("'%s'", [_key_id])),
		_structured({"Credentials": {"AccessKeyId": _key_id}}),
		_structured({"a": [[{"b": [{"c": _key_id}]}]]}),
		_structured({_key_id: "as a key"}),
		{"content": [], "isError": true, "_meta": {"debug": _key_id}},
		{"content": [{"type": "resource", "resource": {"uri": "file:///x", "text": _key_id}}]},
		# JSON text inside a string, once and twice escaped.
		_text(json.marshal({"AccessKeyId": _key_id})),
		_text(json.marshal({"inner": json.marshal({"AccessKeyId": _key_id})})),
		_text(json.marshal({"lines": sprintf("id\n%s", [_key_id])})),
		# Every kind of key id.
		_text("ASIAIOSFODNN7EXAMPLE"),
		_text("ABIAIOSFODNN7EXAMPLE"),
		_text("ACCAIOSFODNN7EXAMPLE"),
		_text("AKIA0123456789ABCDEF"),
	] {
		_ids(secrets.block) == {"secrets.aws_access_key"} with data.mcp_policy as _shipped with input as _call(result)
	}
}

test_secrets_access_key_near_misses_pass if {
	every result in [
		_text("AKIAIOSFODNN7EXAMPL"), # 19 characters
		_text("AKIAIOSFODNN7EXAMPLEX"), # 21: part of a longer word
		_text("XAKIAIOSFODNN7EXAMPLE"),
		_text("1AKIAIOSFODNN7EXAMPLE"),
		_text("_AKIAIOSFODNN7EXAMPLE"),
		_text("AKIAIOSFODNN7EXAMPLE_"),
		_text("akiaiosfodnn7example"),
		_text("AKIAiosfodnn7example"),
		_text("AGPAIOSFODNN7EXAMPLE"), # a group's unique id, not a credential
		_text("AROAIOSFODNN7EXAMPLE"), # a role's unique id
		_text("AKIA IOSFODNN7EXAMPLE"),
		_structured({"UID": "1.2.840.113619.2.55.3.604688119.971.1287475185.411"}),
	] {
		_ids(secrets.block) == set() with data.mcp_policy as _shipped with input as _call(result)
	}
}

# --- secret access keys -----------------------------------------------------------------

test_secrets_secret_key_blocked_next_to_its_name if {
	every result in [
		_text(sprintf("aws_secret_access_key = %s", [_secret])),
		_text(sprintf("[default]\naws_secret_access_key=%s\nregion = us-east-1", [_secret])),
		_text(sprintf("export AWS_SECRET_ACCESS_KEY=%s", [_secret])),
		_text(sprintf("AWS_SECRET_ACCESS_KEY: \"%s\"", [_secret])),
		_text(sprintf("secret_key: %s", [_secret])),
		_text(sprintf("secret-key %s", [_secret])),
		_text(sprintf("Secret Key = %s", [_secret])),
		_text(sprintf("{'SecretAccessKey': '%s'}", [_secret])),
		_text(sprintf("<SecretAccessKey>%s</SecretAccessKey>", [_secret])),
		_structured({"Credentials": {"SecretAccessKey": _secret}}),
		_structured({"secretAccessKey": _secret}),
		_structured({"config": [{"aws": {"secret_key": _secret}}]}),
		{"content": [], "_meta": {"SecretKey": _secret}},
		# JSON text inside a string, once and twice escaped.
		_text(json.marshal({"SecretAccessKey": _secret})),
		_text(json.marshal({"inner": json.marshal({"SecretAccessKey": _secret})})),
		_text(json.marshal({"conf": sprintf("aws_secret_access_key =\n%s", [_secret])})),
		# Only base64 characters, any of them.
		_text("secret_key=0123456789/+ABCDEFGHIJKLMNOPQRSTUVWXYZab"),
	] {
		_ids(secrets.block) == {"secrets.aws_secret_key"} with data.mcp_policy as _shipped with input as _call(result)
	}
}

# A 40-character run is not enough: SHA-1 hashes, base64 data and DICOM values
# pass, and so does a name that is not next to a 40-character value.
test_secrets_secret_key_near_misses_pass if {
	sha1 := "da39a3ee5e6b4b0d3255bfef95601890afd80709"
	every result in [
		_text(_secret),
		_text(sprintf("sha1: %s", [sha1])),
		_structured({"checksum": sha1, "etag": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}),
		_structured({"secret_key_sha1": sha1}),
		_structured({"secret_key_id": "k-1", "note": _secret}),
		_text(sprintf("secret_key = %s", [substring(_secret, 0, 39)])), # 39 characters
		_text(sprintf("secret_key = %sA", [_secret])), # 41
		_text(sprintf("secret_key = %s=", [_secret])), # base64 padding: longer data
		_text(sprintf("secret_key = none; later: %s", [_secret])),
		_text(sprintf("the secret key is kept in a vault: %s", [sha1])),
		_text(sprintf("sEcReT_KeY = %s", [_secret])), # not one of the three casings
		_structured({"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012"}),
		_structured({"PixelDataChecksum": "3vE1cxb2Wn8uQ0Zl9yDhS4aTgk7pRmXoJfBiKqNc"}),
	] {
		_ids(secrets.block) == set() with data.mcp_policy as _shipped with input as _call(result)
	}
}

test_secrets_both_blocked_and_reasons_never_quote_them if {
	result := _text(sprintf("aws_access_key_id = %s\naws_secret_access_key = %s", [_key_id, _secret]))
	blocks := secrets.block with data.mcp_policy as _shipped with input as _call(result)
	blocks == {
		{"rule": "secrets.aws_access_key", "reason": _reason("an AWS access key id")},
		{"rule": "secrets.aws_secret_key", "reason": _reason("an AWS secret access key")},
	}
	d := data.mcp.result_decision with data.mcp_policy as _shipped with input as _call(result)
	d.action == "block"
	d.rule == "secrets.aws_access_key"
	d.reason == concat("; ", [_reason("an AWS access key id"), _reason("an AWS secret access key")])
	d.matched == ["secrets.aws_access_key", "secrets.aws_secret_key"]
	not contains(json.marshal(d), "IOSFODNN7")
	not contains(json.marshal(d), "EXAMPLEKEY")
}

test_secrets_blocked_whatever_the_tool_and_the_caller if {
	call := object.union(_call(_text(_key_id)), {
		"tool": {"server": "awslabs.healthimaging-mcp-server", "name": "get_image_set_metadata", "arguments": {}},
		"principal": {"session_id": "s-1", "roles": ["phi-reader", "admin"], "authenticated": true},
	})
	d := data.mcp.result_decision with data.mcp_policy as _shipped with input as call
	d.action == "block"
	d.rule == "secrets.aws_access_key"
}

test_secrets_results_of_any_shape_pass_when_clean if {
	every result in [null, true, 7, "text", [], {}, {"content": []}, _structured({"a": [1, {"b": null}]})] {
		_ids(secrets.block) == set() with data.mcp_policy as _shipped with input as _call(result)
	}
	every result in [["AKIAIOSFODNN7EXAMPLE"], "AKIAIOSFODNN7EXAMPLE"] {
		_ids(secrets.block) == {"secrets.aws_access_key"} with data.mcp_policy as _shipped with input as _call(result)
	}
}

# --- the size cap comes first ----------------------------------------------------------------

test_secrets_not_searched_when_over_the_cap_or_size_unknown if {
	every info in [{"size_bytes": 1048577, "max_bytes": 1048576}, {}, {"size_bytes": "10", "max_bytes": 100}] {
		call := json.patch(_call(_text(_key_id)), [{"op": "replace", "path": "/result_info", "value": info}])
		count(secrets.block) == 0 with data.mcp_policy as _shipped with input as call
		d := data.mcp.result_decision with data.mcp_policy as _shipped with input as call
		d.action == "block"
		d.matched == ["size.result_too_large"]
	}
}

# --- patterns from the data ------------------------------------------------------------------

_with_pattern(id, pattern) := json.patch(_shipped, [{
	"op": "add",
	"path": sprintf("/results/secrets/%s", [id]),
	"value": pattern,
}])

test_secrets_pattern_tried_only_when_a_hint_matches if {
	pattern := {"regex": "token-[0-9]{4}", "description": "a team token", "hints": ["token-", "TOKEN-"]}
	policy := _with_pattern("team_token", pattern)
	{b.rule | some b in secrets.block} == {"secrets.team_token"} with data.mcp_policy as policy
		with input as _call(_text("here: token-1234"))

	# A hint that does not match: the regex is not tried.
	policy2 := _with_pattern("team_token", object.union(pattern, {"hints": ["TOKEN-"]}))
	count(secrets.block) == 0 with data.mcp_policy as policy2 with input as _call(_text("here: token-1234"))

	# No hints: always tried.
	policy3 := _with_pattern("team_token", object.remove(pattern, ["hints"]))
	{b.rule | some b in secrets.block} == {"secrets.team_token"} with data.mcp_policy as policy3
		with input as _call(_text("here: token-1234"))
}

test_secrets_shadow_pattern_listed_not_enforced if {
	pattern := {"regex": "token-[0-9]{4}", "description": "a team token", "shadow": true}
	policy := _with_pattern("team_token", pattern)
	d := data.mcp.result_decision with data.mcp_policy as policy with input as _call(_text("token-1234"))
	d.action != "block"
	not "secrets.team_token" in d.matched
	d.shadow == [{"level": "block", "rule": "secrets.team_token", "reason": _reason("a team token")}]
}

# What the JSON text cannot show (inside base64 or gzip): each usable pattern,
# not shadow, goes to the engine as a redaction that blocks when it finds.
test_secrets_patterns_searched_by_the_engine_in_what_it_decodes if {
	d := data.mcp.result_decision with data.mcp_policy as _shipped with input as _call(_text("clean"))
	d.action == "redact"
	d.redactions == [
	{
		"rule": sprintf("secrets.%s", [id]),
		"pattern": _shipped.results.secrets[id].regex,
		"replacement": "[REDACTED]",
		"block_if_found": true,
		"block_reason": _reason(_shipped.results.secrets[id].description),
	} |
		some id in ["aws_access_key", "aws_secret_key"]
	]
	d.reason == "redact by rule secrets.aws_access_key"

	shadowed := _with_pattern("team_token", {"regex": "token-[0-9]{4}", "description": "a team token", "shadow": true})
	rules := {r.rule | some r in secrets.redact} with data.mcp_policy as shadowed with input as _call(_text("clean"))
	not "secrets.team_token" in rules
	"secrets.aws_access_key" in rules
}

test_secrets_not_searched_by_the_engine_when_over_the_cap if {
	over := object.union(_call(_text("clean")), {"result_info": {"size_bytes": 2, "max_bytes": 1}})
	count(secrets.redact) == 0 with data.mcp_policy as _shipped with input as over
}

test_secrets_generic_reason_when_description_unusable if {
	every description in ["", 7] {
		policy := _with_pattern("team_token", {"regex": "token", "description": description})
		blocks := secrets.block with data.mcp_policy as policy with input as _call(_text("token"))
		blocks == {{"rule": "secrets.team_token", "reason": _reason("a credential")}}
	}
}

# A pattern that cannot be used (data the load refuses) blocks every result it
# would search: it can never let a credential through.
test_secrets_unusable_pattern_blocks_every_result if {
	every pattern in [
		{"regex": "(", "description": "broken"},
		{"regex": "", "description": "empty"},
		{"regex": 7, "description": "not text"},
		{"description": "no regex"},
		{"regex": "token", "description": "bad hint", "hints": ["("]},
		{"regex": "token", "description": "no hints", "hints": []},
		{"regex": "token", "description": "hints not a list", "hints": "token"},
		"token",
	] {
		policy := _with_pattern("team_token", pattern)
		blocks := secrets.block with data.mcp_policy as policy with input as _call(_text("clean"))
		blocks == {{
			"rule": "secrets.team_token",
			"reason": "the result policy's secret pattern team_token cannot be used, so no result can be checked for it",
		}}
	}
}

test_secrets_load_errors_name_unusable_patterns if {
	policy := json.patch(_shipped, [
		{
			"op": "add",
			"path": "/results/secrets/broken",
			"value": {"regex": "(", "description": "x", "hints": ["ok", "[", "("]},
		},
		{"op": "add", "path": "/results/secrets/listed", "value": {"regex": "a", "description": "x", "hints": "a"}},
		{"op": "add", "path": "/results/secrets/text", "value": "token"},
	])
	errors := secrets.load_errors with data.mcp_policy as policy
	errors == {
		`mcp_policy.results.secrets["broken"]: regex is not a valid RE2 regular expression`,
		`mcp_policy.results.secrets["broken"]: hints[1] is not a valid RE2 regular expression`,
		`mcp_policy.results.secrets["broken"]: hints[2] is not a valid RE2 regular expression`,
		`mcp_policy.results.secrets["listed"]: hints must be a non-empty list of RE2 regular expressions`,
		`mcp_policy.results.secrets["text"]: must be a map with regex and description`,
	}
	all_errors := data.mcp.load_errors with data.mcp_policy as policy
	all_errors == {concat("", ["mcp.result_rules.secrets: ", e]) | some e in errors}
}

test_secrets_load_errors_when_section_not_a_map if {
	policy := json.patch(_shipped, [{"op": "replace", "path": "/results/secrets", "value": ["aws"]}])
	errors := secrets.load_errors with data.mcp_policy as policy
	errors == {"mcp_policy.results.secrets must be a map of pattern id to pattern, got array"}
}

test_secrets_no_load_errors_when_shipped_or_absent if {
	count(secrets.load_errors) == 0 with data.mcp_policy as _shipped
	count(secrets.load_errors) == 0 with data.mcp_policy as json.remove(_shipped, ["results"])
	count(data.mcp.load_errors) == 0 with data.mcp_policy as _shipped
}

test_secrets_nothing_blocked_when_the_policy_has_no_patterns if {
	every policy in [json.remove(_shipped, ["results"]), json.remove(_shipped, ["results/secrets"]), {}] {
		count(secrets.block) == 0 with data.mcp_policy as policy with input as _call(_text(_key_id))
	}
}
