"""A local Sphinx extension: emit each script once per page.

Sphinx 7.4 re-adds inline scripts registered by extensions (sphinx-thebe, sphinx-togglebutton) with
``filename=''`` next to the original ``filename=None`` copy; the two compare unequal, so the page
declares ``const THEBE_JS_URL`` twice and the browser reports a SyntaxError. We drop exact repeats.
"""


def _dedup(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for js in context.get("script_files", []):
        key = (str(getattr(js, "filename", js) or ""), tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    if "script_files" in context:
        context["script_files"][:] = unique


def setup(app):
    app.connect("html-page-context", _dedup, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
