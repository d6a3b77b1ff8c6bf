#!/usr/bin/env python3
"""A scripted "browser" acting as the user at the test OpenID provider (tests/tools/oidc).

System browser mode (what `$BROWSER` runs for `sekisho-client login`):

    oidc_browser.py [--ca FILE] --user alice --password PW [--rewrite-state VALUE]
                    [--save-callback FILE] [--no-consent] URL

starts at URL (the provider's authorization endpoint), fills and posts the login form, then the
consent form, and follows redirects until one leads to a loopback address
(http://127.0.0.1:PORT/..., localhost or [::1]): the native client's redirect URI. There, with
--rewrite-state it replaces the `state` query parameter, with --save-callback it writes that URL
(as it will be requested) to FILE, and then it GETs the URL (plain HTTP, no proxy, no redirect
followed) and prints the response body on stdout. --no-consent declines at the consent page
instead of allowing (the provider then redirects with error=access_denied).

Device mode:

    oidc_browser.py --device --code USER_CODE [--ca FILE] --user alice --password PW URL

opens URL (the verification_uri; with verification_uri_complete --code may be left out), enters
the user code, confirms it, signs in, consents and checks the provider's success page.

The user and password may also come from OIDC_USER and OIDC_PASSWORD, the CA file from OIDC_CA.
Cookies are kept in a jar; redirects are followed by hand; HTML forms are read with
html.parser. Proxies are ignored, each request times out after 10 s, and the walk stops after
30 steps. Progress goes to stderr. Exit status: 0 when the loopback URL answered (any HTTP
status, shown on stderr) or, in device mode, when the success page was shown; 1 with a message
naming what was seen otherwise (the provider's error page, "login refused: ...", ...); 2 for
usage errors. Standard library only.
"""

import argparse
import html.parser
import http.cookiejar
import ipaddress
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT = 10
MAX_STEPS = 30
USER_AGENT = "sekisho-test-browser/1 (oidc_browser.py)"


class Fail(Exception):
    """The walk ended without reaching its goal; the message says what was seen."""


def say(msg):
    print(f"oidc_browser: {msg}", file=sys.stderr, flush=True)


def short(url):
    """The URL without its query (codes and states stay out of logs)."""
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((u.scheme, u.netloc, u.path, "…" if u.query else "", ""))


def is_loopback_http(url):
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        return False
    if u.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(u.hostname).is_loopback
    except ValueError:
        return False


class Page(html.parser.HTMLParser):
    """Forms (with their fields and buttons), the title, error texts and the visible text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.forms = []
        self.title = ""
        self.errors = []
        self.text = []
        self._form = None
        self._skip = 0
        self._in = []
        self._error_depth = None
        self._select = None
        self._textarea = None

    BLOCKS = {"p", "div", "h1", "h2", "h3", "br", "li", "tr", "td", "form", "pre", "label",
              "button", "section", "body", "title"}

    def _space(self, tag):
        if tag in self.BLOCKS:
            self.text.append(" ")
            if self._error_depth is not None:
                self.errors[-1] += " "

    def handle_starttag(self, tag, attrs):
        a = {k: (v if v is not None else "") for k, v in attrs}
        self._space(tag)
        if tag in ("script", "style"):
            self._skip += 1
        if tag not in ("input", "br", "meta", "link", "img", "hr"):
            self._in.append(tag)
            cls = a.get("class", "").split()
            if self._error_depth is None and ("error" in cls or "red" in cls
                                              or a.get("id") == "error"):
                self._error_depth = len(self._in)
                self.errors.append("")
        if tag == "form":
            self._form = {"attrs": a, "fields": [], "buttons": []}
            self.forms.append(self._form)
        elif tag == "input":
            t = a.get("type", "text").lower()
            if t in ("submit", "image"):
                self._button(a)
            elif self._form is not None:
                self._form["fields"].append(a | {"type": t})
        elif tag == "button":
            if a.get("type", "submit").lower() == "submit":
                self._button(a)
        elif tag == "select" and self._form is not None:
            self._select = {"name": a.get("name"), "type": "select", "value": None, "first": None}
            self._form["fields"].append(self._select)
        elif tag == "option" and self._select is not None:
            v = a.get("value", "")
            if self._select["first"] is None:
                self._select["first"] = v
            if "selected" in a:
                self._select["value"] = v
        elif tag == "textarea" and self._form is not None:
            self._textarea = {"name": a.get("name"), "type": "textarea", "value": ""}
            self._form["fields"].append(self._textarea)

    def _button(self, a):
        # A button belongs to its enclosing form, or to the form its `form` attribute names.
        owner = a.get("form")
        if owner:
            a = a | {"_form_id": owner}
            for f in self.forms:
                if f["attrs"].get("id") == owner:
                    f["buttons"].append(a)
                    return
            self._pending_buttons = getattr(self, "_pending_buttons", []) + [a]
        elif self._form is not None:
            self._form["buttons"].append(a)

    def handle_endtag(self, tag):
        self._space(tag)
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        if tag == "form":
            self._form = None
        elif tag == "select":
            if self._select is not None and self._select["value"] is None:
                self._select["value"] = self._select["first"] or ""
            self._select = None
        elif tag == "textarea":
            self._textarea = None
        if tag in self._in:
            while self._in:
                t = self._in.pop()
                if self._error_depth is not None and len(self._in) < self._error_depth:
                    self._error_depth = None
                if t == tag:
                    break

    def handle_data(self, data):
        if self._skip:
            return
        if self._textarea is not None:
            self._textarea["value"] += data
        if self._in and self._in[-1] == "title":
            self.title += data
            return
        self.text.append(data)
        if self._error_depth is not None:
            self.errors[-1] += data

    def close(self):
        super().close()
        # Buttons placed before the form they name (rare).
        for a in getattr(self, "_pending_buttons", []):
            for f in self.forms:
                if f["attrs"].get("id") == a["_form_id"]:
                    f["buttons"].append(a)

    def visible_text(self, limit=400):
        t = " ".join("".join(self.text).split())
        return t if len(t) <= limit else t[:limit] + "…"

    def error_texts(self):
        return [e for e in (" ".join(x.split()) for x in self.errors) if e]


def form_fields(form):
    return {f.get("name"): f for f in form["fields"] if f.get("name")}


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Browser:
    def __init__(self, ca):
        ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPCookieProcessor(self.jar),
            urllib.request.HTTPSHandler(context=ctx),
            NoRedirect(),
        )
        self.steps = 0

    def request(self, method, url, data=None):
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise Fail(f"gave up after {MAX_STEPS} steps (last: {method} {short(url)})")
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, method=method, headers={
            "User-Agent": USER_AGENT,
            "Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8",
        })
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            resp = self.opener.open(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            resp = e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise Fail(f"{method} {short(url)} failed: {reason}") from None
        with resp:
            status = resp.status if hasattr(resp, "status") else resp.code
            headers = resp.headers
            try:
                content = resp.read()
            except OSError as e:
                raise Fail(f"{method} {short(url)}: reading the answer failed: {e}") from None
        say(f"{method} {short(url)} -> {status}")
        charset = headers.get_content_charset() or "utf-8"
        return status, headers, content.decode(charset, "replace")


def deliver(url):
    """GET the loopback redirect URI: plain HTTP, no proxy, no cookies, no redirect."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        resp = opener.open(req, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        resp = e
    except (urllib.error.URLError, OSError) as e:
        raise Fail(f"the loopback redirect {short(url)} could not be reached: "
                   f"{getattr(e, 'reason', e)}") from None
    with resp:
        status = resp.status if hasattr(resp, "status") else resp.code
        body = resp.read()
    say(f"GET {short(url)} (loopback) -> {status}")
    sys.stdout.write(body.decode("utf-8", "replace"))
    if body and not body.endswith(b"\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    return status


def rewrite_state(url, value):
    u = urllib.parse.urlsplit(url)
    q = [(k, value if k == "state" else v)
         for k, v in urllib.parse.parse_qsl(u.query, keep_blank_values=True)]
    if not any(k == "state" for k, _ in q):
        q.append(("state", value))
    return urllib.parse.urlunsplit(u._replace(query=urllib.parse.urlencode(q)))


def fill(form, page_url, values, button=None):
    """The request a browser makes when the form is submitted with `button`."""
    data = []
    for f in form["fields"]:
        name = f.get("name")
        if not name or "disabled" in f:
            continue
        t = f.get("type", "text")
        if t in ("checkbox", "radio"):
            if "checked" in f:
                data.append((name, f.get("value", "on")))
            continue
        if t in ("button", "reset", "file"):
            continue
        data.append((name, values.get(name, f.get("value", ""))))
    if button is not None and button.get("name"):
        data.append((button["name"], button.get("value", "")))
    action = urllib.parse.urljoin(page_url, button.get("formaction") if button is not None
                                  and button.get("formaction") else
                                  form["attrs"].get("action") or page_url)
    method = (form["attrs"].get("method") or "get").upper()
    if method == "GET":
        u = urllib.parse.urlsplit(action)
        return "GET", urllib.parse.urlunsplit(u._replace(query=urllib.parse.urlencode(data))), None
    return "POST", action, data


def plain_button(form):
    """The button a user presses to go on: not one named abort/cancel/deny."""
    for b in form["buttons"]:
        words = " ".join([b.get("name", ""), b.get("value", ""), b.get("id", "")]).lower()
        if not any(w in words for w in ("abort", "cancel", "deny")):
            return b
    return None


def action_path(form):
    return urllib.parse.urlsplit(form["attrs"].get("action") or "").path


def describe(status, page):
    what = "; ".join(page.error_texts()) or page.visible_text()
    title = " ".join(page.title.split())
    return f"status {status}, page {title!r}: {what}" if title else f"status {status}: {what}"


def walk(args):
    b = Browser(args.ca)
    start = urllib.parse.urlsplit(args.url)
    start_origin = (start.scheme, start.netloc)
    method, url, data = "GET", args.url, None
    done = set()  # what was submitted already: login, code, confirm, consent
    while True:
        if args.device is False and is_loopback_http(url) and \
                (urllib.parse.urlsplit(url).scheme, urllib.parse.urlsplit(url).netloc) != start_origin:
            return arrive(args, url)
        status, headers, text = b.request(method, url, data)
        if status in (301, 302, 303, 307, 308):
            loc = headers.get("Location")
            if not loc:
                raise Fail(f"redirect {status} without Location from {short(url)}")
            nxt = urllib.parse.urljoin(url, loc)
            if status in (307, 308):
                url = nxt
            else:
                method, url, data = "GET", nxt, None
            continue

        page = Page()
        page.feed(text)
        page.close()
        title = " ".join(page.title.split()).lower()

        if args.device and "success" in title and not page.forms:
            if "login" not in done:
                raise Fail(f"success page without a sign-in: {describe(status, page)}")
            print(page.visible_text())
            say("device sign-in finished: the provider showed its success page")
            return 0

        forms = page.forms
        login = next((f for f in forms if any(x.get("type") == "password" for x in f["fields"])),
                     None)
        code_input = next((f for f in forms if "user_code" in form_fields(f)
                           and form_fields(f)["user_code"].get("type") != "hidden"), None)
        confirm_code = next((f for f in forms if "confirm" in form_fields(f)
                             and "user_code" in form_fields(f)), None)
        consent = next((f for f in forms if action_path(f).endswith("/confirm")), None)
        abort = next((f for f in forms if action_path(f).endswith("/abort")), None)

        if login is not None:
            if "login" in done:
                raise Fail("login refused: " + describe(status, page))
            done.add("login")
            fields = form_fields(login)
            user_field = next((n for n in ("login", "username", "email") if n in fields), None)
            if user_field is None:
                raise Fail(f"a login form without a user field at {short(url)}")
            pw_field = next(n for n, f in fields.items() if f.get("type") == "password")
            method, url, data = fill(login, url, {user_field: args.user, pw_field: args.password},
                                     plain_button(login))
            continue
        if code_input is not None:
            if not args.device:
                raise Fail(f"a device user-code page in browser mode: {describe(status, page)}")
            if "code" in done:
                raise Fail("user code refused: " + describe(status, page))
            if not args.code:
                raise Fail("the provider asks for a user code and --code was not given")
            done.add("code")
            method, url, data = fill(code_input, url, {"user_code": args.code},
                                     plain_button(code_input))
            continue
        if confirm_code is not None:
            if "confirm" in done:
                raise Fail("device confirmation shown again: " + describe(status, page))
            done.add("confirm")
            # Only the Continue button: the page's Abort button is named abort.
            method, url, data = fill(confirm_code, url, {}, plain_button(confirm_code))
            continue
        if consent is not None:
            if "consent" in done:
                raise Fail("consent asked again: " + describe(status, page))
            done.add("consent")
            if args.no_consent:
                if abort is None:
                    raise Fail(f"--no-consent: no deny form on the consent page at {short(url)}")
                say("declining at the consent page (--no-consent)")
                method, url, data = fill(abort, url, {}, plain_button(abort) or
                                         (abort["buttons"] or [None])[0])
            else:
                method, url, data = fill(consent, url, {}, plain_button(consent))
            continue
        # A page that only posts itself on (response_mode=form_post, or the device page given a
        # user_code in its URL): one form of hidden fields.
        if len(forms) == 1 and all(f.get("type") == "hidden" for f in forms[0]["fields"]):
            f = forms[0]
            method, url, data = fill(f, url, {}, plain_button(f))
            if not args.device and method == "POST" and is_loopback_http(url):
                raise Fail(f"the provider posts the response to {short(url)} (response_mode="
                           "form_post): only redirects to the loopback address are followed")
            continue
        raise Fail(describe(status, page))


def arrive(args, url):
    if args.rewrite_state is not None:
        url = rewrite_state(url, args.rewrite_state)
        say("state rewritten (--rewrite-state)")
    if args.save_callback:
        with open(args.save_callback, "w", encoding="utf-8") as f:
            f.write(url + "\n")
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    if "error" in q:
        say(f"the provider redirected with error={q['error']}"
            + (f" ({q['error_description']})" if "error_description" in q else ""))
    status = deliver(url)
    if status >= 400:
        say(f"the loopback listener answered {status}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", metavar="URL")
    ap.add_argument("--ca", default=os.environ.get("OIDC_CA"),
                    help="CA file to trust for HTTPS (default $OIDC_CA, else the system's)")
    ap.add_argument("--user", default=os.environ.get("OIDC_USER"))
    ap.add_argument("--password", default=os.environ.get("OIDC_PASSWORD"))
    ap.add_argument("--rewrite-state", metavar="VALUE",
                    help="replace the state parameter of the loopback redirect")
    ap.add_argument("--save-callback", metavar="FILE",
                    help="write the loopback redirect URL to FILE")
    ap.add_argument("--no-consent", action="store_true",
                    help="decline at the consent page instead of allowing")
    ap.add_argument("--device", action="store_true",
                    help="device mode: URL is the verification_uri")
    ap.add_argument("--code", metavar="USER_CODE", help="the user code (device mode)")
    args = ap.parse_args(argv)
    if not args.user or args.password is None:
        ap.error("--user and --password (or OIDC_USER and OIDC_PASSWORD) are required")
    if args.code and not args.device:
        ap.error("--code goes with --device")
    try:
        return walk(args)
    except Fail as e:
        print(f"oidc_browser: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
