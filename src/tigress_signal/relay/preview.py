"""The public preview page of a mailbox (``GET /v1/m/{id}``): OpenGraph tags, no script.

A messaging app fetches the share link (its fragment stripped by the HTTP client) to show a
card; a person who opens the link in a browser sees the same title and description. The page
carries no script and its Content-Security-Policy forbids any: the secret sits in the link's
fragment, and a script on this page could read it. Every value comes from the creator of the
mailbox and is HTML-escaped; the image URL is only named in a meta tag, never loaded by the page.
"""

from __future__ import annotations

import base64
import hashlib
import html

from starlette.responses import HTMLResponse

from tigress_signal.relay.entities import DisplayInformation

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f6;color:#1d1d24}"
    "main{max-width:34rem;margin:4rem auto;padding:2rem;background:#fff;border-radius:12px}"
    "h1{font-size:1.5rem;margin:0 0 .75rem}p{line-height:1.45}"
    ".note{color:#5a5a66;font-size:.9rem}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode("utf-8")).digest()).decode("ascii")

#: Nothing may load or run except the one inline style block above.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def preview_page(display: DisplayInformation, url: str) -> HTMLResponse:
    """The preview of a live mailbox.

    Args:
        display: the mailbox's display information.
        url: the share link without its fragment (``og:url``).
    """
    title = html.escape(display.title or "A shared credential")
    description = html.escape(display.description)
    meta = [
        f'<meta property="og:title" content="{title}">',
        f'<meta property="og:description" content="{description}">',
        '<meta property="og:type" content="website">',
        f'<meta property="og:url" content="{html.escape(url)}">',
    ]
    if display.image_url.startswith(("https://", "http://")):
        meta.append(f'<meta property="og:image" content="{html.escape(display.image_url)}">')
    body = (
        f"<h1>{title}</h1><p>{description}</p>"
        '<p class="note">Open this link in your wallet app to receive it. The part of the link '
        "after the # sign is the key; it never reaches this server.</p>"
    )
    return HTMLResponse(_page(title, "\n".join(meta), body), headers=SECURITY_HEADERS)


def missing_page() -> HTMLResponse:
    """The 404 page for a mailbox that does not exist, was deleted or has expired."""
    body = "<h1>Nothing here</h1><p>This share does not exist any more, or never did.</p>"
    return HTMLResponse(
        _page("Share not found", "", body), status_code=404, headers=SECURITY_HEADERS
    )


def _page(title: str, meta: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex, nofollow">\n'
        f"<title>{title}</title>\n{meta}\n<style>{_STYLE}</style></head>\n"
        f"<body><main>{body}</main></body></html>\n"
    )
