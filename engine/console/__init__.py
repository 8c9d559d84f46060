"""The approvals console: server-rendered pages under /console of `mcp-policy serve`.

`routes.mount_console(app, runtime)` mounts it on the service's HTTP app (behind the same
Host/Origin guard). `session` keeps who is signed in (server-side, in memory), `pages`
renders the Jinja2 templates in `templates/` (autoescaped), `static/` holds the CSS and the
little JavaScript that enhances the plain forms (no build step, nothing from the internet).
Every rule of who may view, approve or deny is `engine.approver_auth`'s and the service's:
the pages call the same `DecisionService` functions as the API.
"""
