# METADATA
# title: Outbound mail
# description: |
#   An example rule package of your own, written by `mcp-policy init`: what the
#   YAML in policies/ cannot say, because it looks at the call's arguments.
#   For send_email on the server "mail":
#     deny              outbound_mail.recipients_invalid: `to` is not a
#                       non-empty list of addresses
#     require_approval  outbound_mail.external_recipient: a recipient outside
#                       the company's own domains
#   Every package directly under data.mcp.rules adds its contributions to the
#   decision (the framework's data.mcp.decision folds them: deny >
#   require_approval > rate_limit > allow); the YAML rule for send_email (a
#   limit of 20 messages an hour per user) still applies.
package mcp.rules.outbound_mail

# The company's own mail domains: mail to these needs nobody's approval.
_internal_domains := {"example.com"}

_applies if {
	input.tool.server == "mail"
	input.tool.name == "send_email"
}

_recipients_valid if {
	is_array(input.tool.arguments.to)
	count(input.tool.arguments.to) > 0
	every address in input.tool.arguments.to {
		_is_address(address)
	}
}

_is_address(address) if {
	is_string(address)
	regex.match(`^[^@\s]+@[^@\s]+$`, address)
}

_domain(address) := lower(split(address, "@")[1])

_external contains address if {
	some address in input.tool.arguments.to
	_is_address(address)
	not _domain(address) in _internal_domains
}

# METADATA
# title: Deny contributions
# description: outbound_mail.recipients_invalid
# scope: document
deny contains {
	"rule": "outbound_mail.recipients_invalid",
	"reason": "send_email needs `to`: a non-empty list of mail addresses",
} if {
	_applies
	not _recipients_valid
}

# METADATA
# title: Approval contributions
# description: outbound_mail.external_recipient (the approval stays usable for an hour)
# scope: document
require_approval contains {
	"rule": "outbound_mail.external_recipient",
	"reason": sprintf("mail to someone outside the company needs approval: %s", [concat(", ", sort(_external))]),
	"ttl_seconds": 3600,
} if {
	_applies
	_recipients_valid
	count(_external) > 0
}
