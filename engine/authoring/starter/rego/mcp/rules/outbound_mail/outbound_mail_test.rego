package mcp.rules.outbound_mail_test

import data.mcp.rules.outbound_mail

_send(to) := {
	"tool": {"server": "mail", "name": "send_email", "arguments": {"to": to, "subject": "Minutes"}},
	"principal": {"agent_id": "assistant", "session_id": "s-1", "user_id": "ana", "roles": []},
}

_rules(contributions) := {c.rule | some c in contributions}

test_mail_inside_the_company_needs_nothing if {
	count(outbound_mail.deny) == 0 with input as _send(["ana@example.com", "Bob@EXAMPLE.com"])
	count(outbound_mail.require_approval) == 0 with input as _send(["ana@example.com"])
}

test_mail_outside_the_company_needs_approval if {
	approvals := outbound_mail.require_approval with input as _send(["ana@example.com", "eve@elsewhere.org"])
	_rules(approvals) == {"outbound_mail.external_recipient"}
	some approval in approvals
	contains(approval.reason, "eve@elsewhere.org")
	not contains(approval.reason, "ana@example.com")
}

test_recipients_must_be_a_list_of_addresses if {
	every to in [null, "ana@example.com", [], ["not an address"], [42]] {
		_rules(outbound_mail.deny) == {"outbound_mail.recipients_invalid"} with input as _send(to)
		count(outbound_mail.require_approval) == 0 with input as _send(to)
	}
}

test_other_tools_and_servers_are_left_alone if {
	other_tool := json.patch(_send([]), [{"op": "replace", "path": "/tool/name", "value": "read_inbox"}])
	other_server := json.patch(_send([]), [{"op": "replace", "path": "/tool/server", "value": "chat"}])
	every call in [other_tool, other_server] {
		count(outbound_mail.deny) == 0 with input as call
		count(outbound_mail.require_approval) == 0 with input as call
	}
}
