package mcp.result_rules.size_test

import data.mcp.result_rules.size
import data.mcp.shipped_test

_call(info) := {
	"tool": {"server": "srv", "name": "read_file", "arguments": {}},
	"principal": {"session_id": "s-1", "roles": []},
	"request": {"id": "d-2", "time": "2025-06-18T12:00:00Z", "transport": "grpc"},
	"context": {},
	"result": {"content": [{"type": "text", "text": "ok"}]},
	"result_info": info,
}

_unknown := {
	"rule": "size.result_too_large",
	"reason": concat("", [
		"the tool's result size is not known (input.result_info.size_bytes and max_bytes ",
		"must be numbers >= 0), so it is blocked",
	]),
}

test_size_passes_when_within_the_cap if {
	every info in [
		{"size_bytes": 0, "max_bytes": 1048576},
		{"size_bytes": 30000, "max_bytes": 1048576},
		{"size_bytes": 1048576, "max_bytes": 1048576},
		{"size_bytes": 0, "max_bytes": 0},
		{"size_bytes": 10.5, "max_bytes": 11},
	] {
		count(size.block) == 0 with input as _call(info)
	}
}

test_size_blocked_with_both_numbers_when_over_the_cap if {
	cases := [
		[{"size_bytes": 1048577, "max_bytes": 1048576}, "the tool's result is 1048577 bytes, over the cap of 1048576 bytes"],
		[
			{"size_bytes": 52428800, "max_bytes": 1048576},
			"the tool's result is 52428800 bytes, over the cap of 1048576 bytes",
		],
		[{"size_bytes": 1, "max_bytes": 0}, "the tool's result is 1 bytes, over the cap of 0 bytes"],
	]
	every case in cases {
		size.block == {{"rule": "size.result_too_large", "reason": case[1]}} with input as _call(case[0])
	}
}

# Fail closed: a size or cap that is missing or not usable blocks the result.
test_size_blocked_when_size_or_cap_unknown if {
	size.block == {_unknown} with input as {}
	size.block == {_unknown} with input as json.remove(_call({}), ["result_info"])
	every info in [
		{},
		{"size_bytes": 10},
		{"max_bytes": 1048576},
		{"size_bytes": "10", "max_bytes": 1048576},
		{"size_bytes": 10, "max_bytes": "1048576"},
		{"size_bytes": null, "max_bytes": 1048576},
		{"size_bytes": 10, "max_bytes": null},
		{"size_bytes": true, "max_bytes": 1048576},
		{"size_bytes": [10], "max_bytes": 1048576},
		{"size_bytes": -1, "max_bytes": 1048576},
		{"size_bytes": 10, "max_bytes": -1},
		"10",
		null,
	] {
		size.block == {_unknown} with input as _call(info)
	}
}

test_size_result_decision_blocks_whatever_else_matched if {
	call := object.union(_call({"size_bytes": 2000000, "max_bytes": 1048576}), {
		"tool": {"server": "awslabs.healthimaging-mcp-server", "name": "get_image_set_metadata"},
		"result": {"content": [{"type": "text", "text": "AKIAIOSFODNN7EXAMPLE"}]},
	})
	d := data.mcp.result_decision with data.mcp_policy as shipped_test.policy with input as call
	d.action == "block"
	d.rule == "size.result_too_large"
	d.reason == "the tool's result is 2000000 bytes, over the cap of 1048576 bytes"
	d.redactions == []
	d.matched == ["phi.dicom_patient", "size.result_too_large"]
}
