# METADATA
# title: Results over the size cap blocked
# description: |
#   Blocks a result larger than the cap: input.result_info.size_bytes (the
#   UTF-8 bytes of the result's compact JSON encoding, measured by the
#   engine) over input.result_info.max_bytes (the setting
#   MCP_POLICY_RESULT_MAX_BYTES, default 1048576). Fail closed: when either
#   field is missing, not a number or negative, the size is not known to be
#   within the cap and the result is blocked too (the same rule id, a reason
#   saying so).
package mcp.result_rules.size

_size := input.result_info.size_bytes

_cap := input.result_info.max_bytes

# Both numbers are there and make sense.
_measured if {
	is_number(_size)
	is_number(_cap)
	_size >= 0
	_cap >= 0
}

# METADATA
# title: Block contributions
# description: |
#   size.result_too_large: the result is over the cap, or its size or the
#   cap is not known (missing, not a number, negative).
# scope: document
block contains {
	"rule": "size.result_too_large",
	"reason": sprintf("the tool's result is %v bytes, over the cap of %v bytes", [_size, _cap]),
} if {
	_measured
	_size > _cap
}

block contains {
	"rule": "size.result_too_large",
	"reason": concat("", [
		"the tool's result size is not known (input.result_info.size_bytes and max_bytes ",
		"must be numbers >= 0), so it is blocked",
	]),
} if {
	not _measured
}
